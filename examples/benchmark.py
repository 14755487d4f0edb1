"""
Speed and memory of BAGEL (text-to-image, editing with dual CFG, image understanding) on random weights.

    python examples/benchmark.py                                  # GPU: the 7B in bf16, 1024x1024, 50 steps
    python examples/benchmark.py --config small                   # CPU: a small model, 256x256, same table
    python examples/benchmark.py --config 7b --meta_only          # any machine: 7B sizes, parameters, FLOPs/token

The model is built from its configuration with random weights directly on the device (speed does not depend on weight
values; nothing is downloaded). For each task it prints seconds per image, seconds per denoising step, context-prefill
time, first-token latency and decode tokens/s (understanding), peak memory, and achieved TFLOP/s against the device's
peak. FLOPs are counted from the configuration: 2 x the weights each token passes through (the generation expert for
latent tokens, the understanding expert for text and ViT tokens, the ViT for patches) plus attention
(4 x heads x head_dim x attended keys per layer).

The comparison table runs, in the same process, the denoising steps of the pipeline (CFG branches batched into one
forward over cached contexts) against the unoptimised path of the same model: every branch one after another, each
re-running its whole context (text, ViT image, VAE image) plus the latent block through `BagelModel.forward`, no
cache. It prints seconds per step of both, the speed-up, and how far their velocities and latents differ.
"""

import argparse
import json
import math
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL
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
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TASKS = ("t2i", "edit", "understand")


# -- building --------------------------------------------------------------------------------------------------------


def build_config(preset: str, tokenizer) -> BagelConfig:
    """The preset's BagelConfig, with the special-token ids of `tokenizer`."""
    spec = PRESETS[preset]
    token_ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in SPECIAL_TOKENS.items()}
    text = BagelTextConfig(**spec["text"])
    vision = SiglipVisionConfig(**{**BagelConfig().vision_config.to_dict(), **spec["vision"]})
    return BagelConfig(text_config=text, vision_config=vision, max_latent_size=spec["max_latent_size"], **token_ids)


def build_pipeline(preset: str, device: torch.device, dtype: torch.dtype, attn: str) -> BagelPipeline:
    """A BagelPipeline of the preset's sizes with random weights, created directly on `device` in `dtype`."""
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    config = build_config(preset, tokenizer)
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


def denoise_flops(flops: FlopModel, num_tokens: int, context_lengths: list[int], branches_per_step: list[int]) -> float:
    """FLOPs of the denoising loop: per step, each active branch row runs `num_tokens + 2` block tokens through the
    generation expert and attends to its real context plus the block."""
    block = num_tokens + 2
    per_branch = [block * flops.gen_token + block * (ctx + block) * flops.attn_per_key for ctx in context_lengths]
    return float(sum(sum(per_branch[:n]) for n in branches_per_step))


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


def device_peak_tflops(device: torch.device, dtype: torch.dtype, override: float | None) -> tuple[float, str]:
    """(peak TFLOP/s, where the figure comes from): --peak_tflops, a data-sheet value, or a measured matmul."""
    if override is not None:
        return override, "--peak_tflops"
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_BF16_PEAK_TFLOPS:
            if key in name:
                return value, f"data sheet, {name}, dense {dtype}".replace("torch.", "")
    clock = Clock(device)
    size = 4096 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = math.inf
    for _ in range(5):
        start = clock.now()
        a @ b
        best = min(best, clock.now() - start)
    return 2 * size**3 / best / 1e12, f"measured {size}x{size} {dtype} matmul".replace("torch.", "")


# -- the tasks ---------------------------------------------------------------------------------------------------------


