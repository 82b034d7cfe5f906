"""/api/root/tenant: the origin system's root tenant API, in its envelope."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Header, Query, Response, status
from starlette.concurrency import run_in_threadpool

from monk.api import inline
from monk.api.deps import Root, RuntimeDep
from monk.api.envelope import CHANGE, GROW, READ, READ_ONE, Ok, ok
from monk.api.models import (
    DriftOut,
    TenantCreate,
    TenantHealth,
    TenantMoveRequest,
    TenantMoveStartedOut,
    TenantOut,
    TenantPatch,
    TenantRestore,
)
from monk.api.public import scrubbed
from monk.core.lifecycle import TenantStatus
from monk.service import drift
from monk.service.health import tenant_health
from monk.service.tenants import TenantView
from monk.settings import Settings

router = APIRouter(prefix="/api/root/tenant", tags=["tenants"])

MAX_OFFSET = 2**31 - 1
"""Larger offsets are meaningless and would overflow PostgreSQL's bigint OFFSET."""


async def _call(fn: Callable[[], None]) -> None:
    """A background task run on the event loop (a sync one would take a thread-pool hop)."""
    fn()


def _out(view: TenantView, settings: Settings) -> TenantOut:
    data = view.as_dict()
    if data.get("archive"):
        data["archive"] = scrubbed(settings, data["archive"])  # its path, as <archives>/…
    return TenantOut.model_validate(data)


