"""The tenant data routes: ``/api/describe`` and ``/api/data/{model}`` (tenant token). They parse,
call ``monk.service.tenant_data``, and render the envelope; the rules are in the core."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, status
from fastapi.responses import Response

from monk.api.deps import RuntimeDep, TenantPrincipal, TenantUser
from monk.api.envelope import Ok, ok, responses
from monk.service.tenant_data import Caller, ReadQuery

router = APIRouter(prefix="/api", tags=["tenant data"])

_READ = responses(400, 401, 403, 404, 410, 422, 500, 503)
_WRITE = responses(400, 401, 403, 404, 410, 422, 500, 503, 507)

Record = dict[str, Any]


def _caller(who: TenantPrincipal) -> Caller:
    return Caller(who.state, who.user_id, who.access)


Where = Annotated[
    str | None,
    Query(description='JSON: {"field": value, "field": {"$gt": 1}, "$or": [...]}'),
]
Permanent = Annotated[
    bool, Query(description="Set deleted_at (never returned again): root access only")
]


@router.get(
    "/describe", response_model=Ok[list[Record]], summary="The tenant's models", responses=_READ
)
def list_models(rt: RuntimeDep, who: TenantUser) -> Response:
    return ok(rt.tenant_data.models(_caller(who)))


@router.get(
    "/describe/{model}", response_model=Ok[Record], summary="A model's JSON Schema", responses=_READ
)
def describe(rt: RuntimeDep, who: TenantUser, model: str) -> Response:
    return ok(rt.tenant_data.describe(_caller(who), model))


@router.get(
    "/data/{model}", response_model=Ok[list[Record]], summary="Find records", responses=_READ
)
def find(
    rt: RuntimeDep,
    who: TenantUser,
    model: str,
    where: Where = None,
    order: Annotated[str | None, Query(description="field, field desc, -field; ...")] = None,
    limit: Annotated[int | None, Query(description="default 100, at most 1000")] = None,
    offset: int | None = None,
    select: Annotated[str | None, Query(description="comma-separated fields")] = None,
    include_trashed: bool = False,
) -> Response:
    query = ReadQuery(where, order, limit, offset, select, include_trashed)
    return ok(rt.tenant_data.find(_caller(who), model, query))


@router.post(
    "/data/{model}",
    status_code=status.HTTP_201_CREATED,
    response_model=Ok[list[Record]],
    summary="Create records (all or none)",
    responses=_WRITE,
)
def create(rt: RuntimeDep, who: TenantUser, model: str, body: Annotated[Any, Body()]) -> Response:
    return ok(rt.tenant_data.create(_caller(who), model, body), status.HTTP_201_CREATED)


@router.put(
    "/data/{model}",
    response_model=Ok[list[Record]],
    summary="Update records by id (all or none)",
    responses=_WRITE,
)
def update_many(
    rt: RuntimeDep, who: TenantUser, model: str, body: Annotated[Any, Body()]
) -> Response:
    return ok(rt.tenant_data.update_many(_caller(who), model, body))


@router.patch(
    "/data/{model}",
    response_model=Ok[list[Record]],
    summary="Change the records a where matches",
    responses=_WRITE,
)
def patch(
    rt: RuntimeDep, who: TenantUser, model: str, body: Annotated[Any, Body()], where: Where = None
) -> Response:
    return ok(rt.tenant_data.patch(_caller(who), model, where, body))


@router.delete(
    "/data/{model}",
    response_model=Ok[list[Record]],
    summary="Delete records (soft by default)",
    responses=_WRITE,
)
def delete(
    rt: RuntimeDep,
    who: TenantUser,
    model: str,
    where: Where = None,
    permanent: Permanent = False,
    body: Annotated[Any, Body()] = None,
) -> Response:
    data = rt.tenant_data.delete(_caller(who), model, where=where, ids=body, permanent=permanent)
    return ok(data)


@router.get(
    "/data/{model}/{record_id}", response_model=Ok[Record], summary="One record", responses=_READ
)
def get_one(
    rt: RuntimeDep, who: TenantUser, model: str, record_id: str, include_trashed: bool = False
) -> Response:
    data = rt.tenant_data.get(_caller(who), model, record_id, include_trashed=include_trashed)
    return ok(data)


@router.put(
    "/data/{model}/{record_id}",
    response_model=Ok[Record],
    summary="Update one record",
    responses=_WRITE,
)
def update_one(
    rt: RuntimeDep, who: TenantUser, model: str, record_id: str, body: Annotated[Any, Body()]
) -> Response:
    return ok(rt.tenant_data.update(_caller(who), model, record_id, body))


@router.delete(
    "/data/{model}/{record_id}",
    response_model=Ok[Record],
    summary="Delete one record",
    responses=_WRITE,
)
def delete_one(
    rt: RuntimeDep, who: TenantUser, model: str, record_id: str, permanent: Permanent = False
) -> Response:
    data = rt.tenant_data.delete_one(_caller(who), model, record_id, permanent=permanent)
    return ok(data)
