"""The original BAGEL's TaylorSeer step caching as a diffusers hook on the decoder's layer stack, one state per guidance
branch and per pipeline call.

Written here because no library implements BAGEL's variant: diffusers' `TaylorSeerCacheConfig` hook predicts module
outputs with its own schedule (warm-up, refresh interval, per-module states) and counts steps per module call, while the
original (`modeling/cache_utils/taylorseer.py` of ByteDance-Seed/Bagel) counts decoder-stack calls per guidance branch
and runs its own first-enhance / fresh-threshold schedule. It is built like diffusers' own hooks
(`diffusers/hooks/taylorseer_cache.py`): a stateful [`~diffusers.hooks.ModelHook`] whose `new_forward` either runs the
module or returns the predicted output.
"""

import contextlib
import math

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState


__all__ = ["TaylorSeerHook", "TaylorSeerState", "apply_taylorseer", "remove_taylorseer"]

_TAYLORSEER_HOOK = "bagel_taylorseer"


class TaylorSeerState(BaseState):
    """
    TaylorSeer of one guidance branch, as the original (`modeling/cache_utils/taylorseer.py` of ByteDance-Seed/Bagel):

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
        self.reset()

    def reset(self) -> None:
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


class TaylorSeerHook(ModelHook):
    """
    TaylorSeer on the decoder's layer stack (`BagelDecoderLayers`), one [`TaylorSeerState`] per guidance branch.

    The branches of a denoising step run together, `rows_per_branch` consecutive rows each, in forwards of branches of
    one step type: the pipeline asks [`~TaylorSeerHook.begin_step`] which branches run in full, then runs each group
    inside [`~TaylorSeerHook.branches`]. On a Taylor forward the hook returns the branches' predicted stack output and
    no layer runs; after a full forward it stores each branch's factors.
    """

    _is_stateful = True

    def __init__(self, rows_per_branch: int, first_enhance: int = 5, fresh_threshold: int = 3, max_order: int = 6):
        super().__init__()
        self.rows_per_branch = rows_per_branch
        self.state_kwargs = {"first_enhance": first_enhance, "fresh_threshold": fresh_threshold, "max_order": max_order}
        self.states: dict[str, TaylorSeerState] = {}
        self.running: list[TaylorSeerState] = []

    def begin_step(self, branches: list[str]) -> tuple[list[str], list[str]]:
        """Decides this step's type for each of `branches` (the ones that run); returns the branches whose stack runs
        in full and those predicted by their Taylor factors."""
        for branch in branches:
            self.states.setdefault(branch, TaylorSeerState(**self.state_kwargs)).begin_step()
        full = [branch for branch in branches if self.states[branch].is_full]
        return full, [branch for branch in branches if not self.states[branch].is_full]

    @contextlib.contextmanager
    def branches(self, branches: list[str]):
        """The next forward's rows belong to `branches`, in order (one step type, decided by `begin_step`)."""
        states = [self.states[branch] for branch in branches]
        if len({state.is_full for state in states}) != 1 or states[0].is_full is None:
            raise ValueError("A TaylorSeer forward takes branches whose step type is decided and equal.")
        self.running = states
        try:
            yield
        finally:
            self.running = []

    def end_step(self, branches: list[str]) -> None:
        for branch in branches:
            self.states[branch].end_step()

    def new_forward(self, module: torch.nn.Module, hidden_states: torch.Tensor, *args, **kwargs):
        if not self.running:
            raise ValueError("The TaylorSeer hook runs inside `hook.branches(...)` only (the pipeline's denoising).")
        if not self.running[0].is_full:
            predictions = [state.predict() for state in self.running]
            output = torch.cat(predictions) if len(predictions) > 1 else predictions[0]
            return output.to(hidden_states.dtype)
        output = self.fn_ref.original_forward(hidden_states, *args, **kwargs)
        for state, rows in zip(self.running, output.split(self.rows_per_branch)):
            state.store(rows)
        return output

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.states.clear()
        return module


def apply_taylorseer(layers: torch.nn.Module, rows_per_branch: int) -> TaylorSeerHook:
    """Registers a fresh [`TaylorSeerHook`] on the decoder's layer stack `layers` and returns it."""
    hook = TaylorSeerHook(rows_per_branch)
    HookRegistry.check_if_exists_or_initialize(layers).register_hook(hook, _TAYLORSEER_HOOK)
    return hook


def remove_taylorseer(layers: torch.nn.Module) -> None:
    """Removes the hook of [`apply_taylorseer`] from `layers`."""
    HookRegistry.check_if_exists_or_initialize(layers).remove_hook(_TAYLORSEER_HOOK, recurse=False)
