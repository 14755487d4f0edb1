"""
Speed, FLOPs and memory of BAGEL (text-to-image, editing with dual CFG, image understanding) on random weights.

    python examples/benchmark.py                                  # GPU: the 7B in bf16, 1024x1024, 50 steps
    python examples/benchmark.py --config small                   # CPU: a small model, 256x256, same tables
    python examples/benchmark.py --config 7b --meta_only          # any machine: 7B sizes, parameters, FLOPs/token

The model is built from its configuration with random weights directly on the device (speed does not depend on weight
values; nothing is downloaded). Each generation task (t2i: a prompt; edit: an image and an instruction) is measured in
one run, on the same inputs:

- whole `pipe(...)` calls of `--steps` steps, plain and with each step cache of `--step_caches` (the original's
  TaylorSeer, `enable_taylorseer=True`; diffusers' FirstBlockCache, TaylorSeerCache and MagCache, `pipe.enable_cache`,
  with diffusers' default settings, MagCache's ratios from its own calibration run), each after an untimed warm-up
  call of `--warmup_steps` steps with the same settings;
- the context prefill, `pipe.prepare_guidance`: every guidance context tokenised, ViT-encoded, VAE-encoded and run
  through the decoder into one packed KV cache (`BagelContext`);
- one denoising step with CFG active: one `pipe.guided_velocity` call (every branch in one forward) at the first flow
  time of the schedule where guidance is on (t = 1 for both tasks).

FLOPs are counted, not estimated: `torch.utils.flop_counter.FlopCounterMode` over one untimed call (matmuls,
convolutions and attention kernels at their real shapes, so deterministic; elementwise work is not counted; attention
counts every (query, key) pair its kernel computes, masked or not; with `--quantize`, torchao's quantised matmul
kernels have no counter formula and are left out). Seconds are measured separately, without the counter, as the median
of `--repeats` calls.

Table "Context prefill and one CFG denoising step", one row per generation task:
  CFG branches            query rows (per image) of a step inside the cfg interval: full context, no text, and (edit)
                          no image; text-to-image's no-image context equals the full one, whose velocity it reuses.
  context tokens          cached keys each branch attends to besides its own latent block, full/no-text[/no-image]
                          (`span.length`); text-to-image's no-text context is empty (0).
  KV cache (bytes)        bytes of the cached keys and values of all prefilled contexts
                          (`guidance.context.key_value_bytes()`); the no-text context is a prefix of the full one and
                          shares its keys.
  prefill GFLOP           counted FLOPs of `prepare_guidance` (ViT, VAE encoder, decoder over the contexts).
  prefill GFLOP (full + no-image alone)
                          the same count for the full context prefilled alone plus the no-image context prefilled
                          alone (each without guidance): what a prefill costs when every image and token is prefilled
                          once, whatever the number of branches that hold it. The real prefill may exceed it a little:
                          the no-image context follows the full one in the same cache row, and its attention kernel
                          also runs over the full context's keys, masked out.
  prefill s               seconds of `prepare_guidance` (median).
  step GFLOP              counted FLOPs of one CFG step (all branches).
  step s                  seconds of that step (median).
  step GFLOP/s            step GFLOP / step s.
  GEMM GFLOP/s            matmul throughput measured right before the step, on the same device and threads: the best
                          of float32 1024x1024 matmuls over a second on the CPU, of 10 bfloat16 4096x4096 ones on
                          CUDA (other load on a shared machine slows both measurements alike, mostly).
  % of GEMM               step GFLOP/s / GEMM GFLOP/s.
  % of peak               step GFLOP/s against the device's peak: `--peak_tflops`, else the data sheet's dense bf16
                          figure for known GPUs, else a matmul in the run's dtype measured at start-up (printed with
                          the device).

Table "Whole generation", one row per generation task and method (plain, then each step cache):
  s/image                 seconds of one `pipe(...)` call of `--steps` steps (prefill, denoising, VAE decode).
  speed-up                plain s/image / this method's s/image.
  latent error            max |x_method - x_plain| / max |x_plain| of the final latents (same noise).
  n/a                     MagCache on text-to-image: it counts the calls of each cache context (one per group of
                          branches run together), and the guided group stops inside the schedule (cfg_interval), so
                          its calibration never completes.
  decoder runs            denoising forwards in which the decoder layers ran (the last layer's generation expert
                          counted; the rows of one forward count once): a step cache lowers it. With the original's
                          TaylorSeer, text-to-image's no-image branch runs as a branch of its own (with its own step
                          count, as the original's) because its guidance stops inside the schedule.
  peak GPU mem / RSS      the device allocator's peak over the task's calls on CUDA; the process's peak RSS on CPU.

Table "Understanding": one image and a question prefilled, then `--decode_tokens` greedy tokens through
`model.generate`: first-token latency, decode tokens/s, peak memory, and TFLOP/s from the configuration's FLOP model
(2 x the weights each token passes through plus attention, 4 x heads x head_dim x attended keys per layer).

Table "Denoising step: optimised vs sequential" runs, in the same process and on the same contexts, the pipeline's
step (CFG branches batched into one forward over the cached contexts) against the unoptimised path of the same
model: every branch one after another, each re-running its whole context (text, ViT image, VAE image) plus the latent
block through `BagelModel.forward`, no cache. It prints seconds per step of both, the speed-up, and how far their
velocities and latents differ (a correctness check: both compute the same velocity).
"""

import argparse
import contextlib
import gc
import io
import json
import math
import re
import resource
import sys
import time
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
from transformers import AutoTokenizer, SiglipVisionConfig
from transformers.generation.streamers import BaseStreamer

from diffusers_bagel import BagelPipeline, FlowMatchEulerScheduler
from diffusers_bagel.convert_flux_vae import flux_vae_config
from diffusers_bagel.pipeline_bagel import EDIT_PRESET, TEXT_TO_IMAGE_PRESET
from transformers_bagel import BagelConfig, BagelForConditionalGeneration, BagelImageProcessor, BagelProcessor
from transformers_bagel.configuration_bagel import BagelTextConfig
from transformers_bagel.convert_bagel_to_hf import BAGEL_7B_IMAGE_SIZES, SPECIAL_TOKENS


ROOT = Path(__file__).resolve().parent.parent
# The tiny test checkpoint's tokenizer holds BAGEL's special tokens; the prompt's token count differs from Qwen2.5's,
# which only changes the (short) text part of the contexts.
TOKENIZER_DIR = ROOT / "tests" / "fixtures" / "tiny_bagel_original"

