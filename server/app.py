"""The ASGI application: both APIs' routes behind one guard (the bearer token and the body limit).

Every error answers in the shape of the API its path belongs to: Cloudflare's
envelope under ``/client/v4``, OpenAI's ``{"error": {...}}`` elsewhere.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from typing import Optional

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from mlxq.client import Client
from mlxq.jobs.defaults import DEFAULT_RETENTION
from mlxq.jobs.errors import StoreError
from mlxq.jobs.workers_ai import failure

from . import openai_batch, workers_ai
from .records import Records

__all__ = ["ServerConfig", "create_app", "DEFAULT_MAX_BODY_BYTES"]

log = logging.getLogger(__name__)

#: Largest request body (bytes): Workers AI's limit for a batch.
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024


@dataclass(frozen=True)
class ServerConfig:
    redis_url: str
    #: The model of OpenAI batches (a Workers AI call names its own in the path).
    model: str
    #: Every call needs ``Authorization: Bearer <api_token>`` when set.
    api_token: Optional[str] = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    retention: int = DEFAULT_RETENTION


class BodyTooLarge(Exception):
    pass


def is_cloudflare(path: str) -> bool:
    return path.startswith("/client/v4/")


def error_response(path: str, status: int, message: str, kind: Optional[str] = None) -> JSONResponse:
    """An error in the shape of ``path``'s API; ``kind`` a key of Cloudflare's codes (``mlxq.jobs.workers_ai``)."""
    if is_cloudflare(path):
        default = {400: "bad_input", 401: "authentication", 404: "no_route", 405: "method_not_allowed",
                   413: "too_large"}.get(status, "internal")
        _, body = failure(kind or default, message)  # the status is the caller's
        return JSONResponse(body, status_code=status)
    return openai_batch.error(status, message)


class Guard:
    """ASGI middleware: the bearer token (compared in constant time) and the body size limit."""

    def __init__(self, app: ASGIApp, token: Optional[str], max_body_bytes: int):
        self.app = app
        self.token = token.encode() if token else None
        self.max = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = dict(scope["headers"])
        if self.token is not None:
            given = headers.get(b"authorization", b"")
            scheme, _, value = given.partition(b" ")
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(value.strip(), self.token)):
                message = ("Authentication error: send Authorization: Bearer <MLXQ_API_TOKEN>" if given == b""
                           else "Authentication error: the bearer token is not the server's MLXQ_API_TOKEN")
                return await error_response(path, 401, message)(scope, receive, send)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max:
            return await error_response(path, 413, self._too_large())(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max:
                    raise BodyTooLarge(self._too_large())
            return message

        await self.app(scope, limited, send)

    def _too_large(self) -> str:
        return f"Request is too large: the body is over the limit of {self.max} bytes (mlxq serve --max-body-bytes)"


async def health(request: Request) -> Response:
    await run_in_threadpool(request.app.state.client.ping)
    return JSONResponse({"status": "ok"})


async def _http_error(request: Request, exc: HTTPException) -> Response:
    message = {404: f"No route for {request.method} {request.url.path}",
               405: f"Method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
    return error_response(request.url.path, exc.status_code, message)


async def _too_large(request: Request, exc: BodyTooLarge) -> Response:
    return error_response(request.url.path, 413, str(exc))


async def _store_error(request: Request, exc: StoreError) -> Response:
    log.error("%s %s: %s", request.method, request.url.path, exc)
    return error_response(request.url.path, 503, f"the job store is unavailable: {exc}", "internal")


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("%s %s failed", request.method, request.url.path)
    return error_response(request.url.path, 500, f"internal error: {type(exc).__name__}", "internal")


def create_app(config: ServerConfig) -> Starlette:
    """The server's ASGI app: the Workers AI REST API and the OpenAI Batch API over ``config.redis_url``."""
    from starlette.middleware import Middleware

    client = Client(config.redis_url, retention=config.retention)
    app = Starlette(
        routes=[Route("/health", health), *workers_ai.routes(), *openai_batch.routes()],
        middleware=[Middleware(Guard, token=config.api_token, max_body_bytes=config.max_body_bytes)],
        exception_handlers={HTTPException: _http_error, BodyTooLarge: _too_large, StoreError: _store_error,
                            Exception: _unexpected},
    )
    app.state.config = config
    app.state.client = client
    app.state.records = Records(client.store)
    return app
