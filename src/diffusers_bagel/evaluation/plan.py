"""
A run of `bagel eval` in two steps, so that everything that can be refused is refused before the model loads:

1. [`make_plan`] (no file written): the entries are read and checked, every output path is proven to stay inside the
   output folder, the folder's settings record is compared with this run's settings, and the entries left to draw
   are counted ([`EvalPlan.pending`]; 0 means the model need not be loaded);
2. [`run_plan`]: deletes the earlier run's outputs when asked to overwrite them, writes the settings record, then
   draws what is missing ([`run_items`]).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch
from diffusers.utils import logging

from .paths import check_output_path
from .record import (
    SETTINGS_FILE,
    SettingsMismatchError,
    entries_digest,
    folder_holds_outputs,
    mismatch_message,
    read_record,
    record_conflicts,
    write_record,
)
from .runner import (
    Benchmark,
    EvalItem,
    EvalSummary,
    make_output_folder,
    check_layout,
    count_pending,
    layout_paths,
    output_error,
    run_items,
    sample_seed,
)


logger = logging.get_logger(__name__)

__all__ = ["EvalPlan", "make_plan", "run_plan"]


@dataclass
class EvalPlan:
    """
    What a run will do, decided before the model loads (see [`make_plan`]).

    Args:
        benchmark (`str`): the benchmark's name.
        output_dir (`Path`): the output folder.
        items (`list[EvalItem]`): this run's entries (after `limit`).
        all_items (`list[EvalItem]`): every entry of the benchmark file (whose outputs `--overwrite` deletes).
        seed (`int`), batch_size (`int`), think (`bool`): as given.
        pipeline_kwargs (`dict`): the arguments of every pipeline call.
        settings (`dict`): the settings the record compares; info (`dict`): recorded for information only.
        pending (`int`): entries left to draw (0: nothing to draw, the model is not needed).
        replace (`bool`): the earlier run's outputs (other settings) are deleted before drawing (`overwrite`).
        write_record (`bool`): the settings record is (re)written before drawing.
    """

    benchmark: str
    output_dir: Path
    items: list[EvalItem]
    all_items: list[EvalItem]
    seed: int
    batch_size: int
    think: bool
    pipeline_kwargs: dict
    settings: dict
    info: dict = field(default_factory=dict)
    pending: int = 0
    replace: bool = False
    write_record: bool = True

    @property
    def complete(self) -> bool:
        """Whether every entry of the run is already drawn (the model need not be loaded)."""
        return self.pending == 0


def _dtype_name(dtype, device) -> str | None:
    """The dtype the weights will have: `"auto"` is bfloat16 on CUDA, float32 elsewhere (`bagel eval --dtype`)."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    if dtype != "auto":
        return str(dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        kind = str(device)
    return "bfloat16" if kind == "cuda" else "float32"


def _checkpoint_name(checkpoint) -> str | None:
    if checkpoint is None:
        return None
    path = Path(str(checkpoint))
    return path.resolve().name if path.exists() else str(checkpoint)


def _version() -> str | None:
    try:
        return metadata.version("bagel-hf")
    except metadata.PackageNotFoundError:
        return None


def pipeline_arguments(benchmark: Benchmark, resolution: int | None, overrides: dict) -> dict:
    """The benchmark's original settings with `overrides` (those not `None`) and, for text-to-image, `resolution`."""
    kwargs = {**benchmark.pipeline_kwargs, **{k: v for k, v in overrides.items() if v is not None}}
    if resolution is not None:
        if benchmark.task != "text_to_image":
            raise ValueError(
                f"{benchmark.name} edits images at their own size; --resolution applies to text-to-image benchmarks."
            )
        kwargs.setdefault("height", resolution)
        kwargs.setdefault("width", resolution)
    return kwargs


def _check_writable(output_dir: Path) -> None:
    """The output folder, or the nearest folder above it that exists, must be a writable folder (refused before the
    model loads)."""
    folder = output_dir
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"--output_dir {str(output_dir)!r}: {str(folder)!r} is a file, not a folder.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(
            f"--output_dir {str(output_dir)!r}: {str(folder)!r} is not writable (permission denied); choose another "
            "--output_dir or fix its permissions."
        )


def _check_record(plan: EvalPlan, overwrite: bool) -> None:
    """Compares the folder's record with `plan.settings`; sets `plan.replace` and `plan.write_record`."""
    try:
        record = read_record(plan.output_dir)
    except ValueError:
        if not overwrite:
            raise
        record = {"settings": {"record": "unreadable"}}
    if record is None:
        plan.write_record = True
        if any((plan.output_dir / p).exists() for item in plan.all_items for p in layout_paths(item, plan.think)):
            logger.warning(
                f"{plan.output_dir} holds outputs but no settings record ({SETTINGS_FILE}, written since this "
                "version); they are taken as drawn with this run's settings."
            )
        return
    conflicts = record_conflicts(record["settings"], plan.settings)
    plan.write_record = bool(conflicts)
    if not conflicts or not folder_holds_outputs(plan.output_dir):
        return
    if not overwrite:
        raise SettingsMismatchError(mismatch_message(plan.output_dir, conflicts))
    recorded = record["settings"].get("benchmark", plan.benchmark)
    if recorded != plan.benchmark:
        raise SettingsMismatchError(
            f"the output folder {str(plan.output_dir)!r} holds {recorded!r} outputs; --overwrite only replaces the "
            f"outputs of the same benchmark. Use another --output_dir for {plan.benchmark!r}."
        )
    plan.replace = True


