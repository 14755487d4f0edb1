"""
Where a benchmark file may make `bagel eval` read and write.

Benchmark files are downloaded from the Hub or from other people's repositories: their ids and keys become file and
folder names of the output layout, and their image paths are read under `--image_root`. Nothing in them is trusted:

- **names** ([`name_problem`], [`check_name`]): an id or key that becomes one file or folder name of the layout must
  be a plain name: not empty, not `.` or `..`, no path separator (`/` or `\\`), no drive (`C:`), no control
  character;
- **outputs** ([`check_output_path`]): every path the runner writes is relative, made of plain names, and, once
  resolved (links followed), inside the resolved output folder;
- **inputs** ([`confined_path`]): an input image path is relative and never goes up (`..`), so it stays under
  `--image_root` (refused otherwise, not silently rewritten; links inside `--image_root` are followed, as a dataset
  folder may be one).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath

from diffusers.utils import logging


logger = logging.get_logger(__name__)

__all__ = ["MAX_NAME_BYTES", "name_problem", "check_name", "confined_path", "check_output_path"]

# A file name's limit on common file systems is 255 bytes; the runner's temporary names add ".", "." and up to
# 7 digits of process id plus ".tmp".
MAX_NAME_BYTES = 240


def name_problem(name) -> str | None:
    """Why `name` cannot be one file or folder name of an output layout, or `None` when it can."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a string"
    if not name:
        return "is empty"
    if name in (".", ".."):
        return "is '.' or '..'"
    if "/" in name or "\\" in name:
        return "holds a path separator"
    if any(ord(character) < 32 or ord(character) == 127 for character in name):
        return "holds a control character"
    if PureWindowsPath(name).drive:
        return "names a drive"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes"
    return None


def check_name(value, field: str, where: str) -> str:
    """
    `str(value)` when it is a plain file or folder name (see [`name_problem`]).

    Raises:
        `ValueError` naming `where` (file, line, entry), the field and the offending value.
    """
    name = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    problem = name_problem(name)
    if problem is not None:
        raise ValueError(
            f"{where}: field {field!r} = {value!r} {problem}; it names a file or folder of the output layout, so it "
            "must be a plain name (the benchmark file may be damaged or hostile)."
        )
    return name


def confined_path(root: Path, relative, field: str, where: str) -> Path:
    """
    `root / relative` for an input path read from a benchmark file, refused unless it is relative and never goes up
    (no `..` part, no absolute path, no drive), so that it stays under `root` whatever the file says.

    Raises:
        `ValueError` naming `where`, the field and the offending value.
    """
    problem = None
    if not isinstance(relative, str) or not relative:
        problem = "is not a non-empty string"
    elif "\x00" in relative:
        problem = "holds a NUL character"
    elif PurePosixPath(relative).is_absolute() or PureWindowsPath(relative).anchor:
        problem = "is an absolute path"
    elif ".." in PurePosixPath(relative).parts or ".." in PureWindowsPath(relative).parts:
        problem = "goes up out of its folder ('..')"
    if problem is not None:
        raise ValueError(
            f"{where}: field {field!r} = {relative!r} {problem}; input images are read only under {str(root)!r} "
            "(--image_root)."
        )
    return Path(root) / relative


def check_output_path(base: Path, relative, where: str) -> Path:
    """
    The path the runner writes for `relative` under the output folder `base` (already resolved), proven to stay
    inside it: `relative` is made of plain names and `base / relative`, resolved (links followed), is below `base`.

    Raises:
        `ValueError` naming `where` and the offending path.
    """
    if not isinstance(relative, str) or not relative:
        raise ValueError(f"{where}: output path {relative!r} is not a non-empty relative path.")
    parts = relative.split("/")
    for part in parts:
        problem = name_problem(part)
        if problem is not None:
            raise ValueError(f"{where}: output path {relative!r} is refused: its part {part!r} {problem}.")
    path = base.joinpath(*parts)
    resolved = path.resolve()
    if resolved == base or not resolved.is_relative_to(base):
        raise ValueError(
            f"{where}: output path {relative!r} resolves to {str(resolved)!r}, outside the output folder "
            f"{str(base)!r} (a link inside it points elsewhere); refused."
        )
    return path
