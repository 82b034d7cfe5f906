"""/api/root/host: the fleet's PostgreSQL servers (docs/hosts.md)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Response, status

from monk.api.deps import Root, RuntimeDep
from monk.api.envelope import CHANGE, READ, READ_ONE, Ok
from monk.api.models import (
    HostCheckOut,
    HostCreate,
    HostDrainOut,
    HostDrainRequest,
    HostOut,
    HostPatch,
)
from monk.api.public import scrubbed
from monk.service import hosts
from monk.service.hosts import HostView
from monk.settings import Settings

router = APIRouter(prefix="/api/root/host", tags=["hosts"])


def _out(view: HostView, settings: Settings) -> HostOut:
    # The local server's URL may name its socket folder: shown as <path>.
    return HostOut.model_validate(scrubbed(settings, view.as_dict()))


@router.get("", summary="List hosts (the local one first)", responses=READ)
def list_hosts(rt: RuntimeDep, _: Root) -> Ok[list[HostOut]]:
    return Ok(data=[_out(v, rt.settings) for v in hosts.list_hosts(rt.tenants)])


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Add a host, after checking it (reachable, PostgreSQL 15-18, CREATEDB and CREATEROLE)",
    responses=CHANGE,
)
def add_host(rt: RuntimeDep, _: Root, body: HostCreate) -> Ok[HostOut]:
    view, received = hosts.add_with_templates(
        rt.tenants,
        body.name,
        body.url,
        password=body.password,
        capacity=body.capacity,
        labels=body.labels,
        templates=body.templates,
    )
    out = _out(view, rt.settings)
    out.templates = [scrubbed(rt.settings, a.as_dict()) for a in received]
    return Ok(data=out)


@router.get("/{name}", summary="One host", responses=READ_ONE)
def get_host(rt: RuntimeDep, _: Root, name: str) -> Ok[HostOut]:
    return Ok(data=_out(hosts.get(rt.tenants, name), rt.settings))


@router.patch(
    "/{name}", summary="Change a host's capacity (null: no limit) or labels", responses=CHANGE
)
def patch_host(rt: RuntimeDep, _: Root, name: str, body: HostPatch) -> Ok[HostOut]:
    given = body.model_fields_set
    view = hosts.update(
        rt.tenants,
        name,
        capacity=body.capacity,
        unlimited="capacity" in given and body.capacity is None,
        labels=body.labels if "labels" in given else None,
    )
    return Ok(data=_out(view, rt.settings))


@router.delete("/{name}", summary="Remove a host that holds no live tenant", responses=CHANGE)
def remove_host(rt: RuntimeDep, _: Root, name: str) -> Ok[HostOut]:
    return Ok(data=_out(hosts.remove(rt.tenants, name), rt.settings))


@router.post(
    "/{name}/drain",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Mark a host draining (no new tenants) and move its tenants off (in the background)",
    responses=CHANGE,
    description="Answered at once (202) with the drain's operation id, once the host is marked "
    "draining and the drain's lock is held; its tenants move in the background, `parallel` at "
    "once, each where placement puts it. Follow it with `GET /api/root/operations/{id}` "
    "(result: total, done, moved, failed; state done, or failed when a tenant stayed). "
    '`"move": false`: only mark it draining (200). Another drain of the host in progress: '
    "409 DRAIN_RUNNING.",
)
def drain_host(
    rt: RuntimeDep,
    _: Root,
    name: str,
    response: Response,
    body: Annotated[HostDrainRequest | None, Body()] = None,
) -> Ok[HostDrainOut]:
    body = body or HostDrainRequest()
    if not body.move:
        view = hosts.set_state(rt.tenants, name, "draining")
        response.status_code = status.HTTP_200_OK
        return Ok(data=HostDrainOut.model_validate(_out(view, rt.settings).model_dump()))
    started = rt.start_drain(name, parallel=body.parallel)
    out = _out(hosts.get(rt.tenants, name), rt.settings).model_dump()
    return Ok(
        data=HostDrainOut.model_validate(
            out | {"operation_id": str(started.op_id), "moving": len(started.tenants)}
        )
    )


@router.post("/{name}/undrain", summary="Mark a draining host active", responses=CHANGE)
def undrain_host(rt: RuntimeDep, _: Root, name: str) -> Ok[HostOut]:
    return Ok(data=_out(hosts.set_state(rt.tenants, name, "active"), rt.settings))


@router.post(
    "/{name}/check",
    summary="Check a host: reachable, version, latency, tenants against capacity",
    responses=READ_ONE,
)
def check_host(rt: RuntimeDep, _: Root, name: str) -> Ok[HostCheckOut]:
    result = hosts.check(rt.tenants, name)
    return Ok(data=HostCheckOut.model_validate(scrubbed(rt.settings, result.as_dict())))
