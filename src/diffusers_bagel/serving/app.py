"""
The OpenAI-compatible BAGEL server (`bagel serve`): a FastAPI app whose one worker thread owns the pipeline.

Endpoints: `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus), `POST /v1/chat/completions` (text and images,
streamed or not), `POST /v1/images/generations`, `POST /v1/images/edits` (multipart), and `GET /v1/files/images/NAME`
for `response_format="url"` when an image folder is configured.

Threading: request handlers check their inputs on the event loop (or in its thread pool for image decoding) and put a
[`Job`] on the [`BatchWorker`]'s bounded queue; the worker runs the pipeline. Image jobs with the same batching key
(kind, size, steps and every guidance setting) run as one pipeline call with one `torch.Generator` per image; chat
jobs and thinking-mode image jobs run alone.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import ipaddress
import json
import queue
import re
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

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
from .requests import (
    ServerLimits,
    chat_messages_to_bagel,
    decode_image_bytes,
    parse_bool,
    parse_float,
    parse_int,
    parse_size,
)
from .worker import BatchWorker, Job, QueueFullError


logger = logging.get_logger(__name__)

__all__ = ["ServerConfig", "create_app", "run_server"]

# OpenAI fields the server accepts and does not use (they change nothing for BAGEL).
_IGNORED_IMAGE_FIELDS = {"model", "quality", "style", "user", "background", "moderation", "output_format",
                         "output_compression", "input_fidelity"}  # fmt: skip
_IGNORED_CHAT_FIELDS = {"model", "user", "metadata", "store", "stream_options", "parallel_tool_calls", "service_tier",
                        "n", "logprobs", "response_format", "frequency_penalty", "presence_penalty"}  # fmt: skip
_IMAGE_NAME = re.compile(r"^[0-9a-f]{32}\.png$")


@dataclass
class ServerConfig:
    """
    Settings of the BAGEL server.

    Args:
        model_name (`str`, defaults to `"bagel"`): the id listed by `/v1/models` and accepted as `model`.
        max_batch_size (`int`, defaults to 8): most images of one batched pipeline call (1 disables batching).
        max_queue (`int`, defaults to 64): requests allowed to wait; more are refused with HTTP 429.
        api_key (`str`, *optional*): when set, every `/v1` request and `/metrics` needs `Authorization: Bearer KEY`.
        request_timeout (`float`, defaults to 600): seconds a request may wait and run before HTTP 504.
        allow_remote_images (`bool`, defaults to `False`): fetch http(s) image URLs of chat messages (refused with
            HTTP 400 otherwise; base64 `data:` URLs always work).
        image_dir (`str` or `Path`, *optional*): folder where `response_format="url"` images are written and served
            from (that format is refused without it).
        batch_wait (`float`, defaults to 0.01): seconds the worker waits for more requests to batch with a first one.
        limits ([`ServerLimits`]): the bounds checked on every request before it is queued.
    """

    model_name: str = "bagel"
    max_batch_size: int = 8
    max_queue: int = 64
    api_key: str | None = None
    request_timeout: float = 600.0
    allow_remote_images: bool = False
    image_dir: str | Path | None = None
    batch_wait: float = 0.01
    limits: ServerLimits = field(default_factory=ServerLimits)


@dataclass
class _ImageRequest:
    prompt: str
    images: list | None
    n: int
    seed: int
    settings: dict
    response_format: str


@dataclass
class _ChatRequest:
    messages: list
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    streamer: object = None


class _RowStops:
    """
    A transformers stopping criterion for a batch of chat requests: row `r` is done once its generated text holds one
    of `stops[r]` or it has `max_tokens[r]` new tokens; `ended_at[r]` keeps how many new tokens it had then.
    """

    def __init__(self, tokenizer, prompt_length: int, stops: list[list[str]], max_tokens: list[int]):
        self.tokenizer, self.prompt_length, self.stops, self.max_tokens = tokenizer, prompt_length, stops, max_tokens
        self.ended_at: list[int | None] = [None] * len(stops)

    def __call__(self, input_ids, scores, **kwargs):
        generated = input_ids.shape[1] - self.prompt_length
        for row, stops in enumerate(self.stops):
            if self.ended_at[row] is not None:
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


class _Engine:
    """What the worker thread runs: pipeline calls for image jobs, `model.generate` for chat jobs."""

    def __init__(self, pipe, metrics: ServerMetrics):
        self.pipe = pipe
        self.metrics = metrics

    def execute(self, jobs: list[Job]) -> list:
        if jobs[0].kind == "chat":
            return self._chat([job.payload for job in jobs])
        return self._images(jobs)

    def _images(self, jobs: list[Job]) -> list:
        requests: list[_ImageRequest] = [job.payload for job in jobs]
        prompts, images, generators = [], [], []
        for request in requests:
            for index in range(request.n):
                prompts.append(request.prompt)
                images.append(request.images)
                generators.append(torch.Generator().manual_seed(request.seed + index))
        settings = dict(requests[0].settings)
        # batch_invariant: a seeded request gives the same image whether it ran alone or in a batch.
        output = self.pipe(
            prompts, image=images if jobs[0].kind == "edit" else None, generator=generators, num_images_per_prompt=1,
            batch_invariant=True, **settings,
        )  # fmt: skip
        results, start = [], 0
        for request in requests:
            stop = start + request.n
            results.append(list(zip(output.images[start:stop], (output.text or [None] * len(prompts))[start:stop])))
            start = stop
        return results

    def _chat(self, requests: list[_ChatRequest]) -> list[dict]:
        """One `generate` call for the requests (several only when greedy and not streamed: see `chat_completions`),
        their prompts left-padded into one batch; each row stops on its own stop strings and `max_tokens`."""
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
                              [request.max_tokens for request in requests])  # fmt: skip
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


def _png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


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
    worker = BatchWorker(engine.execute, config.max_batch_size, config.max_queue, metrics, config.batch_wait)
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

    # -- errors, metrics, logs ------------------------------------------------------------------------------------

    @app.exception_handler(APIError)
    async def _api_error(request, error: APIError):
        return JSONResponse(error.body(), status_code=error.status)

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

    @app.middleware("http")
    async def _observe(request: Request, call_next):
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:
            logger.exception(f"{request.method} {request.url.path} failed")
            response = JSONResponse(
                error_body("The server had an error while processing your request.", "server_error"), status_code=500
            )
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "unmatched")
        elapsed = time.perf_counter() - started
        metrics.observe_request(endpoint, response.status_code, elapsed)
        job = getattr(request.state, "job", None)
        detail = f", queue {job.queue_time:.3f}s, batch of {job.batch_size}" if job is not None else ""
        logger.info(f"{request.method} {request.url.path} -> {response.status_code} in {elapsed:.3f}s{detail}")
        return response

    async def _authorize(request: Request):
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    async def _json_body(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise APIError(413, f"The request body is larger than {limits.max_body_bytes} bytes.", code="too_large")
        body = await request.body()
        if len(body) > limits.max_body_bytes:
            raise APIError(413, f"The request body is larger than {limits.max_body_bytes} bytes.", code="too_large")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "The request body is not valid JSON.", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
        return data

    def _check_model(body: dict) -> None:
        model = body.get("model")
        if model is not None and model != config.model_name:
            raise APIError(404, f"The model {str(model)[:100]!r} does not exist; this server serves "
                                f"{config.model_name!r}.", param="model", code="model_not_found")  # fmt: skip

    async def _run_job(job: Job, request: Request):
        request.state.job = job
        try:
            future = worker.submit(job)
        except QueueFullError as error:
            raise APIError(429, str(error), type="rate_limit_error", code="queue_full") from None
        try:
            result = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), config.request_timeout)
        except asyncio.TimeoutError:
            job.cancelled = True
            raise APIError(504, f"The request did not finish within {config.request_timeout:g} seconds.",
                           type="timeout_error", code="timeout") from None  # fmt: skip
        except (ValueError, TypeError) as error:  # the library's refusals of this request's inputs
            raise APIError(400, str(error), code="invalid_value") from None
        except Exception:
            logger.exception(f"A {job.kind} job failed")
            raise APIError(500, "The server had an error while processing your request.", type="server_error") from None
        return result

    # -- informational endpoints -------------------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        """Liveness: the model served and the queue depth."""
        return {"status": "ok", "model": config.model_name, "queue_depth": worker.depth()}

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
        if image_dir is None or not _IMAGE_NAME.fullmatch(name) or not (image_dir / name).is_file():
            raise APIError(404, "No such image.", type="not_found", code="not_found")
        return FileResponse(image_dir / name, media_type="image/png")

    # -- images -------------------------------------------------------------------------------------------------------

    def _image_request(fields: dict, kind: str, images: list | None) -> tuple[_ImageRequest, tuple | None]:
        """Checks the fields of an image request; returns it and its batching key (None: run alone)."""
        preset = EDIT_PRESET if kind == "edit" else TEXT_TO_IMAGE_PRESET
        known = {"prompt", "n", "size", "response_format", "seed", "num_inference_steps", "timestep_shift",
                 "cfg_text_scale", "cfg_img_scale", "cfg_interval", "cfg_renorm_type", "cfg_renorm_min", "think",
                 "max_think_tokens", "think_do_sample", "think_temperature", "image", "image[]", "mask"}  # fmt: skip
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
        response_format = fields.get("response_format") or "b64_json"
        if response_format not in ("b64_json", "url"):
            raise APIError(400, f"`response_format` must be 'b64_json' or 'url', got {response_format!r}.",
                           param="response_format", code="invalid_value")  # fmt: skip
        if response_format == "url" and image_dir is None:
            raise APIError(400, "`response_format='url'` needs a server started with --image_dir; use 'b64_json'.",
                           param="response_format", code="invalid_value")  # fmt: skip
        seed = fields.get("seed")
        seed = secrets.randbits(62) if seed is None else parse_int(seed, "seed", 0, 2**62)
        size = parse_size(fields.get("size"), stride, largest)
        if size is None:
            if kind == "edit":
                width, height = pipe.processor.image_processor.vae_resize(images[-1]).size
            else:
                width = height = pipe.default_sample_size
        else:
            width, height = size
        interval = fields.get("cfg_interval", preset["cfg_interval"])
        if isinstance(interval, str):
            try:
                interval = json.loads(interval)
            except json.JSONDecodeError:
                interval = None
        if not isinstance(interval, (list, tuple)) or len(interval) != 2:
            raise APIError(400, "`cfg_interval` must be [start, end].", param="cfg_interval", code="invalid_value")
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
            "cfg_interval": tuple(parse_float(v, "cfg_interval", 0.0, 1.0) for v in interval),
            "cfg_renorm_type": fields.get("cfg_renorm_type", preset["cfg_renorm_type"]),
            "cfg_renorm_min": parse_float(fields.get("cfg_renorm_min", 0.0), "cfg_renorm_min", 0.0, 1.0),
            "think": think,
            "max_think_tokens": parse_int(fields.get("max_think_tokens", 1000), "max_think_tokens", 1,
                                          limits.max_think_tokens),
            "think_do_sample": parse_bool(fields.get("think_do_sample", False), "think_do_sample"),
            "think_temperature": parse_float(fields.get("think_temperature", 0.3), "think_temperature", 0.0,
                                             100.0, low_open=True),
        }  # fmt: skip
        if settings["cfg_renorm_type"] not in RENORM_TYPES:
            raise APIError(400, f"`cfg_renorm_type` must be one of {list(RENORM_TYPES)}.", param="cfg_renorm_type",
                           code="invalid_value")  # fmt: skip
        try:  # the pipeline's own checks, before queueing: one bad request never reaches a batch
            pipe.check_inputs(
                height, width, settings["num_inference_steps"], settings["timestep_shift"], settings["cfg_text_scale"],
                settings["cfg_img_scale"], settings["cfg_interval"], settings["cfg_renorm_type"],
                settings["cfg_renorm_min"], n, "pil", ["latents"], think, settings["max_think_tokens"],
                settings["think_do_sample"], settings["think_temperature"],
            )  # fmt: skip
            pipe._normalize_prompts(prompt, images)
        except (ValueError, TypeError) as error:
            raise APIError(400, str(error), param="prompt" if "prompt" in str(error) else None,
                           code="invalid_value") from None
        request = _ImageRequest(prompt, images, n, seed, settings, response_format)
        # Thinking writes a plan per prompt before drawing: such jobs run alone, so a plan never depends on others.
        key = None if think else (kind, *sorted(settings.items()))
        return request, key

    async def _image_response(request: Request, kind: str, image_request: _ImageRequest, key) -> dict:
        job = Job(kind=kind, key=key, weight=image_request.n, payload=image_request)
        results = await _run_job(job, request)
        data = []
        for image, thinking in results:
            if image_request.response_format == "url":
                name = f"{uuid.uuid4().hex}.png"
                await run_in_threadpool(image.save, image_dir / name, "PNG")
                item = {"url": str(request.url_for("image_file", name=name))}
            else:
                item = {"b64_json": await run_in_threadpool(_png_base64, image)}
            if thinking is not None:
                item["revised_prompt"] = thinking  # thinking mode's plan, the prompt the image was drawn from
            data.append(item)
        return {"created": int(time.time()), "data": data,
                "usage": {"batch_size": job.batch_size, "queue_time_s": round(job.queue_time, 4)}}  # fmt: skip

    @app.post("/v1/images/generations", dependencies=[Depends(_authorize)])
    async def images_generations(request: Request):
        """Text-to-image (OpenAI's Images API), with BAGEL's guidance settings as extra fields."""
        body = await _json_body(request)
        image_request, key = _image_request(body, "generate", None)
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
        images = []
        for index, (name, data) in enumerate(uploads):
            images.append(await run_in_threadpool(decode_image_bytes, data, f"{name}[{index}]" if len(uploads) > 1
                                                  else name, limits))  # fmt: skip
        image_request, key = await run_in_threadpool(_image_request, fields, "edit", images)
        return await _image_response(request, "edit", image_request, key)

    # -- chat ------------------------------------------------------------------------------------------------------------

    def _chat_request(body: dict) -> _ChatRequest:
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
        messages, _ = chat_messages_to_bagel(body.get("messages"), limits, config.allow_remote_images,
                                             VLM_THINK_SYSTEM_PROMPT if think else None)  # fmt: skip
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
        return _ChatRequest(messages, max_tokens, temperature, top_p, seed, stop)

    @app.post("/v1/chat/completions", dependencies=[Depends(_authorize)])
    async def chat_completions(request: Request):
        """OpenAI chat completions about images (base64 data URLs), streamed as server-sent events with `stream`."""
        body = await _json_body(request)
        chat = await run_in_threadpool(_chat_request, body)
        stream = parse_bool(body.get("stream", False), "stream")
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not stream:
            # Greedy requests batch into one `generate` (padding does not change a greedy answer's tokens); a sampled
            # one runs alone, so that its seed alone decides its text.
            job = Job(kind="chat", key="greedy" if chat.temperature == 0 else None, weight=1, payload=chat)
            result = await _run_job(job, request)
            return {
                "id": completion_id, "object": "chat.completion", "created": created, "model": config.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                             "finish_reason": result["finish_reason"], "logprobs": None}],
                "usage": result["usage"],
            }  # fmt: skip

        from transformers import TextIteratorStreamer

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        chat.streamer = TextIteratorStreamer(pipe.processor.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                             timeout=config.request_timeout)  # fmt: skip
        job = Job(kind="chat", key=None, weight=1, payload=chat)
        request.state.job = job
        try:
            future = worker.submit(job)
        except QueueFullError as error:
            raise APIError(429, str(error), type="rate_limit_error", code="queue_full") from None

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
            except queue.Empty:
                job.cancelled = True
                yield f"data: {json.dumps(error_body('The request timed out.', 'timeout_error', None, 'timeout'))}\n\n"
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
    non-loopback `host` without an `api_key` is logged as a warning.
    """
    import logging as std_logging

    import uvicorn

    config = config or ServerConfig()
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

