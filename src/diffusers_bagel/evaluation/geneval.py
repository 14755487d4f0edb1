"""
GenEval (`djghosh13/geneval`): text-to-image prompts with object, count, colour and position requirements.

Input: `prompts/evaluation_metadata.jsonl`, one JSON object per line with at least `prompt` and `tag`. Output, as the
official `generation/diffusers_generate.py` writes it and `evaluation/evaluate_images.py` reads it:

    OUT/<index:05d>/metadata.jsonl        the entry's line (one JSON object)
    OUT/<index:05d>/samples/<k:05d>.png   sample k < n_samples (4)
    OUT/<index:05d>/grid.png              the samples side by side (written by the official generator unless
                                          --skip_grid; ignored by the scorer)
"""

from __future__ import annotations

import json
from pathlib import Path

import PIL.Image
from diffusers.utils import logging

from .runner import Benchmark, EvalItem, original_settings


logger = logging.get_logger(__name__)

__all__ = ["load_geneval", "make_grid", "GENEVAL"]


def make_grid(images: list[PIL.Image.Image], padding: int = 2) -> PIL.Image.Image:
    """The images in one row on black, `padding` pixels around each (torchvision `make_grid`'s look)."""
    width = max(image.width for image in images)
    height = max(image.height for image in images)
    grid = PIL.Image.new("RGB", (padding + len(images) * (width + padding), height + 2 * padding))
    for position, image in enumerate(images):
        grid.paste(image.convert("RGB"), (padding + position * (width + padding), padding))
    return grid


def _grid_producer(folder: str, n_samples: int):
    def produce(output_dir: Path) -> PIL.Image.Image:
        images = []
        for k in range(n_samples):
            with PIL.Image.open(output_dir / folder / "samples" / f"{k:05d}.png") as image:
                images.append(image.convert("RGB"))
        return make_grid(images)

    return produce


def load_geneval(data, image_root=None, n_samples: int = 4, skip_grid: bool = False) -> list[EvalItem]:
    """
    The entries of a GenEval `evaluation_metadata.jsonl` file (blank lines are refused: they would shift the indices
    the scorer's folders are named by).

    Raises:
        `ValueError` naming the file and line of an entry that is not a JSON object with a non-empty `prompt`.
    """
    path = Path(data)
    if not path.is_file():
        raise ValueError(f"--data {str(path)!r}: no such file (GenEval's prompts/evaluation_metadata.jsonl).")
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    items = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise ValueError(f"{path}:{number}: blank line inside the metadata file (indices would shift).")
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not a JSON line ({error.msg}).") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str) or not entry["prompt"].strip():
            raise ValueError(f"{path}:{number}: expected a JSON object with a non-empty 'prompt'.")
        index = len(items)
        folder = f"{index:05d}"
        extra = {f"{folder}/metadata.jsonl": (lambda _out, text=line.strip(): text + "\n")}
        if not skip_grid:
            extra[f"{folder}/grid.png"] = _grid_producer(folder, n_samples)
        items.append(
            EvalItem(
                index=index,
                prompt=entry["prompt"],
                outputs=[f"{folder}/samples/{k:05d}.png" for k in range(n_samples)],
                extra_files=extra,
            )
        )
    if not items:
        raise ValueError(f"--data {str(path)!r} holds no entries.")
    return items


GENEVAL = Benchmark(
    name="geneval",
    load=load_geneval,
    task="text_to_image",
    # eval/gen/gen_images_mp.py of ByteDance-Seed/Bagel: 50 timesteps (49 steps), shift 3, text CFG 4 on all steps,
    # renorm min 0, the model's "global" renormalisation, 1024x1024, 4 samples; no image guidance (no input image).
    pipeline_kwargs=original_settings("global", cfg_interval=(0.0, 1.0)),
    think=False,
    n_samples=4,
    resolution=1024,
    data_help="GenEval's prompts/evaluation_metadata.jsonl",
    source="djghosh13/geneval generation/diffusers_generate.py; ByteDance-Seed/Bagel eval/gen/gen_images_mp.py",
)
