"""
The OpenAI-compatible BAGEL server (`bagel serve`): a FastAPI app whose one worker thread owns the pipeline.

Endpoints (see [`~serving.routes`]): `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus),
`POST /v1/chat/completions` (text and images, streamed or not), `POST /v1/images/generations`, `POST /v1/images/edits`
(multipart), and `GET /v1/files/images/NAME` for `response_format="url"` when an image folder is configured.

Threading: request handlers check their inputs on the event loop (or in its thread pool for JSON parsing, image
headers and the pipeline's own checks) and put a [`Job`] on the [`BatchWorker`]'s bounded queue; the worker decodes
the job's images and runs the pipeline ([`~serving.engine.Engine`]). Image jobs with the same batching key (kind,
default size and every argument the client set) run as one pipeline call with one `torch.Generator` per image; greedy
chat jobs run as one `generate` call; sampled or streamed chat jobs and thinking-mode image jobs run alone.

Safety: request bodies are capped while they arrive ([`BodyLimitMiddleware`]); a queued request holds its images'
compressed bytes only, and the queue is bounded in requests and in bytes (429 past either); a request whose client
hung up, or whose time ran out, is dropped before it runs, and a running call stops early once nobody waits for it;
every refusal is an OpenAI-style error naming the field, never a traceback or a server path.
"""

from __future__ import annotations

import ipaddress
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from diffusers.utils import logging
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine
from .errors import APIError, error_body
from .metrics import ServerMetrics
from .middleware import BodyLimitMiddleware, BodyTooLargeError, RequestLogMiddleware
from .options import check_api_key, check_port, check_timing
from .requests import ServerLimits
from .routes import router
from .worker import BatchWorker


logger = logging.get_logger(__name__)

__all__ = ["ServerConfig", "create_app", "run_server"]


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


async def _api_error(request, error: APIError):
    # A body refused midway is not read further: the connection closes after the answer.
    headers = {"connection": "close"} if isinstance(error, BodyTooLargeError) else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


async def _validation_error(request, error: RequestValidationError):
    first = error.errors()[0] if error.errors() else {}
    param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    return JSONResponse(error_body(f"Invalid request: {first.get('msg', 'bad input')}.", "invalid_request_error",
                                   param, "invalid_value"), status_code=400)  # fmt: skip


async def _http_error(request, error: StarletteHTTPException):
    kind = "not_found" if error.status_code == 404 else "invalid_request_error"
    return JSONResponse(error_body(str(error.detail), kind), status_code=error.status_code)


def create_app(pipe, config: ServerConfig | None = None):
    """
    The FastAPI app serving `pipe` (a loaded [`BagelPipeline`]) with OpenAI's API: its middleware, error handlers
    and state, and the [`~serving.routes.router`]. Its worker thread starts with the first job and stops at the
    app's shutdown.

    Args:
        pipe ([`BagelPipeline`]): the pipeline; only the worker thread runs it.
        config ([`ServerConfig`], *optional*): the server's settings (the defaults otherwise).
    """
    config = config or ServerConfig()
    metrics = ServerMetrics()
    worker = BatchWorker(Engine(pipe).execute, config.max_batch_size, config.max_queue, metrics, config.batch_wait,
                         config.max_queue_bytes)  # fmt: skip
    image_dir = Path(config.image_dir) if config.image_dir is not None else None
    if image_dir is not None:
        image_dir.mkdir(parents=True, exist_ok=True)
    pipe.set_progress_bar_config(disable=True)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(worker.close)

    app = FastAPI(title="BAGEL OpenAI-compatible server", lifespan=lifespan)
    app.state.pipe, app.state.config, app.state.metrics, app.state.worker = pipe, config, metrics, worker
    app.state.image_dir = image_dir
    app.state.watchers = set()  # disconnection watchers of streamed chats (kept alive until they end)
    # The body limit inside, the request log outside it (a 413 answered before routing is counted too).
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.limits.max_body_bytes)
    app.add_middleware(RequestLogMiddleware, metrics=metrics)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.include_router(router)
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

