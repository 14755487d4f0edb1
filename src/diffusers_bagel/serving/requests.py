"""
Parsing and checking of the server's request bodies, before any work: field types and ranges, the server's limits,
images (checked from their header, kept as their compressed bytes until the worker runs the request; never opened
from a path), and OpenAI chat messages as BAGEL messages. Every refusal is an [`APIError`] naming the field.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
import reprlib
from dataclasses import dataclass

import PIL.Image

from transformers_bagel.chat import DEFAULT_MAX_NEW_TOKENS

from .errors import APIError


__all__ = [
    "EncodedImage",
    "ServerLimits",
    "describe",
    "parse_int",
    "parse_float",
    "parse_bool",
    "parse_size",
    "check_image_bytes",
    "decode_data_url",
    "chat_messages_to_bagel",
    "decode_message_images",
]

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w-]+=[\w.-]+)*)(?P<b64>;base64)?,", re.I)


@dataclass
class ServerLimits:
    """
    Bounds checked on every request before it is queued.

    Args:
        max_image_bytes (`int`): largest encoded input image.
        max_image_pixels (`int`): largest input image, width x height (checked before decoding the pixels).
        max_input_images (`int`): images in one request (chat or edit).
        max_prompt_chars (`int`): characters of a prompt, or of all the texts of a chat request.
        max_messages (`int`): messages of a chat request.
        max_n (`int`): images asked by one generation or edit request.
        max_inference_steps (`int`): denoising steps of one request.
        max_tokens (`int`): largest `max_tokens` of a chat request.
        default_max_tokens (`int`): `max_tokens` of a chat request that sets none (`generate_answer`'s default).
        max_think_tokens (`int`): largest `max_think_tokens` of thinking mode.
        max_body_bytes (`int`): largest request body, counted while it arrives (chunked bodies too).
        remote_image_timeout (`float`): seconds one remote image may take, redirects included
            (`--allow_remote_images`).
        max_redirects (`int`): redirects followed for one remote image, each one checked again.
    """

    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_input_images: int = 8
    max_prompt_chars: int = 8000
    max_messages: int = 64
    max_n: int = 4
    max_inference_steps: int = 200
    max_tokens: int = 4096
    default_max_tokens: int = DEFAULT_MAX_NEW_TOKENS
    max_think_tokens: int = 2048
    max_body_bytes: int = 64 * 1024 * 1024
    remote_image_timeout: float = 10.0
    max_redirects: int = 3


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlong, _REPR.maxlevel = 40, 40, 40, 2


def describe(value) -> str:
    """A short, safe rendering of a client's value for an error message: long numbers, strings and deeply nested
    lists are cut (never a `RecursionError` or a 400-digit echo)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {int(value.bit_length() * math.log10(2)) + 1} digits"
    try:
        return _REPR.repr(value)
    except (RecursionError, ValueError):
        return f"a {type(value).__name__}"


def _invalid(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def _bounds(low, high, left: str = "[") -> str:
    """The text of the interval [`low`, `high`] (either side open-ended when `None`)."""
    if low is None:
        return f"<= {high}"
    return f"{left}{low}, {high}]" if high is not None else (f"> {low}" if left == "(" else f">= {low}")


def parse_int(value, param: str, low: int | None = None, high: int | None = None) -> int:
    """`value` (an integer, or its text from a form) as an int, within [`low`, `high`] where given (the server's own
    limits; the pipeline checks its arguments itself), else a 400 naming `param`."""
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise _invalid(param, f"`{param}` must be an integer, got {value[:40]!r}.") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise _invalid(param, f"`{param}` must be a finite integer, got {describe(value)}.")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _invalid(param, f"`{param}` must be an integer, got {type(value).__name__}.")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = _bounds(low, high)
        raise _invalid(param, f"`{param}` must be an integer {'in ' if bounds[0] == '[' else ''}{bounds}, got "
                       f"{describe(value)}.")  # fmt: skip
    return value


def parse_float(value, param: str, low: float | None = None, high: float | None = None, low_open: bool = False) -> float:
    """`value` (a number, or its text from a form) as a finite float, within the bounds where given, else a 400
    naming `param`."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise _invalid(param, f"`{param}` must be a number, got {value[:40]!r}.") from None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _invalid(param, f"`{param}` must be a finite number, got {describe(value)}.")
    try:
        number = float(value)  # an integer past float's range overflows here
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise _invalid(param, f"`{param}` must be a finite number, got {describe(value)}.")
    too_low = low is not None and (number <= low if low_open else number < low)
    if too_low or (high is not None and number > high):
        bounds = _bounds(low, high, "(" if low_open else "[")
        raise _invalid(param, f"`{param}` must be a number {'in ' if bounds[0] in '[(' else ''}{bounds}, got {number}.")
    return number


def parse_bool(value, param: str) -> bool:
    """`value` (a boolean, or `"true"` / `"false"` from a form) as a bool, else a 400 naming `param`."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    if not isinstance(value, bool):
        raise _invalid(param, f"`{param}` must be true or false, got {describe(value)}.")
    return value


def parse_size(value) -> tuple[int, int] | None:
    """An OpenAI `size` ("WIDTHxHEIGHT", or "auto"/None for the pipeline's default) as `(width, height)`; the
    pipeline checks the sides."""
    if value is None or value == "auto":
        return None
    match = re.fullmatch(r"\s*(\d{1,6})\s*[xX]\s*(\d{1,6})\s*", value) if isinstance(value, str) else None
    if match is None:
        raise _invalid("size", f"`size` must look like 'WIDTHxHEIGHT' (e.g. '512x512'), got {describe(value)}.")
    return int(match.group(1)), int(match.group(2))


@dataclass(frozen=True, eq=False)
class EncodedImage:
    """
    An input image as the client sent it: its compressed bytes, checked from the header at admission (format, size,
    pixel count), decoded only by the worker when the request runs. A queued request holds these bytes, never the
    decoded pixels.

    Args:
        data (`bytes`): the encoded image (PNG, JPEG, ...).
        width (`int`), height (`int`): its size, from the header.
        param (`str`): the request field it came from, named by a decoding error.
    """

    data: bytes
    width: int
    height: int
    param: str

    @property
    def nbytes(self) -> int:
        """Bytes this image holds while its request waits."""
        return len(self.data)

    def decode(self) -> PIL.Image.Image:
        """The RGB PIL image (the project's one loader, `to_rgb_image`); a 400 naming the field if the pixel data is
        broken past the header."""
        from transformers_bagel.image_processing_bagel import to_rgb_image

        try:
            return to_rgb_image(self.data)
        except (ValueError, TypeError, OSError, PIL.Image.DecompressionBombError):
            message = f"`{self.param}` could not be decoded as an image."
            raise _invalid(self.param, message, code="invalid_image") from None


def check_image_bytes(data: bytes, param: str, limits: ServerLimits) -> EncodedImage:
    """
    Encoded image bytes checked without decoding the pixels: the byte limit, a readable header, the pixel limit and
    the format's own integrity check (PNG chunk checksums, ...). Returns the [`EncodedImage`] the request keeps; a 400
    or 413 naming `param` otherwise.
    """
    if not data:
        raise _invalid(param, f"`{param}` is empty.", code="invalid_image")
    if len(data) > limits.max_image_bytes:
        raise APIError(
            413, f"`{param}` is {len(data)} bytes; the limit is {limits.max_image_bytes}.", param=param,
            code="image_too_large",
        )  # fmt: skip
    try:
        with PIL.Image.open(io.BytesIO(data)) as probe:  # reads the header only
            width, height = probe.size
    except (OSError, PIL.UnidentifiedImageError, PIL.Image.DecompressionBombError, ValueError, SyntaxError):
        raise _invalid(param, f"`{param}` could not be decoded as an image.", code="invalid_image") from None
    if width < 1 or height < 1:
        raise _invalid(param, f"`{param}` has an empty size {width}x{height}.", code="invalid_image")
    if width * height > limits.max_image_pixels:
        raise APIError(
            413, f"`{param}` is {width}x{height} pixels; the limit is {limits.max_image_pixels} pixels.", param=param,
            code="image_too_large",
        )  # fmt: skip
    try:
        with PIL.Image.open(io.BytesIO(data)) as probe:
            probe.verify()  # checksums and structure, without decompressing the pixels
    except Exception:  # PIL raises several kinds here (SyntaxError, OSError, struct.error, ...)
        raise _invalid(param, f"`{param}` could not be decoded as an image.", code="invalid_image") from None
    return EncodedImage(bytes(data), width, height, param)


def decode_data_url(url: str, param: str, limits: ServerLimits) -> EncodedImage:
    """A base64 `data:image/...;base64,...` URL as an [`EncodedImage`] (see [`check_image_bytes`])."""
    match = _DATA_URL.match(url)
    if match is None or not match.group("b64"):
        raise _invalid(param, f"`{param}` must be a base64 data URL (data:image/png;base64,...).", code="invalid_image")
    payload = url[match.end() :]
    if len(payload) * 3 // 4 > limits.max_image_bytes + 3:
        raise APIError(
            413, f"`{param}` holds more than {limits.max_image_bytes} bytes.", param=param, code="image_too_large"
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid(param, f"`{param}` is not valid base64.", code="invalid_image") from None
    return check_image_bytes(data, param, limits)


def _load_image_url(url, param: str, limits: ServerLimits, allow_remote: bool) -> EncodedImage:
    if not isinstance(url, str) or not url:
        raise _invalid(param, f"`{param}` must be a non-empty string.", code="invalid_image")
    if url.startswith("data:"):
        return decode_data_url(url, param, limits)
    if url.startswith(("http://", "https://")):
        if not allow_remote:
            raise _invalid(
                param, "Remote image URLs are disabled on this server; send the image as a base64 data URL "
                "(the server runs with --allow_remote_images to fetch them).", code="remote_images_disabled",
            )  # fmt: skip
        from .remote import fetch_remote_image

        return fetch_remote_image(url, param, limits)
    raise _invalid(param, f"`{param}` must be a base64 data URL or an http(s) URL.", code="invalid_image")


def _text_of(content, param: str) -> str:
    """The text of a system / assistant message: a string or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for index, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _invalid(f"{param}[{index}]", f"`{param}[{index}]` must be a text part in this role.")
            texts.append(part["text"])
        return "".join(texts)
    raise _invalid(param, f"`{param}` must be a string or a list of content parts.")


def chat_messages_to_bagel(messages, limits: ServerLimits, allow_remote: bool, system_prompt: str | None = None):
    """
    OpenAI chat `messages` as BAGEL chat messages for `BagelProcessor.apply_chat_template`: user messages become
    lists of `{"type": "text"}` / `{"type": "image", "image": EncodedImage}` parts (decoded by
    [`decode_message_images`] when the request runs), system and assistant messages strings (`developer` is a system
    message). `system_prompt` (thinking mode's) goes first. Returns `(messages, images)`.
    """
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", "`messages` must be a non-empty list of chat messages.")
    if len(messages) > limits.max_messages:
        raise _invalid("messages", f"`messages` holds {len(messages)} messages; the limit is {limits.max_messages}.")
    converted = [{"role": "system", "content": system_prompt}] if system_prompt else []
    images, chars = [], 0
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _invalid(param, f"`{param}` must be an object with `role` and `content`.")
        role, content = message.get("role"), message.get("content")
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant"):
            raise _invalid(f"{param}.role", f"`{param}.role` must be system, user or assistant, got {describe(role)}.")
        if role != "user":
            text = _text_of(content, f"{param}.content")
            chars += len(text)
            converted.append({"role": role, "content": text})
            continue
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list) or not parts:
            raise _invalid(f"{param}.content", f"`{param}.content` must be a string or a non-empty list of parts.")
        bagel_parts = []
        for number, part in enumerate(parts):
            where = f"{param}.content[{number}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                chars += len(part["text"])
                bagel_parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                image_url = part.get("image_url")
                url = image_url.get("url") if isinstance(image_url, dict) else image_url
                if len(images) >= limits.max_input_images:
                    raise _invalid(where, f"A request may hold {limits.max_input_images} images at most.")
                image = _load_image_url(url, f"{where}.image_url", limits, allow_remote)
                images.append(image)
                bagel_parts.append({"type": "image", "image": image})
            else:
                raise _invalid(where, f"`{where}` must be a `text` part or an `image_url` part.")
        if not any(p["type"] == "text" and p["text"].strip() for p in bagel_parts):
            raise _invalid(f"{param}.content", f"`{param}` has no text; ask something.")
        converted.append({"role": "user", "content": bagel_parts})
    if chars > limits.max_prompt_chars:
        raise _invalid("messages", f"The messages hold {chars} characters; the limit is {limits.max_prompt_chars}.")
    if converted[-1]["role"] != "user":
        raise _invalid("messages", "The last message must be the user's (the model answers it).")
    return converted, images


def decode_message_images(messages: list) -> list:
    """BAGEL chat `messages` with every [`EncodedImage`] part decoded to an RGB PIL image (a new list; the queued
    request keeps its bytes only)."""
    decoded = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [{**part, "image": part["image"].decode()} if isinstance(part.get("image"), EncodedImage)
                       else part for part in content]  # fmt: skip
        decoded.append({**message, "content": content})
    return decoded
