"""`--targets`: the prepared GPU run (`scripts/gpu_benchmark.sh`), every figure BAGEL-7B is held to on one GPU."""

import gc
import time

import torch

from diffusers_bagel import BagelPipeline

from .flops import FlopModel
from .generation import make_task, relative_error, time_generation
from .models import build_pipeline, quantize_linears
from .timing import Clock, Memory
from .understanding import run_understanding


__all__ = ["TARGETS", "run_targets"]


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
