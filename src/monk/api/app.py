"""The ASGI application: ``create_app(settings)``. Routes parse, call the service, render."""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

import monk
from monk.api import console, envelope
from monk.api.routes import hosts, system, templates, tenant_auth, tenant_data, tenants
from monk.api.runtime import Runtime
from monk.errors import ConfigError, MonkError
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
    app.include_router(hosts.router)
    app.include_router(tenant_auth.auth_router)
    app.include_router(tenant_auth.tenant_router)
    app.include_router(tenant_auth.users_router)
    app.include_router(tenant_data.router)
    # The operators' web console at /console (and / sends the browser there).
    console.mount(app)
    return app


def listen(host: str, port: int) -> socket.socket:
    """A socket bound and listening on ``host:port``, for ``monk serve`` to take before it
    touches anything: a busy port is then one ConfigError, not a half-started server (clients
    that connect during start-up wait in the backlog)."""
    # as uvicorn does: IPv6 for an address with a colon, else IPv4 (a name resolves to that)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP.
    # Without it Nagle held every response's body until the client's delayed ACK of its
    # headers: +40 ms on each keep-alive request (44 ms p50 back to back, 1.2 ms with it).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        # and, as uvicorn does, a restart need not wait for old connections' TIME_WAIT
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except socket.gaierror as exc:
        sock.close()
        raise ConfigError(f"--host {host}: {exc.strerror}") from None
    except OSError as exc:
        sock.close()
        hint = ""
        if exc.errno == errno.EADDRINUSE:
            hint = " (another monk serve?): stop it, or choose another --port"
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}{hint}") from None
    return sock
