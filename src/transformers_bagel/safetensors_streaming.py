"""
Safetensors files read and written one tensor at a time, so that converting a checkpoint never holds more than one
tensor in memory.

The library calls do not allow that: `safetensors.torch.load_file` and `safe_open` memory-map the file, and every page
they touch stays in the process's resident memory until the file is unmapped (for a whole-checkpoint conversion, the
whole checkpoint); `safetensors.torch.save_file` serialises a dict, so a shard's tensors must all be in memory at once.
Here a header is parsed and checked without reading any data, each tensor is read with `readinto` at its offsets into
a fresh buffer, and a file is written as its header (planned up front from the tensors' dtypes and shapes) followed by
each tensor's bytes as they come. The files are the format's own: 8-byte little-endian header length, JSON header
(`__metadata__`, then each tensor's `dtype`, `shape`, `data_offsets`) padded with spaces to 8 bytes, raw little-endian
data; for tensors of one dtype given in name order (the order `save_file` sorts them in), the file is byte for byte
the one `save_file` writes.

Shards are planned with the rule `save_pretrained` uses (`huggingface_hub`'s split by `max_shard_size`, in the given
order), with the same file names and the same `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import StateDictSplit, split_state_dict_into_shards_factory
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, logging


logger = logging.get_logger(__name__)

__all__ = [
    "SafetensorsEntry",
    "SafetensorsWriter",
    "parse_shard_size",
    "plan_shards",
    "read_safetensors_header",
    "read_tensor",
    "save_sharded_safetensors",
]

_DTYPE_NAMES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "U16": "uint16",
    "I16": "int16",
    "U32": "uint32",
    "I32": "int32",
    "U64": "uint64",
    "I64": "int64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
    "C64": "complex64",
}
# Only the dtypes this torch has (the unsigned and float8 ones are recent).
_TORCH_DTYPES = {code: getattr(torch, name) for code, name in _DTYPE_NAMES.items() if hasattr(torch, name)}
_DTYPE_CODES = {dtype: code for code, dtype in _TORCH_DTYPES.items()}
_HEADER_LENGTH_BYTES = 8
_ALIGNMENT = 8
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
_METADATA_KEY = "__metadata__"
_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}  # decimal, as `save_pretrained` reads them


@dataclass(frozen=True)
class SafetensorsEntry:
    """One tensor of a safetensors file: its name, dtype, shape, and where its bytes lie in the file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    """Position of the tensor's first byte from the start of the file."""
    nbytes: int


def _check_little_endian() -> None:
    # Safetensors data is little-endian; the raw bytes are reinterpreted as they are, without swapping.
    if sys.byteorder != "little":
        raise NotImplementedError("Streaming safetensors needs a little-endian machine.")


def _entry_nbytes(dtype: torch.dtype, shape: Iterable[int]) -> int:
    return math.prod(shape) * dtype.itemsize


def _parse_entry(name: str, info, data_start: int) -> SafetensorsEntry:
    """A header entry as a [`SafetensorsEntry`]; raises `ValueError` saying what is malformed."""
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(f"header entry {name!r} is not a dict of dtype, shape and data_offsets")
    dtype = _TORCH_DTYPES.get(info["dtype"])
    if dtype is None:
        raise ValueError(f"tensor {name!r} has an unknown dtype {info['dtype']!r}")
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(isinstance(size, int) and size >= 0 for size in shape):
        raise ValueError(f"tensor {name!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(value, int) and value >= 0 for value in offsets)
        or offsets[0] > offsets[1]
    ):
        raise ValueError(f"tensor {name!r} has invalid data_offsets {offsets!r}")
    nbytes = _entry_nbytes(dtype, shape)
    if offsets[1] - offsets[0] != nbytes:
        raise ValueError(
            f"tensor {name!r} ({info['dtype']} {shape}) needs {nbytes} bytes but its data_offsets {offsets} span "
            f"{offsets[1] - offsets[0]}"
        )
    return SafetensorsEntry(name=name, dtype=dtype, shape=tuple(shape), offset=data_start + offsets[0], nbytes=nbytes)


def _read_header_bytes(handle, file_size: int) -> bytes:
    if file_size < _HEADER_LENGTH_BYTES:
        raise ValueError(f"the file holds {file_size} bytes, fewer than the 8 of a header length")
    header_length = int.from_bytes(handle.read(_HEADER_LENGTH_BYTES), "little")
    if header_length > min(_MAX_HEADER_BYTES, file_size - _HEADER_LENGTH_BYTES):
        raise ValueError(f"the header length {header_length} exceeds the file ({file_size} bytes)")
    return handle.read(header_length)


