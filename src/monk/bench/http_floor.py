"""The floor under ``monk bench --http``: what serving HTTP costs with no monk code at all.

Two ASGI apps that do no I/O, served by the same uvicorn as ``monk serve`` (same loop, parser
and access log), measured by the bench in the same run and the same way as monk's routes:

    asgi     a bare ASGI callable answering a fixed JSON body: uvicorn and the socket alone
    fastapi  a FastAPI route of monk's shape (a path parameter, a bearer header read by a
             dependency, a JSON body built from a pydantic model), answering the same body

Their times are what any route on this stack adds to its service call before monk's own code
runs: ``monk bench --http`` reports them beside what monk's routes add, so that a target below
the floor reads as such, in every run, on every machine.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, FastAPI, Header
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

_BODY = b'{"success":true,"data":{"name":"floor"}}'
_HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(_BODY))]


async def asgi_app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return  # lifespan: nothing to start
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": _BODY})


class _Data(BaseModel):
    name: str


class _Ok(BaseModel):
    success: bool = True
    data: _Data


async def _bearer(authorization: Annotated[str, Header()] = "") -> str:
    return authorization


fastapi_app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)


@fastapi_app.get("/floor/{name}")
async def floor(name: str, _: Annotated[str, Depends(_bearer)]) -> Response:
    body = _Ok(data=_Data(name=name)).model_dump_json()
    return Response(body, media_type="application/json")