# Model sizes. "7b" is BAGEL-7B-MoT (SPEC section 2): Qwen2.5-7B MoT decoder, SigLIP so400m (26 layers), FLUX VAE.
PRESETS = {
    "tiny": {
        "text": {"vocab_size": 416, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 2},
        "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2},
        "max_latent_size": 16,
        "vae": {"ch": 32, "ch_mult": [1, 2, 2, 2]},
        "image_sizes": {"vae_max_image_size": 128, "vae_min_image_size": 32, "vit_max_image_size": 112,
                        "vit_min_image_size": 28},
        "default_size": 64,
    },
    "small": {
        "text": {"vocab_size": 8192, "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 4,
                 "num_attention_heads": 8, "num_key_value_heads": 2},
        "vision": {"hidden_size": 192, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 3},
        "max_latent_size": 32,
        "vae": {"ch": 32, "ch_mult": [1, 2, 2, 2]},
        "image_sizes": {"vae_max_image_size": 512, "vae_min_image_size": 128, "vit_max_image_size": 490,
                        "vit_min_image_size": 112},
        "default_size": 256,
    },
    "7b": {
        "text": {},  # BagelTextConfig defaults are the 7B's
        "vision": {},  # BagelConfig's default vision config is the 7B's
        "max_latent_size": 64,
        "vae": None,  # FLUX's own parameters
        "image_sizes": dict(BAGEL_7B_IMAGE_SIZES),
        "default_size": 1024,
    },
}
# Dense bf16 tensor-core peaks (vendor data sheets), matched against torch.cuda.get_device_name().
GPU_BF16_PEAK_TFLOPS = [
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
]
# The floor of --meta_only without --peak_tflops: a bf16 8192^3 matmul measured on one H200 of this project's lender.
H200_BF16_TFLOPS = (790.0, "bf16 matmul measured on an H200")
TIMESTEP_SHIFT = 3.0  # the pipeline's default (the original's)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TASKS = ("t2i", "edit", "understand")


# -- building --------------------------------------------------------------------------------------------------------


def build_config(preset: str, tokenizer, num_layers: int | None = None) -> BagelConfig:
    """The preset's BagelConfig (with `num_layers` decoder layers if given), with the special-token ids of
    `tokenizer`."""
    spec = PRESETS[preset]
    token_ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in SPECIAL_TOKENS.items()}
    text_spec = dict(spec["text"], **({"num_hidden_layers": num_layers} if num_layers else {}))
    text = BagelTextConfig(**text_spec)
    vision = SiglipVisionConfig(**{**BagelConfig().vision_config.to_dict(), **spec["vision"]})
    return BagelConfig(text_config=text, vision_config=vision, max_latent_size=spec["max_latent_size"], **token_ids)


def build_pipeline(
    preset: str, device: torch.device, dtype: torch.dtype, attn: str, num_layers: int | None = None
) -> BagelPipeline:
    """A BagelPipeline of the preset's sizes with random weights, created directly on `device` in `dtype`."""
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    config = build_config(preset, tokenizer, num_layers)
    spec = PRESETS[preset]
    with torch.device(device):
        model = BagelForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=attn)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # create the VAE's weights in `dtype` (no float32 copy first)
        try:
            vae = AutoencoderKL(**flux_vae_config(spec["vae"]))
        finally:
            torch.set_default_dtype(previous)
    model.eval()
    vae.eval()
    image_processor = BagelImageProcessor(
        vit_patch_size=config.vision_config.patch_size,
        vae_stride=config.latent_downsample,
        vit_max_num_patch_per_side=config.vit_max_num_patch_per_side,
        **spec["image_sizes"],
    )
    processor = BagelProcessor(image_processor=image_processor, tokenizer=tokenizer)
    pipe = BagelPipeline(model=model, vae=vae, scheduler=FlowMatchEulerScheduler(), processor=processor)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- FLOP accounting ---------------------------------------------------------------------------------------------------


@dataclass
class FlopModel:
    """Per-token FLOPs of each path, from the model's weight shapes (2 FLOPs per multiply-add)."""

    gen_token: float  # one latent token through the generation expert of every layer (+ vae2llm, llm2vae)
    und_token: float  # one text / ViT token through the understanding expert of every layer
    lm_head: float  # one token's logits
    vit_patch: float  # one patch through the ViT (+ patch embedding, connector), attention excluded
    attn_per_key: float  # decoder attention, per (query, key) pair, all layers: 4 * heads * head_dim * layers
    vit_attn_per_key: float  # the same for the ViT
    params: dict = field(default_factory=dict)


def _linear_params(modules) -> int:
    return sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0) for m in modules)


def count_model(model: BagelForConditionalGeneration) -> FlopModel:
    """Parameter counts by part and per-token FLOPs (works on the meta device)."""
    lm = model.model.language_model
    gen_linear = und_linear = 0
    for layer in lm.layers:
        attn = layer.self_attn
        und_linear += _linear_params([attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj])
        und_linear += _linear_params([layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj])
        gen_mlp = layer.mlp_moe_gen
        gen_attn = [attn.q_proj_moe_gen, attn.k_proj_moe_gen, attn.v_proj_moe_gen, attn.o_proj_moe_gen]
        gen_linear += _linear_params(gen_attn)
        gen_linear += _linear_params([gen_mlp.gate_proj, gen_mlp.up_proj, gen_mlp.down_proj])
    text = model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    vision = model.config.vision_config
    vit_linear = sum(
        p.numel()
        for n, p in model.model.vision_model.named_parameters()
        if n.endswith("weight") and p.dim() == 2 and "position" not in n
    )
    connector = _linear_params([model.model.connector.fc1, model.model.connector.fc2])
    latent_io = _linear_params([model.model.vae2llm, model.llm2vae])

    def numel(prefixes):
        return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefixes))

    layers_all = numel("model.language_model.layers.")
    gen_layers = sum(p.numel() for n, p in lm.layers.named_parameters() if "_moe_gen" in n)
    gen_all = gen_layers + lm.norm_moe_gen.weight.numel()
    und_all = layers_all - gen_layers + lm.norm.weight.numel()
    embeddings = lm.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    params = {
        "total": sum(p.numel() for p in model.parameters()),
        "decoder_understanding_expert": und_all,
        "decoder_generation_expert": gen_all,
        "embed_tokens_and_lm_head": embeddings,
        "vit": numel("model.vision_model."),
        "connector_heads_tables": numel(("model.connector.", "model.vae2llm.", "llm2vae.", "model.time_embedder.",
                                         "model.latent_pos_embed.", "model.vit_pos_embed.")),
        # What one token touches: one expert of the decoder, plus the embedding table and the LM head (as the
        # published "7B active" counts Qwen2.5-7B).
        "active_per_token": und_all + embeddings,
    }
    return FlopModel(
        gen_token=2.0 * (gen_linear + latent_io),
        und_token=2.0 * und_linear,
        lm_head=2.0 * model.lm_head.weight.numel(),
        vit_patch=2.0 * (vit_linear + connector),
        attn_per_key=4.0 * text.num_attention_heads * head_dim * text.num_hidden_layers,
        vit_attn_per_key=4.0 * vision.hidden_size * vision.num_hidden_layers,
        params=params,
    )


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the CPU's fused SDPA kernel, as FlopCounterMode counts the CUDA ones (it has no formula for it)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(model: BagelForConditionalGeneration, fn):
    """(the result of `fn()`, the FLOPs it ran), counted by `FlopCounterMode` at the real shapes. Compiled code runs
    eagerly under the counter, so that every op is seen (FLOPs do not depend on compilation). FlopCounterMode cannot
    run flex_attention (a higher-order op, pytorch/pytorch#134385): a flex_attention model is counted on sdpa, whose
    kernels compute the same (query, key) pairs."""
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop}
    implementation = model.config.text_config._attn_implementation
    if implementation == "flex_attention":
        model.set_attn_implementation("sdpa")
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    try:
        with torch.compiler.set_stance("force_eager"), counter:
            result = fn()
    finally:
        if implementation == "flex_attention":
            model.set_attn_implementation(implementation)
    return result, counter.get_total_flops()


# -- timing helpers ----------------------------------------------------------------------------------------------------


