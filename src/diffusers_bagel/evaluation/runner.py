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
  leaves a truncated file that a rerun would take for a finished one.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import PIL.Image
import torch
from diffusers.utils import logging
from tqdm.auto import tqdm


logger = logging.get_logger(__name__)

__all__ = [
    "original_settings",
    "EvalItem",
    "EvalSummary",
    "sample_seed",
    "atomic_save_image",
    "atomic_write_text",
    "is_complete",
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
    """

    index: int
    prompt: str
    outputs: list[str]
    load_images: Callable[[], list] | None = None
    size_key: tuple = ()
    extra_files: dict = field(default_factory=dict)


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
    """`write(temporary)` in the same folder as `path`, then a rename onto `path` (no half-written file is left)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary(path)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


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


def _think_path(output: str) -> str:
    return str(Path(output).with_suffix(".txt"))


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
    BAGEL evaluation scripts do).

    Args:
        pipe ([`BagelPipeline`]): the loaded pipeline.
        items (`list[EvalItem]`): the entries, in the order of the benchmark's input file.
        output_dir (`str` or `os.PathLike`): the benchmark's output folder.
        seed (`int`): the run's seed (see [`sample_seed`]).
        batch_size (`int`): items per batch (each item draws `len(item.outputs)` images).
        think (`bool`): thinking mode.
        pipeline_kwargs (`dict`, *optional*): other arguments of every pipeline call (steps, guidance, size, ...).
        progress (`bool`): show a tqdm progress bar over items.

    Returns:
        [`EvalSummary`].
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output_dir {str(output_dir)!r} exists and is not a folder.")
    output_dir.mkdir(parents=True, exist_ok=True)
    indices = [item.index for item in items]
    if len(set(indices)) != len(indices):
        raise ValueError("benchmark items must have distinct indices.")
    outputs = [output for item in items for output in item.outputs]
    if len(set(outputs)) != len(outputs):
        raise ValueError("two benchmark items write the same output path; check the input file for duplicate ids.")
    pipeline_kwargs = dict(pipeline_kwargs or {})
    summary = EvalSummary()
    batches: dict[int, list[EvalItem]] = {}
    for item in items:
        batches.setdefault(item.index // batch_size, []).append(item)
    bar = tqdm(total=len(items), desc=description, disable=not progress)
    try:
        for batch in batches.values():
            wanted = [output for item in batch for output in item.outputs]
            if think:
                wanted += [_think_path(output) for output in wanted]
            if all(is_complete(output_dir / output) for output in wanted):
                summary.skipped += len(batch)
            else:
                groups: dict[tuple, list[EvalItem]] = {}
                for item in batch:
                    groups.setdefault(item.size_key, []).append(item)
                for group in groups.values():
                    _draw(pipe, group, output_dir, seed, think, pipeline_kwargs, summary)
                summary.drawn += len(batch)
            for item in batch:
                for relative, producer in item.extra_files.items():
                    if not is_complete(output_dir / relative):
                        _write(producer(output_dir), output_dir / relative)
                        summary.written.append(relative)
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
        path = output_dir / output
        if not is_complete(path):
            atomic_save_image(image, path)
            summary.written.append(output)
        if think:
            text_path = output_dir / _think_path(output)
            if not is_complete(text_path):
                text = texts[position] if position < len(texts) else ""
                atomic_write_text(text or "", text_path)
                summary.written.append(_think_path(output))
