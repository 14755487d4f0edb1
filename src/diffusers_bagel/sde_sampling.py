# Copyright 2025 The bagel-hf authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Output class of [`BagelPipeline`]."""
"""The denoising loop's sampler: BAGEL's Euler steps, or Flow-GRPO's SDE steps with their log-probabilities, and the
trajectory a call returns for reinforcement learning."""

import math
from collections.abc import Iterable
from numbers import Integral, Real

import torch
from diffusers.utils import logging

from .scheduling_flow_match_euler import FlowMatchEulerScheduler


logger = logging.get_logger(__name__)  # pylint: disable=invalid-name

__all__ = ["DenoisingSampler", "check_sde_arguments"]


def check_sde_arguments(
    sde_noise_level,
    sde_steps,
    return_trajectory,
    num_inference_steps: int,
    step_cache: bool = False,
    guidance_parallel: bool = False,
) -> tuple[int, ...]:
    """
    Checks a call's stochastic-sampling arguments before any work and returns the SDE step indices (sorted; every
    step when `sde_steps` is `None` and `sde_noise_level > 0`, none when it is 0).

    `step_cache`: TaylorSeer or a diffusers step cache is on. Its velocities are approximations that training cannot
    recompute, so `return_trajectory=True` refuses it (SDE sampling alone works with it). `guidance_parallel`: the
    processes would draw different SDE noise, so `sde_noise_level > 0` is refused.
    """
    if not isinstance(sde_noise_level, Real) or isinstance(sde_noise_level, bool):
        raise ValueError(f"`sde_noise_level` must be a finite number >= 0, got {sde_noise_level!r}.")
    if not math.isfinite(sde_noise_level) or sde_noise_level < 0:
        raise ValueError(f"`sde_noise_level` must be a finite number >= 0, got {sde_noise_level!r}.")
    if not isinstance(return_trajectory, bool):
        raise ValueError(f"`return_trajectory` must be a bool, got {return_trajectory!r}.")
    if return_trajectory and step_cache:
        raise ValueError(
            "`return_trajectory=True` records log-probabilities of the velocities the model computes, but TaylorSeer "
            "(`enable_taylorseer=True`) and diffusers' step caches (`enable_cache`) replace some of them by "
            "approximations that training cannot recompute; turn the cache off for these calls."
        )
    if sde_noise_level > 0 and guidance_parallel:
        raise ValueError(
            "`sde_noise_level > 0` draws noise on every step, which the processes of guidance parallelism would draw "
            "differently; run SDE sampling without it (`pipe.disable_guidance_parallel()`)."
        )
    if sde_steps is None:
        return tuple(range(num_inference_steps)) if sde_noise_level > 0 else ()
    if sde_noise_level == 0:
        raise ValueError("`sde_steps` needs `sde_noise_level > 0`: with noise level 0 every step is the Euler step.")
    if not isinstance(sde_steps, Iterable) or isinstance(sde_steps, (str, bytes)):
        raise ValueError(f"`sde_steps` must be a list of step indices, got {sde_steps!r}.")
    steps = list(sde_steps)
    bad = [s for s in steps if not isinstance(s, Integral) or isinstance(s, bool) or not 0 <= s < num_inference_steps]
    if bad or not steps:
        raise ValueError(
            f"`sde_steps` must be a non-empty list of step indices in [0, {num_inference_steps}), got {sde_steps!r}."
        )
    if len(set(steps)) != len(steps):
        raise ValueError(f"`sde_steps` lists a step twice: {sde_steps!r}.")
    return tuple(sorted(int(s) for s in steps))


class DenoisingSampler:
    """
    One call's denoising steps: the scheduler's Euler step, or its SDE step (`sde_step`, Flow-GRPO's sampler) on the
    steps in `sde_steps`, and, with `record=True`, the trajectory and the SDE steps' log-probabilities.

    Without noise and recording, [`~DenoisingSampler.step`] is `scheduler.step` and nothing is kept (the default call
    costs nothing more). The noise comes from the call's `generator`, after the initial latents (and the VAE posterior
    samples of `sample_posterior`), so a seeded call reproduces.

    Args:
        scheduler ([`FlowMatchEulerScheduler`]): the call's scheduler, its timesteps set.
        latents (`torch.Tensor`): the initial packed latents `(batch, num_tokens, channels)`.
        noise_level (`float`): the SDE's noise level (`sde_step`'s `noise_level`); 0 runs Euler steps only.
        sde_steps (`tuple[int, ...]`): the step indices that run the SDE, from [`check_sde_arguments`].
        generator (`torch.Generator` or list, *optional*): the call's generator.
        record (`bool`): keep the trajectory and the log-probabilities.
    """

    def __init__(
        self,
        scheduler: FlowMatchEulerScheduler,
        latents: torch.Tensor,
        noise_level: float,
        sde_steps: tuple[int, ...],
        generator: torch.Generator | list[torch.Generator] | None = None,
        record: bool = False,
    ):
        self.scheduler = scheduler
        self.noise_level = float(noise_level)
        self.sde_steps = frozenset(sde_steps) if noise_level > 0 else frozenset()
        self.generator = generator
        self.record = record
        self.trajectory = [latents] if record else None
        self.log_probs = []
        self.steps_run = []

    def step(self, index: int, velocity: torch.Tensor, timestep: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Step `index` from `latents` with the (guided) `velocity`; returns the next latents."""
        if self.record:
            self._check_unchanged(index, latents)
        if index not in self.sde_steps:
            latents = self.scheduler.step(velocity, timestep, latents, return_dict=False)[0]
        else:
            latents, log_prob, _, _ = self.scheduler.sde_step(
                velocity, timestep, latents, self.noise_level, generator=self.generator, return_dict=False
            )
            if self.record:
                self.log_probs.append(log_prob)
                self.steps_run.append(index)
        if self.record:
            self.trajectory.append(latents)
        return latents

    def _check_unchanged(self, index: int, latents: torch.Tensor) -> None:
        """A step callback must not replace the recorded latents: the log-probabilities are those of the sampler's
        own draws."""
        last = self.trajectory[-1]
        if latents is not last and not torch.equal(latents, last):
            raise ValueError(
                f"`callback_on_step_end` replaced the latents before step {index}; with `return_trajectory=True` "
                "the trajectory and its log-probabilities must be the sampler's own."
            )

    def outputs(self, latents: torch.Tensor) -> dict:
        """The fields of [`BagelPipelineOutput`] this sampler adds: none without recording; otherwise `trajectory`
        (packed latents `(num_steps_run + 1, batch, num_tokens, channels)`, float32, on the call's device), `log_probs`
        (`(num_sde_steps_run, batch)` float32, `None` when no SDE step ran), `timesteps` (`(num_steps_run,)`, the
        timesteps of the steps run) and `sde_steps` (the indices of the SDE steps run, in order)."""
        if not self.record:
            return {}
        self._check_unchanged(len(self.trajectory) - 1, latents)
        num_steps_run = len(self.trajectory) - 1
        return {
            "trajectory": torch.stack(self.trajectory),
            "log_probs": torch.stack(self.log_probs) if self.log_probs else None,
            "timesteps": self.scheduler.timesteps[:num_steps_run].clone(),
            "sde_steps": tuple(self.steps_run),
        }
