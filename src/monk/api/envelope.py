"""The origin system's response envelope, kept so that its clients work unchanged:
``{"success": true, "data": …}`` or ``{"success": false, "error": "…", "error_code": "…"}``."""

from __future__ import annotations

import logging
from typing import Any, Generic, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from monk.adapters.postgres.connection import translate
from monk.core.redact import without_paths
from monk.errors import (
    InvalidRequest,
    MonkError,
    UsageError,
    error_codes,
    status_and_exit,
    table_entry,
)
from monk.service import templates as template_service

log = logging.getLogger(__name__)

T = TypeVar("T")

# The codes of the error tree, and those of failures raised before monk's code runs.
ERROR_CODES = sorted(
    {*error_codes(), "VALIDATION_ERROR", "NOT_FOUND", "METHOD_NOT_ALLOWED", "HTTP_ERROR"}
    | {"AUTH_FAILED", "INTERNAL_ERROR"}
)
_CODES_SCHEMA: dict[str, Any] = {"enum": ERROR_CODES}


class Ok(BaseModel, Generic[T]):
    success: bool = True
    data: T


def ok(data: BaseModel | list[Any] | dict[str, Any] | None, status_code: int = 200) -> Response:
    """``Ok(data=data)`` as JSON, built here rather than by FastAPI from the return value.

    FastAPI validates a sync route's return value against its response model on the thread
    pool: a second hop per request (two more thread wake-ups; ~0.2 ms b2b, more on a busy
    machine). A route returning this skips it; it still names ``response_model`` (and its
    ``status_code``), so the OpenAPI document is unchanged."""
    # Ok(...), not Ok[Any](...): a parametrised generic is looked up per call (~0.1 ms)
    body = Ok(data=data).model_dump_json()
    return Response(body, status_code=status_code, media_type="application/json")


class Failure(BaseModel):
    success: bool = False
    error: str
    error_code: str = Field(
        description="Stable machine-readable code of the failure.",
        json_schema_extra=_CODES_SCHEMA,
    )


def failure(
    status: int, message: str, code: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = Failure(error=message, error_code=code).model_dump()
    return JSONResponse(status_code=status, content=body, headers=headers)


def error_headers(exc: MonkError) -> dict[str, str] | None:
    status, _exit = status_and_exit(exc)
    retry_after = exc.details.get("retry_after", exc.retry_after)
    headers = {"Retry-After": str(retry_after)} if exc.retryable else None
    if status == 401:
        headers = (headers or {}) | {"WWW-Authenticate": "Bearer"}
    return headers


async def monk_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, MonkError)
    status, _exit = status_and_exit(exc)
    # The CLI shows paths (its user owns them); an HTTP client learns none of the server's.
    runtime = getattr(request.app.state, "runtime", None)
    labels = template_service.path_labels(runtime.settings) if runtime is not None else None
    return failure(status, without_paths(exc.message, labels), exc.code, error_headers(exc))


async def validation_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    # A body or parameter FastAPI refused: answered as monk's own invalid requests are.
    status, _exit = table_entry(InvalidRequest)
    return failure(status, "; ".join(parts) or "invalid request", "VALIDATION_ERROR")


async def http_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    codes = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 401: "AUTH_FAILED"}
    return failure(exc.status_code, str(exc.detail), codes.get(exc.status_code, "HTTP_ERROR"))


async def internal_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Anything that escaped the error tree: still the envelope, never a bare text page."""
    known = translate(exc)
    if known is not None:
        # A full disk or a server gone away: the client's answer says so (no traceback).
        log.warning("%s: %s", known.code, known.message)
        return await monk_error_handler(request, known)
    log.error("internal error: %s: %s", type(exc).__name__, exc, exc_info=exc)
    status, _exit = table_entry(MonkError)
    return failure(status, "internal error; see the server log", "INTERNAL_ERROR")


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
            status, _exit = table_entry(UsageError)
            response = failure(
                status, "NUL bytes are not allowed in paths or parameters", UsageError.code
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


RETRY_AFTER: dict[str, Any] = {
    "Retry-After": {
        "description": "Seconds to wait before trying again.",
        "schema": {"type": "integer"},
    }
}

_DESCRIPTIONS = {
    400: "Invalid name or argument",
    401: "Missing, invalid or expired token",
    403: "Not allowed: a token without root access, a tenant user's access too low (or deny), "
    "or a disabled tenant",
    404: "Not found",
    409: "Exists, or not in a state that allows it",
    410: "The tenant of this token was trashed or purged (TENANT_GONE)",
    422: "Invalid body or parameter",
    429: "Too many failed logins: retry after Retry-After seconds",
    500: "A step failed (undone), the server is misconfigured, or a bug",
    503: "Database server or template unavailable: retry after Retry-After seconds",
    507: "Disk full (DISK_FULL): free space, then retry",
}


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The error answers a route can give, for its OpenAPI entry (its real ones only)."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": Failure, "description": _DESCRIPTIONS[status]}
        if status in (429, 503, 507):
            entry["headers"] = RETRY_AFTER
        out[status] = entry
    return out


# Every root route: bad input (a NUL byte is refused before routing), auth, a database that
# is down, and the envelope of an unexpected failure.
_ROOT = (400, 401, 403, 422, 500, 503)
READ = responses(*_ROOT)
READ_ONE = responses(*_ROOT, 404)
CHANGE = responses(*_ROOT, 404, 409)
GROW = responses(*_ROOT, 404, 409, 507)  # writes that need disk space
