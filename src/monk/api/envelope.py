"""The origin system's response envelope, kept so that its clients work unchanged:
``{"success": true, "data": …}`` or ``{"success": false, "error": "…", "error_code": "…"}``."""

from __future__ import annotations

import logging
from typing import Any, Generic, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from monk.core.redact import without_paths
from monk.errors import MonkError, status_and_exit
from monk.service import templates as template_service

log = logging.getLogger(__name__)

T = TypeVar("T")


class Ok(BaseModel, Generic[T]):
    success: bool = True
    data: T


class Failure(BaseModel):
    success: bool = False
    error: str
    error_code: str


def failure(
    status: int, message: str, code: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = Failure(error=message, error_code=code).model_dump()
    return JSONResponse(status_code=status, content=body, headers=headers)


async def monk_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, MonkError)
    status, _exit = status_and_exit(exc)
    headers = {"Retry-After": "2"} if exc.retryable else None
    if status == 401:
        headers = (headers or {}) | {"WWW-Authenticate": "Bearer"}
    # The CLI shows paths (its user owns them); an HTTP client learns none of the server's.
    runtime = getattr(request.app.state, "runtime", None)
    labels = template_service.path_labels(runtime.settings) if runtime is not None else None
    return failure(status, without_paths(exc.message, labels), exc.code, headers)


async def validation_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return failure(422, "; ".join(parts) or "invalid request", "VALIDATION_ERROR")


async def http_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    codes = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 401: "AUTH_FAILED"}
    return failure(exc.status_code, str(exc.detail), codes.get(exc.status_code, "HTTP_ERROR"))


async def internal_error_handler(_: Request, exc: Exception) -> JSONResponse:
    """Anything that escaped the error tree: still the envelope, never a bare text page."""
    log.error("internal error: %s: %s", type(exc).__name__, exc, exc_info=exc)
    return failure(500, "internal error; see the server log", "INTERNAL_ERROR")


class RejectNulBytes:
    """ASGI middleware: a NUL byte in the path or the query string is a 400.

    PostgreSQL text cannot hold NUL, so such a value would otherwise fail deep inside a query.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (
            "\x00" in scope.get("path", "") or b"%00" in scope.get("query_string", b"")
        ):
            response = failure(
                400, "NUL bytes are not allowed in paths or parameters", "VALIDATION_ERROR"
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": Failure, "description": text}
    for code, text in {
        400: "Invalid name or argument",
        401: "Missing, invalid or expired token",
        403: "Token without root access",
        404: "Not found",
        409: "Exists, or not in a state that allows it",
        422: "Invalid body",
        500: "A step failed (undone) or the server is misconfigured",
        503: "Database server or template unavailable; retry (Retry-After)",
    }.items()
}