class Clock:
    """Wall-clock timestamps that wait for the device's queued work first."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()


class Memory:
    """Peak memory of a task: the device allocator's peak on CUDA, the process's peak RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    @property
    def label(self) -> str:
        return "peak GPU mem (GiB)" if self.device.type == "cuda" else "peak RSS (GiB, process)"

    def reset(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return kib / 2**20


def timed(fn, repeats: int, clock: Clock):
    """(the last call's result, median seconds) of `repeats` calls of `fn()`."""
    times, result = [], None
    for _ in range(repeats):
        result = None  # free the previous result (a prefilled cache) before the next call
        start = clock.now()
        result = fn()
        times.append(clock.now() - start)
    return result, float(np.median(times))


@dataclass
class Gemm:
    """A measured square matmul throughput."""

    tflops: float
    size: int
    dtype: torch.dtype

    @property
    def label(self) -> str:
        return f"measured {self.size}x{self.size} {self.dtype} matmul".replace("torch.", "")


def measure_gemm(
    device: torch.device, dtype: torch.dtype, size: int, repeats: int = 10, min_seconds: float = 0.0
) -> Gemm:
    """Best of `repeats` (and of at least `min_seconds` of) `size x size` matmuls on `device`, with torch's current
    threads, after one warm-up."""
    clock = Clock(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    best, count, began = math.inf, 0, clock.now()
    while count < repeats or clock.now() - began < min_seconds:
        start = clock.now()
        a @ b
        best = min(best, clock.now() - start)
        count += 1
    return Gemm(2 * size**3 / best / 1e12, size, dtype)


def reference_gemm(device: torch.device) -> Gemm:
    """The GEMM the denoising step is compared with: bfloat16 4096x4096 on CUDA; float32 1024x1024 on the CPU, over
    at least a second (a shared CPU's speed comes and goes)."""
    if device.type == "cuda":
        return measure_gemm(device, torch.bfloat16, 4096)
    return measure_gemm(device, torch.float32, 1024, min_seconds=1.0)


def device_peak_tflops(device: torch.device, dtype: torch.dtype, override: float | None) -> tuple[float, str]:
    """(peak TFLOP/s, where the figure comes from): --peak_tflops, a data-sheet value, or a matmul in `dtype` of the
    reference GEMM's size, measured as `reference_gemm` does."""
    if override is not None:
        return override, "--peak_tflops"
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_BF16_PEAK_TFLOPS:
            if key in name:
                return value, f"data sheet, {name}, dense {dtype}".replace("torch.", "")
    if device.type == "cuda":
        gemm = measure_gemm(device, dtype, 4096)
    else:
        gemm = measure_gemm(device, dtype, 1024, min_seconds=1.0)
    return gemm.tflops, gemm.label


# -- the tasks ---------------------------------------------------------------------------------------------------------


def test_image(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
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
        return GenerationTask(name, prompt, test_image(args.width, args.height), args.height, args.width)
    prompt = "A photo of a red cat sitting on a wooden table next to a window, soft morning light."
    return GenerationTask(name, prompt, None, args.height, args.width)


def prefill(pipe: BagelPipeline, contexts, preset: dict, **overrides):
    """`pipe.prepare_guidance` of one prompt's contexts, with the task's CFG settings (as its pipeline call runs it)."""
    return pipe.prepare_guidance([contexts], **{**preset, "cfg_renorm_min": 0.0, **overrides})


def branch_lengths(guidance) -> list[int]:
    """Context length of each CFG branch of the (only) prompt: full, no text, and no image when it runs on its own."""
    kinds = ["cond"] + ["text"] * guidance.use_text + ["image"] * guidance.use_image
    return [guidance.spans[kind][0].length for kind in kinds]


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
        "kv_cache_bytes": guidance.context.key_value_bytes(),
        "prefill_gflop": flops / 1e9,
        "prefill_alone_gflop": (full_alone + no_image_alone) / 1e9,
        "prefill_s": seconds,
    }
    return guidance, figures


def measure_step(pipe: BagelPipeline, task: GenerationTask, guidance, args, clock: Clock) -> dict:
    """Counted FLOPs and median seconds of one `guided_velocity` call, at the schedule's first flow time where
    guidance is on."""
    scheduler = FlowMatchEulerScheduler()
    scheduler.set_timesteps(args.steps, timestep_shift=3.0)
    sigma = next(s for s in scheduler.sigmas[:-1].tolist() if scheduler.cfg_active(s, guidance.cfg_interval))
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
        self.text_model = pipe.model.model.language_model
        self.layer = self.text_model.layers[-1]
        self.count, self.denoising = 0, False

    def _layer_called(self, module, args, kwargs):
        self.denoising = kwargs.get("branch_keys") is not None

    def _mlp_called(self, module, args):
        self.count += self.denoising

    def __enter__(self):
        self.compiled = self.text_model._compiled_denoising
        if self.compiled is not None:
            # Compiled layers call no module hook: count the calls of the compiled layer stack instead (the decoder
            # calls it only for denoising, and only when no step cache predicted its output).
            def counting(*args, **kwargs):
                self.count += 1
                return self.compiled(*args, **kwargs)

            self.text_model._compiled_denoising = counting
            self.handles = []
            return self
        self.handles = [self.layer.register_forward_pre_hook(self._layer_called, with_kwargs=True),
                        self.layer.mlp_moe_gen.register_forward_pre_hook(self._mlp_called)]  # fmt: skip
        return self

    def __exit__(self, *exc):
        if self.compiled is not None:
            self.text_model._compiled_denoising = self.compiled
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


NOT_APPLICABLE = object()  # a step cache that cannot run on this task


def time_generation(pipe: BagelPipeline, task: GenerationTask, args, clock: Clock, method: str = "plain"):
    """(seconds, final latents, decoder runs) of one whole pipeline call of `--steps` steps with `method` ("plain" or
    one of `STEP_CACHES`), after an untimed warm-up call of `--warmup_steps` steps with the same settings."""
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
        error = (cached_latents - latents).abs().max() / latents.abs().max()
        row["step_caches"].append({"method": method, "s_per_image": cached_seconds, "speedup": seconds / cached_seconds,
                                   "latent_rel_error": float(error), "decoder_runs": cached_runs})  # fmt: skip
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


class TokenTimes(BaseStreamer):
    """Streamer that timestamps every generated token (the first `put` is the prompt)."""

    def __init__(self, clock: Clock):
        self.clock, self.times, self.prompt_seen = clock, [], False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.times.append(self.clock.now())

    def end(self):
        pass


def understanding_inputs(pipe, args, device=None) -> dict:
    """The chat inputs of the understanding task: one `--width` x `--height` image and a question."""
    image = test_image(args.width, args.height, seed=1)
    question = "Describe this picture in detail: what objects are there and what colours do they have?"
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    inputs = pipe.processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    return {k: v.to(device) for k, v in inputs.items()} if device is not None else dict(inputs)


def run_understanding(pipe, args, flops: FlopModel, clock: Clock, memory: Memory) -> dict:
    """Prefill of one image and a question, then `--decode_tokens` greedy tokens through `model.generate`."""
    inputs = understanding_inputs(pipe, args, clock.device)
    model = pipe.model
    new_tokens = args.decode_tokens
    generate = {"do_sample": False, "pad_token_id": model.config.pad_token_id}
    generate["eos_token_id"] = model.config.eos_token_id  # min_new_tokens keeps it from ending the answer early
    model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, **generate)  # warm-up

    memory.reset()
    streamer = TokenTimes(clock)
    start = clock.now()
    model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=streamer, **generate)
    times = streamer.times
    first = times[0] - start
    decode_rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")

    prompt_tokens = int(inputs["attention_mask"].sum())
    vit_patches = int(inputs["image_grid_hw"].prod(-1).sum())
    prefill_flops = (
        vit_patches * flops.vit_patch
        + vit_patches**2 * flops.vit_attn_per_key
        + prompt_tokens * flops.und_token
        + prompt_tokens * (prompt_tokens + 1) / 2 * flops.attn_per_key
        + flops.lm_head
    )
    decode_flops = sum(
        flops.und_token + flops.lm_head + (prompt_tokens + k) * flops.attn_per_key for k in range(1, len(times))
    )
    total = times[-1] - start
    return {
        "task": "understand",
        "image": f"{args.width}x{args.height}",
        "context_tokens": [prompt_tokens],
        "prefill_s": first,
        "first_token_s": first,
        "decode_tok_s": decode_rate,
        "peak_mem_gib": memory.peak_gib(),
        "tflops": (prefill_flops + decode_flops) / total / 1e12,
        "prefill_tflops": prefill_flops / first / 1e12,
    }


