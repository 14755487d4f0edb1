"""
The queued form of the server's requests and how request fields become it: [`ImageRequest`] (generation and
editing: the pipeline arguments the client set, nothing else) and [`ChatRequest`]. The pipeline owns its defaults
and bounds: a field the client leaves out stays unset, and the pipeline's own checks ([`check_image_arguments`]) refuse
a bad value before the request is queued. The server checks only what is its own: the request's shape and types,
its limits ([`ServerLimits`]) and the OpenAI fields it cannot honour.
"""

from __future__ import annotations

import inspect
import json
import re
import secrets
from dataclasses import dataclass

from ..defaults import EDIT_PRESET, TEXT_TO_IMAGE_PRESET
from .errors import APIError
from .requests import EncodedImage, ServerLimits, chat_messages_to_bagel, describe, parse_bool, parse_float
from .requests import parse_int, parse_size


__all__ = ["ChatRequest", "ImageRequest", "check_image_arguments", "parse_chat_request", "parse_image_fields",
           "pipeline_error"]  # fmt: skip

# OpenAI fields the server accepts and does not use (hints that change nothing for BAGEL's images).
_IGNORED_IMAGE_FIELDS = {"model", "quality", "style", "user", "moderation", "input_fidelity"}
_IGNORED_CHAT_FIELDS = {"model", "user", "metadata", "store", "stream_options", "parallel_tool_calls", "service_tier",
                        "n", "logprobs", "response_format", "frequency_penalty", "presence_penalty"}  # fmt: skip
_OUTPUT_FIELDS = {"response_format", "output_format", "output_compression", "background"}
# Pipeline arguments a client may set, each parsed from JSON or form text (the pipeline checks the values).
_NUMBERS = ("timestep_shift", "cfg_text_scale", "cfg_img_scale", "cfg_renorm_min", "think_temperature")
_SWITCHES = ("think", "think_do_sample")
_IMAGE_FIELDS = {"prompt", "n", "size", "seed", "num_inference_steps", "cfg_interval", "cfg_renorm_type",
                 "max_think_tokens", "image", "image[]", "mask", *_NUMBERS, *_SWITCHES, *_OUTPUT_FIELDS}  # fmt: skip
# The request field a pipeline argument comes from, where the names differ.
_FIELD_OF_ARGUMENT = {"height": "size", "width": "size", "num_images_per_prompt": "n"}


@dataclass
class ImageRequest:
    """
    A generation or edit request while it waits and runs.

    Args:
        prompt (`str`): the prompt.
        images (`list`, *optional*): [`EncodedImage`]s while queued, PIL images in the worker's call (editing).
        n (`int`): images asked; each is drawn with its own generator, seeded `seed + index`.
        seed (`int`): the first image's seed.
        arguments (`dict`): the pipeline arguments the client set (hashable values); the pipeline's defaults apply
            to the others.
        response_format (`str`), output_format (`str`), output_compression (`int`): how the images are answered.
    """

    prompt: str
    images: list | None
    n: int
    seed: int
    arguments: dict
    response_format: str
    output_format: str = "png"
    output_compression: int = 100

    @property
    def nbytes(self) -> int:
        """Bytes held while queued: the prompt and the images' compressed bytes."""
        return len(self.prompt.encode("utf-8", "replace")) + sum(image.nbytes for image in self.images or ())


@dataclass
class ChatRequest:
    """A chat request while it waits and runs: BAGEL chat messages (image parts hold [`EncodedImage`]s while queued,
    PIL images in the worker's call), the answer's budget and sampling, its stop strings, and the streamer of a
    streamed request."""

    messages: list
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    streamer: object = None

    @property
    def nbytes(self) -> int:
        """Bytes held while queued: the texts and the images' compressed bytes."""
        total = 0
        for message in self.messages:
            parts = message["content"] if isinstance(message["content"], list) else [{"text": message["content"]}]
            for part in parts:
                image = part.get("image")
                total += image.nbytes if isinstance(image, EncodedImage) else len(part.get("text", "").encode())
        return total


