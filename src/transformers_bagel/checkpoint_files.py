"""
Checks of a local checkpoint folder's files before transformers reads them.

transformers names a missing file or an invalid `config.json`, but a truncated safetensors shard fails with the
library's bare "Error while deserializing header", a truncated `tokenizer.json` with a `JSONDecodeError`, and a
folder without tokenizer files with advice to install sentencepiece: none of them says which file is broken. These
checks read only headers and small JSON files, so they cost nothing next to the loading itself. Hub ids and files
that are not on disk are left to transformers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open


__all__ = ["local_folder", "is_pipeline_root", "check_weight_files", "check_json_files", "check_tokenizer_files"]

_REDO = "it is probably truncated (an interrupted download, copy or conversion): download or convert it again"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")
"""Files a tokenizer can be built from (fast serialisation, BPE vocabulary, sentencepiece model)."""


def local_folder(where, subfolder: str | None = None) -> Path | None:
    """The folder `from_pretrained(where, subfolder=...)` reads, when it is a local directory; None otherwise."""
    if not isinstance(where, (str, os.PathLike)):
        return None
    folder = Path(where) / subfolder if subfolder else Path(where)
    return folder if folder.is_dir() else None


def is_pipeline_root(where) -> bool:
    """Whether `where` is the top of a converted pipeline folder (a `model_index.json`, no weights of its own)."""
    folder = Path(where)
    return (folder / "model_index.json").is_file() and not any(folder.glob("*.safetensors*"))


def check_json_files(folder: Path, names) -> None:
    """Raises `OSError` naming the first of `names` in `folder` that exists but is not valid JSON."""
    for name in names:
        path = folder / name
        if not path.is_file():
            continue
        try:
            with open(path, encoding="utf-8") as handle:
                json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise OSError(f"{str(path)!r} is not a valid JSON file ({error}); {_REDO}.") from None


def check_weight_files(folder: Path, weights_name: str = "model.safetensors") -> None:
    """
    Opens the header of every safetensors file of `folder` (the shards listed by its index, or the single file):
    raises `OSError` naming a shard that is truncated or not a safetensors file. safetensors checks at opening that
    the header's tensors cover the file exactly, so a cut file is caught here without reading its data.
    """
    index = folder / f"{weights_name}.index.json"
    check_json_files(folder, [index.name])
    if index.is_file():
        with open(index, encoding="utf-8") as handle:
            shards = sorted(set(json.load(handle).get("weight_map", {}).values()))
    else:
        shards = [weights_name]
    for shard in shards:
        path = folder / shard
        if not path.is_file():
            continue  # transformers names a missing shard itself
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as error:  # safetensors raises its own SafetensorError (not an OSError subclass)
            raise OSError(f"{str(path)!r} is not a complete safetensors file ({error}); {_REDO}.") from None


def check_tokenizer_files(folder: Path) -> None:
    """Raises `OSError` when `folder` has no tokenizer file at all, or when its JSON tokenizer files are broken."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise OSError(
            f"{str(folder)!r} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}): a converted BAGEL folder "
            "keeps it in its `processor` subfolder; convert the checkpoint again if the file was deleted."
        )
    check_json_files(folder, ["tokenizer.json", "tokenizer_config.json", "vocab.json", "special_tokens_map.json"])
