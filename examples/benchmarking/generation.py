"""The generation tasks (text-to-image, editing): the context prefill, one CFG denoising step, and whole pipeline calls
plain and with each step cache."""

import contextlib
import io
import json
import re
from dataclasses import dataclass, replace

import numpy as np
import PIL.Image
import torch

from diffusers_bagel import BagelPipeline, FlowMatchEulerScheduler
from diffusers_bagel.pipeline_bagel import EDIT_PRESET, TEXT_TO_IMAGE_PRESET
from transformers_bagel import BagelContext

from .flops import count_flops
from .timing import Clock, Memory, reference_gemm, timed


__all__ = [
    "STEP_CACHES",
    "GenerationTask",
    "branch_lengths",
    "kv_cache_bytes",
    "make_task",
    "prefill",
    "random_image",
    "relative_error",
    "run_generation",
    "schedule",
    "time_generation",
]


def random_image(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@dataclass
class GenerationTask:
    """The inputs of one generation task: a prompt, the image it edits (None for text-to-image), the output size."""

    name: str
    prompt: str
    image: PIL.Image.Image | None
    height: int
    width: int

    @property
    def preset(self) -> dict:
        """The pipeline's CFG settings for the task (what a call without cfg arguments uses)."""
        return EDIT_PRESET if self.image is not None else TEXT_TO_IMAGE_PRESET

    @property
    def items(self) -> list:
        """The interleaved input, as the pipeline orders it (images first)."""
        return [self.image, self.prompt] if self.image is not None else [self.prompt]

    def call(self, steps: int) -> dict:
        """Keyword arguments of a `pipe(task.prompt, **...)` call of `steps` steps."""
        kwargs = {"num_inference_steps": steps, "height": self.height, "width": self.width, "output_type": "pil"}
        if self.image is not None:
            kwargs["image"] = self.image
        return kwargs


def make_task(name: str, args) -> GenerationTask:
    if name == "edit":
        prompt = "Make the sky above the house a deep orange sunset and add two birds."
        return GenerationTask(name, prompt, random_image(args.width, args.height), args.height, args.width)
    prompt = "A photo of a red cat sitting on a wooden table next to a window, soft morning light."
    return GenerationTask(name, prompt, None, args.height, args.width)


def schedule(steps: int) -> list[float]:
    """The flow times of a `steps`-step call, the terminal 0 included, at the scheduler's default shift (BAGEL's, the
    pipeline's default `timestep_shift`)."""
    scheduler = FlowMatchEulerScheduler()
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.tolist()


def prefill(pipe: BagelPipeline, contexts, preset: dict, **overrides):
    """`pipe.prepare_guidance` of one prompt's contexts, with the task's CFG settings (as its pipeline call runs it)."""
    return pipe.prepare_guidance([contexts], **{**preset, "cfg_renorm_min": 0.0, **overrides})


def branch_lengths(guidance) -> list[int]:
    """Context length of each CFG branch of the (only) prompt: full, no text, and no image when it runs on its own."""
    kinds = ["cond"] + ["text"] * guidance.use_text + ["image"] * guidance.use_image
    return [guidance.spans[kind][0].length for kind in kinds]


def kv_cache_bytes(context: BagelContext) -> int:
    """Bytes of the cached keys and values, every layer, of a prefilled context (its `num_keys` keys)."""
    return sum(
        tensor[:, :, : context.num_keys].nbytes
        for layer in context.cache.layers
        if getattr(layer, "is_initialized", False)
        for tensor in (layer.keys, layer.values)
    )


def measure_prefill(pipe: BagelPipeline, task: GenerationTask, contexts, args, clock: Clock):
    """(the guidance, the prefill's figures): counted FLOPs, the FLOPs of the full and no-image contexts each
    prefilled alone (no guidance: the full context only), median seconds, cache size and context lengths."""
    preset = task.preset
    no_image = replace(contexts, full=contexts.no_image)
    _, flops = count_flops(pipe.model, lambda: prefill(pipe, contexts, preset))
    _, full_alone = count_flops(pipe.model, lambda: prefill(pipe, contexts, preset, cfg_text_scale=1.0))
    _, no_image_alone = count_flops(pipe.model, lambda: prefill(pipe, no_image, preset, cfg_text_scale=1.0))
    guidance, seconds = timed(lambda: prefill(pipe, contexts, preset), args.repeats, clock)
    figures = {
        "cfg_branches": guidance.num_branches,
        "context_tokens": branch_lengths(guidance),
        "cached_keys": guidance.context.num_keys,
        "kv_cache_bytes": kv_cache_bytes(guidance.context),
        "prefill_gflop": flops / 1e9,
        "prefill_alone_gflop": (full_alone + no_image_alone) / 1e9,
        "prefill_s": seconds,
    }
    return guidance, figures


def measure_step(pipe: BagelPipeline, task: GenerationTask, guidance, args, clock: Clock) -> dict:
    """Counted FLOPs and median seconds of one `guided_velocity` call, at the schedule's first flow time where
    guidance is on."""
    sigmas = schedule(args.steps)[:-1]
    sigma = next(s for s in sigmas if FlowMatchEulerScheduler.cfg_active(s, guidance.cfg_interval))
    x = pipe.prepare_latents(1, task.height, task.width, torch.float32, clock.device, torch.manual_seed(args.seed))
    grid = (task.height // pipe.latent_downsample, task.width // pipe.latent_downsample)

    def step():
        return pipe.guided_velocity(x, sigma, grid, guidance)

    step()  # the first call builds the context's step-invariant inputs
    _, flops = count_flops(pipe.model, step)
    _, seconds = timed(step, args.repeats, clock)
    return {"step_gflop": flops / 1e9, "step_s": seconds, "step_gflop_per_s": flops / 1e9 / seconds}


STEP_CACHES = ("taylorseer", "first_block", "diffusers_taylorseer", "mag")
"""The step caches timed against the plain run: the original's TaylorSeer (`enable_taylorseer=True`) and diffusers'
FirstBlockCache, TaylorSeerCache and MagCache (`pipe.enable_cache`), each with diffusers' default settings."""


class DecoderRuns:
    """Counts the denoising forwards in which the last decoder layer really runs: its generation-expert MLP is called
    (a step cache that returns the layer's output skips it) inside a denoising forward (not a prefill, whose clean VAE
    image also goes through that expert)."""

    def __init__(self, pipe: BagelPipeline):
        self.layers = pipe.model.model.language_model.layers
        self.layer = self.layers[-1]
        self.count, self.denoising = 0, False

    def _layer_called(self, module, args, kwargs):
        self.denoising = kwargs.get("branch_keys") is not None

    def _mlp_called(self, module, args):
        self.count += self.denoising

    def __enter__(self):
        self.compiled = self.layers._compiled_denoising
        if self.compiled is not None:
            # Compiled layers call no module hook: count the calls of the compiled layer stack instead (the decoder
            # calls it only for denoising, and only when no step cache predicted its output).
            def counting(*args, **kwargs):
                self.count += 1
                return self.compiled(*args, **kwargs)

            self.layers._compiled_denoising = counting
            self.handles = []
            return self
        self.handles = [self.layer.register_forward_pre_hook(self._layer_called, with_kwargs=True),
                        self.layer.mlp_moe_gen.register_forward_pre_hook(self._mlp_called)]  # fmt: skip
        return self

    def __exit__(self, *exc):
        if self.compiled is not None:
            self.layers._compiled_denoising = self.compiled
        for handle in self.handles:
            handle.remove()


def mag_cache_ratios(pipe: BagelPipeline, task: GenerationTask, args) -> list[float]:
    """MagCache's magnitude ratios for this model and schedule, from diffusers' own calibration run (it prints them)."""
    from diffusers.hooks import MagCacheConfig

    pipe.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=args.steps))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            pipe(task.prompt, generator=torch.manual_seed(args.seed), **task.call(args.steps))
    finally:
        pipe.disable_cache()
    lists = re.findall(r"\[[-0-9.,e\s]+\]", printed.getvalue())
    # MagCache counts the calls of each cache context; a group of branches that stops inside the schedule
    # (text-to-image's guidance interval) never reaches `num_inference_steps`, and no ratios are printed.
    return json.loads(lists[-1]) if lists else None


