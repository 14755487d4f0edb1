"""
Speed, FLOPs and memory of BAGEL (text-to-image, editing with dual CFG, image understanding) on random weights.

    python examples/benchmark.py                                  # GPU: the 7B in bf16, 1024x1024, 50 steps
    python examples/benchmark.py --config small                   # CPU: a small model, 256x256, same tables
    python examples/benchmark.py --config 7b --meta_only          # any machine: 7B sizes, parameters, FLOPs/token
    python examples/benchmark.py --communication                  # any machine: 7B bytes between GPUs per step

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
  KV cache (bytes)        bytes of the cached keys and values of all prefilled contexts, every layer of
                          `guidance.context.cache`; the no-text context is a prefix of the full one and shares its
                          keys.
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
import json
import math
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from benchmarking.communication import communication_report, communication_table
from benchmarking.fake_tensors import analyse_on_fake_tensors
from benchmarking.flops import FlopModel, count_model
from benchmarking.generation import STEP_CACHES, make_task, run_generation
from benchmarking.models import PRESETS, TOKENIZER_DIR, build_config, build_pipeline, quantize_linears
from benchmarking.sequential import run_comparison
from benchmarking.targets import TARGETS, run_targets
from benchmarking.timing import Clock, Memory, device_label, device_peak
from benchmarking.understanding import run_understanding
from transformers_bagel import BagelConfig, BagelForConditionalGeneration


# The floor of --meta_only without --peak_tflops: a bf16 8192^3 matmul measured on one H200 of this project's lender.
H200_BF16_TFLOPS = (790.0, "bf16 matmul measured on an H200")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TASKS = ("t2i", "edit", "understand")


# -- tables ------------------------------------------------------------------------------------------------------------


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


def run_communication(meta_model, args) -> dict:
    peak = args.peak_tflops or H200_BF16_TFLOPS[0]
    report = communication_report(meta_model, args.height, args.width, args.steps, peak,
                                  PRESETS[args.config]["image_sizes"])
    print(f"## Communication per denoising step: {args.config}, {report['image']}, bf16, compute at {peak:g} TFLOP/s "
          "(per training step for fsdp; speed-ups over one GPU: no overlap / full overlap)")  # fmt: skip
    print_table(*communication_table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


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
    parser.add_argument("--communication", action="store_true",
                        help="Count, from the model's shapes, the bytes each GPU sends per denoising step for "
                             "guidance branches in parallel, tensor parallelism, Ulysses and ring sequence parallelism "
                             "and FSDP2 training on 2-8 GPUs, their time on NVLink and PCIe and the implied speed-up "
                             "(benchmarking/communication.py explains the counts). --config 7b by default. Then exit.")
    parser.add_argument("--json", type=Path, default=None, help="Also write every figure to this JSON file.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of weights and noise.")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's own choice, usually one per core).")
    args = parser.parse_args(argv)

    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but CUDA is not available.")
    on_gpu = args.device.type == "cuda"
    args.config = args.config or ("7b" if on_gpu or args.communication else "small")
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
    if args.communication and (args.meta_only or args.targets):
        parser.error("--communication counts alone: drop --meta_only and --targets.")
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


def main(argv=None):
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    config = build_config(args.config, tokenizer, args.num_layers)
    with torch.device("meta"):
        meta_model = BagelForConditionalGeneration(config)
    if args.communication:
        return run_communication(meta_model, args)
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
    peak, peak_source = device_peak(args.device, args.dtype, args.peak_tflops)
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
