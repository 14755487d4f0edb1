"""
The images the server answers: the output options of a request (`response_format`, `output_format`,
`output_compression`, `background`), encoding, and the files of `response_format="url"` (random names, written once,
a failed write a 507 or 503 that names no path).
"""

from __future__ import annotations

import base64
import errno
import io
import re
from pathlib import Path

import PIL.features
from diffusers.utils import logging

from .errors import APIError
from .requests import describe, parse_int


logger = logging.get_logger(__name__)

__all__ = ["OUTPUT_FORMATS", "encode_base64", "encode_image", "is_image_name", "output_options", "storage_error",
           "write_image_file", "remove_partial_file"]  # fmt: skip


def _writable_formats() -> dict[str, tuple[str, str]]:
    """The `output_format`s this Pillow writes: OpenAI's name -> (Pillow's format, media type)."""
    formats = {"png": ("PNG", "image/png")}
    if PIL.features.check("jpg"):
        formats["jpeg"] = ("JPEG", "image/jpeg")
    if PIL.features.check("webp"):
        formats["webp"] = ("WEBP", "image/webp")
    return formats


OUTPUT_FORMATS = _writable_formats()
_IMAGE_NAME = re.compile(r"^[0-9a-f]{32}\.(png|jpeg|webp)$")


def is_image_name(name: str) -> bool:
    """Whether `name` is one the server could have written (128-bit random hex and a format it writes)."""
    return bool(_IMAGE_NAME.fullmatch(name)) and name.rpartition(".")[2] in OUTPUT_FORMATS


def output_options(fields: dict, has_image_dir: bool) -> dict:
    """`response_format`, `output_format`, `output_compression` and `background` of an image request, checked: what
    the server cannot produce is refused, naming the field and the values it takes."""
    response_format = fields.get("response_format")
    response_format = "b64_json" if response_format is None else response_format
    if response_format not in ("b64_json", "url"):
        raise APIError(400, f"`response_format` must be 'b64_json' or 'url', got {describe(response_format)}.",
                       param="response_format", code="invalid_value")  # fmt: skip
    if response_format == "url" and not has_image_dir:
        raise APIError(400, "`response_format='url'` needs a server started with --image_dir; use 'b64_json'.",
                       param="response_format", code="invalid_value")  # fmt: skip
    output_format = fields.get("output_format")
    output_format = "png" if output_format is None else output_format
    if not isinstance(output_format, str) or output_format.lower() not in OUTPUT_FORMATS:
        raise APIError(400, f"`output_format` must be one of {sorted(OUTPUT_FORMATS)}, got {describe(output_format)}.",
                       param="output_format", code="invalid_value")  # fmt: skip
    output_format = output_format.lower()
    compression = fields.get("output_compression")
    if compression is not None and output_format == "png":
        raise APIError(400, "`output_compression` applies to the 'jpeg' and 'webp' output formats only.",
                       param="output_compression", code="invalid_value")  # fmt: skip
    compression = 100 if compression is None else parse_int(compression, "output_compression", 0, 100)
    if fields.get("background") not in (None, "auto", "opaque"):
        raise APIError(400, f"`background` must be 'auto' or 'opaque' (BAGEL draws opaque images), got "
                       f"{describe(fields.get('background'))}.", param="background", code="invalid_value")  # fmt: skip
    return {"response_format": response_format, "output_format": output_format, "output_compression": compression}


def encode_image(image, output_format: str, compression: int) -> bytes:
    """`image` encoded as `output_format` (`compression`, 0-100, is the JPEG / WebP quality)."""
    buffer = io.BytesIO()
    options = {} if output_format == "png" else {"quality": compression}
    image.save(buffer, format=OUTPUT_FORMATS[output_format][0], **options)
    return buffer.getvalue()


def encode_base64(data: bytes) -> str:
    """`data` as base64 text (the `b64_json` of a response)."""
    return base64.b64encode(data).decode("ascii")


def write_image_file(path: Path, data: bytes) -> None:
    """Writes one `response_format="url"` image as a new file."""
    with open(path, "xb") as file:
        file.write(data)


def remove_partial_file(path: Path) -> None:
    """Removes what a failed write left at `path`, if anything."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def storage_error(error: OSError) -> APIError:
    """The client's view of a failed image write: 507 when the folder is full, 503 otherwise (never the path)."""
    logger.error(f"Writing a response_format=url image failed: {error.strerror or type(error).__name__}")
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return APIError(507, "The server's image folder is full, so the image could not be stored; ask for "
                        "response_format='b64_json', or retry later.", type="server_error", param="response_format",
                        code="image_storage_full")  # fmt: skip
    return APIError(503, "The server could not store the image; ask for response_format='b64_json', or retry later.",
                    type="server_error", param="response_format", code="image_storage_unavailable")  # fmt: skip