NOT_APPLICABLE = object()  # a step cache that cannot run on this task


def step_cache_config(name: str, pipe: BagelPipeline, task: GenerationTask, args):
    """The diffusers config of a step cache of `STEP_CACHES` (None for the original's TaylorSeer)."""
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    if name == "first_block":
        return FirstBlockCacheConfig()
    if name == "diffusers_taylorseer":
        return TaylorSeerCacheConfig(taylor_factors_dtype=pipe.model.dtype)
    if name == "mag":
        ratios = mag_cache_ratios(pipe, task, args)
        return MagCacheConfig(num_inference_steps=args.steps, mag_ratios=ratios) if ratios else NOT_APPLICABLE
    return None


def time_generation(pipe: BagelPipeline, task: GenerationTask, args, clock: Clock, method: str = "plain"):
    """(seconds, final latents, decoder runs) of one whole pipeline call of `--steps` steps with `method` ("plain" or
    one of `STEP_CACHES`), after an untimed warm-up call of `--warmup_steps` steps with the same settings; None if the
    step cache cannot run on this task."""
    config = step_cache_config(method, pipe, task, args)
    if config is NOT_APPLICABLE:
        return None
    common = {"generator": torch.manual_seed(args.seed), "enable_taylorseer": method == "taylorseer"}
    if config is not None:
        pipe.enable_cache(config)
    try:
        pipe(task.prompt, **common, **task.call(args.warmup_steps))
        final = {}

        def keep_final(_pipe, step, _timestep, kwargs):
            if step == args.steps - 1:
                final["latents"] = kwargs["latents"].float()
            return {}

        common["generator"] = torch.manual_seed(args.seed)
        with DecoderRuns(pipe) as runs:
            start = clock.now()
            pipe(task.prompt, **common, callback_on_step_end=keep_final,
                 callback_on_step_end_tensor_inputs=["latents"], **task.call(args.steps))  # fmt: skip
            seconds = clock.now() - start
    finally:
        if config is not None:
            pipe.disable_cache()
    return seconds, final["latents"], runs.count


