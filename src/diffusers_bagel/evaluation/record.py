"""
The settings record of an output folder: `bagel_eval_settings.json`, written (atomically) before the first image of
a run. It holds the settings that decide what the images look like (`settings`: benchmark, entries, checkpoint, dtype,
seed, samples per entry, thinking, every pipeline argument) and, for information only, the rest (`info`: data file,
batch size, limit, device, package version).

A rerun into a folder whose record holds other `settings` and which holds outputs is refused, with the differing
settings listed ([`SettingsMismatchError`]), unless it is asked to overwrite: then the outputs of the earlier run's
layout are deleted and drawn again. A rerun with the same settings resumes. A folder with outputs but no record
(written by an older version) is taken as drawn with the current settings, with a warning.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from diffusers.utils import logging

from .runner import EvalItem, atomic_write_text


logger = logging.get_logger(__name__)

__all__ = [
    "SETTINGS_FILE",
    "SettingsMismatchError",
    "entries_digest",
    "read_record",
    "record_conflicts",
    "folder_holds_outputs",
    "write_record",
]

SETTINGS_FILE = "bagel_eval_settings.json"
_FORMAT = 1


class SettingsMismatchError(ValueError):
    """A run's settings differ from those recorded in an output folder that already holds outputs."""


def entries_digest(items: list[EvalItem]) -> str:
    """A SHA-256 of the entries' indices, prompts and first output paths (what the images depend on besides the
    settings): a rerun with another or an edited benchmark file differs."""
    rows = [[item.index, item.prompt, item.outputs[0] if item.outputs else ""] for item in items]
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode("utf-8")).hexdigest()


def _normalized(value):
    """`value` as it reads back from JSON (tuples become lists), so that recorded and new settings compare."""
    return json.loads(json.dumps(value))


def read_record(output_dir) -> dict | None:
    """
    The settings record of `output_dir`, `None` when there is none.

    Raises:
        `ValueError` naming the file when it is not a record `bagel eval` wrote.
    """
    path = Path(output_dir) / SETTINGS_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"{path} could not be read as the settings record of `bagel eval` ({error}); move it away, use another "
            "--output_dir, or overwrite the folder's outputs (--overwrite)."
        ) from None
    if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
        raise ValueError(f"{path} is not a settings record of `bagel eval` (no 'settings' object).")
    return record


def folder_holds_outputs(output_dir) -> bool:
    """Whether `output_dir` holds anything besides its settings record."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return False
    return any(entry.name != SETTINGS_FILE for entry in output_dir.iterdir())


def record_conflicts(recorded: dict, settings: dict) -> list[str]:
    """The settings that differ, one line each: `name: recorded value -> this run's value`."""
    recorded, settings = _normalized(recorded), _normalized(settings)
    missing = object()
    lines = []
    for key in sorted(set(recorded) | set(settings)):
        before, now = recorded.get(key, missing), settings.get(key, missing)
        if before != now:
            show = lambda value: "(not set)" if value is missing else json.dumps(value)  # noqa: E731
            lines.append(f"{key}: {show(before)} (recorded) -> {show(now)} (this run)")
    return lines


def mismatch_message(output_dir, conflicts: list[str]) -> str:
    """The refusal of a rerun with other settings: the differing settings and how to proceed."""
    path = Path(output_dir) / SETTINGS_FILE
    listed = "\n  ".join(conflicts)
    return (
        f"the output folder {str(output_dir)!r} holds outputs drawn with other settings ({path}):\n  {listed}\n"
        "Use another --output_dir, rerun with the recorded settings to resume, or pass --overwrite to delete this "
        "folder's outputs of the recorded run and draw them again with the new settings."
    )


def write_record(output_dir, settings: dict, info: dict) -> None:
    """Writes the settings record of `output_dir` atomically (no time in it: the same run writes the same bytes)."""
    record = {"format": _FORMAT, "tool": "bagel eval", "settings": _normalized(settings), "info": _normalized(info)}
    atomic_write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", Path(output_dir) / SETTINGS_FILE)