def test_image(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


class GuidanceRecorder:
    """Wraps `pipe.prepare_guidance` to time the context prefill and keep the guidance (context lengths, branches)."""

    def __init__(self, pipe: BagelPipeline, clock: Clock):
        self.pipe, self.clock = pipe, clock
        self.original = pipe.prepare_guidance
        self.guidance = None
        self.seconds = 0.0

    def __enter__(self):
        def wrapped(*args, **kwargs):
            start = self.clock.now()
            self.guidance = self.original(*args, **kwargs)
            self.seconds = self.clock.now() - start
            return self.guidance

        self.pipe.prepare_guidance = wrapped
        return self

    def __exit__(self, *exc):
        del self.pipe.prepare_guidance  # back to the class method


def branches_per_step(pipe: BagelPipeline, guidance, steps: int, shift: float) -> list[int]:
    scheduler = FlowMatchEulerScheduler()
    scheduler.set_timesteps(steps, timestep_shift=shift)
    sigmas = scheduler.sigmas[:-1].tolist()
    active = [guidance.use_text and scheduler.cfg_active(s, guidance.cfg_interval) for s in sigmas]
    return [guidance.num_branches if a else 1 for a in active]


def context_lengths(guidance) -> list[int]:
    if guidance.context_mask is not None:
        return guidance.context_mask.sum(-1).tolist()
    length = guidance.cache.get_seq_length() if guidance.cache is not None else 0
    return [length] * (guidance.batch_size * guidance.num_branches)


def run_generation(pipe, task: str, args, flops: FlopModel, clock: Clock, memory: Memory) -> dict:
    """One timed pipeline call (after a short warm-up call), returning the table's figures."""
    height, width = args.height, args.width
    call = {"num_inference_steps": args.steps, "output_type": "pil", "height": height, "width": width}
    if task == "edit":
        call["image"] = test_image(width, height)
        prompt = "Make the sky above the house a deep orange sunset and add two birds."
    else:
        prompt = "A photo of a red cat sitting on a wooden table next to a window, soft morning light."

    warm = dict(call, num_inference_steps=args.warmup_steps)
    pipe(prompt, generator=torch.manual_seed(args.seed), **warm)

    stamps = {}

    def on_step_end(_pipe, step, _timestep, _kwargs):
        if step in (0, args.steps - 1):
            stamps[step] = clock.now()
        return {}

    memory.reset()
    with GuidanceRecorder(pipe, clock) as recorder:
        start = clock.now()
        pipe(prompt, generator=torch.manual_seed(args.seed), callback_on_step_end=on_step_end, **call)
        total = clock.now() - start
    guidance = recorder.guidance
    if args.steps > 1:
        per_step = (stamps[args.steps - 1] - stamps[0]) / (args.steps - 1)
        loop_steps = branches_per_step(pipe, guidance, args.steps, 3.0)[1:]
    else:
        per_step = stamps[0] - start - recorder.seconds
        loop_steps = branches_per_step(pipe, guidance, args.steps, 3.0)
    num_tokens = (height // pipe.latent_downsample) * (width // pipe.latent_downsample)
    loop_flops = denoise_flops(flops, num_tokens, context_lengths(guidance), loop_steps)
    return {
        "task": task,
        "image": f"{width}x{height}",
        "steps": args.steps,
        "cfg_branches": guidance.num_branches,
        "context_tokens": context_lengths(guidance),
        "s_per_image": total,
        "s_per_step": per_step,
        "prefill_s": recorder.seconds,
        "first_token_s": None,
        "decode_tok_s": None,
        "peak_mem_gib": memory.peak_gib(),
        "tflops": loop_flops / (per_step * len(loop_steps)) / 1e12,
    }


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


def run_understanding(pipe, args, flops: FlopModel, clock: Clock, memory: Memory) -> dict:
    """Prefill of one image and a question, then `--decode_tokens` greedy tokens through `model.generate`."""
    image = test_image(args.width, args.height, seed=1)
    question = "Describe this picture in detail: what objects are there and what colours do they have?"
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    inputs = pipe.processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    inputs = {k: v.to(clock.device) for k, v in inputs.items()}
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
        "steps": None,
        "cfg_branches": None,
        "context_tokens": [prompt_tokens],
        "s_per_image": None,
        "s_per_step": None,
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


def run_comparison(pipe, task: str, args, clock: Clock) -> dict:
    """`--compare_steps` denoising steps (the first ones of the schedule, where CFG is on) of both paths, timed."""
    height, width = args.height, args.width
    items = [test_image(width, height), "Make the sky orange."] if task == "edit" else ["A red cat on a table."]
    preset = EDIT_PRESET if task == "edit" else TEXT_TO_IMAGE_PRESET
    contexts = pipe.build_contexts(items, think=False)
    guidance = pipe.prepare_guidance([contexts], cfg_renorm_min=0.0, **preset)
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
        "task": task,
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
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.4g}"
    return str(value)


def print_table(headers: list[str], rows: list[list]):
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")


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
                        help="Steps of the untimed warm-up call before each timed generation (default: 6, enough "
                             "to run both the CFG and the conditional-only step shapes).")
    parser.add_argument("--decode_tokens", type=int, default=64, help="Tokens decoded in the understanding task (default: 64).")
    parser.add_argument("--tasks", default=",".join(TASKS),
                        help=f"Comma-separated tasks to time, from {','.join(TASKS)} (default: all).")
    parser.add_argument("--compare_steps", type=int, default=4,
                        help="Denoising steps timed for the optimised-vs-sequential comparison; 0 skips it "
                             "(default: 4).")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each decoder layer for the generation tasks (off by default; the "
                             "warm-up call pays the compilation).")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="The device's peak TFLOP/s for the utilisation column (default: data sheet for known "
                             "GPUs, else a measured matmul).")
    parser.add_argument("--meta_only", action="store_true",
                        help="Build the configuration on the meta device, print parameters and FLOPs/token, exit.")
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
    args.dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if on_gpu else torch.float32)
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
    for name in ("steps", "decode_tokens", "warmup_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}.")
    if args.compare_steps < 0:
        parser.error(f"--compare_steps must be >= 0, got {args.compare_steps}.")
    if args.quantize != "none":
        try:
            import torchao  # noqa: F401
        except ImportError:
            parser.error("--quantize needs torchao: pip install -e '.[quant]'")
        if args.quantize == "int4" and not on_gpu:
            parser.error("--quantize int4 runs on CUDA only; use int8 on the CPU.")
    return args


