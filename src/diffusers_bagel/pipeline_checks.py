"""
The checks of a [`BagelPipeline`] call's arguments, run before any work so that a bad value is refused with a message
naming it (and what BAGEL calls an argument other diffusers pipelines name differently).
"""

import difflib
import inspect

import numpy as np
import torch

from .defaults import (
    MAX_GUIDANCE_SCALE,
    MAX_IMAGES_PER_CALL,
    MAX_INFERENCE_STEPS,
    MAX_TIMESTEP_SHIFT,
    MIN_TIMESTEP_SHIFT,
    OUTPUT_TYPES,
    CFG_RENORM_TYPES,
    DEFAULT_THINK_TEMPERATURE,
)


__all__ = ["as_int", "check_batch", "check_call_arguments", "unknown_arguments_message"]


# Arguments of other diffusers pipelines that BAGEL has under another name, or has no use for.
_OTHER_PIPELINES_ARGUMENTS = {
    "guidance_scale": "BAGEL's text guidance is `cfg_text_scale` (and its image guidance, for edits, `cfg_img_scale`)",
    "true_cfg_scale": "BAGEL's text guidance is `cfg_text_scale`",
    "image_guidance_scale": "BAGEL's image guidance is `cfg_img_scale`",
    "negative_prompt": (
        "BAGEL has no negative prompt: its guidance contrasts the full context with the context without the text "
        "(`cfg_text_scale`) and without the images (`cfg_img_scale`)"
    ),
    "num_images": "use `num_images_per_prompt`",
    "steps": "use `num_inference_steps`",
    "seed": "pass `generator=torch.Generator().manual_seed(seed)`",
    "size": "use `height` and `width`",
}


def unknown_arguments_message(kwargs: dict, call) -> str:
    """The TypeError of arguments `__call__` does not take, saying what BAGEL calls them, or the closest names."""
    known = [name for name in inspect.signature(call).parameters if name != "kwargs"]
    lines = []
    for name in kwargs:
        hint = _OTHER_PIPELINES_ARGUMENTS.get(name)
        if hint is None:
            close = difflib.get_close_matches(name, known, n=2)
            hint = f"did you mean {' or '.join(f'`{c}`' for c in close)}?" if close else "see help(BagelPipeline.__call__)"
        lines.append(f"`{name}`: {hint}")
    message = "BagelPipeline got unexpected keyword arguments: " + "; ".join(lines)
    return message if message.endswith("?") else message + "."


def as_int(value):
    """A numpy / torch integer scalar as a Python int (for the argument checks); anything else unchanged."""
    if isinstance(value, (np.integer, torch.Tensor)) and not isinstance(value, bool):
        if isinstance(value, torch.Tensor) and (value.numel() != 1 or value.is_floating_point()):
            return value
        return int(value)
    return value