def read_safetensors_header(path: str | os.PathLike) -> dict[str, SafetensorsEntry]:
    """
    Parses and checks the header of the safetensors file `path` without reading any tensor data.

    Returns:
        `dict[str, SafetensorsEntry]`: the file's tensors by name, in the order of their data in the file.

    Raises:
        `ValueError`: saying what is wrong when the file is not a complete safetensors file: a header that is not the
        format's JSON, an unknown dtype, a tensor whose offsets disagree with its dtype and shape, data regions that
        overlap or leave gaps, or data that does not end exactly where the file does (a truncated file).
    """
    with open(path, "rb") as handle:
        file_size = os.fstat(handle.fileno()).st_size
        raw = _read_header_bytes(handle, file_size)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"the header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    metadata = header.pop(_METADATA_KEY, None)
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(value, str) for value in metadata.values())
    ):
        raise ValueError("the header's __metadata__ is not a dict of strings")
    data_start = _HEADER_LENGTH_BYTES + len(raw)
    entries = sorted(
        (_parse_entry(name, info, data_start) for name, info in header.items()), key=lambda entry: entry.offset
    )
    position = data_start
    for entry in entries:
        if entry.offset != position:
            raise ValueError(f"tensor {entry.name!r} starts at byte {entry.offset}, expected {position}")
        position += entry.nbytes
    if position != file_size:
        raise ValueError(f"the header describes {position} bytes but the file holds {file_size}")
    return {entry.name: entry for entry in entries}


def read_tensor(handle, entry: SafetensorsEntry) -> torch.Tensor:
    """
    Reads the tensor `entry` from `handle` (a file opened with `open(path, "rb")`, whose header gave `entry`) into a
    fresh buffer with `readinto`: nothing of the file stays mapped or cached in the process afterwards.
    """
    _check_little_endian()
    buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
    view = memoryview(buffer.numpy())
    handle.seek(entry.offset)
    filled = 0
    while filled < entry.nbytes:
        count = handle.readinto(view[filled:])
        if not count:
            raise ValueError(f"the file ends inside tensor {entry.name!r}")
        filled += count
    return buffer.view(entry.dtype).reshape(entry.shape)


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor, without a copy when it is contiguous."""
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


class SafetensorsWriter:
    """
    Writes one safetensors file tensor by tensor. The header is written at opening from `specs` (name, dtype, shape
    of every tensor, in file order); [`write`] then appends each tensor's bytes, in that order. Closing checks that
    every tensor was written. Use it as a context manager:

    ```python
    with SafetensorsWriter("model.safetensors", [("weight", torch.float32, (2, 3))]) as writer:
        writer.write("weight", torch.zeros(2, 3))
    ```
    """

    def __init__(
        self,
        path: str | os.PathLike,
        specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ):
        _check_little_endian()
        self.path = Path(path)
        self._specs = [(name, dtype, tuple(shape)) for name, dtype, shape in specs]
        names = [name for name, _, _ in self._specs]
        if len(set(names)) != len(names) or _METADATA_KEY in names:
            raise ValueError(f"Tensor names of {self.path} must be unique and not {_METADATA_KEY!r}.")
        unknown = sorted({str(dtype) for _, dtype, _ in self._specs if dtype not in _DTYPE_CODES})
        if unknown:
            raise ValueError(f"Safetensors cannot store the dtypes {unknown}.")
        self._header = self._header_bytes(metadata)
        self._next = 0
        self._handle = open(self.path, "wb")
        self._handle.write(len(self._header).to_bytes(_HEADER_LENGTH_BYTES, "little"))
        self._handle.write(self._header)

    def _header_bytes(self, metadata: dict[str, str] | None) -> bytes:
        header = {_METADATA_KEY: metadata} if metadata else {}
        offset = 0
        for name, dtype, shape in self._specs:
            end = offset + _entry_nbytes(dtype, shape)
            header[name] = {"dtype": _DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
            offset = end
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        return text + b" " * (-len(text) % _ALIGNMENT)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Appends the bytes of `tensor`, which must be the next tensor of the header, with its dtype and shape."""
        if self._next >= len(self._specs):
            raise ValueError(f"{self.path}: tensor {name!r} is one more than the header lists.")
        expected, dtype, shape = self._specs[self._next]
        if name != expected or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(
                f"{self.path}: expected tensor {expected!r} ({dtype}, {shape}) next, got {name!r} "
                f"({tensor.dtype}, {tuple(tensor.shape)})."
            )
        self._handle.write(_tensor_bytes(tensor.cpu()))
        self._next += 1

    def close(self) -> None:
        """Closes the file; raises `ValueError` when tensors of the header were not written."""
        self._handle.close()
        if self._next != len(self._specs):
            raise ValueError(
                f"{self.path}: {len(self._specs) - self._next} tensors of the header were never written "
                f"(next: {self._specs[self._next][0]!r})."
            )

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self._handle.close()  # the caller's error wins; the file is incomplete and must be discarded


