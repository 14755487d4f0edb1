"""
The endpoints of the BAGEL server, as a FastAPI [`router`] that [`create_app`] includes. Each handler reads what it
serves from `request.app.state`: `pipe` (the pipeline), `config` ([`ServerConfig`]), `worker` ([`BatchWorker`]),
`metrics` ([`ServerMetrics`]), `image_dir` (the folder of `response_format="url"` images, or `None`) and `watchers`
(the disconnection watchers of streamed chats).

A handler checks its request on the event loop (or in its thread pool for JSON parsing, image headers and the
pipeline's checks), puts a [`Job`] on the worker's bounded queue and waits for it while its client is there.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import queue
import time
import uuid
from concurrent.futures import CancelledError

from diffusers.utils import logging
from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import outputs
from .engine import cut_at_stop
from .errors import APIError, error_body
from .middleware import CLIENT_CLOSED_REQUEST
from .payloads import ImageRequest, check_image_arguments, check_model, parse_chat_request, parse_image_fields
from .payloads import pipeline_error
from .requests import check_image_bytes
from .worker import Job, QueueFullError


logger = logging.get_logger(__name__)

__all__ = ["router"]

# Seconds between two checks of whether a waiting request's client is still there.
_DISCONNECT_POLL_S = 0.1


async def authorize(request: Request) -> None:
    """Refuses a request without the server's API key (`Authorization: Bearer KEY`) when it has one."""
    api_key = request.app.state.config.api_key
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")


router = APIRouter()
_authorized = [Depends(authorize)]


# -- request bodies and jobs --------------------------------------------------------------------------------------------


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


async def _json_body(request: Request) -> dict:
    """The JSON object of the request body, read as a stream (the body is not kept on the request: a queued request
    holds only what its job needs). [`BodyLimitMiddleware`] stops the read past `max_body_bytes`."""
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
    data = await run_in_threadpool(_parse_json, raw)
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    return data


def _submit(request: Request, job: Job):
    """Queues `job` (dropped unrun past the request timeout); a full queue is a 429."""
    job.timeout = request.app.state.config.request_timeout
    request.state.job = job  # the request log names its queue time and batch size
    try:
        return request.app.state.worker.submit(job)
    except QueueFullError as error:
        raise APIError(429, str(error), type="rate_limit_error", code="queue_full") from None


async def _wait(request: Request, job: Job):
    """The job's result, waiting at most `request_timeout` and only while the client is there: a client that hung
    up, or a timeout, cancels the job (dropped unrun if it still waits; a running call may stop early)."""
    timeout = request.app.state.config.request_timeout
    waiter = asyncio.wrap_future(job.future)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not waiter.done() and loop.time() < deadline:
        await asyncio.wait({waiter}, timeout=min(deadline - loop.time(), _DISCONNECT_POLL_S))
        if not waiter.done() and await request.is_disconnected():
            job.cancel("disconnected")
            waiter.cancel()
            raise APIError(CLIENT_CLOSED_REQUEST, "The client closed the request.", code="client_closed_request")
    if not waiter.done() or waiter.cancelled():
        job.cancel("timeout")
        waiter.cancel()
        raise APIError(504, f"The request did not finish within {timeout:g} seconds.", type="timeout_error",
                       code="timeout")  # fmt: skip
    return waiter.result()


async def _run_job(request: Request, job: Job):
    """Queues `job` and returns its result; the library's refusal of its inputs is a 400 naming the field."""
    _submit(request, job)
    try:
        return await _wait(request, job)
    except APIError:
        raise
    except (ValueError, TypeError) as error:  # the library's refusals of this request's inputs
        raise pipeline_error(error) from None
    except Exception:
        logger.exception(f"A {job.kind} job failed")
        raise APIError(500, "The server had an error while processing your request.", type="server_error") from None


# -- informational endpoints ----------------------------------------------------------------------------------------------


@router.get("/health")
async def health(request: Request):
    """Liveness: the model served, the queue depth and the bytes the queue holds."""
    worker = request.app.state.worker
    return {"status": "ok", "model": request.app.state.config.model_name, "queue_depth": worker.depth(),
            "queue_bytes": worker.queued_bytes()}  # fmt: skip


