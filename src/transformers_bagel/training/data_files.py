"""
Reading the files of training data with errors that name the file and the line.

`datasets` and the YAML / JSON parsers report a broken file without naming it (`JSON parse error: Missing a name for
object member. in row 2`, `StopIteration` for an empty JSON lines file, a bare `UnicodeDecodeError` for a Latin-1
metadata file; JSON lines with Latin-1 bytes even load, and fail only when the row is read). Here a data config is
parsed with its file, line and column named; [`load_data_rows`] loads rows with `datasets`, validates the loaded
table's text (milliseconds), and only when either fails (the normal path reads no file twice) scans the files for the
first problem: bytes that are not UTF-8, a JSON line or a CSV row that does not parse, a parquet file that does not
open, or no rows at all.
"""

import csv
import json
from pathlib import Path

import datasets
from transformers.utils import logging


logger = logging.get_logger(__name__)

_REENCODE = "re-encode it (from Latin-1: `iconv -f latin1 -t utf-8 FILE > NEW`)"
_METADATA_NAMES = ("metadata.jsonl", "metadata.csv")


# -- config files ----------------------------------------------------------------------------------------------------


def _not_utf8(what: str, data: bytes, error: UnicodeDecodeError, reader: str, first_line: int = 1) -> ValueError:
    line = first_line + data.count(b"\n", 0, error.start)
    return ValueError(
        f"{what} is not UTF-8 text (byte 0x{data[error.start]:02x} on line {line}, perhaps Latin-1): {reader} reads it "
        f"as UTF-8; {_REENCODE}."
    )