def parse_shard_size(max_shard_size: int | str) -> int:
    """
    `max_shard_size` in bytes, read as `save_pretrained` reads it: a positive number of bytes, or digits and a decimal
    unit (`"500MB"` is 500,000,000 bytes; KB, MB, GB, TB). Raises `ValueError` for anything else.
    """
    if isinstance(max_shard_size, int) and not isinstance(max_shard_size, bool):
        size = max_shard_size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]B)\s*", str(max_shard_size), flags=re.IGNORECASE)
        size = int(float(match[1]) * _SIZE_UNITS[match[2].upper()]) if match else 0
    if size <= 0:
        raise ValueError(
            f"`max_shard_size` must be a positive number of bytes or a size like '500MB' or '5GB', got "
            f"{max_shard_size!r}."
        )
    return size


def plan_shards(
    sizes: dict[str, int], max_shard_size: int | str, weights_name: str = SAFE_WEIGHTS_NAME
) -> StateDictSplit:
    """
    Splits tensors into shard files by the rule of `save_pretrained` (`huggingface_hub`'s split): in the order of
    `sizes` (name -> bytes), a new shard starts when the next tensor would push the current one over
    `max_shard_size`, and a tensor larger than it gets a shard of its own. One shard is `weights_name`; several are
    `model-0000k-of-0000n.safetensors`.
    """
    pattern = weights_name.replace(".safetensors", "{suffix}.safetensors")
    return split_state_dict_into_shards_factory(
        sizes,
        get_storage_size=lambda size: size,
        filename_pattern=pattern,
        max_shard_size=parse_shard_size(max_shard_size),
    )


def save_sharded_safetensors(
    save_directory: str | os.PathLike,
    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
    load_tensor: Callable[[str], torch.Tensor],
    max_shard_size: int | str,
    index_metadata: dict | None = None,
    desc: str = "Writing tensors",
) -> StateDictSplit:
    """
    Writes the tensors of `specs` (name -> (dtype, shape), in the order shards are filled) into `save_directory` as
    `save_pretrained` lays them out: shards planned with [`plan_shards`], each shard's tensors in name order with
    `{"format": "pt"}` metadata, and `model.safetensors.index.json` when there are several shards (its `metadata` is
    `index_metadata` plus `total_size`). Each tensor is fetched with `load_tensor(name)` just before it is written
    and dropped right after, so memory holds one tensor at a time. A progress bar counts the bytes written.

    Returns:
        [`huggingface_hub.StateDictSplit`]: the shards written.

    Raises:
        `ValueError`: when `max_shard_size` is not a size, `save_directory` already holds safetensors files (stale
        shards would survive), or a tensor from `load_tensor` does not have the dtype and shape of `specs`.
    """
    save_directory = Path(save_directory)
    sizes = {name: _entry_nbytes(dtype, shape) for name, (dtype, shape) in specs.items()}
    split = plan_shards(sizes, max_shard_size)
    if save_directory.is_dir() and any(save_directory.glob("*.safetensors*")):
        raise ValueError(f"{save_directory} already holds safetensors files; write into a new folder.")
    save_directory.mkdir(parents=True, exist_ok=True)
    with logging.tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, unit_divisor=1024, desc=desc) as bar:
        for filename, names in split.filename_to_tensors.items():
            names = sorted(names)
            with SafetensorsWriter(
                save_directory / filename, [(name, *specs[name]) for name in names], metadata={"format": "pt"}
            ) as writer:
                for name in names:
                    writer.write(name, load_tensor(name))
                    bar.update(sizes[name])
    if split.is_sharded:
        index = {"metadata": {**(index_metadata or {}), **split.metadata}, "weight_map": split.tensor_to_filename}
        with open(save_directory / SAFE_WEIGHTS_INDEX_NAME, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    logger.info(f"Wrote {len(split.filename_to_tensors)} safetensors file(s) into {save_directory}")
    return split
