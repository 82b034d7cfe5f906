"""/api/root/host: the fleet's PostgreSQL servers (docs/hosts.md)."""

from __future__ import annotations

from fastapi import APIRouter, status

from monk.api.deps import Root, RuntimeDep
from monk.api.envelope import CHANGE, READ, READ_ONE, Ok
from monk.api.models import HostCheckOut, HostCreate, HostOut, HostPatch
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


@router.post("/{name}/drain", summary="Mark a host draining (no new tenants)", responses=CHANGE)
def drain_host(rt: RuntimeDep, _: Root, name: str) -> Ok[HostOut]:
    return Ok(data=_out(hosts.set_state(rt.tenants, name, "draining"), rt.settings))


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
