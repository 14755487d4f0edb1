"""
The shared runner of the image benchmarks: per-sample seeds, fixed batches, atomic writes and resuming.

Every benchmark module turns its published input files into a list of [`EvalItem`]s (what to draw or edit, and the
paths, relative to the output folder, where the benchmark's own scorer expects the results). [`run_items`] then draws
them with a [`BagelPipeline`]:

- **seeds**: sample `k` of the item at index `i` starts from the noise of [`sample_seed`]`(seed, i, k)`, whatever the
  other items of the run are;
- **batches**: items are grouped into fixed batches by index (`[0, B)`, `[B, 2B)`, ...), so a batch always holds the
  same items and a rerun with the same `batch_size`, device and dtype reproduces bit-identical images (within a batch,
  items whose input images differ in size go through separate calls);
- **resuming**: a batch whose outputs all exist and are complete is skipped; a batch with a missing output is drawn
  again in full and only the missing files are written, so existing files are never touched;
- **atomic writes**: each file is written to a temporary name in its folder, then renamed, so an interrupted run never
  leaves a truncated file that a rerun would take for a finished one; a failed write (full disk, permission denied)
  removes its temporary file and raises one [`EvalOutputError`] naming the output folder;
- **confinement**: before anything is written, every path of the layout is checked to be made of plain names and to
  resolve inside the output folder ([`check_layout`]), whatever the benchmark file said.
"""

from __future__ import annotations

import errno
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import PIL.Image
import torch
from diffusers.utils import logging
from tqdm.auto import tqdm

from .paths import check_output_path


logger = logging.get_logger(__name__)

__all__ = [
    "original_settings",
    "EvalItem",
    "EvalSummary",
    "EvalOutputError",
    "sample_seed",
    "atomic_save_image",
    "atomic_write_text",
    "is_complete",
    "layout_paths",
    "check_layout",
    "count_pending",
    "make_output_folder",
    "output_error",
    "run_items",
    "Benchmark",
]


def original_settings(cfg_renorm_type: str, cfg_img_scale: float = 1.0, cfg_interval=(0.0, 1.0)) -> dict:
    """The sampling settings the original evaluation scripts share: 50 timesteps (49 Euler steps), shift 3, text CFG
    4, renorm min 0; the renormalisation, image CFG and guidance interval differ by benchmark."""
    return {
        "num_inference_steps": 49,
        "timestep_shift": 3.0,
        "cfg_text_scale": 4.0,
        "cfg_img_scale": cfg_img_scale,
        "cfg_interval": tuple(cfg_interval),
        "cfg_renorm_type": cfg_renorm_type,
        "cfg_renorm_min": 0.0,
    }


@dataclass
class EvalItem:
    """
    One benchmark entry.

    Args:
        index (`int`): position of the entry in the benchmark's input file (seeds and batches derive from it).
        prompt (`str`): the prompt (text-to-image) or the editing instruction.
        outputs (`list[str]`): paths relative to the output folder of the images to draw, one per sample.
        load_images (`Callable[[], list[PIL.Image.Image]]`, *optional*): the input images of an editing entry, loaded
            only when the entry is drawn.
        size_key (`tuple`, *optional*): entries of one batch with different keys (input image sizes) are drawn by
            separate pipeline calls.
        extra_files (`dict[str, Callable[[Path], str | PIL.Image.Image]]`): other files of the benchmark's layout
            (relative path -> producer called with the output folder once the images exist), written when missing.
        source (`str`): where the entry was read (`FILE:LINE: entry N`), for error messages.
    """

    index: int
    prompt: str
    outputs: list[str]
    load_images: Callable[[], list] | None = None
    size_key: tuple = ()
    extra_files: dict = field(default_factory=dict)
    source: str = ""