def make_plan(
    benchmark: Benchmark,
    all_items: list[EvalItem],
    output_dir,
    *,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 1,
    think: bool = False,
    resolution: int | None = None,
    checkpoint=None,
    dtype=None,
    device=None,
    overwrite: bool = False,
    data=None,
    overrides: dict | None = None,
) -> EvalPlan:
    """
    Plans a run of `benchmark` over `all_items` (every entry of its file; the first `limit` are drawn) into
    `output_dir`. Writes nothing.

    Args:
        checkpoint (`str` or `os.PathLike`, *optional*): the converted folder (its name is recorded).
        dtype (`str` or `torch.dtype`, *optional*): `bagel eval --dtype` (`"auto"` resolved with `device` as the
            command does) or the loaded pipeline's dtype.
        overwrite (`bool`): allow a run with other settings than the folder's record: its outputs are deleted and drawn
            again ([`run_plan`]).
        overrides (`dict`, *optional*): [`BagelPipeline.__call__`] arguments over the benchmark's settings.

    Raises:
        `ValueError`: bad arguments, a path outside the output folder, a folder or file in the way;
        [`SettingsMismatchError`] (a `ValueError`): other settings than the record of a folder holding outputs.
    """
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"`limit` must be a positive integer, got {limit!r}.")
    sample_seed(seed, 0)  # checks the seed
    items = all_items[:limit] if limit is not None else list(all_items)
    kwargs = pipeline_arguments(benchmark, resolution, overrides or {})
    output_dir = Path(output_dir)
    check_layout(all_items, output_dir, think)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    _check_writable(output_dir)
    settings = {
        "benchmark": benchmark.name,
        "entries_sha256": entries_digest(all_items),
        "checkpoint": _checkpoint_name(checkpoint),
        "dtype": _dtype_name(dtype, device),
        "seed": seed,
        "n_samples": len(all_items[0].outputs) if all_items else None,
        "think": bool(think),
        **kwargs,
    }
    info = {
        "data": None if data is None else str(data),
        "entries": len(all_items),
        "batch_size": batch_size,
        "limit": limit,
        "device": None if device is None else str(device),
        "bagel_hf": _version(),
    }
    plan = EvalPlan(benchmark.name, output_dir, items, list(all_items), seed, batch_size, think, kwargs, settings, info)
    _check_record(plan, overwrite)
    plan.pending = len(items) if plan.replace else count_pending(items, output_dir, batch_size, think)
    return plan


def _delete_earlier_outputs(plan: EvalPlan) -> int:
    """Deletes the files of the layout of every entry (plans included) before an overwriting run; returns how many."""
    base = plan.output_dir.resolve()
    deleted = 0
    for item in plan.all_items:
        for relative in layout_paths(item, think=True):
            path = check_output_path(base, relative, item.source or f"entry {item.index}")
            if path.is_file() or path.is_symlink():
                try:
                    path.unlink()
                except OSError as error:
                    raise output_error(plan.output_dir, relative, error) from error
                deleted += 1
    return deleted


def _warn_leftovers(plan: EvalPlan) -> None:
    """Files of the folder outside this benchmark file's layout (e.g. entries of an earlier, longer file)."""
    known = {relative for item in plan.all_items for relative in layout_paths(item, think=True)} | {SETTINGS_FILE}
    others = [
        path.relative_to(plan.output_dir).as_posix()
        for path in plan.output_dir.rglob("*")
        if path.is_file() and path.relative_to(plan.output_dir).as_posix() not in known
    ]
    if others:
        logger.warning(
            f"{plan.output_dir} still holds {len(others)} files outside this benchmark file's layout (e.g. "
            f"{others[:3]}); a scorer that lists the folder may read them."
        )


def run_plan(pipe, plan: EvalPlan, progress: bool = True) -> EvalSummary:
    """
    Carries out `plan` (from [`make_plan`]): with `plan.replace`, deletes the earlier run's outputs first; writes the
    settings record; draws the missing outputs with `pipe` (`None` is enough when `plan.pending` is 0).

    Returns:
        [`EvalSummary`].

    Raises:
        [`EvalOutputError`] (an `OSError` and a `ValueError`) naming the output folder when writing fails.
    """
    make_output_folder(plan.output_dir)
    if plan.replace:
        deleted = _delete_earlier_outputs(plan)
        logger.warning(f"{plan.output_dir}: deleted {deleted} outputs drawn with other settings (--overwrite).")
        _warn_leftovers(plan)
    if plan.write_record:
        try:
            write_record(plan.output_dir, plan.settings, plan.info)
        except OSError as error:
            raise output_error(plan.output_dir, SETTINGS_FILE, error) from error
    logger.info(
        f"{plan.benchmark}: {len(plan.items)} entries ({plan.pending} to draw) -> {plan.output_dir} (settings "
        f"{plan.pipeline_kwargs}, think={plan.think}, seed={plan.seed})"
    )
    return run_items(
        pipe, plan.items, plan.output_dir, seed=plan.seed, batch_size=plan.batch_size, think=plan.think,
        pipeline_kwargs=plan.pipeline_kwargs, progress=progress, description=plan.benchmark,
    )  # fmt: skip
