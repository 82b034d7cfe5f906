"""Liveness, Prometheus metrics, the operations journal and the tenant events."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from typing import Annotated
from uuid import UUID

from fastapi import APIRouter, Query, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from monk.api.deps import Root, RuntimeDep
from monk.api.envelope import READ, READ_ONE, RETRY_AFTER, Ok, error_headers
from monk.api.models import (
    EventOut,
    HostHealth,
    OperationDetailOut,
    OperationOut,
    ServiceHealth,
    ServiceHealthFailure,
)
from monk.api.public import scrubbed
from monk.api.runtime import Runtime
from monk.errors import DatabaseUnavailable, MonkError, table_entry
from monk.service import operations as operations_service
from monk.service import upgrades

router = APIRouter()


@router.get(
    "/health",
    tags=["service"],
    summary="Liveness and database reachability (no auth)",
    response_model=Ok[ServiceHealth],
    responses={
        503: {
            "model": ServiceHealthFailure,
            "description": "The database is unreachable",
            "headers": RETRY_AFTER,
        }
    },
)
def health(rt: RuntimeDep) -> JSONResponse:
    # One kept session of its own, not the pools: liveness must not queue behind busy
    # provisions; its answer is shared for half a second by every caller.
    version, exc = rt.probe.check()
    if exc is not None:
        body = ServiceHealth(status="unavailable", database="unreachable", error=exc.message)
        _add_restarts(rt, body)
        failed = ServiceHealthFailure(data=body, error=exc.message, error_code=exc.code)
        # However the probe failed, /health says: the database is unavailable.
        status, _exit = table_entry(DatabaseUnavailable)
        return JSONResponse(
            status_code=status, content=failed.model_dump(), headers=error_headers(exc)
        )
    body = ServiceHealth(status="ok", database="reachable", server_version=version)
    _add_restarts(rt, body)
    try:
        body.hosts = [HostHealth(**h) for h in rt.host_probes.check()]
    except MonkError as lost:
        body.error = lost.message  # the registry went away since the probe: hosts unknown
    return JSONResponse(content=Ok(data=body).model_dump())


def _add_restarts(rt: Runtime, body: ServiceHealth) -> None:
    """What the supervisor of the embedded server did (nothing to say for an external one)."""
    if rt.supervisor is None:
        return
    sup = rt.supervisor.status()
    body.server_restarts = sup.restarts
    body.last_restart_reason = sup.last_reason
    if sup.last_restart_at is not None:
        body.last_restart_at = datetime.fromtimestamp(sup.last_restart_at, UTC).isoformat()


@router.get(
    "/metrics",
    tags=["service"],
    summary="Prometheus metrics (no auth)",
    response_class=PlainTextResponse,
    responses={
        200: {
            "description": "Prometheus text exposition format",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    },
)
def metrics(rt: RuntimeDep) -> Response:
    # Metrics must answer even while the database does not.
    with contextlib.suppress(MonkError):
        rt.refresh_registry_gauges()
    return Response(generate_latest(rt.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/api/root/operations",
    tags=["operations"],
    summary="The operations journal: provisioning, purges, restores, template builds",
    responses=READ,
)
def operations(
    rt: RuntimeDep,
    _: Root,
    state: Annotated[list[str] | None, Query()] = None,
    kind: str | None = None,
    subject: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> Ok[list[OperationOut]]:
    ops = operations_service.list_operations(
        rt.tenants, states=state, kind=kind, subject=subject, limit=limit
    )
    out = []
    for op in ops:
        data = operations_service.operation_dict(op)
        # What a step wrote may name server paths: shown as <archives>/… and the like.
        for name in ("error", "params", "result"):
            data[name] = scrubbed(rt.settings, data[name])
        out.append(OperationOut.model_validate(data))
    return Ok(data=out)


@router.get(
    "/api/root/operations/{op_id}",
    tags=["operations"],
    summary="One operation; for a fleet upgrade, its progress and per-tenant results",
    responses=READ_ONE,
)
def operation(rt: RuntimeDep, _: Root, op_id: UUID) -> Ok[OperationDetailOut]:
    op = operations_service.get_operation(rt.tenants, op_id)
    data = operations_service.operation_dict(op)
    for name in ("error", "params", "result"):
        data[name] = scrubbed(rt.settings, data[name])
    if op.kind == upgrades.KIND:
        data["upgrade"] = scrubbed(rt.settings, upgrades.report(rt.tenants, op_id).as_dict())
    return Ok(data=OperationDetailOut.model_validate(data))


@router.get(
    "/api/root/events",
    tags=["operations"],
    summary="Tenant events, newest first: what observers receive, with their delivery state",
    responses=READ,
)
def events_(
    rt: RuntimeDep,
    _: Root,
    pending: bool = False,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> Ok[list[EventOut]]:
    found = operations_service.list_events(rt.tenants, pending=pending, limit=limit)
    return Ok(data=[EventOut.model_validate(e.as_dict()) for e in found])