def check_model(fields: dict, model_name: str) -> None:
    """Refuses a `model` other than the one served (404), or not a string (400)."""
    model = fields.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, f"`model` must be a string, got {describe(model)}.", param="model", code="invalid_value")
    if model is not None and model != model_name:
        raise APIError(404, f"The model {describe(model)} does not exist; this server serves {model_name!r}.",
                       param="model", code="model_not_found")  # fmt: skip


def pipeline_error(error: Exception) -> APIError:
    """The pipeline's refusal of a request's inputs (`ValueError` / `TypeError`) as a 400 naming the request field its
    message names."""
    message = str(error)
    named = re.findall(r"`(\w+)`", message) or (["prompt"] if "prompt" in message.lower() else [])
    param = next((_FIELD_OF_ARGUMENT.get(name, name) for name in named
                  if _FIELD_OF_ARGUMENT.get(name, name) in _IMAGE_FIELDS), None)  # fmt: skip
    return APIError(400, message, param=param, code="invalid_value")


def _cfg_interval(value) -> tuple[float, float]:
    """`cfg_interval` ([start, end], or its JSON text from a form) as two floats."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            value = None
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise APIError(400, "`cfg_interval` must be [start, end].", param="cfg_interval", code="invalid_value")
    return tuple(parse_float(number, "cfg_interval") for number in value)


def _pipeline_arguments(fields: dict, limits: ServerLimits) -> dict:
    """The pipeline arguments a request sets, parsed from JSON or form text (hashable: they make its batching key).
    Unset fields stay out: the pipeline's defaults apply (presets of generation or editing, the edit size, ...)."""
    arguments = {}
    size = parse_size(fields.get("size"))
    if size is not None:
        arguments["width"], arguments["height"] = size
    if fields.get("num_inference_steps") is not None:  # the server's own limit; the pipeline checks the rest
        arguments["num_inference_steps"] = parse_int(fields["num_inference_steps"], "num_inference_steps",
                                                     high=limits.max_inference_steps)  # fmt: skip
    if fields.get("max_think_tokens") is not None:
        arguments["max_think_tokens"] = parse_int(fields["max_think_tokens"], "max_think_tokens",
                                                  high=limits.max_think_tokens)  # fmt: skip
    for name in _NUMBERS:
        if fields.get(name) is not None:
            arguments[name] = parse_float(fields[name], name)
    for name in _SWITCHES:
        if fields.get(name) is not None:
            arguments[name] = parse_bool(fields[name], name)
    if fields.get("cfg_interval") is not None:
        arguments["cfg_interval"] = _cfg_interval(fields["cfg_interval"])
    if fields.get("cfg_renorm_type") is not None:
        if not isinstance(fields["cfg_renorm_type"], str):
            raise APIError(400, f"`cfg_renorm_type` must be a string, got {describe(fields['cfg_renorm_type'])}.",
                           param="cfg_renorm_type", code="invalid_value")  # fmt: skip
        arguments["cfg_renorm_type"] = fields["cfg_renorm_type"]
    return arguments


def parse_image_fields(fields: dict, images: list | None, limits: ServerLimits, model_name: str, output: dict):
    """
    An image request from its fields (JSON, or the text fields of a multipart edit) and its checked `images`
    (editing). `output` holds its checked `response_format`, `output_format` and `output_compression`. Returns the
    [`ImageRequest`]; the pipeline's checks come next ([`check_image_arguments`]).
    """
    unknown = sorted(set(fields) - _IMAGE_FIELDS - _IGNORED_IMAGE_FIELDS)
    if unknown:
        raise APIError(400, f"Unsupported parameter(s): {unknown}.", param=unknown[0], code="unknown_parameter")
    if "mask" in fields:
        raise APIError(400, "`mask` is not supported: BAGEL edits the whole image by instruction.", param="mask")
    check_model(fields, model_name)
    prompt = fields.get("prompt")
    if not isinstance(prompt, str):
        raise APIError(400, "`prompt` must be a non-empty string.", param="prompt", code="invalid_value")
    if len(prompt) > limits.max_prompt_chars:
        raise APIError(400, f"`prompt` holds {len(prompt)} characters; the limit is {limits.max_prompt_chars}.",
                       param="prompt", code="invalid_value")  # fmt: skip
    n = parse_int(fields.get("n", 1), "n", 1, limits.max_n)
    seed = fields.get("seed")
    seed = secrets.randbits(62) if seed is None else parse_int(seed, "seed", 0, 2**62)
    return ImageRequest(prompt, images, n, seed, _pipeline_arguments(fields, limits), **output)


