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

from ._inputs import read_text
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


def _check_clauses(entry: dict, key: str, where: str) -> None:
    """`include` / `exclude`, when given, as the official scorer reads them: a list of objects with a non-empty
    `class` and an integer `count` >= 0, an optional `color` string and, in `include`, an optional `position`
    [relation, index of an earlier clause]."""
    if key not in entry:
        return
    clauses = entry[key]
    if not isinstance(clauses, list):
        raise ValueError(f"{where}: field {key!r} must be a list of objects, got {type(clauses).__name__}.")
    for number, clause in enumerate(clauses):
        field = f"{key}[{number}]"
        if not isinstance(clause, dict):
            raise ValueError(f"{where}: field {field!r} must be an object, got {type(clause).__name__}.")
        if not isinstance(clause.get("class"), str) or not clause["class"].strip():
            raise ValueError(f"{where}: field {field + '.class'!r} must be a non-empty string (the object's class).")
        count = clause.get("count")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f"{where}: field {field + '.count'!r} must be an integer >= 0, got {count!r}.")
        if "color" in clause and (not isinstance(clause["color"], str) or not clause["color"].strip()):
            raise ValueError(f"{where}: field {field + '.color'!r} must be a non-empty string.")
        position = clause.get("position")
        if "position" in clause and not (
            key == "include" and isinstance(position, list) and len(position) == 2 and isinstance(position[0], str)
            and isinstance(position[1], int) and not isinstance(position[1], bool) and 0 <= position[1] < number
        ):  # fmt: skip
            raise ValueError(
                f"{where}: field {field + '.position'!r} must be [relation, index of an earlier 'include' clause], "
                f"got {position!r}."
            )


def _check_entry(entry, where: str) -> None:
    """The fields of one metadata line that the official scorer (`evaluate_images.py`, `summary_scores.py`) reads."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(entry).__name__}.")
    for key in ("prompt", "tag"):
        if key not in entry:
            raise ValueError(f"{where}: missing field {key!r} (the official GenEval scorer reads it).")
        if not isinstance(entry[key], str) or not entry[key].strip():
            raise ValueError(f"{where}: field {key!r} must be a non-empty string, got {entry[key]!r}.")
    _check_clauses(entry, "include", where)
    _check_clauses(entry, "exclude", where)


def load_geneval(data, image_root=None, n_samples: int = 4, skip_grid: bool = False) -> list[EvalItem]:
    """
    The entries of a GenEval `evaluation_metadata.jsonl` file (blank lines are refused: they would shift the indices
    the scorer's folders are named by).

    Raises:
        `ValueError` naming the file and line of an entry that is not a JSON object with the fields the official
        scorer reads (`prompt`, `tag`, and well-formed `include` / `exclude` clauses), and naming the file when it is
        missing, a folder, empty or not UTF-8.
    """
    path = Path(data)
    lines = read_text(path, "GenEval's prompts/evaluation_metadata.jsonl").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    items = []
    for number, line in enumerate(lines, start=1):
        where = f"{path}:{number}"
        if not line.strip():
            raise ValueError(f"{where}: blank line inside the metadata file (indices would shift).")
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not a JSON line ({error.msg}, column {error.colno}).") from None
        _check_entry(entry, where)
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
                source=where,
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
