"""
The OpenAI-compatible BAGEL server (`bagel serve`): a FastAPI app whose one worker thread owns the pipeline.

Endpoints: `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus), `POST /v1/chat/completions` (text and images,
streamed or not), `POST /v1/images/generations`, `POST /v1/images/edits` (multipart), and `GET /v1/files/images/NAME`
for `response_format="url"` when an image folder is configured.

Threading: request handlers check their inputs on the event loop (or in its thread pool for JSON parsing and image
headers) and put a [`Job`] on the [`BatchWorker`]'s bounded queue; the worker decodes the job's images and runs the
pipeline. Image jobs with the same batching key (kind, size, steps and every guidance setting) run as one pipeline
call with one `torch.Generator` per image; chat jobs and thinking-mode image jobs run alone.

Safety: request bodies are capped while they arrive ([`BodyLimitMiddleware`]); a queued request holds its images'
compressed bytes only, and the queue is bounded in requests and in bytes (429 past either); a request whose client
hung up, or whose time ran out, is dropped before it runs, and a running call stops early once nobody waits for it;
every refusal is an OpenAI-style error naming the field, never a traceback or a server path.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import errno
import hmac
import io
import ipaddress
import json
import math
import queue
import re
import secrets
import time
import uuid
from concurrent.futures import CancelledError
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import PIL.features
import torch
from diffusers.utils import logging
from transformers import StoppingCriteriaList
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..pipeline_bagel import EDIT_PRESET, MAX_GUIDANCE_SCALE, MAX_TIMESTEP_SHIFT, MIN_TIMESTEP_SHIFT, RENORM_TYPES
from ..pipeline_bagel import TEXT_TO_IMAGE_PRESET
from .errors import APIError, error_body
from .metrics import ServerMetrics
from .middleware import CLIENT_CLOSED_REQUEST, BodyLimitMiddleware, BodyTooLargeError, RequestLogMiddleware
from .options import check_api_key, check_port, check_timing
from .requests import (
    EncodedImage,
    ServerLimits,
    chat_messages_to_bagel,
    check_image_bytes,
    decode_message_images,
    describe,
    parse_bool,
    parse_float,
    parse_int,
    parse_size,
)
from .worker import BatchWorker, Job, QueueFullError


logger = logging.get_logger(__name__)

__all__ = ["ServerConfig", "create_app", "run_server"]

# OpenAI fields the server accepts and does not use (hints that change nothing for BAGEL's images).
_IGNORED_IMAGE_FIELDS = {"model", "quality", "style", "user", "moderation", "input_fidelity"}
_IGNORED_CHAT_FIELDS = {"model", "user", "metadata", "store", "stream_options", "parallel_tool_calls", "service_tier",
                        "n", "logprobs", "response_format", "frequency_penalty", "presence_penalty"}  # fmt: skip
# Seconds between two checks of whether a waiting request's client is still there.
_DISCONNECT_POLL_S = 0.1


def _writable_formats() -> dict[str, tuple[str, str]]:
    """The `output_format`s this Pillow writes: OpenAI's name -> (Pillow's format, media type)."""
    formats = {"png": ("PNG", "image/png")}
    if PIL.features.check("jpg"):
        formats["jpeg"] = ("JPEG", "image/jpeg")
    if PIL.features.check("webp"):
        formats["webp"] = ("WEBP", "image/webp")
    return formats


_OUTPUT_FORMATS = _writable_formats()
_IMAGE_NAME = re.compile(r"^[0-9a-f]{32}\.(png|jpeg|webp)$")


@dataclass
class ServerConfig:
    """
    Settings of the BAGEL server.

    Args:
        model_name (`str`, defaults to `"bagel"`): the id listed by `/v1/models` and accepted as `model`.
        max_batch_size (`int`, defaults to 8): most images of one batched pipeline call (1 disables batching).
        max_queue (`int`, defaults to 64): requests allowed to wait; more are refused with HTTP 429.
        api_key (`str`, *optional*): when set, every `/v1` request and `/metrics` needs `Authorization: Bearer KEY`.
        request_timeout (`float`, defaults to 600): seconds a request may wait and run before HTTP 504 (a queued
            request past it is dropped unrun).
        allow_remote_images (`bool`, defaults to `False`): fetch http(s) image URLs of chat messages (refused with
            HTTP 400 otherwise; base64 `data:` URLs always work).
        image_dir (`str` or `Path`, *optional*): folder where `response_format="url"` images are written and served
            from (that format is refused without it).
        batch_wait (`float`, defaults to 0.01): seconds the worker waits for more requests to batch with a first one
            (shorter than `request_timeout`).
        max_queue_bytes (`int`, defaults to 512 MiB): most bytes of input (compressed images and texts) the waiting
            requests may hold together; more are refused with HTTP 429 (a request alone in the queue is always
            taken).
        limits ([`ServerLimits`]): the bounds checked on every request before it is queued.

    Raises:
        `ValueError` at construction, naming the `bagel serve` option: an empty or blank `api_key`, a `batch_wait`
        not shorter than `request_timeout`, sizes below 1, an `image_dir` that is a file.
    """

    model_name: str = "bagel"
    max_batch_size: int = 8
    max_queue: int = 64
    api_key: str | None = None
    request_timeout: float = 600.0
    allow_remote_images: bool = False
    image_dir: str | Path | None = None
    batch_wait: float = 0.01
    max_queue_bytes: int = 512 * 1024 * 1024
    limits: ServerLimits = field(default_factory=ServerLimits)

    def __post_init__(self):
        check_api_key(self.api_key, "`api_key` (--api_key or BAGEL_API_KEY)")
        check_timing(self.request_timeout, self.batch_wait)
        for name, flag in (("max_batch_size", "--max_batch_size"), ("max_queue", "--max_queue"),
                           ("max_queue_bytes", None)):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}`{f' ({flag})' if flag else ''} must be an integer >= 1, got {value!r}.")
        if not isinstance(self.model_name, str) or not self.model_name.strip():
            raise ValueError(f"`model_name` (--model_name) must be a non-empty string, got {self.model_name!r}.")
        if self.image_dir is not None and Path(self.image_dir).exists() and not Path(self.image_dir).is_dir():
            raise ValueError(f"--image_dir {str(self.image_dir)!r} exists and is not a folder.")


@dataclass
class _ImageRequest:
    prompt: str
    images: list | None  # EncodedImage while queued, PIL images in the worker's call
    n: int
    seed: int
    settings: dict
    response_format: str
    output_format: str = "png"
    output_compression: int = 100

    @property
    def nbytes(self) -> int:
        """Bytes held while queued: the prompt and the images' compressed bytes."""
        return len(self.prompt.encode("utf-8", "replace")) + sum(image.nbytes for image in self.images or ())


