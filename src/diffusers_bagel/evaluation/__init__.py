"""
Seeded, batched, resumable generation of the image benchmarks the BAGEL paper reports (GenEval, WISE, GEdit-Bench,
ImgEdit, KRIS-Bench, RISEBench), each written in the layout its official scorer reads (`bagel eval BENCHMARK ...`).
The understanding benchmarks run through lmms-eval with `transformers_bagel.lmms_eval_bagel`. See docs/evaluation.md.
"""

from __future__ import annotations

from .editing import IMGEDIT, KRIS, RISE
from .gedit import GEDIT
from .geneval import GENEVAL
from .plan import EvalPlan, make_plan, run_plan
from .record import SETTINGS_FILE, SettingsMismatchError
from .runner import Benchmark, EvalItem, EvalOutputError, EvalSummary, sample_seed
from .wise import WISE


__all__ = [
    "BENCHMARKS",
    "SETTINGS_FILE",
    "Benchmark",
    "EvalItem",
    "EvalOutputError",
    "EvalPlan",
    "EvalSummary",
    "SettingsMismatchError",
    "load_benchmark",
    "plan_benchmark",
    "run_benchmark",
    "run_plan",
    "sample_seed",
]

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (GENEVAL, WISE, GEDIT, IMGEDIT, KRIS, RISE)}


def _benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {sorted(BENCHMARKS)}.")
    return BENCHMARKS[name]


def load_benchmark(name: str, data, image_root=None, n_samples: int | None = None, limit: int | None = None, **options):
    """The [`EvalItem`]s of benchmark `name` read from `data` (the first `limit` ones when given)."""
    benchmark = _benchmark(name)
    n_samples = benchmark.n_samples if n_samples is None else n_samples
    if not isinstance(n_samples, int) or isinstance(n_samples, bool) or n_samples < 1:
        raise ValueError(f"`n_samples` must be a positive integer, got {n_samples!r}.")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"`limit` must be a positive integer, got {limit!r}.")
    items = benchmark.load(data, image_root=image_root, n_samples=n_samples, **options)
    return items[:limit] if limit is not None else items


def plan_benchmark(
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
    checkpoint=None,
    dtype=None,
    device=None,
    overwrite: bool = False,
    load_options: dict | None = None,
    items: list[EvalItem] | None = None,
    **overrides,
) -> EvalPlan:
    """
    Everything `bagel eval` checks before the model loads, with nothing written: reads and checks the benchmark file
    (every entry), proves every output path stays inside `output_dir`, compares this run's settings with the folder's
    record ([`SETTINGS_FILE`]) and counts the entries left to draw ([`EvalPlan.pending`]; 0: do not load the model).
    Carry the plan out with [`run_plan`].

    Args:
        resolution (`int`, *optional*): side of text-to-image outputs; by default the pipeline's, 1024 capped by the
            model's largest image (1024 for BAGEL-7B-MoT, the original evaluation's resolution). Editing benchmarks keep
            the input image's VAE-resized size.
        checkpoint (`str` or `os.PathLike`, *optional*): the converted folder (its name is part of the settings).
        dtype (`str` or `torch.dtype`, *optional*), device (`str`, *optional*): `--dtype` and `--device` (`"auto"` is
            resolved as the command loads the model: bfloat16 on CUDA, float32 elsewhere).
        overwrite (`bool`): let a run with other settings than the folder's record delete the earlier outputs and draw
            them again (refused with [`SettingsMismatchError`] otherwise).
        items (`list[EvalItem]`, *optional*): every entry, already read by [`load_benchmark`] without `limit`.
        overrides: [`BagelPipeline.__call__`] arguments (`num_inference_steps`, `cfg_text_scale`, ...); `None` values
            keep the benchmark's settings.

    Raises:
        `ValueError` naming the file, line, field or id of a bad entry, or the offending setting or path.
    """
    benchmark = _benchmark(name)
    if items is None:
        items = load_benchmark(name, data, image_root, n_samples, None, **(load_options or {}))
    return make_plan(
        benchmark, items, output_dir, limit=limit, seed=seed, batch_size=batch_size, think=think,
        resolution=resolution, checkpoint=checkpoint, dtype=dtype, device=device, overwrite=overwrite, data=data,
        overrides=overrides,
    )  # fmt: skip


def run_benchmark(
    pipe, name: str, data, output_dir, *, progress: bool = True, checkpoint=None, **options
) -> EvalSummary:
    """
    Generates benchmark `name`'s outputs under `output_dir` with `pipe` ([`BagelPipeline`]), with the original BAGEL
    evaluation's settings (`BENCHMARKS[name].pipeline_kwargs`) unless overridden: [`plan_benchmark`] then
    [`run_plan`].

    Args:
        progress (`bool`, defaults to `True`): show a progress bar.
        checkpoint (`str`, *optional*): the name recorded in the settings (default: the pipeline's `name_or_path`);
            the recorded dtype is the pipeline's.
        options: the other arguments of [`plan_benchmark`] (`seed`, `batch_size`, `n_samples`, `think`, `limit`,
            `resolution`, `overwrite`, `items`, ...) and [`BagelPipeline.__call__`] overrides (`num_inference_steps`,
            `cfg_text_scale`, ...).

    Returns:
        [`EvalSummary`]: the files written and the items skipped as already complete.
    """
    if checkpoint is None:
        checkpoint = getattr(pipe, "name_or_path", None) or None
    plan = plan_benchmark(name, data, output_dir, checkpoint=checkpoint, dtype=getattr(pipe, "dtype", None), **options)
    return run_plan(pipe, plan, progress=progress)