@router.get("/metrics", dependencies=_authorized)
async def prometheus_metrics(request: Request):
    """Request counts, latency and queue-time summaries, batch sizes, in Prometheus' text format."""
    return PlainTextResponse(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4")


def _model_card(model_name: str) -> dict:
    return {"id": model_name, "object": "model", "created": 0, "owned_by": "bagel-hf"}


@router.get("/v1/models", dependencies=_authorized)
async def list_models(request: Request):
    """The one model this server serves, in OpenAI's list format."""
    return {"object": "list", "data": [_model_card(request.app.state.config.model_name)]}


@router.get("/v1/models/{model_id}", dependencies=_authorized)
async def get_model(request: Request, model_id: str):
    """One model, in OpenAI's format (404 for any other id)."""
    check_model({"model": model_id}, request.app.state.config.model_name)
    return _model_card(request.app.state.config.model_name)


@router.get("/v1/files/images/{name}")
async def image_file(request: Request, name: str):
    """An image written for `response_format="url"` (names are random 128-bit hex, nothing else is served)."""
    image_dir = request.app.state.image_dir
    if image_dir is None or not outputs.is_image_name(name) or not (image_dir / name).is_file():
        raise APIError(404, "No such image.", type="not_found", code="not_found")
    return FileResponse(image_dir / name, media_type=outputs.OUTPUT_FORMATS[name.rpartition(".")[2]][1])


# -- images ---------------------------------------------------------------------------------------------------------------


def _image_request(request: Request, fields: dict, images: list | None) -> tuple[ImageRequest, tuple | None]:
    """Checks the fields of an image request, the pipeline's own checks included; returns it and its batching key
    (`None`: it runs alone)."""
    state = request.app.state
    output = outputs.output_options(fields, state.image_dir is not None)
    image_request = parse_image_fields(fields, images, state.config.limits, state.config.model_name, output)
    try:  # before queueing: one bad request never reaches a batch
        check_image_arguments(state.pipe, image_request)
    except (ValueError, TypeError) as error:
        raise pipeline_error(error) from None
    arguments = image_request.arguments
    if arguments.get("think"):  # a plan per prompt is written before drawing: such jobs run alone
        return image_request, None
    # Jobs that share a key run as one call: same kind and arguments, and the same default size (an edit's is its
    # last image's, decided by that image's size).
    default_size = None if "height" in arguments or not images else (images[-1].width, images[-1].height)
    return image_request, ("edit" if images else "generate", default_size, *sorted(arguments.items()))


async def _store_image(request: Request, data: bytes, output_format: str) -> str:
    """Writes an image of `response_format="url"`; returns its file name. A failed write leaves no file and is a 507
    (folder full) or 503, never a path or a traceback."""
    path = request.app.state.image_dir / f"{uuid.uuid4().hex}.{output_format}"
    try:
        await run_in_threadpool(outputs.write_image_file, path, data)
    except OSError as error:
        await run_in_threadpool(outputs.remove_partial_file, path)
        raise outputs.storage_error(error) from None
    return path.name


async def _image_response(request: Request, kind: str, image_request: ImageRequest, key) -> dict:
    job = Job(kind=kind, key=key, weight=image_request.n, payload=image_request, nbytes=image_request.nbytes)
    results = await _run_job(request, job)
    data, fmt = [], image_request.output_format
    for image, thinking in results:
        encoded = await run_in_threadpool(outputs.encode_image, image, fmt, image_request.output_compression)
        if image_request.response_format == "url":
            item = {"url": str(request.url_for("image_file", name=await _store_image(request, encoded, fmt)))}
        else:
            item = {"b64_json": await run_in_threadpool(outputs.encode_base64, encoded)}
        if thinking is not None:
            item["revised_prompt"] = thinking  # thinking mode's plan, the prompt the image was drawn from
        data.append(item)
    return {"created": int(time.time()), "data": data, "output_format": fmt,
            "usage": {"batch_size": job.batch_size, "queue_time_s": round(job.queue_time, 4)}}  # fmt: skip


@router.post("/v1/images/generations", dependencies=_authorized)
async def images_generations(request: Request):
    """Text-to-image (OpenAI's Images API), with BAGEL's guidance settings as extra fields."""
    body = await _json_body(request)
    image_request, key = await run_in_threadpool(_image_request, request, body, None)
    del body  # the queued job keeps only what it needs
    return await _image_response(request, "generate", image_request, key)


async def _edit_form(request: Request) -> tuple[dict, list[tuple[str, bytes]]]:
    """The text fields and the uploaded images (`image` or `image[]`, their bytes read up to the limit plus one) of
    a multipart edit."""
    limits = request.app.state.config.limits
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
                uploads.append((name, await value.read(limits.max_image_bytes + 1)))
            else:
                fields[name] = value if isinstance(value, str) else None
    finally:
        await form.close()
    return fields, uploads


@router.post("/v1/images/edits", dependencies=_authorized)
async def images_edits(request: Request):
    """Instruction editing: multipart `image` (or `image[]`, one or several) + `prompt`, same options."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise APIError(400, "`/v1/images/edits` takes multipart/form-data with `image` and `prompt`.",
                       code="invalid_content_type")  # fmt: skip
    fields, uploads = await _edit_form(request)
    if not uploads:
        raise APIError(400, "`image` is required: one or several image files.", param="image")
    images = []  # checked from their headers; the queued job keeps their compressed bytes
    for index, (name, data) in enumerate(uploads):
        param = f"{name}[{index}]" if len(uploads) > 1 else name
        images.append(await run_in_threadpool(check_image_bytes, data, param, request.app.state.config.limits))
    del uploads
    image_request, key = await run_in_threadpool(_image_request, request, fields, images)
    return await _image_response(request, "edit", image_request, key)


# -- chat -------------------------------------------------------------------------------------------------------------------


def _watch_disconnect(request: Request, job: Job) -> None:
    """Cancels `job` once its client goes away (checked every `_DISCONNECT_POLL_S` until the job is done): a queued
    job is then dropped, a running `generate` stops at its next token."""

    async def watch():
        while not job.future.done():
            if await request.is_disconnected():
                job.cancel("disconnected")
                return
            await asyncio.sleep(_DISCONNECT_POLL_S)

    watchers = request.app.state.watchers
    task = asyncio.create_task(watch())
    watchers.add(task)
    task.add_done_callback(watchers.discard)


@router.post("/v1/chat/completions", dependencies=_authorized)
async def chat_completions(request: Request):
    """OpenAI chat completions about images (base64 data URLs), streamed as server-sent events with `stream`."""
    config = request.app.state.config
    body = await _json_body(request)
    chat, stream, include_usage = await run_in_threadpool(parse_chat_request, body, config.limits, config.model_name,
                                                          config.allow_remote_images)  # fmt: skip
    del body  # the queued job keeps only what it needs
    completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if not stream:
        # Greedy requests batch into one `generate` (padding does not change a greedy answer's tokens); a sampled one
        # runs alone, so that its seed alone decides its text.
        job = Job(kind="chat", key="greedy" if chat.temperature == 0 else None, weight=1, payload=chat,
                  nbytes=chat.nbytes)  # fmt: skip
        result = await _run_job(request, job)
        return {
            "id": completion_id, "object": "chat.completion", "created": created, "model": config.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result["text"]},
                         "finish_reason": result["finish_reason"], "logprobs": None}],
            "usage": result["usage"],
        }  # fmt: skip

    from transformers import TextIteratorStreamer

    chat.streamer = TextIteratorStreamer(request.app.state.pipe.processor.tokenizer, skip_prompt=True,
                                         skip_special_tokens=True, timeout=config.request_timeout)  # fmt: skip
    job = Job(kind="chat", key=None, weight=1, payload=chat, nbytes=chat.nbytes)
    future = _submit(request, job)
    # A job dropped unrun (client gone, timeout) never starts `generate`: end its stream here instead.
    future.add_done_callback(lambda done: chat.streamer.end() if done.cancelled() else None)
    _watch_disconnect(request, job)
    events = _stream_events(chat, job, future, completion_id, created, config, include_usage)
    return StreamingResponse(events, media_type="text/event-stream")


def _stream_events(chat, job: Job, future, completion_id: str, created: int, config, include_usage: bool):
    """The server-sent events of a streamed chat: the answer's pieces as they come (held back while they could be
    the start of a stop string), the finish reason, the usage when asked, then `[DONE]`; an error as one event."""
    def chunk(delta: dict | None, finish=None, usage=None) -> str:
        payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                   "model": config.model_name,
                   "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if usage is not None:
            payload["usage"] = usage
        return f"data: {json.dumps(payload)}\n\n"  # fmt: skip

    yield chunk({"role": "assistant", "content": ""})
    text, sent = "", 0
    holdback = max((len(s) for s in chat.stop), default=1) - 1
    try:
        for piece in chat.streamer:
            text += piece
            cut, stopped = cut_at_stop(text, chat.stop)
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
        yield f"data: {json.dumps(error_body('The request was cancelled.', 'timeout_error', None, 'cancelled'))}\n\n"
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
                    f"{result['usage']['completion_tokens']} tokens")  # fmt: skip
    yield "data: [DONE]\n\n"
