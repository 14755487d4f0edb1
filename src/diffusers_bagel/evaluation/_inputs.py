"""Reading the benchmarks' JSON files and images, with errors that name the file, the line and the entry."""

from __future__ import annotations

import json
from pathlib import Path

from .paths import check_name, confined_path


__all__ = [
    "read_text",
    "read_json",
    "read_json_entries",
    "entry_where",
    "require_field",
    "check_name",
    "confined_path",
    "image_loader",
    "image_size",
    "check_single_sample",
]


def _check_file(path: Path, what: str) -> None:
    if path.is_dir():
        raise ValueError(f"--data {str(path)!r} is a folder; expected a file ({what}).")
    if not path.is_file():
        raise ValueError(f"--data {str(path)!r}: no such file ({what}).")


def read_text(data, what: str) -> str:
    """
    The text of the benchmark file `data`, decoded as UTF-8 (a leading byte-order mark is dropped).

    Raises:
        `ValueError` naming the file when it is missing, a folder, unreadable, empty, or not UTF-8 (with the line and
        the byte that is not).
    """
    path = Path(data)
    _check_file(path, what)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ValueError(f"--data {str(path)!r} could not be read ({error.strerror or error}).") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise ValueError(
            f"--data {str(path)!r} is not UTF-8 text: line {line} holds the byte {raw[error.start:error.start + 1]!r} "
            f"({error.reason}); it may be Latin-1 or another legacy encoding: convert it to UTF-8 (e.g. "
            f"`iconv -f latin1 -t utf-8`)."
        ) from None
    if not text.strip():
        raise ValueError(f"--data {str(path)!r} is empty ({what}).")
    return text


def read_json(data, what: str):
    """The parsed JSON file `data` (`what` names the benchmark file in errors)."""
    return read_json_entries(data, what)[0]


def read_json_entries(data, what: str) -> tuple:
    """
    The parsed JSON file `data` and the line of each top-level entry: a list of line numbers in entry order for a
    JSON list, in key order for a JSON object (empty for anything else).

    Raises:
        `ValueError` naming the file (see [`read_text`]), the line of a JSON syntax error, or the lines of a key given
        twice in the top-level object (JSON keeps the last one silently).
    """
    text = read_text(data, what)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"--data {str(data)!r} is not valid JSON ({error.msg}, line {error.lineno} column {error.colno})."
        ) from None
    return value, _entry_lines(text, value, data)


def _skip_blank(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _entry_lines(text: str, value, data) -> list:
    """The line of each top-level entry of the (valid) JSON `text`; `value` is its parsed form."""
    if not isinstance(value, (list, dict)):
        return []
    decoder = json.JSONDecoder()
    position = _skip_blank(text, 0) + 1
    line, counted = 1, 0
    lines, first_line = [], {}
    while True:
        position = _skip_blank(text, position)
        if text[position] in "]}":
            break
        line += text.count("\n", counted, position)
        counted = position
        if isinstance(value, dict):
            key, position = decoder.raw_decode(text, position)
            if key in first_line:
                raise ValueError(f"{data}:{line}: key {key!r} given twice (first on line {first_line[key]}).")
            first_line[key] = line
            position = _skip_blank(text, position) + 1  # the colon
            position = _skip_blank(text, position)
        _, position = decoder.raw_decode(text, position)
        lines.append(line)
        position = _skip_blank(text, position)
        if text[position] == ",":
            position += 1
    return lines


def entry_where(data, lines: list, index: int, label=None) -> str:
    """`FILE:LINE: entry LABEL` (the entry's index unless `label`) for error messages."""
    line = f":{lines[index]}" if index < len(lines) else ""
    return f"{data}{line}: entry {index if label is None else repr(label)}"


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

    if path.is_dir():
        raise ValueError(f"{where}: input image {str(path)!r} is a folder, not an image file.")
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
