"""The ASGI application: ``create_app(settings)``. Routes parse, call the service, render."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

import monk
from monk.api import envelope
from monk.api.routes import system, templates, tenants
from monk.api.runtime import Runtime
from monk.errors import MonkError
from monk.settings import Settings

log = logging.getLogger(__name__)


def create_app(settings: Settings, *, runtime: Runtime | None = None) -> FastAPI:
    """``runtime`` lets a caller that already started monk (``monk serve``) hand it over."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        rt = runtime or Runtime(settings)
        app.state.runtime = rt
        rt.start()
        try:
            yield
        finally:
            rt.stop()

    # /docs and /redoc with their assets served from the package: no CDN, so they load offline.
    app = FastAPIOffline(
        title="monk",
        version=monk.__version__,
        description="A PostgreSQL database per tenant, cloned from pre-built templates. "
        "Root routes need `Authorization: Bearer <token>` (`monk token --root`).",
        lifespan=lifespan,
        # Swagger UI would ask an online validator about the document.
        swagger_ui_parameters={"validatorUrl": None},
    )
    app.add_exception_handler(MonkError, envelope.monk_error_handler)
    app.add_exception_handler(RequestValidationError, envelope.validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, envelope.http_error_handler)
    app.add_exception_handler(Exception, envelope.internal_error_handler)
    app.add_middleware(envelope.RejectNulBytes)
    app.include_router(system.router)
    app.include_router(tenants.router)
    app.include_router(templates.router)
    return app
