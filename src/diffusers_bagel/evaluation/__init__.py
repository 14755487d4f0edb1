"""
Seeded, batched, resumable generation of the image benchmarks the BAGEL paper reports (GenEval, WISE, GEdit-Bench,
ImgEdit, KRIS-Bench, RISEBench), each written in the layout its official scorer reads (`bagel eval BENCHMARK ...`).
The understanding benchmarks run through lmms-eval with `transformers_bagel.lmms_eval_bagel`. See docs/evaluation.md.
"""

from __future__ import annotations

from pathlib import Path

from diffusers.utils import logging

from .editing import IMGEDIT, KRIS, RISE
from .gedit import GEDIT
from .geneval import GENEVAL
from .runner import Benchmark, EvalItem, EvalSummary, run_items, sample_seed
from .wise import WISE


logger = logging.get_logger(__name__)

__all__ = ["BENCHMARKS", "Benchmark", "EvalItem", "EvalSummary", "load_benchmark", "run_benchmark", "sample_seed"]

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (GENEVAL, WISE, GEDIT, IMGEDIT, KRIS, RISE)}


def load_benchmark(name: str, data, image_root=None, n_samples: int | None = None, limit: int | None = None, **options):
    """The [`EvalItem`]s of benchmark `name` read from `data` (the first `limit` ones when given)."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {sorted(BENCHMARKS)}.")
    benchmark = BENCHMARKS[name]
    n_samples = benchmark.n_samples if n_samples is None else n_samples
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"`n_samples` must be a positive integer, got {n_samples!r}.")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"`limit` must be a positive integer, got {limit!r}.")
    items = benchmark.load(data, image_root=image_root, n_samples=n_samples, **options)
    return items[:limit] if limit is not None else items


def run_benchmark(
    pipe,
    name: str,
    data,
    output_dir,
    *,
    image_root=None,
    seed: int = 0,
    batch_size: int = 1,
    n_samples: int | None = None,
    think: bool = False,
    limit: int | None = None,
    resolution: int | None = None,
    progress: bool = True,
    load_options: dict | None = None,
    items: list[EvalItem] | None = None,
    **overrides,
) -> EvalSummary:
    """
    Generates benchmark `name`'s outputs under `output_dir` with `pipe` ([`BagelPipeline`]), with the original BAGEL
    evaluation's settings (`BENCHMARKS[name].pipeline_kwargs`) unless overridden by `overrides` (any
    [`BagelPipeline.__call__`] argument: `num_inference_steps`, `cfg_text_scale`, `max_think_tokens`, ...).

    Args:
        resolution (`int`, *optional*): side of text-to-image outputs; by default the pipeline's, 1024 capped by the
            model's largest image (1024 for BAGEL-7B-MoT, the original evaluation's resolution). Editing benchmarks keep
            the input image's VAE-resized size.
        items (`list[EvalItem]`, *optional*): the entries already read by [`load_benchmark`] (so that bad input
            files fail before the model loads); read from `data` otherwise.

    Returns:
        [`EvalSummary`]: the files written and the items skipped as already complete.
    """
    if items is None:
        items = load_benchmark(name, data, image_root, n_samples, limit, **(load_options or {}))
    benchmark = BENCHMARKS[name]
    kwargs = {**benchmark.pipeline_kwargs, **{k: v for k, v in overrides.items() if v is not None}}
    if benchmark.task == "text_to_image":
        if resolution is not None:
            kwargs.setdefault("height", resolution)
            kwargs.setdefault("width", resolution)
    elif resolution is not None:
        raise ValueError(f"{name} edits images at their own size; --resolution applies to text-to-image benchmarks.")
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    logger.info(f"{name}: {len(items)} entries -> {output_dir} (settings {kwargs}, think={think}, seed={seed})")
    return run_items(
        pipe, items, output_dir, seed=seed, batch_size=batch_size, think=think, pipeline_kwargs=kwargs,
        progress=progress, description=name,
    )  # fmt: skip