@dataclass
class Benchmark:
    """
    A benchmark: how to read its published inputs and the original BAGEL evaluation's settings for it.

    Args:
        name (`str`): the `bagel eval` subcommand's name.
        load (`Callable`): `load(data, image_root, n_samples) -> list[EvalItem]`.
        task (`str`): `"text_to_image"` or `"edit"`.
        pipeline_kwargs (`dict`): guidance and schedule of the original evaluation script.
        think (`bool`): whether the paper's reported setting uses thinking (the `--think` default stays off).
        n_samples (`int`): images per entry of the official protocol.
        resolution (`int`, *optional*): output side of text-to-image benchmarks.
        data_help (`str`): what `--data` is.
        source (`str`): where the settings and layout were read.
    """

    name: str
    load: Callable
    task: str
    pipeline_kwargs: dict
    think: bool
    n_samples: int
    resolution: int | None
    data_help: str
    source: str


@dataclass
class EvalSummary:
    """What a run did: `written` files (images, thinking texts, extra files), `skipped` items found complete."""

    written: list[str] = field(default_factory=list)
    skipped: int = 0
    drawn: int = 0


class EvalOutputError(OSError, ValueError):
    """
    Writing into the output folder failed (full disk, permission denied, read-only file system, ...): one message
    naming the folder, the file and what to do; `errno` is the failed call's. A `ValueError` too, so that command-line
    callers report it as a plain error.
    """


_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG)
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


def output_error(output_dir, relative: str, error: OSError) -> EvalOutputError:
    """The [`EvalOutputError`] of `error`, raised while writing `relative` (or the folder itself) in `output_dir`."""
    reason = error.strerror or str(error)
    if error.errno in _FULL:
        hint = "free some space or choose another --output_dir"
    elif error.errno in _DENIED:
        hint = "check that you may write there (permissions, read-only file system) or choose another --output_dir"
    else:
        hint = "check the output folder"
    target = f"{relative!r} in " if relative else ""
    wrapped = EvalOutputError(
        f"could not write {target}the output folder {str(output_dir)!r}: {reason}. {hint.capitalize()}; files "
        "already finished are kept and a rerun resumes where this one stopped."
    )
    wrapped.errno = error.errno  # (not `strerror`: with both set, OSError's str() drops the message)
    return wrapped


