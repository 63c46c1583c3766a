"""Pure ASGI middleware: request metrics, the API key, and the body-size limit.

Pure ASGI (not BaseHTTPMiddleware) so they add no task per request and see every response, including
the 401/413 they produce themselves and FastAPI's own 422s.
"""
from __future__ import annotations

import hmac
import json
import time
from typing import Iterable

from starlette.exceptions import HTTPException

from .metrics import Metrics


async def _send_error(send, status: int, message: str, error_type: str) -> None:
    body = json.dumps({"error": message, "error_type": error_type}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class MetricsMiddleware:
    """Counts requests by route and status and times them; unknown paths share the label "other"."""

    def __init__(self, app, metrics: Metrics, routes: Iterable[str]):
        self.app, self.metrics, self.routes = app, metrics, set(routes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.routes else "other"
        status = [500]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        t0 = time.perf_counter()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.request_duration.labels(route).observe(time.perf_counter() - t0)
            self.metrics.requests.labels(route, str(status[0])).inc()


class APIKeyMiddleware:
    """With a key set, every route but the open ones (health probes, metrics scrapes) needs
    `Authorization: Bearer <key>` (what the OpenAI client sends)."""

    def __init__(self, app, api_key: str, open_paths: Iterable[str] = ("/health", "/metrics")):
        self.app, self.open_paths = app, set(open_paths)
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        given = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        if given is None:
            return await _send_error(send, 401, "missing API key: send the header 'Authorization: Bearer <key>'",
                                     "unauthorized")
        if not hmac.compare_digest(given, self.expected):
            return await _send_error(send, 401, "wrong API key", "unauthorized")
        return await self.app(scope, receive, send)


class _TooLarge(HTTPException):
    """Raised from `receive` mid-body; FastAPI re-raises HTTPExceptions from body reading, and the app's
    handler renders it as the usual error body."""

    def __init__(self, message: str):
        super().__init__(413, message)


class BodyLimitMiddleware:
    """413 for a body over `limit` bytes: at once from Content-Length, else while it streams in."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        msg = f"payload too large: the limit is {self.limit} bytes (--payload-limit)"
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _send_error(send, 413, msg, "validation")
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge(msg)
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _send_error(send, 413, msg, "validation")