# -- the unoptimised reference path -----------------------------------------------------------------------------------


class SequentialPath:
    """
    The unoptimised path: at every step, each CFG branch one after another, each running its whole context plus the
    latent block through `BagelModel.forward` with no cache. Same contexts, branch selection and guidance
    combination as `BagelPipeline.guided_velocity`.
    """

    def __init__(self, pipe: BagelPipeline, contexts, guidance):
        self.pipe, self.guidance = pipe, guidance
        branches = [contexts.full]
        if guidance.use_text:
            branches.append(contexts.no_text)
        if guidance.use_image:
            branches.append(contexts.no_image)
        # Tokenisation, ViT pixels and VAE latents of each context are inputs of the public forward, prepared once
        # (the pipeline's own helper builds them); the model work (ViT, decoder) is redone every step.
        self.inputs = [pipe._tokenize_contexts([ctx], generator=None, sample_posterior=False) for ctx in branches]

    def _velocity(self, inputs: dict, x: torch.Tensor, t: float, grid: tuple[int, int]) -> torch.Tensor:
        model, config = self.pipe.model, self.pipe.model.config
        device, num_tokens = x.device, x.shape[1]
        block = torch.full((num_tokens + 2,), config.latent_token_id, dtype=torch.long, device=device)
        block[0], block[-1] = config.start_of_image_token_id, config.end_of_image_token_id
        input_ids = torch.cat([inputs["input_ids"][0], block])[None]
        context_latents = inputs.get("latents")
        latents = x[0].to(model.dtype)
        if context_latents is not None:
            latents = torch.cat([context_latents, latents])
        grids = torch.tensor([list(grid)], device=device)
        if context_latents is not None:
            grids = torch.cat([inputs["latent_grid_hw"], grids])
        timesteps = torch.zeros(grids.shape[0], device=device)
        timesteps[-1] = t
        hidden = model.model(
            input_ids=input_ids,
            pixel_values=inputs.get("pixel_values"),
            image_grid_hw=inputs.get("image_grid_hw"),
            latents=latents,
            latent_grid_hw=grids,
            latent_timesteps=timesteps,
            use_cache=False,
        ).last_hidden_state
        return model.llm2vae(hidden[:, -num_tokens - 1 : -1]).float()

    def velocity(self, x: torch.Tensor, t: float, grid: tuple[int, int]) -> torch.Tensor:
        g = self.guidance
        if not (g.use_text and self.pipe.scheduler.cfg_active(t, g.cfg_interval)):
            return self._velocity(self.inputs[0], x, t, grid)
        v_cond, v_text = self._velocity(self.inputs[0], x, t, grid), self._velocity(self.inputs[1], x, t, grid)
        if g.use_image:
            v_image = self._velocity(self.inputs[2], x, t, grid)
        else:
            v_image = v_cond if g.image_reuses_full else None
        return self.pipe.scheduler.apply_guidance(
            v_cond, v_uncond_text=v_text, v_uncond_image=v_image, cfg_text_scale=g.cfg_text_scale,
            cfg_img_scale=g.cfg_img_scale, cfg_renorm_type=g.cfg_renorm_type, cfg_renorm_min=g.cfg_renorm_min,
        )  # fmt: skip


def run_comparison(pipe, task: GenerationTask, contexts, guidance, args, clock: Clock) -> dict:
    """`--compare_steps` denoising steps (the first ones of the schedule, where CFG is on) of both paths over the
    task's contexts, timed."""
    height, width = task.height, task.width
    grid = (height // pipe.latent_downsample, width // pipe.latent_downsample)
    shape = (1, grid[0] * grid[1], pipe.model.config.patch_latent_dim)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed)).to(clock.device)
    scheduler = FlowMatchEulerScheduler()
    scheduler.set_timesteps(args.steps, timestep_shift=3.0)
    sigmas = scheduler.sigmas.tolist()
    steps = min(args.compare_steps, args.steps)
    sequential = SequentialPath(pipe, contexts, guidance)
    paths = {
        "optimised": lambda x, t: pipe.guided_velocity(x, t, grid, guidance),
        "sequential": lambda x, t: sequential.velocity(x, t, grid),
    }
    x = {name: noise for name in paths}
    first_v, times = {}, {name: [] for name in paths}
    with torch.no_grad():
        for velocity in paths.values():
            velocity(noise, sigmas[0])  # warm-up (allocator, kernels)
        # The two paths alternate step by step, so that load from other processes hits both alike.
        for i in range(steps):
            for name, velocity in paths.items():
                start = clock.now()
                v = velocity(x[name], sigmas[i])
                x[name] = x[name] + (sigmas[i + 1] - sigmas[i]) * v
                times[name].append(clock.now() - start)
                first_v.setdefault(name, v)
    best = {name: min(t) for name, t in times.items()}
    median = {name: float(np.median(t)) for name, t in times.items()}
    return {
        "task": task.name,
        "cfg_branches": guidance.num_branches,
        "steps_timed": steps,
        "sequential_s_per_step": best["sequential"],
        "optimised_s_per_step": best["optimised"],
        "speedup": best["sequential"] / best["optimised"],
        "speedup_median": median["sequential"] / median["optimised"],
        "sequential_step_times": times["sequential"],
        "optimised_step_times": times["optimised"],
        "max_abs_dv_step1": float((first_v["optimised"] - first_v["sequential"]).abs().max()),
        "max_abs_v_step1": float(first_v["sequential"].abs().max()),
        "max_abs_dx_final": float((x["optimised"] - x["sequential"]).abs().max()),
    }


# -- printing ----------------------------------------------------------------------------------------------------------


