"""Reading the benchmarks' JSON files and images, with errors that name the file and the entry."""

from __future__ import annotations

import json
from pathlib import Path


__all__ = ["read_json", "require_field", "image_loader", "image_size", "check_single_sample"]


def read_json(data, what: str):
    """The parsed JSON file `data` (`what` names the benchmark file in errors)."""
    path = Path(data)
    if not path.is_file():
        raise ValueError(f"--data {str(path)!r}: no such file ({what}).")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"--data {str(path)!r} is not valid JSON ({error.msg}, line {error.lineno}).") from None


def require_field(entry, key: str, where: str, kinds=(str,)):
    """`entry[key]`, refused with `where` (file and entry) when missing, of another type or an empty string."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(entry).__name__}.")
    if key not in entry:
        raise ValueError(f"{where}: missing field {key!r}.")
    value = entry[key]
    if not isinstance(value, kinds) or isinstance(value, bool) or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{where}: field {key!r} must be a non-empty {' or '.join(k.__name__ for k in kinds)}.")
    return value


def image_size(path: Path, where: str) -> tuple:
    """The (width, height) of the image at `path` (its header only), refused with `where` when unreadable."""
    import PIL.Image

    if not path.is_file():
        raise ValueError(f"{where}: input image {str(path)!r} not found (check --image_root).")
    try:
        with PIL.Image.open(path) as image:
            return image.size
    except OSError as error:
        raise ValueError(f"{where}: {str(path)!r} is not a readable image ({error}).") from None


def image_loader(paths: list[Path]):
    """A loader of the RGB images at `paths`, through the processor's one image loader."""

    def load():
        from transformers_bagel.image_processing_bagel import to_rgb_image

        return [to_rgb_image(path) for path in paths]

    return load


def check_single_sample(name: str, n_samples: int) -> None:
    """The benchmarks with one output file per entry refuse --n_samples other than 1."""
    if n_samples != 1:
        raise ValueError(f"{name} scores one image per entry (its layout has one file name per entry); use --n_samples 1.")
