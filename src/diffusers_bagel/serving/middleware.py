"""
ASGI middleware of the BAGEL server: the request-body limit, enforced while the body arrives, and the per-request
metrics and log line. Both are plain ASGI (no `BaseHTTPMiddleware`), so the body streams through them untouched and
a handler sees the client's disconnection.
"""

from __future__ import annotations

import json
import time

from diffusers.utils import logging
from starlette.requests import ClientDisconnect

from .errors import APIError, error_body
from .metrics import ServerMetrics


logger = logging.get_logger(__name__)

__all__ = ["BodyLimitMiddleware", "BodyTooLargeError", "RequestLogMiddleware", "CLIENT_CLOSED_REQUEST"]

# nginx's status for a request whose client went away before the answer: recorded in metrics and logs only.
CLIENT_CLOSED_REQUEST = 499


class BodyTooLargeError(APIError):
    """A request body past the server's limit (HTTP 413)."""

    def __init__(self, limit: int):
        super().__init__(413, f"The request body is larger than {limit} bytes.", code="too_large")


async def send_json(send, status: int, body: dict, close: bool = False) -> None:
    """Answers a whole JSON response through the ASGI `send` (`close`: and closes the connection after it)."""
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


def _declared_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


class BodyLimitMiddleware:
    """
    Refuses request bodies over `max_bytes` with HTTP 413: at once when `Content-Length` declares more, otherwise
    (chunked bodies) as soon as the bytes received pass the limit. Nothing past the limit is read: the receive call
    that crosses it raises [`BodyTooLargeError`], which the app answers (or this middleware, if the app let it
    through before answering), and the connection closes after the answer.

    Args:
        app: the ASGI app.
        max_bytes (`int`): the largest body accepted.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _declared_length(scope)
        if declared is not None and declared > self.max_bytes:
            return await send_json(send, 413, BodyTooLargeError(self.max_bytes).body(), close=True)
        received, started = 0, False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLargeError(self.max_bytes)
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except BodyTooLargeError as error:
            if started:
                raise
            await send_json(send, 413, error.body(), close=True)


class RequestLogMiddleware:
    """
    Records every HTTP request in [`ServerMetrics`] (endpoint, status, latency) and logs one line for it, with the
    queue time and batch size of its job when it had one. An error that escaped the app becomes an OpenAI-style 500
    (logged with its traceback, never sent); a client that went away is recorded as 499.

    Args:
        app: the ASGI app.
        metrics ([`ServerMetrics`]): where requests are counted.
    """

    def __init__(self, app, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started_at = time.perf_counter()
        status = None

        async def observed_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        except (ClientDisconnect, OSError):
            status = CLIENT_CLOSED_REQUEST if status is None else status
        except Exception:
            logger.exception(f"{scope.get('method')} {scope.get('path')} failed")
            if status is None:
                status = 500
                body = error_body("The server had an error while processing your request.", "server_error")
                try:
                    await send_json(send, 500, body)
                except (ClientDisconnect, OSError):
                    status = CLIENT_CLOSED_REQUEST
        finally:
            self._record(scope, status if status is not None else CLIENT_CLOSED_REQUEST, started_at)

    def _record(self, scope, status: int, started_at: float) -> None:
        elapsed = time.perf_counter() - started_at
        endpoint = getattr(scope.get("route"), "path", "unmatched")
        self.metrics.observe_request(endpoint, status, elapsed)
        job = (scope.get("state") or {}).get("job")
        detail = f", queue {job.queue_time:.3f}s, batch of {job.batch_size}" if job is not None else ""
        logger.info(f"{scope.get('method')} {scope.get('path')} -> {status} in {elapsed:.3f}s{detail}")