def read_config_file(path: str | Path, what: str = "Data config") -> dict:
    """
    A YAML or JSON config file (`.json` is read as JSON, anything else as YAML) as a dict.

    Raises:
        `FileNotFoundError` for a missing file; `ValueError` naming the file for bytes that are not UTF-8 (with their
        line), a syntax error (with its line and column) or an empty file; `TypeError` naming the file when its top
        level is not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist.")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        raise _not_utf8(f"{what} {str(path)!r}", data, error, "the config reader") from None
    config = _parse_json(text, path, what) if path.suffix == ".json" else _parse_yaml(text, path, what)
    if config is None:
        raise ValueError(f"{what} {str(path)!r} is empty.")
    if not isinstance(config, dict):
        kind = type(config).__name__
        raise TypeError(f"{what} {str(path)!r} must hold a mapping (with a `sources` list), got a {kind}.")
    return config


def _parse_json(text: str, path: Path, what: str):
    try:
        return json.loads(text) if text.strip() else None
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{what} {str(path)!r}, line {error.lineno}, column {error.colno}: not valid JSON: {error.msg}."
        ) from None


def _parse_yaml(text: str, path: Path, what: str):
    import yaml  # a dependency of `datasets`

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(p) for p in (getattr(error, "context", None), getattr(error, "problem", None)) if p)
        raise ValueError(f"{what} {str(path)!r}{where}: not valid YAML: {problem or error}.") from None


# -- data files ------------------------------------------------------------------------------------------------------


def load_data_rows(
    builder: str, data_files: list[str], split: str = "train", where: str = "`data`"
) -> datasets.Dataset:
    """
    Rows of data files with `datasets.load_dataset(builder, data_files=..., split=...)` (an image folder:
    `data_dir=data_files[0]`), their text validated as UTF-8 (the JSON reader loads Latin-1 bytes without a word).
    When either fails, the files are scanned and the first problem is named instead.

    Args:
        builder (`str`): `parquet`, `json`, `csv` or `imagefolder`.
        data_files (`list[str]`): the files (an image folder: one folder).
        split (`str`, defaults to `"train"`).
        where (`str`): what the rows are for, starting every message (e.g. `"Source 'vqa'"`, `"--data"`).

    Raises:
        `ValueError` starting with `where` and naming the file (and line) at fault: bytes that are not UTF-8, a
        JSON line / document or CSV row that does not parse, a parquet file that does not open, no rows.
    """
    try:
        if builder == "imagefolder":
            rows = datasets.load_dataset("imagefolder", data_dir=data_files[0], split=split)
        else:
            rows = datasets.load_dataset(builder, data_files=list(data_files), split=split)
    except Exception as error:  # datasets raises many kinds (StopIteration for an empty JSON lines file)
        raise _unreadable(builder, data_files, where, error) from error
    if builder != "parquet":
        try:
            # The JSON reader keeps bytes that are not UTF-8 (a Latin-1 file) and fails only when the row is read:
            # a full validation of the loaded table (milliseconds for 500k rows) finds them now.
            rows.data.table.validate(full=True)
        except Exception as error:  # pyarrow.ArrowInvalid: Invalid UTF8 sequence
            raise _unreadable(builder, data_files, where, error) from error
    if len(rows) == 0:
        raise ValueError(f"{where}: `data` holds no rows ({list(data_files)}).")
    return rows


def _unreadable(builder: str, data_files: list[str], where: str, error: Exception) -> ValueError:
    problem = diagnose_data_files(builder, data_files)
    if problem is None:
        problem = f"`datasets` could not read {list(data_files)}: {type(error).__name__}: {error}"
    return ValueError(f"{where}: {problem}.")


def diagnose_data_files(builder: str, data_files: list[str]) -> str | None:
    """The first problem found in the files of a source that `datasets` failed to read (see [`load_data_rows`]),
    as a sentence naming the file and line; `None` when the scan finds nothing."""
    if builder == "imagefolder":
        folder = Path(data_files[0])
        files = sorted(p for p in folder.rglob("*") if p.name in _METADATA_NAMES)
    else:
        files = [Path(file) for file in data_files]
    scan = {"json": _json_problem, "csv": _csv_problem, "parquet": _parquet_problem}
    for file in files:
        kind = "json" if file.suffix == ".jsonl" else builder if builder != "imagefolder" else file.suffix[1:]
        problem = scan.get(kind, lambda _: None)(file)
        if problem is not None:
            return problem
    return None


def _utf8_lines(file: Path):
    """`(line number, text)` of a text file, raising `ValueError` at the first line that is not UTF-8."""
    with open(file, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise _not_utf8(f"the file {str(file)!r}", raw, error, "`datasets`", first_line=number) from None
            yield number, text.lstrip("\ufeff") if number == 1 else text


def _json_problem(file: Path) -> str | None:
    try:
        if file.suffix == ".json":
            problem = _json_document_problem(file)
            if problem != "lines":
                return problem
        return _json_lines_problem(file)
    except ValueError as error:  # not UTF-8
        return str(error).rstrip(".")


def _json_document_problem(file: Path) -> str | None:
    """A `.json` file as one JSON document; `"lines"` when it is JSON lines instead (its first line parses alone)."""
    lines = [(number, text) for number, text in _utf8_lines(file) if text.strip()]
    if not lines:
        return f"the file {str(file)!r} is empty (no rows)"
    try:
        document = json.loads("".join(text for _, text in lines))
    except json.JSONDecodeError as error:
        if len(lines) > 1 and _parses(lines[0][1]):
            return "lines"
        return f"the file {str(file)!r}, line {error.lineno}, column {error.colno}: not valid JSON: {error.msg}"
    return None if document else f"the file {str(file)!r} holds no rows"


def _json_lines_problem(file: Path) -> str | None:
    """JSON lines: one object per line (blank lines are skipped)."""
    empty = True
    for number, text in _utf8_lines(file):
        if not text.strip():
            continue
        empty = False
        try:
            row = json.loads(text)
        except json.JSONDecodeError as error:
            return f"the file {str(file)!r}, line {number}: not valid JSON ({error.msg}, column {error.colno})"
        if not isinstance(row, dict):
            kind = type(row).__name__
            return f"the file {str(file)!r}, line {number}: a JSON line must be an object (a row), got {kind}"
    return f"the file {str(file)!r} is empty (no rows)" if empty else None


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _csv_problem(file: Path) -> str | None:
    reader = csv.reader(text for _, text in _utf8_lines(file))
    header, count = None, 0
    try:
        for row in reader:
            if not row:
                continue
            if header is None:
                header = row
                continue
            count += 1
            if len(row) != len(header):
                fields = f"{len(row)} fields where the header has {len(header)}"
                return f"the file {str(file)!r}, line {reader.line_num}: {fields}"
    except csv.Error as error:
        return f"the file {str(file)!r}, line {reader.line_num}: not valid CSV ({error})"
    except ValueError as error:  # not UTF-8
        return str(error).rstrip(".")
    return None if count else f"the file {str(file)!r} holds no rows (a header at most)"


def _parquet_problem(file: Path) -> str | None:
    import pyarrow.parquet as pq

    try:
        rows = pq.ParquetFile(file).metadata.num_rows
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ...
        return f"the file {str(file)!r} is not a readable parquet file ({type(error).__name__}: {error})"
    return None if rows else f"the file {str(file)!r} holds no rows"


__all__ = ["diagnose_data_files", "load_data_rows", "read_config_file"]