@router.get("", summary="List tenants", responses=READ, response_model=Ok[list[TenantOut]])
def list_tenants(
    rt: RuntimeDep,
    _: Root,
    include_trashed: bool = False,
    include_deleted: bool = False,
    status_: Annotated[list[TenantStatus] | None, Query(alias="status")] = None,
    template: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> Response:
    tenants = rt.tenants.list(
        statuses=[s.value for s in status_] if status_ else None,
        template=template,
        include_trashed=include_trashed,
        include_deleted=include_deleted,
        limit=limit,
        offset=offset,
    )
    return ok([_out(rt.tenants.view(t), rt.settings) for t in tenants])


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    summary="Provision a tenant",
    responses=GROW,
    response_model=Ok[TenantOut],
)
async def create_tenant(
    rt: RuntimeDep,
    _: Root,
    body: TenantCreate,
    background: BackgroundTasks,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> Response:
    # The refiller (a clone, argon2 hashing) starts once the answer is sent: woken in the
    # handler, it took the GIL and a core from the answer (docs/benchmarks.md).
    def later(wake: Callable[[], None]) -> None:
        background.add_task(_call, wake)

    # A warm handout is registry statements only: tried on the loop thread (monk.api.inline)
    # when one looks ready. It clones nothing: without a spare it answers None and the
    # provision (a clone) runs on the thread pool.
    if rt.registry_ready() and rt.warm_handout_ready(
        body.template, host=body.host, placement=body.placement, root_password=body.root_password
    ):
        handed = await inline.run(
            rt,
            lambda: rt.hand_out(
                body.name,
                template=body.template,
                host=body.host,
                idempotency_key=idempotency_key,
                connection_limit=body.connection_limit,
                placement=body.placement,
                later=later,
            ),
        )
        if handed is not None:
            return ok(_out(handed, rt.settings), status.HTTP_201_CREATED)

    def provision() -> Response:
        view = rt.provision(
            body.name,
            template=body.template,
            host=body.host,
            idempotency_key=idempotency_key,
            connection_limit=body.connection_limit,
            root_password=body.root_password,
            placement=body.placement,
            later=later,
        )
        return ok(_out(view, rt.settings), status.HTTP_201_CREATED)

    return await run_in_threadpool(provision)


@router.get(
    "/{name}",
    summary="One tenant; ?include_deleted=true also finds a purged one",
    responses=READ_ONE,
    response_model=Ok[TenantOut],
)
async def get_tenant(rt: RuntimeDep, _: Root, name: str, include_deleted: bool = False) -> Response:
    def read() -> Response:
        tenant = rt.tenants.get(name, include_deleted=include_deleted)
        return ok(_out(rt.tenants.view(tenant), rt.settings))

    return await inline.run(rt, read)


@router.patch(
    "/{name}",
    summary="Edit a tenant (is_active: enable or disable)",
    responses=CHANGE,
    response_model=Ok[TenantOut],
)
def patch_tenant(rt: RuntimeDep, _: Root, name: str, body: TenantPatch) -> Response:
    limit_given = "connection_limit" in body.model_fields_set
    view = rt.tenants.update(
        name,
        is_active=body.is_active,
        connection_limit=body.connection_limit,
        default_connection_limit=limit_given and body.connection_limit is None,
    )
    return ok(_out(view, rt.settings))


@router.put(
    "/{name}",
    summary="Restore a trashed tenant, or a purged one from its archive",
    responses=GROW,
    response_model=Ok[TenantOut],
)
def restore_tenant(
    rt: RuntimeDep, _: Root, name: str, body: TenantRestore | None = None
) -> Response:
    host = body.host if body is not None else None
    return ok(_out(rt.tenants.restore(name, host=host), rt.settings))


@router.delete(
    "/{name}",
    summary="Trash a tenant; ?force=true purges it (archive, then drop)",
    responses=GROW,
    response_model=Ok[TenantOut],
)
def delete_tenant(
    rt: RuntimeDep,
    _: Root,
    name: str,
    force: bool = False,
    archive: bool = True,
    forget: bool = False,
) -> Response:
    if not force:
        return ok(_out(rt.tenants.trash(name), rt.settings))
    view = rt.request_purge(name, archive=archive, forget=forget)
    return ok(_out(view, rt.settings))


@router.get(
    "/{name}/health", summary="Check a tenant", responses=READ_ONE, response_model=Ok[TenantHealth]
)
def health(rt: RuntimeDep, _: Root, name: str) -> Response:
    return ok(TenantHealth.model_validate(tenant_health(rt.tenants, name)))


@router.get(
    "/{name}/drift",
    summary="The tenant's last drift check",
    responses=READ_ONE,
    description="As kept in the system database (`data` is null if it was never checked); "
    "`POST` checks now.",
    response_model=Ok[DriftOut | None],
)
def last_drift(rt: RuntimeDep, _: Root, name: str) -> Response:
    found = drift.last_result(rt.tenants, name)
    return ok(DriftOut.model_validate(found.as_dict()) if found else None)


@router.post(
    "/{name}/drift",
    summary="Compare the tenant's schema with the build it claims to be at",
    responses=READ_ONE,
    description="Opens the tenant's database (monk's admin, one connection), compares its "
    "catalog with the claimed build's, keeps the result. `drifted: true` lists the "
    "`differences`; there is no repair (see docs/templates.md).",
    response_model=Ok[DriftOut],
)
def check_drift(rt: RuntimeDep, _: Root, name: str) -> Response:
    return ok(DriftOut.model_validate(drift.tenant_drift(rt.tenants, name).as_dict()))


@router.post(
    "/{name}/move",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Move a tenant to another host (in the background)",
    responses=CHANGE,
    description="Answered at once with the move's operation id, once both hosts answered and "
    "the tenant's lock is held; the move runs in the background (freeze, copy, verify, switch, "
    "unfreeze). Follow it with `GET /api/root/operations/{id}` (its step, then its downtime_ms "
    "and total_ms). Another move of the tenant in progress: 409 MOVE_RUNNING; a host that "
    "does not answer: 503 HOST_UNAVAILABLE.",
    response_model=Ok[TenantMoveStartedOut],
)
def move_tenant(rt: RuntimeDep, _: Root, name: str, body: TenantMoveRequest) -> Response:
    started = rt.start_move(name, body.to, jobs=body.jobs)
    assert started.op_id is not None
    url = None
    if started.credentials is not None:
        # The new password is for the tenant on its new host.
        moved = dataclasses.replace(started.tenant, host=started.to_host)
        url = rt.tenants.view(moved, started.credentials).as_dict()["connection_url"]
    return ok(
        TenantMoveStartedOut(
            operation_id=str(started.op_id),
            tenant=started.tenant.name,
            from_host=started.from_host,
            to_host=started.to_host,
            credentials="rotated" if started.credentials else "kept",
            connection_url=url,
        ),
        status.HTTP_202_ACCEPTED,
    )


@router.post(
    "/{name}/credentials",
    summary="Issue a new password for the tenant's role",
    responses=CHANGE,
    response_model=Ok[TenantOut],
)
def rotate_credentials(rt: RuntimeDep, _: Root, name: str) -> Response:
    return ok(_out(rt.tenants.rotate_credentials(name), rt.settings))