def check_call_arguments(
    config,
    callback_tensor_inputs: list[str],
    height,
    width,
    num_inference_steps,
    timestep_shift,
    cfg_text_scale,
    cfg_img_scale,
    cfg_interval,
    cfg_renorm_type,
    cfg_renorm_min,
    num_images_per_prompt,
    output_type,
    callback_on_step_end_tensor_inputs,
    think=False,
    max_think_tokens=None,
    think_do_sample=False,
    think_temperature=DEFAULT_THINK_TEMPERATURE,
    callback_on_step_end=None,
) -> None:
    """Refuses the arguments of a call (see `BagelPipeline.__call__`) that the model (its `config`) cannot run or that
    are out of bounds; `callback_tensor_inputs`: the tensors a step callback may ask for."""
    if callback_on_step_end is not None and not callable(callback_on_step_end):
        raise TypeError(
            "`callback_on_step_end` must be a callable `(pipe, step, timestep, callback_kwargs) -> dict`, got "
            f"{type(callback_on_step_end).__name__}."
        )
    stride = config.latent_downsample
    limit = config.max_image_size
    for name, value in (("height", height), ("width", width)):
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if value % stride:
            raise ValueError(f"`{name}` must be divisible by {stride}, got {value}.")
        if value > limit:
            raise ValueError(
                f"`{name}`={value} exceeds the model's largest image side {limit} "
                f"(max_latent_size {config.max_latent_size} x {stride})."
            )
    if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
        raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}.")
    if num_inference_steps > MAX_INFERENCE_STEPS:
        raise ValueError(
            f"`num_inference_steps`={num_inference_steps} is beyond {MAX_INFERENCE_STEPS} (BAGEL uses 50; past a "
            "few hundred the Euler steps change nothing but the run time)."
        )
    # Bounds far beyond any useful setting, and tight enough that float32 guidance and the shifted schedule cannot
    # overflow or cancel into NaN images (found by
    # tests/pipelines/bagel/test_hypothesis.py: scales and shifts near 3e38, shifts near 1e-276).
    if (
        not isinstance(timestep_shift, (int, float))
        or isinstance(timestep_shift, bool)
        or not MIN_TIMESTEP_SHIFT <= timestep_shift <= MAX_TIMESTEP_SHIFT
    ):
        raise ValueError(
            f"`timestep_shift` must be a number in [{MIN_TIMESTEP_SHIFT}, {MAX_TIMESTEP_SHIFT}], "
            f"got {timestep_shift!r}."
        )
    for name, value in (("cfg_text_scale", cfg_text_scale), ("cfg_img_scale", cfg_img_scale)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 1.0 <= value <= MAX_GUIDANCE_SCALE:
            raise ValueError(
                f"`{name}` must be a number in [1.0, {MAX_GUIDANCE_SCALE}] (1.0 disables that guidance), "
                f"got {value!r}."
            )
    if (
        not isinstance(cfg_interval, (list, tuple))
        or len(cfg_interval) != 2
        or not all(isinstance(v, (int, float)) for v in cfg_interval)
        or not 0.0 <= cfg_interval[0] <= cfg_interval[1] <= 1.0
    ):
        raise ValueError(f"`cfg_interval` must be (start, end) with 0 <= start <= end <= 1, got {cfg_interval!r}.")
    if cfg_renorm_type not in CFG_RENORM_TYPES:
        raise ValueError(f"`cfg_renorm_type` must be one of {CFG_RENORM_TYPES}, got {cfg_renorm_type!r}.")
    if not isinstance(cfg_renorm_min, (int, float)) or not 0.0 <= cfg_renorm_min <= 1.0:
        raise ValueError(f"`cfg_renorm_min` must be in [0, 1], got {cfg_renorm_min!r}.")
    if (
        not isinstance(num_images_per_prompt, int)
        or isinstance(num_images_per_prompt, bool)
        or not 1 <= num_images_per_prompt <= MAX_IMAGES_PER_CALL
    ):
        raise ValueError(
            f"`num_images_per_prompt` must be an integer in [1, {MAX_IMAGES_PER_CALL}], got {num_images_per_prompt!r}."
        )
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
    if think:
        if max_think_tokens is not None and (
            not isinstance(max_think_tokens, int) or isinstance(max_think_tokens, bool) or max_think_tokens < 1
        ):
            raise ValueError(f"`max_think_tokens` must be a positive integer, got {max_think_tokens!r}.")
        if think_do_sample and (
            not isinstance(think_temperature, (int, float)) or not 0 < think_temperature < float("inf")
        ):
            raise ValueError(f"`think_temperature` must be a finite number > 0, got {think_temperature!r}.")
    if callback_on_step_end_tensor_inputs is not None and not all(
        k in callback_tensor_inputs for k in callback_on_step_end_tensor_inputs
    ):
        raise ValueError(
            f"`callback_on_step_end_tensor_inputs` must be a subset of {callback_tensor_inputs}, got "
            f"{callback_on_step_end_tensor_inputs}."
        )


def check_batch(config, latents, generator, batch_size, height, width, prompts, per_prompt) -> None:
    """The number of images, `latents` and `generator` against the batch, before any work: the images per call, the
    shape, dtype and finite values of `latents`, the generators' count and type. `prompts` x `per_prompt` images."""
    if batch_size > MAX_IMAGES_PER_CALL:
        raise ValueError(
            f"{prompts} prompts x num_images_per_prompt={per_prompt} = {batch_size} images, over "
            f"{MAX_IMAGES_PER_CALL} per call; split the prompts over several calls."
        )
    vae_downsample = config.vae_downsample
    shape = (batch_size, config.latent_channels, height // vae_downsample, width // vae_downsample)
    if latents is not None:
        if not isinstance(latents, torch.Tensor):
            raise TypeError(f"`latents` must be a torch tensor, got {type(latents).__name__}.")
        if latents.shape[0] != batch_size:
            raise ValueError(
                f"`latents` holds {latents.shape[0]} images but {batch_size} are requested "
                f"({prompts} prompts x num_images_per_prompt={per_prompt})."
            )
        if tuple(latents.shape) != shape:
            raise ValueError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}.")
        if not latents.is_floating_point():
            raise TypeError(f"`latents` must be a floating-point tensor (Gaussian noise), got {latents.dtype}.")
        if not bool(torch.isfinite(latents).all()):
            raise ValueError("`latents` contains NaN or infinite values.")
    generators = generator if isinstance(generator, (list, tuple)) else [generator]
    if isinstance(generator, (list, tuple)) and len(generator) != batch_size:
        raise ValueError(
            f"`generator` is a list of {len(generator)} generators for {batch_size} images "
            f"({prompts} prompts x num_images_per_prompt={per_prompt}); give one, or one per image."
        )
    for item in generators:
        if item is not None and not isinstance(item, torch.Generator):
            raise TypeError(
                f"`generator` must be a torch.Generator (e.g. torch.Generator().manual_seed(0)) or a list of them, "
                f"got {type(item).__name__}."
            )