def check_image_arguments(pipe, request: ImageRequest) -> None:
    """
    The pipeline's own checks of an image request before it is queued ([`BagelPipeline.check_inputs`] and
    [`BagelPipeline.normalize_prompts`]), so that one bad request never reaches a batch: the arguments the client set,
    the others at the pipeline's defaults (its call's, and the generation or edit preset). Its images are checked
    from their headers at admission and decoded when it runs. Raises the pipeline's `ValueError` / `TypeError`.
    """
    defaults = {name: parameter.default for name, parameter in inspect.signature(pipe).parameters.items()}
    defaults.update(EDIT_PRESET if request.images else TEXT_TO_IMAGE_PRESET)
    values = {**defaults, **request.arguments}
    checked = inspect.signature(pipe.check_inputs).parameters
    pipe.check_inputs(**{name: values[name] for name in checked if name in values})
    pipe.normalize_prompts(request.prompt)


def parse_chat_request(body: dict, limits: ServerLimits, model_name: str, allow_remote_images: bool):
    """
    A chat request from its JSON body; returns it, whether it is streamed, and whether the stream ends with usage.
    Its images (remote ones fetched here) come last, after every cheap check.
    """
    from transformers_bagel.chat import VLM_THINK_SYSTEM_PROMPT

    known = {"messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stream", "stop",
             "think"}  # fmt: skip
    unknown = sorted(set(body) - known - _IGNORED_CHAT_FIELDS)
    if unknown:
        raise APIError(400, f"Unsupported parameter(s): {unknown}.", param=unknown[0], code="unknown_parameter")
    check_model(body, model_name)
    if body.get("n", 1) not in (1, None):
        raise APIError(400, "`n` must be 1: one answer per request.", param="n", code="invalid_value")
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise APIError(400, f"`{name}` is not supported (leave it 0).", param=name, code="invalid_value")
    if body.get("logprobs"):
        raise APIError(400, "`logprobs` is not supported.", param="logprobs", code="invalid_value")
    if body.get("response_format") not in (None, {"type": "text"}):
        raise APIError(400, "Only text responses are supported.", param="response_format", code="invalid_value")
    think = parse_bool(body.get("think", False), "think")
    stream = parse_bool(body.get("stream", False), "stream")
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise APIError(400, "`stream_options` must be an object such as {\"include_usage\": true}.",
                       param="stream_options", code="invalid_value")  # fmt: skip
    include_usage = parse_bool((stream_options or {}).get("include_usage", False), "stream_options.include_usage")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = limits.default_max_tokens if max_tokens is None else parse_int(max_tokens, "max_tokens", 1,
                                                                                limits.max_tokens)  # fmt: skip
    temperature = parse_float(body.get("temperature") or 0.0, "temperature", 0.0, 2.0)
    top_p = body.get("top_p")
    top_p = 1.0 if top_p is None else parse_float(top_p, "top_p", 0.0, 1.0, low_open=True)
    seed = body.get("seed")
    seed = None if seed is None else parse_int(seed, "seed", 0, 2**62)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "`stop` must be a string or a list of up to 4 non-empty strings.", param="stop",
                       code="invalid_value")  # fmt: skip
    messages, _ = chat_messages_to_bagel(body.get("messages"), limits, allow_remote_images,
                                         VLM_THINK_SYSTEM_PROMPT if think else None)  # fmt: skip
    return ChatRequest(messages, max_tokens, temperature, top_p, seed, stop), stream, include_usage