def _fmt(value, digits=3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def print_table(headers: list[str], rows: list[list]):
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")


def _lengths(values: list[int]) -> str:
    return "/".join(str(v) for v in values)


def print_generation_tables(rows: list[dict], args, memory: Memory):
    print(f"\n## Context prefill and one CFG denoising step ({args.config}, {args.width}x{args.height}, "
          f"median of {args.repeats} calls)")
    print_table(
        ["task", "image", "CFG branches", "context tokens", "KV cache (bytes)", "prefill GFLOP",
         "prefill GFLOP (full + no-image alone)", "prefill s", "step GFLOP", "step s", "step GFLOP/s", "GEMM GFLOP/s",
         "% of GEMM", "% of peak"],
        [
            [r["task"], r["image"], r["cfg_branches"], _lengths(r["context_tokens"]), r["kv_cache_bytes"],
             r["prefill_gflop"], r["prefill_alone_gflop"], r["prefill_s"], r["step_gflop"], r["step_s"],
             r["step_gflop_per_s"], r["gemm_gflop_per_s"], r["pct_of_gemm"], r["pct_of_peak"]]
            for r in rows
        ],
    )  # fmt: skip
    print(f"\n## Whole generation ({args.config}, {args.width}x{args.height}, {args.steps} steps): plain and step caches")
    print("decoder runs: denoising forwards in which the decoder layers ran (rows of one forward count once)")
    table = []
    for r in rows:
        table.append([r["task"], "plain", r["s_per_image"], "1.00x", 0.0, r["decoder_runs"], r["peak_mem_gib"]])
        for c in r["step_caches"]:
            if c["s_per_image"] is None:
                table.append([r["task"], c["method"], "n/a", "n/a", "n/a", "n/a", None])
                continue
            table.append([r["task"], c["method"], c["s_per_image"], f"{c['speedup']:.2f}x", c["latent_rel_error"],
                          c["decoder_runs"], None])  # fmt: skip
    print_table(["task", "method", "s/image", "speed-up", "latent error", "decoder runs", memory.label], table)


def print_understanding_table(row: dict, args, memory: Memory, peak: float):
    print(f"\n## Understanding ({args.config}, one {row['image']} image, {args.decode_tokens} tokens decoded)")
    print_table(
        ["task", "image", "context tokens", "first token s", "decode tok/s", memory.label, "TFLOP/s", "% of peak"],
        [[row["task"], row["image"], _lengths(row["context_tokens"]), row["first_token_s"], row["decode_tok_s"],
          row["peak_mem_gib"], row["tflops"], 100 * row["tflops"] / peak]],
    )  # fmt: skip


def print_comparison_table(comparisons: list[dict]):
    print("\n## Denoising step: optimised (batched CFG, cached contexts) vs sequential (no cache, one branch after "
          "another)")
    print("s/step: best of the timed steps, the two paths alternating step by step (CFG on in every one)")
    print_table(
        ["task", "CFG branches", "steps timed", "sequential s/step", "optimised s/step", "speed-up",
         "speed-up (median)", "max abs dv (step 1)", "max abs v", "max abs dx (final)"],
        [
            [c["task"], c["cfg_branches"], c["steps_timed"], c["sequential_s_per_step"], c["optimised_s_per_step"],
             f"{c['speedup']:.2f}x", f"{c['speedup_median']:.2f}x", c["max_abs_dv_step1"], c["max_abs_v_step1"],
             c["max_abs_dx_final"]]
            for c in comparisons
        ],
    )  # fmt: skip


def print_model_summary(preset: str, flops: FlopModel, config: BagelConfig):
    p = flops.params
    text = config.text_config
    print(f"## BAGEL '{preset}' configuration")
    print(
        f"decoder: {text.num_hidden_layers} layers, hidden {text.hidden_size}, MLP {text.intermediate_size}, "
        f"{text.num_attention_heads} heads / {text.num_key_value_heads} KV heads; ViT: "
        f"{config.vision_config.num_hidden_layers} layers, hidden {config.vision_config.hidden_size}; "
        f"largest image {config.max_image_size}px"
    )
    print_table(
        ["parameters", "count (B)"],
        [
            ["total", p["total"] / 1e9],
            ["decoder, understanding expert", p["decoder_understanding_expert"] / 1e9],
            ["decoder, generation expert", p["decoder_generation_expert"] / 1e9],
            ["embed_tokens + lm_head", p["embed_tokens_and_lm_head"] / 1e9],
            ["ViT", p["vit"] / 1e9],
            ["connector, latent heads, position tables", p["connector_heads_tables"] / 1e9],
            ["active per token (one expert + embeddings + head)", p["active_per_token"] / 1e9],
        ],
    )
    print(f"GFLOP per latent token per CFG branch (generation expert, 2 x weights): {flops.gen_token / 1e9:.4g}")
    print(f"GFLOP per text/ViT token (understanding expert): {flops.und_token / 1e9:.4g}")
    print(f"attention FLOPs per attended key per query token (all layers): {flops.attn_per_key:.4g}")


# -- analysis on fake tensors (--meta_only) ---------------------------------------------------------------------------


class LiveBytes(TorchDispatchMode):
    """
    Bytes of the tensor storages created inside the mode and still alive, and their peak. Fake tensors have storages
    of their real sizes (and no data), so under fake weights this is the activation memory of a call, allocated
    nowhere. Views share their base's storage and count once; a storage counts until it is freed.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen = weakref.WeakSet()

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # A view or an in-place result lives in an input's storage (a weight's, say): nothing new.
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if storage._cdata not in inputs and storage not in self._seen:
                    self._seen.add(storage)
                    self.live += storage.nbytes()
                    weakref.finalize(storage, self._free, storage.nbytes())
                    self.peak = max(self.peak, self.live)
        return out


def fake_weights(module: torch.nn.Module, fake_mode: FakeTensorMode) -> torch.nn.Module:
    """`module`, built on the meta device, with every parameter and buffer a fake tensor on the CPU: real shapes,
    dtypes and storage sizes, no data. Real inputs then run through it (`allow_non_fake_inputs`): whatever touches a
    weight is fake, while the token ids, positions and image grids stay real, so the model reads its layout as it
    does on a real run."""
    with fake_mode:
        return module.to_empty(device="cpu")


def analyse_on_fake_tensors(args, peak_tflops: float) -> dict:
    """
    Counted FLOPs and memory of a whole generation at the configuration's full size, on fake weights (nothing is
    allocated or computed): for text-to-image and editing, the context prefill, one step with every guidance branch
    (t = 1) and one with the full context only, the number of guided steps of the schedule, the KV cache, the activation
    peak, the VAE decode; for understanding, the prefill of one image and a question and one decoding step. The floor
    of a task is its FLOPs over `peak_tflops`.
    """
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    pipe = build_pipeline(args.config, torch.device("meta"), args.dtype, args.attn, args.num_layers)
    fake_weights(pipe.model, fake_mode)
    fake_weights(pipe.vae, fake_mode)
    model = pipe.model
    scheduler = FlowMatchEulerScheduler()
    scheduler.set_timesteps(args.steps, timestep_shift=TIMESTEP_SHIFT)
    sigmas = scheduler.sigmas.tolist()
    grid = (args.height // pipe.latent_downsample, args.width // pipe.latent_downsample)
    report = {
        "config": args.config, "dtype": str(args.dtype).replace("torch.", ""), "image": f"{args.width}x{args.height}",
        "steps": args.steps, "peak_tflops": peak_tflops,
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "vae_param_bytes": sum(p.numel() * p.element_size() for p in pipe.vae.parameters()),
        "kv_cache_bytes": {}, "peak_activation_bytes": {}, "activation_peaks": {}, "floor_s": {},
    }  # fmt: skip
    latents = torch.zeros(1, model.config.latent_channels, grid[0] * pipe.latent_patch_size,
                          grid[1] * pipe.latent_patch_size, dtype=args.dtype)  # fmt: skip
    with torch.no_grad(), LiveBytes() as live:
        _, report["vae_decode_flops"] = count_flops(model, lambda: pipe.vae.decode(latents))
    vae_peak = live.peak

    for name in ("t2i", "edit"):
        task = make_task(name, args)
        contexts = pipe.build_contexts(task.items, think=False)
        with torch.no_grad():
            with LiveBytes() as live:
                guidance, prefill_flops = count_flops(model, lambda: prefill(pipe, contexts, task.preset))
            kv_bytes = guidance.context.key_value_bytes()
            prefill_peak = live.peak - kv_bytes  # beyond the finished cache: the prefill's transient memory
            x = pipe.prepare_latents(1, args.height, args.width, torch.float32, torch.device("cpu"),
                                     torch.manual_seed(args.seed))  # fmt: skip
            pipe.guided_velocity(x, sigmas[0], grid, guidance)  # builds the context's step-invariant inputs
            with LiveBytes() as live:
                _, step_flops = count_flops(model, lambda: pipe.guided_velocity(x, sigmas[0], grid, guidance))
            step_peak = live.peak
            cond = guidance.spans["cond"]
            _, unguided_flops = count_flops(
                model, lambda: model.predict_velocity(x.to(args.dtype), sigmas[0], grid, guidance.context, cond)
            )
        guided_steps = sum(guidance.use_text and scheduler.cfg_active(sigma, guidance.cfg_interval)
                           for sigma in sigmas[:-1])  # fmt: skip
        total = (prefill_flops + guided_steps * step_flops + (args.steps - guided_steps) * unguided_flops
                 + report["vae_decode_flops"])  # fmt: skip
        report[name] = {
            "prefill_flops": prefill_flops, "step_flops": step_flops, "unguided_step_flops": unguided_flops,
            "guided_steps": guided_steps, "cfg_branches": guidance.num_branches,
            "context_tokens": branch_lengths(guidance), "total_flops": total,
        }  # fmt: skip
        report["kv_cache_bytes"][name] = kv_bytes
        report["peak_activation_bytes"][name] = max(prefill_peak, step_peak, vae_peak)
        report["activation_peaks"][name] = {"prefill": prefill_peak, "step": step_peak, "vae_decode": vae_peak}
        report["floor_s"][name] = total / (peak_tflops * 1e12)

    report["understand"] = analyse_understanding_on_fake_tensors(pipe, args)
    return report


def analyse_understanding_on_fake_tensors(pipe, args) -> dict:
    """FLOPs of the prefill of one image and a question, and of one decoding step after it (fake weights)."""
    model = pipe.model
    inputs = understanding_inputs(pipe, args)
    with torch.no_grad():
        output, prefill_flops = count_flops(model, lambda: model(**inputs, use_cache=True, logits_to_keep=1))
        token = torch.zeros((1, 1), dtype=torch.long)
        position = output.next_position[:, None]
        _, step_flops = count_flops(model, lambda: model(input_ids=token, position_ids=position, cache=output.cache,
                                                         text_only=True, use_cache=True))  # fmt: skip
    return {"context_tokens": int(inputs["input_ids"].shape[1]), "prefill_flops": prefill_flops,
            "decode_step_flops": step_flops}  # fmt: skip


def print_fake_analysis(report: dict) -> None:
    tera = 1e12
    print(f"\n## Counted on fake tensors: {report['config']} in {report['dtype']}, {report['image']}, "
          f"{report['steps']} steps (nothing allocated or computed)")  # fmt: skip
    print(f"weights {report['param_bytes'] / 1e9:.2f} GB (+ VAE {report['vae_param_bytes'] / 1e9:.3f} GB); "
          f"VAE decode {report['vae_decode_flops'] / tera:.3f} TFLOP")  # fmt: skip
    rows = []
    for name in ("t2i", "edit"):
        r = report[name]
        rows.append([name, _lengths(r["context_tokens"]), r["prefill_flops"] / tera, r["step_flops"] / tera,
                     r["unguided_step_flops"] / tera, f"{r['guided_steps']}/{report['steps']}",
                     report["kv_cache_bytes"][name] / 2**30, report["peak_activation_bytes"][name] / 2**30,
                     r["total_flops"] / 1e15, report["floor_s"][name]])  # fmt: skip
    print_table(["task", "context tokens", "prefill TFLOP", "guided step TFLOP", "unguided step TFLOP",
                 "guided steps", "KV cache GiB", "activation peak GiB", "PFLOP/image",
                 f"floor s at {report['peak_tflops']:g} TFLOP/s"], rows)  # fmt: skip
    u = report["understand"]
    print(f"understanding: {u['context_tokens']} prompt tokens, prefill {u['prefill_flops'] / tera:.3f} TFLOP, "
          f"one decoding step {u['decode_step_flops'] / 1e9:.2f} GFLOP")


# -- main --------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(PRESETS), default=None,
                        help="Model size: tiny, small or 7b (BAGEL-7B-MoT). Default: 7b on CUDA, small on CPU.")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu. Default: cuda if available, else cpu.")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="Weights and activations. Default: bfloat16 on CUDA, float32 on CPU.")
    parser.add_argument("--attn", choices=["sdpa", "eager", "flex_attention"], default="sdpa",
                        help="Attention implementation of the decoder (default: sdpa).")
    parser.add_argument("--height", type=int, default=None,
                        help="Generated (and edited, and understood) image height; multiple of 16. Default: 1024 "
                             "for 7b, 256 for small, 64 for tiny.")
    parser.add_argument("--width", type=int, default=None, help="Image width; multiple of 16. Default: --height.")
    parser.add_argument("--steps", type=int, default=50, help="Euler steps per image (default: 50, the original's).")
    parser.add_argument("--warmup_steps", type=int, default=6,
                        help="Steps of the untimed warm-up call before each timed generation call (default: 6, "
                             "enough to run the CFG and conditional-only step shapes and, with TaylorSeer, its "
                             "full and Taylor steps).")
    parser.add_argument("--repeats", type=int, default=5,
                        help="Timed calls of the context prefill and of the CFG denoising step, whose median is "
                             "printed (default: 5).")
    parser.add_argument("--step_caches", default=",".join(STEP_CACHES),
                        help=f"Comma-separated step caches timed against the plain call, from {','.join(STEP_CACHES)} "
                             "(taylorseer: the original's, enable_taylorseer=True; the others diffusers' hooks through "
                             "pipe.enable_cache); 'none' for none (default: all).")
    parser.add_argument("--num_layers", type=int, default=None,
                        help="Decoder layers of the configuration instead of the preset's (e.g. 8 with --config small: "
                             "the 8-layer model the original is compared on).")
    parser.add_argument("--decode_tokens", type=int, default=64, help="Tokens decoded in the understanding task (default: 64).")
    parser.add_argument("--tasks", default=",".join(TASKS),
                        help=f"Comma-separated tasks to time, from {','.join(TASKS)} (default: all).")
    parser.add_argument("--compare_steps", type=int, default=4,
                        help="Denoising steps timed for the optimised-vs-sequential comparison; 0 skips it "
                             "(default: 4).")
    parser.add_argument("--compile", action="store_true",
                        help="Compile the denoising steps' layer stack (model.compile_denoising(): fullgraph, static "
                             "shapes) for the generation tasks (off by default; the warm-up calls pay the compilation).")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="The device's peak TFLOP/s for the utilisation column (default: data sheet for known "
                             "GPUs, else a measured matmul).")
    parser.add_argument("--meta_only", action="store_true",
                        help="Analyse the configuration on fake tensors (no weights allocated, nothing computed, any "
                             "machine): parameters, counted FLOPs of the prefill, a guided and an unguided step and "
                             "the VAE decode, KV cache and activation peak of t2i and edit at --height x --width, the "
                             "floor in seconds at --peak_tflops (default: 790, an H200's measured bf16 matmul); "
                             "dtype bfloat16 unless --dtype. Then exit.")
    parser.add_argument("--targets", action="store_true",
                        help="The prepared GPU run (scripts/gpu_benchmark.sh): one table of build time, text-to-image "
                             "plain / TaylorSeer / compiled, editing, peak memory, understanding first token and "
                             "decode rate, and int8 weights (peak memory, final-latent error), each against BAGEL-7B's "
                             "targets on one H200. Needs torchao.")
    parser.add_argument("--quantize", choices=["none", "int8", "int4"], default="none",
                        help="Weight-only quantisation of every decoder linear (both experts) with torchao "
                             "(pip install -e '.[quant]'): int8 on CPU or CUDA, int4 (group size 128) on CUDA. "
                             "Default: none.")
    parser.add_argument("--json", type=Path, default=None, help="Also write every figure to this JSON file.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of weights and noise.")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's own choice, usually one per core).")
    args = parser.parse_args(argv)

    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but CUDA is not available.")
    on_gpu = args.device.type == "cuda"
    args.config = args.config or ("7b" if on_gpu else "small")
    # --meta_only counts the release's own dtype by default: nothing runs, so the CPU's float32 is no reason to change.
    args.dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if on_gpu or args.meta_only else torch.float32)
    args.height = args.height or PRESETS[args.config]["default_size"]
    args.width = args.width or args.height
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(args.tasks) - set(TASKS))
    if unknown or not args.tasks:
        parser.error(f"--tasks must name some of {','.join(TASKS)}, got {unknown or 'nothing'}.")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value <= 0 or value % 16:
            parser.error(f"--{name} must be a positive multiple of 16, got {value}.")
    limit = PRESETS[args.config]["max_latent_size"] * 16
    if max(args.height, args.width) > limit:
        parser.error(f"--height/--width must be at most {limit} for --config {args.config}.")
    for name in ("steps", "decode_tokens", "warmup_steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}.")
    if args.compare_steps < 0:
        parser.error(f"--compare_steps must be >= 0, got {args.compare_steps}.")
    caches = [c.strip() for c in args.step_caches.split(",") if c.strip()]
    args.step_caches = [] if caches == ["none"] else caches
    unknown = sorted(set(args.step_caches) - set(STEP_CACHES))
    if unknown:
        parser.error(f"--step_caches must name some of {','.join(STEP_CACHES)} (or none), got {unknown}.")
    if args.num_layers is not None and args.num_layers < 1:
        parser.error(f"--num_layers must be >= 1, got {args.num_layers}.")
    if args.targets and (args.meta_only or args.quantize != "none" or args.compile):
        parser.error("--targets runs its own set (int8 and compiled included): drop --meta_only, --quantize, --compile.")
    if args.quantize != "none" or args.targets:
        try:
            import torchao  # noqa: F401
        except ImportError:
            parser.error(f"{'--targets' if args.targets else '--quantize'} needs torchao: pip install -e '.[quant]'")
        if args.quantize == "int4" and not on_gpu:
            parser.error("--quantize int4 runs on CUDA only; use int8 on the CPU.")
    return args


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def quantize_linears(module: torch.nn.Module, scheme: str) -> None:
    """torchao weight-only quantisation, in place, of every linear layer of `module` (`--quantize`: the MoT decoder's
    layers, understanding and generation experts; `--targets`: the whole model, LM head and ViT included, only the
    embedding table staying in the model's dtype)."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    config = Int8WeightOnlyConfig() if scheme == "int8" else Int4WeightOnlyConfig(group_size=128)
    quantize_(module, config)


# -- the prepared GPU run (--targets) ---------------------------------------------------------------------------------

# BAGEL-7B-MoT on one H200 in bfloat16, 1024x1024, 50 steps, the original's defaults: (figure, target, "<=" or ">=").
TARGETS = {
    "t2i_s": (8.0, "<="), "t2i_taylorseer_s": (3.5, "<="), "edit_s": (15.0, "<="), "peak_gib": (31.0, "<="),
    "int8_peak_gib": (17.0, "<="), "first_token_s": (0.150, "<="), "decode_tok_s": (60.0, ">="),
}  # fmt: skip


def run_targets(args, flops: FlopModel) -> dict:
    """
    The prepared GPU run: one table of the figures BAGEL-7B is held to on one GPU, each against its target. Three
    pipelines with the same random weights are built in turn (seeded): bfloat16 for understanding (first-token
    latency, decode tokens/s), text-to-image plain and with TaylorSeer, and editing; the same with every linear layer
    in int8 (torchao weight-only) for text-to-image, with its final latents against bfloat16's; bfloat16 again with the
    denoising layers compiled (`compile_denoising`), whose warm-up call pays the compilation. Peak memory is the
    device allocator's peak over each call (its warm-up included). Progress lines are printed as figures come in.
    """
    clock, memory = Clock(args.device), Memory(args.device)
    figures = {}

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    def fresh_pipeline() -> BagelPipeline:
        gc.collect()
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
        torch.manual_seed(args.seed)  # the same random weights every time
        start = clock.now()
        pipe = build_pipeline(args.config, args.device, args.dtype, args.attn, args.num_layers)
        figures.setdefault("build_s", clock.now() - start)
        return pipe

    def generation(pipe, task, method="plain") -> tuple[float, float, torch.Tensor, float]:
        memory.reset()
        start = clock.now()
        seconds, latents, _ = time_generation(pipe, task, args, clock, method)
        return seconds, memory.peak_gib(), latents, clock.now() - start - seconds

    t2i, edit = make_task("t2i", args), make_task("edit", args)
    with torch.no_grad():
        pipe = fresh_pipeline()
        log(f"built {args.config} with random weights on {args.device} in {figures['build_s']:.1f} s")
        understanding = run_understanding(pipe, args, flops, clock, memory)
        figures.update(first_token_s=understanding["first_token_s"], decode_tok_s=understanding["decode_tok_s"],
                       understand_peak_gib=understanding["peak_mem_gib"])  # fmt: skip
        log(f"understanding: first token {figures['first_token_s']:.3f} s, {figures['decode_tok_s']:.1f} tokens/s")
        figures["t2i_s"], figures["t2i_peak_gib"], reference, _ = generation(pipe, t2i)
        log(f"t2i: {figures['t2i_s']:.2f} s/image, peak {figures['t2i_peak_gib']:.2f} GiB")
        seconds, peak, latents, _ = generation(pipe, t2i, "taylorseer")
        figures.update(t2i_taylorseer_s=seconds, t2i_taylorseer_peak_gib=peak,
                       t2i_taylorseer_latent_error=relative_error(latents, reference))  # fmt: skip
        log(f"t2i TaylorSeer: {seconds:.2f} s/image")
        figures["edit_s"], figures["edit_peak_gib"], _, _ = generation(pipe, edit)
        log(f"edit: {figures['edit_s']:.2f} s/image, peak {figures['edit_peak_gib']:.2f} GiB")
        figures["peak_gib"] = max(figures[key] for key in ("understand_peak_gib", "t2i_peak_gib", "edit_peak_gib"))
        del pipe

        pipe = fresh_pipeline()
        quantize_linears(pipe.model, "int8")
        seconds, peak, latents, _ = generation(pipe, t2i)
        figures.update(int8_t2i_s=seconds, int8_peak_gib=peak, int8_latent_error=relative_error(latents, reference))
        log(f"int8 weights: t2i {seconds:.2f} s/image, peak {peak:.2f} GiB")
        del pipe

        pipe = fresh_pipeline()
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        pipe.model.compile_denoising()
        seconds, peak, latents, warmup = generation(pipe, t2i)
        figures.update(compiled_t2i_s=seconds, compiled_peak_gib=peak, compile_warmup_s=warmup,
                       compiled_latent_error=relative_error(latents, reference))  # fmt: skip
        log(f"compiled: t2i {seconds:.2f} s/image (warm-up with compilation {warmup:.0f} s)")
        del pipe
    return figures


def relative_error(latents: torch.Tensor, reference: torch.Tensor) -> float:
    """max |latents - reference| / max |reference| (final latents of the same noise)."""
    return float((latents - reference).abs().max() / reference.abs().max())


def print_targets_table(figures: dict, args) -> None:
    image = f"{args.width}x{args.height}"
    rows = [
        ["random weights built on the device (s)", figures["build_s"], None],
        [f"text-to-image {image}, {args.steps} steps (s/image)", figures["t2i_s"], "t2i_s"],
        ["  with TaylorSeer (s/image)", figures["t2i_taylorseer_s"], "t2i_taylorseer_s"],
        ["  its final-latent error against plain", figures["t2i_taylorseer_latent_error"], None],
        ["  compiled denoising layers (s/image)", figures["compiled_t2i_s"], "t2i_s"],
        ["  its warm-up call, compilation included (s)", figures["compile_warmup_s"], None],
        [f"edit {image}, dual CFG (s/image)", figures["edit_s"], "edit_s"],
        ["peak memory, text-to-image (GiB)", figures["t2i_peak_gib"], "peak_gib"],
        ["peak memory, edit (GiB)", figures["edit_peak_gib"], "peak_gib"],
        ["peak memory, understanding (GiB)", figures["understand_peak_gib"], "peak_gib"],
        ["understanding: first token (s)", figures["first_token_s"], "first_token_s"],
        ["understanding: decode (tokens/s)", figures["decode_tok_s"], "decode_tok_s"],
        ["int8 weights: text-to-image (s/image)", figures["int8_t2i_s"], None],
        ["int8 weights: peak memory (GiB)", figures["int8_peak_gib"], "int8_peak_gib"],
        ["int8 weights: final-latent error against bf16", figures["int8_latent_error"], None],
    ]
    table = []
    for label, value, key in rows:
        target, met = "", ""
        if key is not None:
            bound, sense = TARGETS[key]
            target = f"{sense} {bound:g}"
            met = "yes" if (value <= bound if sense == "<=" else value >= bound) else "NO"
        table.append([label, value, target, met])
    dtype = str(args.dtype).replace("torch.", "")
    print(f"\n## {args.config} on {device_label(args.device)}, {dtype}, {time.strftime('%Y-%m-%d')} (targets: BAGEL-7B "
          "on one H200)")  # fmt: skip
    print_table(["figure", "value", "target", "met"], table)


def main(argv=None):
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    config = build_config(args.config, tokenizer, args.num_layers)
    with torch.device("meta"):
        meta_model = BagelForConditionalGeneration(config)
    flops = count_model(meta_model)
    del meta_model
    print_model_summary(args.config, flops, config)
    block = (args.height // config.latent_downsample) * (args.width // config.latent_downsample) + 2
    print(
        f"one CFG branch of one {args.width}x{args.height} denoising step ({block} block tokens): "
        f"{block * flops.gen_token / 1e12:.4g} TFLOP in the generation expert + "
        f"{block * block * flops.attn_per_key / 1e12:.4g} TFLOP attention inside the block + "
        f"{block * flops.attn_per_key / 1e9:.4g} GFLOP per context token attended"
    )
    report = {"config": args.config, "params": flops.params, "gflop_per_latent_token": flops.gen_token / 1e9,
              "gflop_per_und_token": flops.und_token / 1e9}
    if args.meta_only:
        peak, peak_source = (args.peak_tflops, "--peak_tflops") if args.peak_tflops else H200_BF16_TFLOPS
        report.update(analyse_on_fake_tensors(args, peak))
        report["peak_source"] = peak_source
        print_fake_analysis(report)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        return report

    if args.attn == "flex_attention" and args.device.type == "cpu":
        # CPU inductor cannot build flex_attention kernels for dynamic shapes (torch 2.13): compile every shape.
        torch._dynamo.config.automatic_dynamic_shapes = False
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    if args.targets:
        figures = run_targets(args, flops)
        print_targets_table(figures, args)
        report.update(device=device_label(args.device), dtype=str(args.dtype), targets=figures)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        return report
    clock, memory = Clock(args.device), Memory(args.device)
    peak, peak_source = device_peak_tflops(args.device, args.dtype, args.peak_tflops)
    device_name = device_label(args.device)
    print(f"\ndevice: {device_name}; dtype {str(args.dtype).replace('torch.', '')}; attention {args.attn}; "
          f"peak {peak:.4g} TFLOP/s ({peak_source}); compile {'on' if args.compile else 'off'}")

    start = time.perf_counter()
    pipe = build_pipeline(args.config, args.device, args.dtype, args.attn, args.num_layers)
    if args.quantize != "none":
        quantize_linears(pipe.model.model.language_model.layers, args.quantize)
    print(f"built with random weights on {args.device} in {time.perf_counter() - start:.1f}s"
          + (f"; decoder weights quantised to {args.quantize}" if args.quantize != "none" else ""))

    understanding, rows, comparisons = None, [], []
    with torch.no_grad():
        if "understand" in args.tasks:  # before any compilation: decoding changes shapes every token
            understanding = run_understanding(pipe, args, flops, clock, memory)
        if args.compile:
            # One graph per shape of denoising rows (CFG and conditional-only steps, TaylorSeer groups, each task).
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            pipe.model.compile_denoising()
        for name in ("t2i", "edit"):
            if name in args.tasks:
                task = make_task(name, args)
                row, contexts, guidance = run_generation(pipe, task, args, clock, memory, peak)
                rows.append(row)
                if args.compare_steps:
                    comparisons.append(run_comparison(pipe, task, contexts, guidance, args, clock))
                del contexts, guidance

    if rows:
        print_generation_tables(rows, args, memory)
    if understanding is not None:
        print_understanding_table(understanding, args, memory, peak)
    if comparisons:
        print_comparison_table(comparisons)
    tasks = rows + ([understanding] if understanding is not None else [])
    report.update(device=device_name, dtype=str(args.dtype), quantize=args.quantize, peak_tflops=peak,
                  peak_source=peak_source, memory=memory.label, tasks=tasks, comparisons=comparisons)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    sys.exit(main() and 0)