def sample_seed(seed: int, index: int, sample: int = 0) -> int:
    """
    The seed of sample `sample` of the item at `index`, derived from the run's `seed` by a hash (so that neighbouring
    seeds or indices give unrelated noise), in `[0, 2**63)`.
    """
    for name, value in (("seed", seed), ("index", index), ("sample", sample)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"`{name}` must be an integer >= 0, got {value!r}.")
    digest = hashlib.sha256(f"bagel-eval:{seed}:{index}:{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(temporary)` in the same folder as `path`, then a rename onto `path`: no half-written file is left, and
    the temporary file is removed whatever fails (its own removal failing does not hide the first error)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary(path)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        try:
            temporary.unlink(missing_ok=True)
        except OSError as error:
            logger.warning(f"could not remove the temporary file {temporary} ({error.strerror or error}).")


def atomic_save_image(image: PIL.Image.Image, path: Path) -> None:
    """Saves `image` as PNG at `path` through a temporary file in the same folder and a rename."""
    _atomic_write(path, lambda temporary: image.save(temporary, format="PNG"))


def atomic_write_text(text: str, path: Path) -> None:
    """Writes `text` (UTF-8) at `path` through a temporary file in the same folder and a rename."""
    _atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def is_complete(path: Path) -> bool:
    """Whether `path` is a finished output: a file (written atomically) and, for an image, one PIL can read to the
    end (a file copied in by hand or cut short by a full disk is drawn again)."""
    if not path.is_file():
        return False
    if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
        try:
            with PIL.Image.open(path) as image:
                image.load()
        except (OSError, SyntaxError, ValueError):
            logger.warning(f"{path} is not a readable image; it will be drawn again.")
            return False
    return True


def _write(value, path: Path) -> None:
    if isinstance(value, PIL.Image.Image):
        atomic_save_image(value, path)
    elif isinstance(value, str):
        atomic_write_text(value, path)
    else:
        raise TypeError(f"the producer of {path} returned {type(value).__name__}, expected a PIL image or a str.")


def _save(value, output_dir: Path, relative: str, summary: EvalSummary) -> None:
    """Writes `value` at `output_dir / relative`; a failed write becomes one [`EvalOutputError`]."""
    try:
        _write(value, output_dir / relative)
    except OSError as error:
        raise output_error(output_dir, relative, error) from error
    summary.written.append(relative)


def _think_path(output: str) -> str:
    return str(Path(output).with_suffix(".txt").as_posix())


def layout_paths(item: EvalItem, think: bool) -> list[str]:
    """Every path (relative to the output folder) the runner may write for `item`: its images, their `.txt` plans
    with `think`, and its extra files."""
    paths = list(item.outputs)
    if think:
        paths += [_think_path(output) for output in item.outputs]
    return paths + list(item.extra_files)


def _where(item: EvalItem) -> str:
    return item.source or f"entry {item.index}"


def _check_not_blocked(base: Path, path: Path, relative: str, where: str, folders: set) -> None:
    """A folder where the layout expects a file, or a file where it expects a folder, refused by name."""
    if path.is_dir():
        raise ValueError(f"{where}: {str(path)!r} is a folder where the layout expects the file {relative!r}.")
    for folder in path.relative_to(base).parents:
        if folder in folders or folder == Path("."):
            continue
        if (base / folder).exists() and not (base / folder).is_dir():
            raise ValueError(
                f"{where}: {str(base / folder)!r} is a file where the layout expects a folder (for {relative!r})."
            )
        folders.add(folder)


def check_layout(items: list[EvalItem], output_dir, think: bool = False) -> Path:
    """
    Checks, before anything is written, every path the runner may write for `items` under `output_dir`: made of plain
    names, resolving inside the output folder (links followed), no folder where a file goes (nor the reverse), no two
    entries on one file.

    Returns:
        `Path`: the output folder, resolved.

    Raises:
        `ValueError` naming the entry (file and line) and the offending path.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output_dir {str(output_dir)!r} exists and is not a folder.")
    base = output_dir.resolve()
    owners: dict[str, str] = {}
    folders: set = set()
    for item in items:
        where = _where(item)
        for relative in layout_paths(item, think):
            path = check_output_path(base, relative, where)
            if relative in owners:
                raise ValueError(
                    f"{where}: output path {relative!r} is also written by {owners[relative]}; check the input file "
                    "for duplicate ids."
                )
            owners[relative] = where
            _check_not_blocked(base, path, relative, where, folders)
    return base


def _batches(items: list[EvalItem], batch_size: int) -> list[list[EvalItem]]:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    batches: dict[int, list[EvalItem]] = {}
    for item in items:
        batches.setdefault(item.index // batch_size, []).append(item)
    return list(batches.values())


def _batch_complete(batch: list[EvalItem], output_dir: Path, think: bool) -> bool:
    wanted = [output for item in batch for output in item.outputs]
    if think:
        wanted += [_think_path(output) for output in wanted]
    return all(is_complete(output_dir / output) for output in wanted)


def count_pending(items: list[EvalItem], output_dir, batch_size: int = 1, think: bool = False) -> int:
    """
    How many of `items` a run with these arguments would draw: the items of the batches with a missing or unreadable
    output ([`run_items`]'s own resume rule). 0 means the model is not needed (missing extra files, such as GenEval's
    grids, are written without it).
    """
    output_dir = Path(output_dir)
    return sum(len(batch) for batch in _batches(items, batch_size) if not _batch_complete(batch, output_dir, think))


def make_output_folder(output_dir: Path) -> None:
    """Creates the output folder; a failure becomes one [`EvalOutputError`]."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise output_error(output_dir, "", error) from error


def run_items(
    pipe,
    items: list[EvalItem],
    output_dir,
    *,
    seed: int = 0,
    batch_size: int = 1,
    think: bool = False,
    pipeline_kwargs: dict | None = None,
    progress: bool = True,
    description: str = "eval",
) -> EvalSummary:
    """
    Draws the missing outputs of `items` with `pipe` and writes them under `output_dir` (see the module docstring for
    seeds, batches and resuming). With `think`, the plan of each image is written beside it (`.txt`, as the original
    BAGEL evaluation scripts do). Every path is checked ([`check_layout`]) before anything is written.

    Args:
        pipe ([`BagelPipeline`]): the loaded pipeline; may be `None` when [`count_pending`] is 0 (only missing extra
            files are then written).
        items (`list[EvalItem]`): the entries, in the order of the benchmark's input file.
        output_dir (`str` or `os.PathLike`): the benchmark's output folder.
        seed (`int`): the run's seed (see [`sample_seed`]).
        batch_size (`int`): items per batch (each item draws `len(item.outputs)` images).
        think (`bool`): thinking mode.
        pipeline_kwargs (`dict`, *optional*): other arguments of every pipeline call (steps, guidance, size, ...).
        progress (`bool`): show a tqdm progress bar over items.

    Returns:
        [`EvalSummary`].

    Raises:
        `ValueError` for a path outside the output folder or other layout problem (nothing written);
        [`EvalOutputError`] when writing fails.
    """
    batches = _batches(items, batch_size)
    indices = [item.index for item in items]
    if len(set(indices)) != len(indices):
        raise ValueError("benchmark items must have distinct indices.")
    output_dir = Path(output_dir)
    check_layout(items, output_dir, think)
    make_output_folder(output_dir)
    pipeline_kwargs = dict(pipeline_kwargs or {})
    summary = EvalSummary()
    bar = tqdm(total=len(items), desc=description, disable=not progress)
    try:
        for batch in batches:
            if _batch_complete(batch, output_dir, think):
                summary.skipped += len(batch)
            else:
                if pipe is None:
                    raise ValueError(f"{_where(batch[0])}: outputs are missing and no pipeline was given to draw them.")
                groups: dict[tuple, list[EvalItem]] = {}
                for item in batch:
                    groups.setdefault(item.size_key, []).append(item)
                for group in groups.values():
                    _draw(pipe, group, output_dir, seed, think, pipeline_kwargs, summary)
                summary.drawn += len(batch)
            for item in batch:
                for relative, producer in item.extra_files.items():
                    if not is_complete(output_dir / relative):
                        _save(producer(output_dir), output_dir, relative, summary)
            bar.update(len(batch))
    finally:
        bar.close()
    return summary


def _draw(pipe, group: list[EvalItem], output_dir: Path, seed: int, think: bool, kwargs: dict, summary) -> None:
    counts = {len(item.outputs) for item in group}
    if len(counts) != 1:
        raise ValueError("the items of one batch must draw the same number of samples.")
    per_prompt = counts.pop()
    prompts = []
    for item in group:
        if item.load_images is None:
            prompts.append(item.prompt)
        else:
            prompts.append([*item.load_images(), item.prompt])
    generators = [
        torch.Generator().manual_seed(sample_seed(seed, item.index, k)) for item in group for k in range(per_prompt)
    ]
    result = pipe(prompts, num_images_per_prompt=per_prompt, generator=generators, think=think, **kwargs)
    images = list(result.images)
    if len(images) != len(generators):
        raise RuntimeError(f"the pipeline returned {len(images)} images for {len(generators)} requested.")
    texts = list(result.text or []) if think else []
    slots = [output for item in group for output in item.outputs]
    for position, (output, image) in enumerate(zip(slots, images)):
        if not is_complete(output_dir / output):
            _save(image, output_dir, output, summary)
        if think and not is_complete(output_dir / _think_path(output)):
            text = texts[position] if position < len(texts) else ""
            _save(text or "", output_dir, _think_path(output), summary)
