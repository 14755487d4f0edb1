"""The original BAGEL's TaylorSeer step caching, one state per guidance branch and per pipeline call.

Written here because no library implements BAGEL's variant: diffusers' `TaylorSeerCacheConfig` hook predicts module
outputs with its own schedule (warm-up, refresh interval, per-module states) and counts steps per module call, while the
original counts decoder-stack calls per guidance branch and runs its own first-enhance / fresh-threshold schedule.
"""

import math

import torch

from transformers_bagel import BagelStepCache


__all__ = ["TaylorSeerState", "TaylorSeerStepCache"]


class TaylorSeerState:
    """
    TaylorSeer of one guidance branch, as the original (`modeling/cache_utils/taylorseer.py`, SPEC.md section 5):

    - the branch's decoder stack runs in full on its first `first_enhance` (5) calls and then on every
      `fresh_threshold`-th (3rd) call; on the others ("Taylor" steps) its output is predicted;
    - a full step stores the stack output `f0` and, from the 5th call on, finite differences of the previous full step's
      factors, `f(i+1) = (f(i)_new - f(i)_old) / d` up to order `max_order` (6), with `d` the distance in calls
      between the two full steps;
    - a Taylor step predicts `sum_i f(i) x**i / i!` with `x` the calls since the last full step.

    The original keeps factors per decoder layer, but every layer's Taylor output replaces its input, so only the last
    layer's factors reach the output: this state keeps those (the stack's output before the final norm), which gives
    the same numbers with one layer's memory instead of all of them.

    Counting is per branch: a branch that does not run at a step (outside `cfg_interval`) does not advance.
    """

    def __init__(self, first_enhance: int = 5, fresh_threshold: int = 3, max_order: int = 6):
        self.first_enhance = first_enhance
        self.fresh_threshold = fresh_threshold
        self.max_order = max_order
        self.step = 0
        self.activated_steps = [0]
        self.cache_counter = 0
        self.factors: dict[int, torch.Tensor] = {}
        self.is_full: bool | None = None

    def begin_step(self) -> bool:
        """Decides this call's type (the original's `cal_type`); returns True when the stack must run in full."""
        if self.step < self.first_enhance or self.cache_counter == self.fresh_threshold - 1:
            self.is_full = True
            self.cache_counter = 0
            self.activated_steps.append(self.step)
        else:
            self.is_full = False
            self.cache_counter += 1
        return self.is_full

    def store(self, output: torch.Tensor) -> None:
        """After a full call: the new Taylor factors from the stack output (the original's `derivative_approximation`)."""
        distance = self.activated_steps[-1] - self.activated_steps[-2]
        factors = {0: output}
        for order in range(self.max_order):
            if order not in self.factors or self.step <= self.first_enhance - 2:
                break
            factors[order + 1] = (factors[order] - self.factors[order]) / distance
        self.factors = factors

    def predict(self) -> torch.Tensor:
        """The stack output of a Taylor call (the original's `taylor_formula`)."""
        x = self.step - self.activated_steps[-1]
        output = 0
        for order, factor in self.factors.items():
            output = output + (1 / math.factorial(order)) * factor * (x**order)
        return output

    def end_step(self) -> None:
        self.step += 1


class TaylorSeerStepCache(BagelStepCache):
    """
    The [`BagelStepCache`] of one denoising forward whose rows belong to several branches of the same type this step
    (all full or all Taylor): `rows_per_branch` consecutive rows per state, in order.
    """

    def __init__(self, states: list[TaylorSeerState], rows_per_branch: int):
        kinds = {state.is_full for state in states}
        if len(kinds) != 1 or None in kinds:
            raise ValueError("A TaylorSeer forward takes branches whose step type is decided and equal.")
        self.states = states
        self.rows_per_branch = rows_per_branch

    def cached_output(self) -> torch.Tensor | None:
        if self.states[0].is_full:
            return None
        predictions = [state.predict() for state in self.states]
        return torch.cat(predictions) if len(predictions) > 1 else predictions[0]

    def store(self, output: torch.Tensor) -> None:
        for state, rows in zip(self.states, output.split(self.rows_per_branch)):
            state.store(rows)
