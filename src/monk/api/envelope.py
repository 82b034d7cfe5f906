"""The origin system's response envelope, kept so that its clients work unchanged:
``{"success": true, "data": …}`` or ``{"success": false, "error": "…", "error_code": "…"}``."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from monk.errors import MonkError, status_and_exit

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


async def monk_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, MonkError)
    status, _exit = status_and_exit(exc)
    headers = {"Retry-After": "2"} if exc.retryable else None
    if status == 401:
        headers = (headers or {}) | {"WWW-Authenticate": "Bearer"}
    return failure(status, exc.message, exc.code, headers)


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


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": Failure, "description": text}
    for code, text in {
        400: "Invalid name or argument",
        401: "Missing, invalid or expired token",
        403: "Token without root access",
        404: "Not found",
        409: "Exists, or not in a state that allows it",
        422: "Invalid body",
        503: "Database server or template unavailable; retry (Retry-After)",
    }.items()
}
