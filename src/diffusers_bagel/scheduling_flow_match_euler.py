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
"""BAGEL's flow-matching Euler schedule and its dual classifier-free-guidance combination."""

import math
from dataclasses import dataclass
from numbers import Real
from typing import Literal

import numpy as np
import torch
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
# diffusers' loader finds a component's base class by name in the module `model_index.json` points at.
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor

from .defaults import CFG_RENORM_TYPES


logger = logging.get_logger(__name__)  # pylint: disable=invalid-name

__all__ = ["CFG_RENORM_TYPES", "FlowMatchEulerScheduler", "FlowMatchEulerSDEStepOutput"]


def _is_real(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_shift(name: str, value) -> float:
    if not _is_real(value) or not math.isfinite(value) or not value > 0:
        raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}.")
    return float(value)


@dataclass
class FlowMatchEulerSDEStepOutput(BaseOutput):
    """
    Output of [`~FlowMatchEulerScheduler.sde_step`].

    Args:
        prev_sample (`torch.Tensor`):
            The sample at the next (lower) flow time, shaped like `sample`, in `model_output`'s dtype (the drawn one,
            or the given `prev_sample`).
        log_prob (`torch.Tensor` or `None`):
            `(batch,)` float32: the Gaussian log-density of `prev_sample` under the transition, summed over each
            sample's elements. `None` when `noise_level == 0` (the Euler step is deterministic).
        prev_sample_mean (`torch.Tensor`):
            The transition's mean, float32 (the Euler step itself when `noise_level == 0`).
        std_dev (`torch.Tensor` or `None`):
            The transition's standard deviation `sigma_t * sqrt(sigma - sigma_next)`, float32, a scalar or one per
            sample shaped to broadcast against `sample`; `None` when `noise_level == 0`.
    """

    prev_sample: torch.Tensor
    log_prob: torch.Tensor | None
    prev_sample_mean: torch.Tensor
    std_dev: torch.Tensor | None