@dataclass
class _ChatRequest:
    messages: list  # image parts hold EncodedImage while queued, PIL images in the worker's call
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


class _RowStops:
    """
    A transformers stopping criterion for a batch of chat requests: row `r` is done once its generated text holds one
    of `stops[r]`, it has `max_tokens[r]` new tokens, or its job was cancelled (its client went away, its time ran
    out); `ended_at[r]` keeps how many new tokens it had then.
    """

    def __init__(self, tokenizer, prompt_length: int, stops: list[list[str]], max_tokens: list[int],
                 jobs: list[Job] | None = None):  # fmt: skip
        self.tokenizer, self.prompt_length, self.stops, self.max_tokens = tokenizer, prompt_length, stops, max_tokens
        self.jobs = jobs
        self.ended_at: list[int | None] = [None] * len(stops)

    def __call__(self, input_ids, scores, **kwargs):
        generated = input_ids.shape[1] - self.prompt_length
        for row, stops in enumerate(self.stops):
            if self.ended_at[row] is not None:
                continue
            if self.jobs is not None and self.jobs[row].cancelled:
                self.ended_at[row] = generated
                continue
            text = self.tokenizer.decode(input_ids[row, self.prompt_length :], skip_special_tokens=True) if stops else ""
            if generated >= self.max_tokens[row] or any(stop in text for stop in stops):
                self.ended_at[row] = generated
        done = [ended is not None for ended in self.ended_at]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` up to the first stop string, and whether one was found."""
    cuts = [text.find(stop) for stop in stops if stop in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _end_stream(payload) -> None:
    """Ends the streamer of a streamed chat job that will not run, so that its response stops waiting."""
    if getattr(payload, "streamer", None) is not None:
        payload.streamer.end()


def _decoded(job: Job):
    """The job's payload with its images decoded (a copy: the queued payload keeps the compressed bytes only)."""
    payload = job.payload
    if job.kind == "chat":
        return dataclasses.replace(payload, messages=decode_message_images(payload.messages))
    if not payload.images:
        return payload
    return dataclasses.replace(payload, images=[image.decode() for image in payload.images])


class _Engine:
    """What the worker thread runs: pipeline calls for image jobs, `model.generate` for chat jobs. Each job's images
    are decoded here, job by job: one whose pixel data is broken fails alone and the others run."""

    def __init__(self, pipe, metrics: ServerMetrics):
        self.pipe = pipe
        self.metrics = metrics

    def execute(self, jobs: list[Job]) -> list:
        results, ready = [None] * len(jobs), []
        for index, job in enumerate(jobs):
            try:
                ready.append((index, job, _decoded(job)))
            except APIError as error:
                _end_stream(job.payload)
                results[index] = error
        if ready:
            run = self._chat if jobs[0].kind == "chat" else self._images
            outputs = run([job for _, job, _ in ready], [payload for _, _, payload in ready])
            for (index, _, _), output in zip(ready, outputs):
                results[index] = output
        return results

    def _images(self, jobs: list[Job], requests: list[_ImageRequest]) -> list:
        prompts, images, generators = [], [], []
        for request in requests:
            for index in range(request.n):
                prompts.append(request.prompt)
                images.append(request.images)
                generators.append(torch.Generator().manual_seed(request.seed + index))
        settings = dict(requests[0].settings)

        def stop_when_abandoned(pipe, step, timestep, callback_kwargs):
            if all(job.cancelled for job in jobs):  # nobody waits for these images any more
                pipe._interrupt = True
            return {}

        # batch_invariant: a seeded request gives the same image whether it ran alone or in a batch.
        output = self.pipe(
            prompts, image=images if jobs[0].kind == "edit" else None, generator=generators, num_images_per_prompt=1,
            batch_invariant=True, callback_on_step_end=stop_when_abandoned, callback_on_step_end_tensor_inputs=[],
            **settings,
        )  # fmt: skip
        results, start = [], 0
        for request in requests:
            stop = start + request.n
            results.append(list(zip(output.images[start:stop], (output.text or [None] * len(prompts))[start:stop])))
            start = stop
        return results

    def _chat(self, jobs: list[Job], requests: list[_ChatRequest]) -> list[dict]:
        """One `generate` call for the requests (several only when greedy and not streamed: see `chat_completions`),
        their prompts left-padded into one batch; each row stops on its own stop strings and `max_tokens`, or when
        its client has gone."""
        model, processor = self.pipe.model, self.pipe.processor
        first = requests[0]
        try:
            inputs = processor.apply_chat_template(
                [request.messages for request in requests], add_generation_prompt=True, tokenize=True,
                return_dict=True, return_tensors="pt",
            ).to(model.device)  # fmt: skip
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            prompt_length = inputs["input_ids"].shape[1]
            stops = _RowStops(processor.tokenizer, prompt_length, [request.stop for request in requests],
                              [request.max_tokens for request in requests], jobs)  # fmt: skip
            options = {"max_new_tokens": max(request.max_tokens for request in requests), "streamer": first.streamer,
                       "stopping_criteria": StoppingCriteriaList([stops])}  # fmt: skip
            if first.temperature > 0:  # a sampled request runs alone: its seed sets the generator
                options.update(do_sample=True, temperature=first.temperature, top_p=first.top_p, top_k=0)
                torch.manual_seed(first.seed if first.seed is not None else secrets.randbits(63))
            else:
                options["do_sample"] = False
            with torch.no_grad():
                output = model.generate(**inputs, **options)
        except BaseException:
            if first.streamer is not None:
                first.streamer.end()  # the streaming response stops waiting
            raise
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) if eos is not None else set()
        results = []
        for row, request in enumerate(requests):
            new_tokens = output[row, prompt_length:].tolist()
            ended = next((index + 1 for index, token in enumerate(new_tokens) if token in eos), None)
            length = min(end for end in (ended, stops.ended_at[row], len(new_tokens)) if end is not None)
            new_tokens = new_tokens[:length]
            text = processor.tokenizer.decode(new_tokens, skip_special_tokens=True)
            text, stopped = _cut_at_stop(text, request.stop)
            finish = "stop" if stopped or ended == length or length < request.max_tokens else "length"
            prompt_tokens = int(inputs["attention_mask"][row].sum())
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": length,
                     "total_tokens": prompt_tokens + length}  # fmt: skip
            results.append({"text": text, "finish_reason": finish, "usage": usage})
        return results


def _encode_image(image, output_format: str, compression: int) -> bytes:
    """`image` encoded as `output_format` (`compression`, 0-100, is the JPEG / WebP quality)."""
    buffer = io.BytesIO()
    options = {} if output_format == "png" else {"quality": compression}
    image.save(buffer, format=_OUTPUT_FORMATS[output_format][0], **options)
    return buffer.getvalue()


def _base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _write_image_file(path: Path, data: bytes) -> None:
    """Writes one `response_format="url"` image as a new file."""
    with open(path, "xb") as file:
        file.write(data)


def _remove_partial_file(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


def _storage_error(error: OSError) -> APIError:
    """The client's view of a failed image write: 507 when the folder is full, 503 otherwise (never the path)."""
    logger.error(f"Writing a response_format=url image failed: {error.strerror or type(error).__name__}")
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return APIError(507, "The server's image folder is full, so the image could not be stored; ask for "
                        "response_format='b64_json', or retry later.", type="server_error", param="response_format",
                        code="image_storage_full")  # fmt: skip
    return APIError(503, "The server could not store the image; ask for response_format='b64_json', or retry later.",
                    type="server_error", param="response_format", code="image_storage_unavailable")  # fmt: skip


def _json_int(text: str) -> int | float:
    """A JSON integer; one past Python's digit limit for conversions becomes +-infinity, which every numeric field
    refuses by name (a 400 naming the field, not a parse error of the whole body)."""
    try:
        return int(text)
    except ValueError:
        return -math.inf if text.startswith("-") else math.inf


def _parse_json(raw: bytes):
    """A request body as JSON; client mistakes (broken, nested past Python's recursion limit) are 400s."""
    try:
        return json.loads(raw, parse_int=_json_int)
    except RecursionError:
        raise APIError(400, "The request body is nested too deeply.", code="invalid_json") from None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise APIError(400, "The request body is not valid JSON.", code="invalid_json") from None


def _output_options(fields: dict, has_image_dir: bool) -> dict:
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
    if not isinstance(output_format, str) or output_format.lower() not in _OUTPUT_FORMATS:
        raise APIError(400, f"`output_format` must be one of {sorted(_OUTPUT_FORMATS)}, got {describe(output_format)}.",
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


def _cfg_interval(fields: dict, preset: dict) -> tuple[float, float]:
    """`cfg_interval` ([start, end], or its JSON text from a form) as two floats in [0, 1]."""
    interval = fields.get("cfg_interval", preset["cfg_interval"])
    if isinstance(interval, str):
        try:
            interval = json.loads(interval)
        except (ValueError, RecursionError):
            interval = None
    if not isinstance(interval, (list, tuple)) or len(interval) != 2:
        raise APIError(400, "`cfg_interval` must be [start, end].", param="cfg_interval", code="invalid_value")
    return tuple(parse_float(value, "cfg_interval", 0.0, 1.0) for value in interval)


def create_app(pipe, config: ServerConfig | None = None):
    """
    The FastAPI app serving `pipe` (a loaded [`BagelPipeline`]) with OpenAI's API. Its worker thread starts with the
    first job and stops at the app's shutdown.

    Args:
        pipe ([`BagelPipeline`]): the pipeline; only the worker thread runs it.
        config ([`ServerConfig`], *optional*): the server's settings (the defaults otherwise).
    """
    config = config or ServerConfig()
    limits = config.limits
    metrics = ServerMetrics()
    engine = _Engine(pipe, metrics)
    worker = BatchWorker(engine.execute, config.max_batch_size, config.max_queue, metrics, config.batch_wait,
                         config.max_queue_bytes)  # fmt: skip
    image_dir = Path(config.image_dir) if config.image_dir is not None else None
    if image_dir is not None:
        image_dir.mkdir(parents=True, exist_ok=True)
    stride = pipe.latent_downsample
    largest = pipe.model.config.max_image_size
    pipe.set_progress_bar_config(disable=True)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(worker.close)

    app = FastAPI(title="BAGEL OpenAI-compatible server", lifespan=lifespan)
    app.state.config, app.state.metrics, app.state.worker = config, metrics, worker
    # The body limit inside, the request log outside it (a 413 answered before routing is counted too).
    app.add_middleware(BodyLimitMiddleware, max_bytes=limits.max_body_bytes)
    app.add_middleware(RequestLogMiddleware, metrics=metrics)
    watchers: set[asyncio.Task] = set()  # disconnection watchers of streamed chats (kept alive until they end)

    # -- errors, metrics, logs ------------------------------------------------------------------------------------

    @app.exception_handler(APIError)
    async def _api_error(request, error: APIError):
        # A body refused midway is not read further: the connection closes after the answer.
        headers = {"connection": "close"} if isinstance(error, BodyTooLargeError) else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, error):
        first = error.errors()[0] if error.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return JSONResponse(error_body(f"Invalid request: {first.get('msg', 'bad input')}.", "invalid_request_error",
                                       param, "invalid_value"), status_code=400)  # fmt: skip

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, error):
        kind = "not_found" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(error.detail), kind), status_code=error.status_code)

    async def _authorize(request: Request):
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    async def _json_body(request: Request) -> dict:
        """The JSON object of the request body, read as a stream (the body is not kept on the request: a queued
        request holds only what its job needs). [`BodyLimitMiddleware`] stops the read past `max_body_bytes`."""
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
        data = await run_in_threadpool(_parse_json, raw)
        if not isinstance(data, dict):
            raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
        return data

    def _check_model(body: dict) -> None:
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise APIError(400, f"`model` must be a string, got {describe(model)}.", param="model",
                           code="invalid_value")  # fmt: skip
        if model is not None and model != config.model_name:
            raise APIError(404, f"The model {describe(model)} does not exist; this server serves "
                                f"{config.model_name!r}.", param="model", code="model_not_found")  # fmt: skip

    def _submit(job: Job):
        job.timeout = config.request_timeout  # the worker drops it unrun past this
        try:
            return worker.submit(job)
        except QueueFullError as error:
            raise APIError(429, str(error), type="rate_limit_error", code="queue_full") from None

    async def _wait(job: Job, request: Request):
        """The job's result, waiting at most `request_timeout` and only while the client is there: a client that hung
        up, or a timeout, cancels the job (dropped unrun if it still waits; a running call may stop early)."""
        waiter = asyncio.wrap_future(job.future)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + config.request_timeout
        while not waiter.done() and loop.time() < deadline:
            await asyncio.wait({waiter}, timeout=min(deadline - loop.time(), _DISCONNECT_POLL_S))
            if not waiter.done() and await request.is_disconnected():
                job.cancel("disconnected")
                waiter.cancel()
                raise APIError(CLIENT_CLOSED_REQUEST, "The client closed the request.", code="client_closed_request")
        if not waiter.done() or waiter.cancelled():
            job.cancel("timeout")
            waiter.cancel()
            raise APIError(504, f"The request did not finish within {config.request_timeout:g} seconds.",
                           type="timeout_error", code="timeout")  # fmt: skip
        return waiter.result()

    async def _run_job(job: Job, request: Request):
        request.state.job = job
        _submit(job)
        try:
            return await _wait(job, request)
        except APIError:
            raise
        except (ValueError, TypeError) as error:  # the library's refusals of this request's inputs
            raise APIError(400, str(error), code="invalid_value") from None
        except Exception:
            logger.exception(f"A {job.kind} job failed")
            raise APIError(500, "The server had an error while processing your request.", type="server_error") from None

    # -- informational endpoints -------------------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        """Liveness: the model served, the queue depth and the bytes the queue holds."""
        return {"status": "ok", "model": config.model_name, "queue_depth": worker.depth(),
                "queue_bytes": worker.queued_bytes()}  # fmt: skip

    @app.get("/metrics", dependencies=[Depends(_authorize)])
    async def prometheus_metrics():
        """Request counts, latency and queue-time summaries, batch sizes, in Prometheus' text format."""
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(_authorize)])
    async def list_models():
        """The one model this server serves, in OpenAI's list format."""
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "bagel-hf"}]}  # fmt: skip

    @app.get("/v1/models/{model_id}", dependencies=[Depends(_authorize)])
    async def get_model(model_id: str):
        """One model, in OpenAI's format (404 for any other id)."""
        _check_model({"model": model_id})
        return {"id": config.model_name, "object": "model", "created": 0, "owned_by": "bagel-hf"}

    @app.get("/v1/files/images/{name}")
    async def image_file(name: str):
        """An image written for `response_format="url"` (names are random 128-bit hex, nothing else is served)."""
        if (image_dir is None or not _IMAGE_NAME.fullmatch(name) or name.rpartition(".")[2] not in _OUTPUT_FORMATS
                or not (image_dir / name).is_file()):
            raise APIError(404, "No such image.", type="not_found", code="not_found")
        return FileResponse(image_dir / name, media_type=_OUTPUT_FORMATS[name.rpartition(".")[2]][1])

    # -- images -------------------------------------------------------------------------------------------------------

    def _image_request(fields: dict, kind: str, images: list | None) -> tuple[_ImageRequest, tuple | None]:
        """Checks the fields of an image request; returns it and its batching key (None: run alone)."""
        preset = EDIT_PRESET if kind == "edit" else TEXT_TO_IMAGE_PRESET
        known = {"prompt", "n", "size", "response_format", "seed", "num_inference_steps", "timestep_shift",
                 "cfg_text_scale", "cfg_img_scale", "cfg_interval", "cfg_renorm_type", "cfg_renorm_min", "think",
                 "max_think_tokens", "think_do_sample", "think_temperature", "image", "image[]", "mask",
                 "output_format", "output_compression", "background"}  # fmt: skip
        unknown = sorted(set(fields) - known - _IGNORED_IMAGE_FIELDS)
        if unknown:
            raise APIError(400, f"Unsupported parameter(s): {unknown}.", param=unknown[0], code="unknown_parameter")
        if "mask" in fields:
            raise APIError(400, "`mask` is not supported: BAGEL edits the whole image by instruction.", param="mask")
        _check_model(fields)
        prompt = fields.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise APIError(400, "`prompt` must be a non-empty string.", param="prompt", code="invalid_value")
        if len(prompt) > limits.max_prompt_chars:
            raise APIError(400, f"`prompt` holds {len(prompt)} characters; the limit is {limits.max_prompt_chars}.",
                           param="prompt", code="invalid_value")  # fmt: skip
        n = parse_int(fields.get("n", 1), "n", 1, limits.max_n)
        output = _output_options(fields, image_dir is not None)
        seed = fields.get("seed")
        seed = secrets.randbits(62) if seed is None else parse_int(seed, "seed", 0, 2**62)
        size = parse_size(fields.get("size"), stride, largest)
        if size is None:
            if kind == "edit":  # the last image's size after the VAE resize, known from its header
                width, height = pipe.processor.image_processor.get_resize_size(images[-1].width, images[-1].height,
                                                                               "vae")  # fmt: skip
            else:
                width = height = pipe.default_sample_size
        else:
            width, height = size
        think = parse_bool(fields.get("think", False), "think")
        settings = {
            "height": height,
            "width": width,
            "num_inference_steps": parse_int(fields.get("num_inference_steps", 50), "num_inference_steps", 1,
                                             limits.max_inference_steps),
            "timestep_shift": parse_float(fields.get("timestep_shift", 3.0), "timestep_shift", MIN_TIMESTEP_SHIFT,
                                          MAX_TIMESTEP_SHIFT),
            "cfg_text_scale": parse_float(fields.get("cfg_text_scale", preset["cfg_text_scale"]), "cfg_text_scale",
                                          1.0, MAX_GUIDANCE_SCALE),
            "cfg_img_scale": parse_float(fields.get("cfg_img_scale", preset["cfg_img_scale"]), "cfg_img_scale", 1.0,
                                         MAX_GUIDANCE_SCALE),
            "cfg_interval": _cfg_interval(fields, preset),
            "cfg_renorm_type": fields.get("cfg_renorm_type", preset["cfg_renorm_type"]),
            "cfg_renorm_min": parse_float(fields.get("cfg_renorm_min", 0.0), "cfg_renorm_min", 0.0, 1.0),
            "think": think,
            "max_think_tokens": parse_int(fields.get("max_think_tokens", 1000), "max_think_tokens", 1,
                                          limits.max_think_tokens),
            "think_do_sample": parse_bool(fields.get("think_do_sample", False), "think_do_sample"),
            "think_temperature": parse_float(fields.get("think_temperature", 0.3), "think_temperature", 0.0,
                                             100.0, low_open=True),
        }  # fmt: skip
        if not isinstance(settings["cfg_renorm_type"], str) or settings["cfg_renorm_type"] not in RENORM_TYPES:
            raise APIError(400, f"`cfg_renorm_type` must be one of {list(RENORM_TYPES)}.", param="cfg_renorm_type",
                           code="invalid_value")  # fmt: skip
        try:  # the pipeline's own checks, before queueing: one bad request never reaches a batch
            pipe.check_inputs(
                height, width, settings["num_inference_steps"], settings["timestep_shift"], settings["cfg_text_scale"],
                settings["cfg_img_scale"], settings["cfg_interval"], settings["cfg_renorm_type"],
                settings["cfg_renorm_min"], n, "pil", ["latents"], think, settings["max_think_tokens"],
                settings["think_do_sample"], settings["think_temperature"],
            )  # fmt: skip
            pipe._normalize_prompts(prompt, None)  # the images are checked from their headers, decoded when run
        except (ValueError, TypeError) as error:
            raise APIError(400, str(error), param="prompt" if "prompt" in str(error) else None,
                           code="invalid_value") from None
        request = _ImageRequest(prompt, images, n, seed, settings, **output)
        # Thinking writes a plan per prompt before drawing: such jobs run alone, so a plan never depends on others.
        key = None if think else (kind, *sorted(settings.items()))
        return request, key

    async def _store_image(data: bytes, output_format: str) -> str:
        """Writes an image of `response_format="url"`; returns its file name. A failed write leaves no file and is a
        507 (folder full) or 503, never a path or a traceback."""
        name = f"{uuid.uuid4().hex}.{output_format}"
        try:
            await run_in_threadpool(_write_image_file, image_dir / name, data)
        except OSError as error:
            await run_in_threadpool(_remove_partial_file, image_dir / name)
            raise _storage_error(error) from None
        return name

    async def _image_response(request: Request, kind: str, image_request: _ImageRequest, key) -> dict:
        job = Job(kind=kind, key=key, weight=image_request.n, payload=image_request, nbytes=image_request.nbytes)
        results = await _run_job(job, request)
        data, fmt = [], image_request.output_format
        for image, thinking in results:
            encoded = await run_in_threadpool(_encode_image, image, fmt, image_request.output_compression)
            if image_request.response_format == "url":
                item = {"url": str(request.url_for("image_file", name=await _store_image(encoded, fmt)))}
            else:
                item = {"b64_json": await run_in_threadpool(_base64, encoded)}
            if thinking is not None:
                item["revised_prompt"] = thinking  # thinking mode's plan, the prompt the image was drawn from
            data.append(item)
        return {"created": int(time.time()), "data": data, "output_format": fmt,
                "usage": {"batch_size": job.batch_size, "queue_time_s": round(job.queue_time, 4)}}  # fmt: skip

    @app.post("/v1/images/generations", dependencies=[Depends(_authorize)])
    async def images_generations(request: Request):
        """Text-to-image (OpenAI's Images API), with BAGEL's guidance settings as extra fields."""
        body = await _json_body(request)
        image_request, key = _image_request(body, "generate", None)
        del body  # the queued job keeps only what it needs
        return await _image_response(request, "generate", image_request, key)

    @app.post("/v1/images/edits", dependencies=[Depends(_authorize)])
    async def images_edits(request: Request):
        """Instruction editing: multipart `image` (or `image[]`, one or several) + `prompt`, same options."""
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise APIError(400, "`/v1/images/edits` takes multipart/form-data with `image` and `prompt`.",
                           code="invalid_content_type")  # fmt: skip
        try:
            form = await request.form(max_files=limits.max_input_images, max_fields=64,
                                      max_part_size=limits.max_prompt_chars * 4 + 1024)  # fmt: skip
        except StarletteHTTPException as error:
            raise APIError(400, f"Invalid multipart body: {error.detail}", code="invalid_multipart") from None
        try:
            fields, uploads = {}, []
            for name, value in form.multi_items():
                if name in ("image", "image[]"):
                    if isinstance(value, str):
                        raise APIError(400, f"`{name}` must be an uploaded file.", param=name, code="invalid_image")
                    data = await value.read(limits.max_image_bytes + 1)
                    uploads.append((name, data))
                else:
                    fields[name] = value if isinstance(value, str) else None
        finally:
            await form.close()
        if not uploads:
            raise APIError(400, "`image` is required: one or several image files.", param="image")
        images = []  # checked from their headers; the queued job keeps their compressed bytes
        for index, (name, data) in enumerate(uploads):
            images.append(await run_in_threadpool(check_image_bytes, data, f"{name}[{index}]" if len(uploads) > 1
                                                  else name, limits))  # fmt: skip
        del uploads, form
        image_request, key = await run_in_threadpool(_image_request, fields, "edit", images)
        return await _image_response(request, "edit", image_request, key)

    # -- chat ------------------------------------------------------------------------------------------------------------

    def _chat_request(body: dict) -> tuple[_ChatRequest, bool, bool]:
        """Checks a chat request; returns it, whether it is streamed, and whether the stream ends with usage. Its
        images (remote ones fetched here) come last, after every cheap check."""
        known = {"messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stream", "stop",
                 "think"}  # fmt: skip
        unknown = sorted(set(body) - known - _IGNORED_CHAT_FIELDS)
        if unknown:
            raise APIError(400, f"Unsupported parameter(s): {unknown}.", param=unknown[0], code="unknown_parameter")
        _check_model(body)
        if body.get("n", 1) not in (1, None):
            raise APIError(400, "`n` must be 1: one answer per request.", param="n", code="invalid_value")
        for name in ("frequency_penalty", "presence_penalty"):
            if body.get(name) not in (None, 0, 0.0):
                raise APIError(400, f"`{name}` is not supported (leave it 0).", param=name, code="invalid_value")
        if body.get("logprobs"):
            raise APIError(400, "`logprobs` is not supported.", param="logprobs", code="invalid_value")
        response_format = body.get("response_format")
        if response_format not in (None, {"type": "text"}):
            raise APIError(400, "Only text responses are supported.", param="response_format", code="invalid_value")
        from transformers_bagel.chat import VLM_THINK_SYSTEM_PROMPT

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
        top_p = parse_float(body.get("top_p", 1.0) if body.get("top_p") is not None else 1.0, "top_p", 0.0, 1.0,
                            low_open=True)  # fmt: skip
        seed = body.get("seed")
        seed = None if seed is None else parse_int(seed, "seed", 0, 2**62)
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise APIError(400, "`stop` must be a string or a list of up to 4 non-empty strings.", param="stop",
                           code="invalid_value")  # fmt: skip
        messages, _ = chat_messages_to_bagel(body.get("messages"), limits, config.allow_remote_images,
                                             VLM_THINK_SYSTEM_PROMPT if think else None)  # fmt: skip
        return _ChatRequest(messages, max_tokens, temperature, top_p, seed, stop), stream, include_usage

    def _watch_disconnect(request: Request, job: Job) -> None:
        """Cancels `job` once its client goes away (checked every `_DISCONNECT_POLL_S` until the job is done): a
        queued job is then dropped, a running `generate` stops at its next token."""

        async def watch():
            while not job.future.done():
                if await request.is_disconnected():
                    job.cancel("disconnected")
                    return
                await asyncio.sleep(_DISCONNECT_POLL_S)

        task = asyncio.create_task(watch())
        watchers.add(task)
        task.add_done_callback(watchers.discard)

    @app.post("/v1/chat/completions", dependencies=[Depends(_authorize)])
    async def chat_completions(request: Request):
        """OpenAI chat completions about images (base64 data URLs), streamed as server-sent events with `stream`."""
        body = await _json_body(request)
        chat, stream, include_usage = await run_in_threadpool(_chat_request, body)
        del body  # the queued job keeps only what it needs
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not stream:
            # Greedy requests batch into one `generate` (padding does not change a greedy answer's tokens); a sampled
            # one runs alone, so that its seed alone decides its text.
            job = Job(kind="chat", key="greedy" if chat.temperature == 0 else None, weight=1, payload=chat,
                      nbytes=chat.nbytes)  # fmt: skip
            result = await _run_job(job, request)
            return {
                "id": completion_id, "object": "chat.completion", "created": created, "model": config.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                             "finish_reason": result["finish_reason"], "logprobs": None}],
                "usage": result["usage"],
            }  # fmt: skip

        from transformers import TextIteratorStreamer

        chat.streamer = TextIteratorStreamer(pipe.processor.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                             timeout=config.request_timeout)  # fmt: skip
        job = Job(kind="chat", key=None, weight=1, payload=chat, nbytes=chat.nbytes)
        request.state.job = job
        future = _submit(job)
        # A job dropped unrun (client gone, timeout) never starts `generate`: end its stream here instead.
        future.add_done_callback(lambda done: chat.streamer.end() if done.cancelled() else None)
        _watch_disconnect(request, job)

        def chunk(delta: dict, finish=None, usage=None) -> str:
            payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                       "model": config.model_name,
                       "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]}
            if usage is not None:
                payload["usage"] = usage
            return f"data: {json.dumps(payload)}\n\n"  # fmt: skip

        def events():
            yield chunk({"role": "assistant", "content": ""})
            text, sent = "", 0
            holdback = max((len(s) for s in chat.stop), default=1) - 1
            try:
                for piece in chat.streamer:
                    text += piece
                    cut, stopped = _cut_at_stop(text, chat.stop)
                    safe = len(cut) if stopped else max(sent, len(text) - holdback)
                    if safe > sent:
                        yield chunk({"content": cut[sent:safe]})
                        sent = safe
                    if stopped:
                        break
                result = future.result(timeout=config.request_timeout)
            except (queue.Empty, TimeoutError):  # no token, or no end, within request_timeout
                job.cancel("timeout")
                yield f"data: {json.dumps(error_body('The request timed out.', 'timeout_error', None, 'timeout'))}\n\n"
            except CancelledError:  # dropped unrun: its client went away or its time ran out
                cancelled = error_body("The request was cancelled.", "timeout_error", None, "cancelled")
                yield f"data: {json.dumps(cancelled)}\n\n"
            except APIError as error:
                yield f"data: {json.dumps(error.body())}\n\n"
            except Exception as error:
                if not isinstance(error, (ValueError, TypeError)):
                    logger.exception("A streamed chat job failed")
                message = str(error) if isinstance(error, (ValueError, TypeError)) else "The server had an error."
                yield f"data: {json.dumps(error_body(message, 'invalid_request_error'))}\n\n"
            else:
                final = result["text"]
                if len(final) > sent:
                    yield chunk({"content": final[sent:]})
                yield chunk({}, finish=result["finish_reason"])
                if include_usage:
                    yield chunk(None, usage=result["usage"])
                logger.info(f"chat stream {completion_id} done: queue {job.queue_time:.3f}s, batch of 1, "
                            f"{result['usage']['completion_tokens']} tokens")
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def run_server(pipe, config: ServerConfig | None = None, host: str = "127.0.0.1", port: int = 8000,
               log_level: str = "info") -> None:  # fmt: skip
    """
    Serves `pipe` with [`create_app`] under uvicorn until interrupted. Binds 127.0.0.1 unless told otherwise; a
    non-loopback `host` without an `api_key` is logged as a warning. The address is checked first ([`check_port`]:
    `ValueError` when out of range or in use); `bagel serve` checks it, and the options, before loading the model.
    """
    import logging as std_logging

    import uvicorn

    config = config or ServerConfig()
    check_port(host, port)
    package_logger = std_logging.getLogger(__name__.rpartition(".")[0])
    if not package_logger.handlers:  # per-request lines (latency, batch size, queue time) beside uvicorn's own
        handler = std_logging.StreamHandler()
        handler.setFormatter(std_logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        package_logger.addHandler(handler)
    package_logger.setLevel(log_level.upper())
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and config.api_key is None:
        logger.warning(f"Serving on {host} without --api_key: anyone who can reach the port can use the model.")
    uvicorn.run(create_app(pipe, config), host=host, port=port, log_level=log_level)