def quantize_decoder(model, scheme: str) -> None:
    """torchao weight-only quantisation, in place, of every linear of the MoT decoder (understanding and generation
    experts); the ViT, connector, embeddings and heads stay in the model's dtype."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    config = Int8WeightOnlyConfig() if scheme == "int8" else Int4WeightOnlyConfig(group_size=128)
    quantize_(model.model.language_model.layers, config)


def main(argv=None):
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    config = build_config(args.config, tokenizer)
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
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        return report

    if args.attn == "flex_attention" and args.device.type == "cpu":
        # CPU inductor cannot build flex_attention kernels for dynamic shapes (torch 2.13): compile every shape.
        torch._dynamo.config.automatic_dynamic_shapes = False
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    clock, memory = Clock(args.device), Memory(args.device)
    peak, peak_source = device_peak_tflops(args.device, args.dtype, args.peak_tflops)
    if args.device.type == "cuda":
        device_name = torch.cuda.get_device_name(args.device)
    else:
        device_name = f"CPU ({torch.get_num_threads()} threads)"
    print(f"\ndevice: {device_name}; dtype {str(args.dtype).replace('torch.', '')}; attention {args.attn}; "
          f"peak {peak:.4g} TFLOP/s ({peak_source}); compile {'on' if args.compile else 'off'}")

    start = time.perf_counter()
    pipe = build_pipeline(args.config, args.device, args.dtype, args.attn)
    if args.quantize != "none":
        quantize_decoder(pipe.model, args.quantize)
    print(f"built with random weights on {args.device} in {time.perf_counter() - start:.1f}s"
          + (f"; decoder weights quantised to {args.quantize}" if args.quantize != "none" else ""))

    rows, comparisons = [], []
    with torch.no_grad():
        if "understand" in args.tasks:  # before any compilation: decoding changes shapes every token
            rows.append(run_understanding(pipe, args, flops, clock, memory))
        layers = pipe.model.model.language_model.layers
        if args.compile:
            # One graph per shape (CFG and conditional-only steps, each context length); leave room for them.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            for layer in layers:
                layer.compile(dynamic=False)
        for task in ("t2i", "edit"):
            if task in args.tasks:
                rows.append(run_generation(pipe, task, args, flops, clock, memory))
                if args.compare_steps:
                    comparisons.append(run_comparison(pipe, task, args, clock))
    rows.sort(key=lambda r: TASKS.index(r["task"]))

    print(f"\n## Speed ({args.config}, {args.steps} steps, {args.width}x{args.height})")
    print_table(
        ["task", "image", "CFG branches", "context tokens", "s/image", "s/step", "prefill s", "first token s",
         "decode tok/s", memory.label, "TFLOP/s", "% of peak"],
        [
            [r["task"], r["image"], r["cfg_branches"], "/".join(str(c) for c in r["context_tokens"]), r["s_per_image"],
             r["s_per_step"], r["prefill_s"], r["first_token_s"], r["decode_tok_s"], r["peak_mem_gib"], r["tflops"],
             100 * r["tflops"] / peak]
            for r in rows
        ],
    )
    if comparisons:
        print("\n## Denoising step: optimised (batched CFG, cached contexts) vs sequential (no cache, one branch "
              "after another)")
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
        )
    report.update(device=device_name, dtype=str(args.dtype), quantize=args.quantize, peak_tflops=peak, peak_source=peak_source,
                  memory=memory.label, tasks=rows, comparisons=comparisons)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    sys.exit(main() and 0)