def relative_error(latents: torch.Tensor, reference: torch.Tensor) -> float:
    """max |latents - reference| / max |reference| (final latents of the same noise)."""
    return float((latents - reference).abs().max() / reference.abs().max())


def run_generation(pipe, task: GenerationTask, args, clock: Clock, memory: Memory, peak: float):
    """Whole calls (plain, then each step cache), then the prefill and one CFG step, measured apart, the reference
    GEMM right before the step (so that both see the same load): (the table's figures, the contexts and guidance, for
    the comparison)."""
    memory.reset()
    seconds, latents, runs = time_generation(pipe, task, args, clock)
    row = {"task": task.name, "image": f"{task.width}x{task.height}", "steps": args.steps, "s_per_image": seconds,
           "decoder_runs": runs, "step_caches": []}  # fmt: skip
    for method in args.step_caches:
        timed_call = time_generation(pipe, task, args, clock, method)
        if timed_call is None:
            row["step_caches"].append({"method": method, "s_per_image": None, "speedup": None,
                                       "latent_rel_error": None, "decoder_runs": None})  # fmt: skip
            continue
        cached_seconds, cached_latents, cached_runs = timed_call
        row["step_caches"].append({"method": method, "s_per_image": cached_seconds, "speedup": seconds / cached_seconds,
                                   "latent_rel_error": relative_error(cached_latents, latents),
                                   "decoder_runs": cached_runs})  # fmt: skip
    contexts = pipe.build_contexts(task.items, think=False)
    guidance, figures = measure_prefill(pipe, task, contexts, args, clock)
    row.update(figures)
    gemm = reference_gemm(clock.device)
    row.update(measure_step(pipe, task, guidance, args, clock))
    row["gemm_gflop_per_s"], row["gemm_source"] = gemm.tflops * 1e3, gemm.label
    row["pct_of_gemm"] = 100 * row["step_gflop_per_s"] / row["gemm_gflop_per_s"]
    row["pct_of_peak"] = 100 * row["step_gflop_per_s"] / (peak * 1e3)
    row["peak_mem_gib"] = memory.peak_gib()
    return row, contexts, guidance