class FlowMatchEulerScheduler(FlowMatchEulerDiscreteScheduler):
    """
    BAGEL's Euler sampler for rectified flow, as a [`FlowMatchEulerDiscreteScheduler`] with BAGEL's default schedule.

    For `N` inference steps the sigmas are `t = linspace(1, 0, N + 1)[:-1]`, shifted to `t' = s t / (1 + (s - 1) t)`,
    followed by a terminal sigma of 0, and `timesteps = sigmas[:-1] * num_train_timesteps`. BAGEL's model predicts
    the velocity `v = noise - data`, so [`~FlowMatchEulerDiscreteScheduler.step`] computes
    `x_next = x + (sigma_next - sigma) * v`, which is BAGEL's `x - v * dt`. (BAGEL's own `num_timesteps=N` argument
    gives `N - 1` Euler steps; here `num_inference_steps` is the number of steps.)

    The scheduler also carries BAGEL's guidance rules: [`~FlowMatchEulerScheduler.cfg_active`] (the guidance interval)
    and [`~FlowMatchEulerScheduler.apply_guidance`] (text and image classifier-free guidance with renormalisation).

    Everything else, including the configuration, is the parent's: the config is a `FlowMatchEulerDiscreteScheduler`
    config whose `shift` (BAGEL's `timestep_shift`) defaults to 3.0, so the two classes load each other's configs
    with [`~ConfigMixin.from_config`], and passing `sigmas=`, `timesteps=` or `mu=` to `set_timesteps` behaves as in
    the parent.

    Args:
        num_train_timesteps (`int`, defaults to 1000):
            Scale between sigmas in `[0, 1]` and the timesteps handed to the model (`timesteps = sigmas * 1000`).
        shift (`float`, defaults to 3.0):
            BAGEL's `timestep_shift` `s`, used unless `set_timesteps` gets its own `timestep_shift`.
        The other arguments are [`FlowMatchEulerDiscreteScheduler`]'s (`use_dynamic_shifting`, `use_karras_sigmas`,
        `stochastic_sampling`, ...), in its order and with its defaults, which reproduce BAGEL: the config has the
        parent's keys.
    """

    _compatibles = ["FlowMatchEulerDiscreteScheduler"]
    order = 1

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 3.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: Literal["exponential", "linear"] = "exponential",
        stochastic_sampling: bool = False,
    ):
        if not _is_positive_int(num_train_timesteps):
            raise ValueError(f"`num_train_timesteps` must be a positive int, got {num_train_timesteps!r}.")
        _check_shift("shift", shift)
        # Not decorated with `register_to_config`: the parent's `__init__` registers the config, and every argument is
        # passed to it by name, so none is recorded as a default that `from_config` may replace with the loading
        # class's own (BAGEL's `shift` travels with the config into a `FlowMatchEulerDiscreteScheduler`).
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            shift=shift,
            use_dynamic_shifting=use_dynamic_shifting,
            base_shift=base_shift,
            max_shift=max_shift,
            base_image_seq_len=base_image_seq_len,
            max_image_seq_len=max_image_seq_len,
            invert_sigmas=invert_sigmas,
            shift_terminal=shift_terminal,
            use_karras_sigmas=use_karras_sigmas,
            use_exponential_sigmas=use_exponential_sigmas,
            use_beta_sigmas=use_beta_sigmas,
            time_shift_type=time_shift_type,
            stochastic_sampling=stochastic_sampling,
        )

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        *,
        timestep_shift: float | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
        timesteps: list[float] | None = None,
    ):
        """
        Sets BAGEL's shifted schedule for `num_inference_steps` Euler steps (to be run before inference).

        Args:
            num_inference_steps (`int`, *optional*):
                The number of Euler steps (model evaluations). Required unless `sigmas` or `timesteps` is given.
            device (`str` or `torch.device`, *optional*):
                The device the timesteps and sigmas are moved to. If `None`, they stay on the CPU.
            timestep_shift (`float`, *optional*):
                The shift `s` of `t' = s t / (1 + (s - 1) t)` for this schedule only. Defaults to the scheduler's
                shift (`config.shift`, or the value given to `set_shift`).
            sigmas (`list[float]`, *optional*):
                Custom unshifted sigmas, one per step, as in [`FlowMatchEulerDiscreteScheduler.set_timesteps`].
            mu (`float`, *optional*):
                Resolution-dependent shift, only with `use_dynamic_shifting=True` (as in the parent).
            timesteps (`list[float]`, *optional*):
                Custom timesteps, as in [`FlowMatchEulerDiscreteScheduler.set_timesteps`].
        """
        if timestep_shift is not None:
            timestep_shift = _check_shift("timestep_shift", timestep_shift)
            if self.config.use_dynamic_shifting:
                raise ValueError(
                    "`timestep_shift` cannot be combined with `use_dynamic_shifting=True`; the shift then comes "
                    "from `mu`."
                )
        if num_inference_steps is not None and not _is_positive_int(num_inference_steps):
            raise ValueError(f"`num_inference_steps` must be a positive int, got {num_inference_steps!r}.")
        if sigmas is None and timesteps is None:
            if num_inference_steps is None:
                raise ValueError("Pass `num_inference_steps` (or custom `sigmas` / `timesteps`).")
            # BAGEL's unshifted grid: 1, (N-1)/N, ..., 1/N (the terminal 0 is appended by the parent).
            sigmas = np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1]

        if timestep_shift is None:
            super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu, timesteps=timesteps)
            return
        # A shift for this schedule only: the parent shifts by `self.shift`, set through its own `set_shift`.
        shift = self.shift
        self.set_shift(timestep_shift)
        try:
            super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu, timesteps=timesteps)
        finally:
            self.set_shift(shift)

    def sde_step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        noise_level: float,
        generator: torch.Generator | list[torch.Generator] | None = None,
        prev_sample: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> FlowMatchEulerSDEStepOutput | tuple:
        r"""
        One step of the stochastic sampler whose marginals are the flow ODE's (Flow-GRPO, Liu et al. 2025), with the
        Gaussian log-probability of the transition.

        With BAGEL's flow `x_t = (1 - t) x_0 + t noise` and velocity `v = noise - x_0`, the score is
        `-(x_t + (1 - t) v) / t`, and adding `sigma_t^2 / 2` times the score to the drift of the reverse-time
        process (with a diffusion `sigma_t dW`) keeps every marginal. For `dt = sigma_next - sigma < 0`:

            mean = x + dt * (v + sigma_t^2 / (2 t) * (x + (1 - t) v)),    std = sigma_t * sqrt(-dt),
            sigma_t = noise_level * sqrt(t / (1 - t)),

        where at `t = 1` the denominator uses the second sigma of the schedule instead (`1 - sigmas[1]`), as
        Flow-GRPO does, so the first step's noise is finite.

        Two uses:
        - sampling (`prev_sample=None`): draws `prev_sample = mean + std * noise` (noise from `generator`) and, like
          [`~FlowMatchEulerDiscreteScheduler.step`], takes the step from the scheduler's step index and advances it,
          so `step` and `sde_step` can be mixed in one loop;
        - scoring (`prev_sample` given, e.g. a stored transition recomputed under the current policy in training):
          the step is located from `timestep` (one of `timesteps`, or one per sample), the scheduler's step index is
          neither used nor changed, and gradients flow through `model_output` into `log_prob` and `prev_sample_mean`.

        With `noise_level == 0` the SDE is the flow ODE: sampling returns `step(...)`'s result bit for bit, with
        `log_prob=None` and `std_dev=None`; scoring a `prev_sample` is refused (a deterministic step has no density).

        Args:
            model_output (`torch.Tensor`):
                The (guided) velocity `noise - data` predicted at `sample`, shaped like `sample`.
            timestep (`float` or `torch.Tensor`):
                The current timestep, one of `timesteps`; when scoring, a tensor of one timestep per sample works too.
            sample (`torch.Tensor`):
                The current sample, `(batch, ...)`.
            noise_level (`float`):
                Flow-GRPO's `a` in `sigma_t = a * sqrt(t / (1 - t))`, a finite number `>= 0` (0.7 in Flow-GRPO).
            generator (`torch.Generator` or a list of one per sample, *optional*):
                The generator of the step's noise (sampling only).
            prev_sample (`torch.Tensor`, *optional*):
                A sample at the next flow time to score instead of drawing one.
            return_dict (`bool`, defaults to `True`):
                Return a [`FlowMatchEulerSDEStepOutput`] instead of a tuple.

        Returns:
            [`FlowMatchEulerSDEStepOutput`] or `tuple`: `(prev_sample, log_prob, prev_sample_mean, std_dev)`.
        """
        if not _is_real(noise_level) or not math.isfinite(noise_level) or noise_level < 0:
            raise ValueError(f"`noise_level` must be a finite number >= 0, got {noise_level!r}.")
        if model_output.shape != sample.shape:
            raise ValueError(
                f"`model_output` has shape {tuple(model_output.shape)}, but `sample` has {tuple(sample.shape)}."
            )
        scoring = prev_sample is not None
        if scoring and prev_sample.shape != sample.shape:
            raise ValueError(
                f"`prev_sample` has shape {tuple(prev_sample.shape)}, but `sample` has {tuple(sample.shape)}."
            )
        if scoring and generator is not None:
            raise ValueError("`generator` draws a new sample; it cannot be combined with a given `prev_sample`.")
        if getattr(self, "num_inference_steps", None) is None:
            raise ValueError("Run `set_timesteps` before `sde_step`.")

        if noise_level == 0:
            if scoring:
                raise ValueError(
                    "With `noise_level=0` the step is the deterministic Euler step, whose `log_prob` is undefined; "
                    "score transitions with the `noise_level` they were sampled with (> 0)."
                )
            euler = self.step(model_output, timestep, sample, return_dict=False)[0]
            output = (euler, None, euler, None)
            return FlowMatchEulerSDEStepOutput(*output) if return_dict else output

        if scoring:
            index = self._indices_of_timesteps(timestep, sample)
            shape = (-1,) + (1,) * (sample.ndim - 1)
            sigma = self.sigmas[index].to(sample.device).view(shape)
            sigma_next = self.sigmas[index + 1].to(sample.device).view(shape)
        else:
            if self.step_index is None:
                self._init_step_index(timestep)
            sigma = self.sigmas[self.step_index].to(sample.device)
            sigma_next = self.sigmas[self.step_index + 1].to(sample.device)

        x = sample.float()
        v = model_output.float()
        dt = sigma_next - sigma
        # Flow-GRPO's noise schedule; at t = 1, 1 - t is replaced by 1 - sigmas[1] (finite noise on the first step).
        sigma_max = self.sigmas[1].to(sample.device)
        noise_scale = noise_level * torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma)))
        mean = x + dt * (v + noise_scale**2 / (2 * sigma) * (x + (1 - sigma) * v))
        std_dev = noise_scale * torch.sqrt(-dt)

        if scoring:
            prev_sample = prev_sample.to(model_output.dtype)
        else:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=torch.float32)
            prev_sample = (mean + std_dev * noise).to(model_output.dtype)
            self._step_index += 1
        # The log-density of the returned sample (as stored), summed over each sample's elements.
        log_density = (
            -((prev_sample.float() - mean) ** 2) / (2 * std_dev**2) - torch.log(std_dev) - 0.5 * math.log(2 * math.pi)
        )
        log_prob = log_density.sum(dim=tuple(range(1, sample.ndim)))
        output = (prev_sample, log_prob, mean, std_dev)
        return FlowMatchEulerSDEStepOutput(*output) if return_dict else output

    def _indices_of_timesteps(self, timestep: float | torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The schedule index of `timestep` (one, or one per sample of `sample`); refused if not in `timesteps`."""
        wanted = torch.as_tensor(timestep, dtype=self.timesteps.dtype).to(self.timesteps.device).reshape(-1)
        if wanted.numel() not in (1, sample.shape[0]):
            raise ValueError(
                f"`timestep` must be one value or one per sample ({sample.shape[0]}), got {wanted.numel()} values."
            )
        matches = wanted[:, None] == self.timesteps[None, :]
        found = matches.any(dim=1)
        if not bool(found.all()):
            missing = wanted[~found].tolist()
            raise ValueError(f"`timestep` {missing} is not one of the scheduler's `timesteps`.")
        return matches.int().argmax(dim=1).to(self.sigmas.device)

    @staticmethod
    def cfg_active(sigma: float | torch.Tensor, cfg_interval: tuple[float, float] | list[float]) -> bool:
        """
        Whether guidance applies at this step: BAGEL guides iff `cfg_interval[0] < sigma <= cfg_interval[1]`.

        Args:
            sigma (`float` or `torch.Tensor`):
                The flow time of the current step in `[0, 1]` (`scheduler.sigmas[i]`, 1 = pure noise), not the
                timestep scaled by `num_train_timesteps`.
            cfg_interval (`tuple[float, float]`):
                `(low, high)`; the lower end is excluded, the upper end included.

        Returns:
            `bool`: `True` when the guidance scales apply, `False` when they are all 1 for this step.
        """
        if len(cfg_interval) != 2:
            raise ValueError(f"`cfg_interval` must be a pair (low, high), got {cfg_interval!r}.")
        if isinstance(sigma, torch.Tensor):
            if sigma.numel() != 1:
                raise ValueError(f"`sigma` must be a scalar, got a tensor of shape {tuple(sigma.shape)}.")
            sigma = sigma.item()
        low, high = (float(bound) for bound in cfg_interval)
        return bool(low < float(sigma) <= high)

    @staticmethod
    def apply_guidance(
        v_cond: torch.Tensor,
        v_uncond_text: torch.Tensor | None = None,
        v_uncond_image: torch.Tensor | None = None,
        cfg_text_scale: float = 1.0,
        cfg_img_scale: float = 1.0,
        cfg_renorm_type: str = "global",
        cfg_renorm_min: float = 0.0,
    ) -> torch.Tensor:
        """
        Combines BAGEL's velocity predictions with text and image classifier-free guidance.

        With `v` = `v_cond`, `v_t` = `v_uncond_text`, `v_i` = `v_uncond_image`, `s_t` = `cfg_text_scale`,
        `s_i` = `cfg_img_scale` and `r(a, b) = clamp(||a|| / (||b|| + 1e-8), cfg_renorm_min, 1)`:

        - `"text_channel"`: `u = v_t + s_t (v - v_t)`, `u = u * r(v, u)` per token, then
          `v_i + s_i (u - v_i)` if `s_i > 1`. The renorm comes before the image guidance and not after it.
        - `"global"` / `"channel"`: `u = v_t + s_t (v - v_t)`, then `u = v_i + s_i (u - v_i)` if `s_i > 1`, then
          `u * r(v, u)`. `"channel"` takes norms per token; `"global"` takes one norm per image (over tokens and
          channels of each batch element, which is BAGEL's whole-tensor norm for a single image).

        Image guidance is only applied together with text guidance: if `cfg_text_scale <= 1`, `v_cond` is returned
        unchanged whatever `cfg_img_scale` is.

        Args:
            v_cond (`torch.Tensor`):
                Velocity with the full context, `(batch, num_tokens, channels)` or unbatched `(num_tokens, channels)`.
            v_uncond_text (`torch.Tensor`, *optional*):
                Velocity without the text condition (BAGEL's `cfg_text` context), same shape. Required if
                `cfg_text_scale > 1`.
            v_uncond_image (`torch.Tensor`, *optional*):
                Velocity without the image condition (BAGEL's `cfg_img` context), same shape. Required if both
                scales are > 1.
            cfg_text_scale (`float`, defaults to 1.0):
                Text guidance scale; `<= 1` disables all guidance.
            cfg_img_scale (`float`, defaults to 1.0):
                Image guidance scale; `<= 1` disables image guidance.
            cfg_renorm_type (`str`, defaults to `"global"`):
                One of `"global"`, `"channel"`, `"text_channel"`.
            cfg_renorm_min (`float`, defaults to 0.0):
                Lower clamp of the renormalisation factor (the upper clamp is 1).

        Returns:
            `torch.Tensor`: the guided velocity, shaped like `v_cond`.
        """
        if cfg_renorm_type not in CFG_RENORM_TYPES:
            raise ValueError(f"`cfg_renorm_type` must be one of {list(CFG_RENORM_TYPES)}, got {cfg_renorm_type!r}.")
        for name, value in (
            ("cfg_text_scale", cfg_text_scale),
            ("cfg_img_scale", cfg_img_scale),
            ("cfg_renorm_min", cfg_renorm_min),
        ):
            if not _is_real(value) or not math.isfinite(value):
                raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
        if v_cond.ndim not in (2, 3):
            raise ValueError(
                f"`v_cond` must be (batch, num_tokens, channels) or (num_tokens, channels), got {tuple(v_cond.shape)}."
            )
        if cfg_text_scale <= 1.0:
            return v_cond

        use_image = cfg_img_scale > 1.0
        branches = {"v_uncond_text": v_uncond_text}
        if use_image:
            branches["v_uncond_image"] = v_uncond_image
        for name, branch in branches.items():
            if branch is None:
                raise ValueError(
                    f"`{name}` is required with cfg_text_scale={cfg_text_scale}, cfg_img_scale={cfg_img_scale}."
                )
            if branch.shape != v_cond.shape:
                raise ValueError(f"`{name}` has shape {tuple(branch.shape)}, but `v_cond` has {tuple(v_cond.shape)}.")

        # Norm dims: per token (last dim), or per image (all but the batch dim; everything if unbatched).
        per_token = (-1,)
        per_image = (-2, -1)

        def renorm(reference: torch.Tensor, guided: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
            norm_ref = torch.linalg.vector_norm(reference, dim=dims, keepdim=True)
            norm_guided = torch.linalg.vector_norm(guided, dim=dims, keepdim=True)
            scale = (norm_ref / (norm_guided + 1e-8)).clamp(min=cfg_renorm_min, max=1.0)
            return guided * scale

        guided = v_uncond_text + cfg_text_scale * (v_cond - v_uncond_text)
        if cfg_renorm_type == "text_channel":
            guided = renorm(v_cond, guided, per_token)
            if use_image:
                guided = v_uncond_image + cfg_img_scale * (guided - v_uncond_image)
            return guided

        if use_image:
            guided = v_uncond_image + cfg_img_scale * (guided - v_uncond_image)
        return renorm(v_cond, guided, per_token if cfg_renorm_type == "channel" else per_image)
