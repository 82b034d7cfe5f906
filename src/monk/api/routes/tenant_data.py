"""The tenant data routes: ``/api/describe`` and ``/api/data/{model}`` (tenant token). They parse,
call ``monk.service.tenant_data``, and render the envelope; the rules are in the core."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, status

from monk.api.deps import RuntimeDep, TenantUser
from monk.api.envelope import Ok, responses
from monk.service.tenant_data import ReadQuery

router = APIRouter(prefix="/api", tags=["tenant data"])

_READ = responses(400, 401, 403, 404, 410, 422, 500, 503)
_WRITE = responses(400, 401, 403, 404, 410, 422, 500, 503, 507)

Record = dict[str, Any]
Where = Annotated[
    str | None,
    Query(description='JSON: {"field": value, "field": {"$gt": 1}, "$or": [...]}'),
]
Permanent = Annotated[
    bool, Query(description="Set deleted_at (never returned again): root access only")
]


@router.get("/describe", summary="The tenant's models", responses=_READ)
def list_models(rt: RuntimeDep, who: TenantUser) -> Ok[list[Record]]:
    return Ok(data=rt.tenant_data.models(who.state, who.access))


@router.get("/describe/{model}", summary="A model's JSON Schema", responses=_READ)
def describe(rt: RuntimeDep, who: TenantUser, model: str) -> Ok[Record]:
    return Ok(data=rt.tenant_data.describe(who.state, who.access, model))


@router.get("/data/{model}", summary="Find records", responses=_READ)
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
) -> Ok[list[Record]]:
    query = ReadQuery(where, order, limit, offset, select, include_trashed)
    return Ok(data=rt.tenant_data.find(who.state, who.access, model, query))


@router.post(
    "/data/{model}",
    status_code=status.HTTP_201_CREATED,
    summary="Create records (all or none)",
    responses=_WRITE,
)
def create(
    rt: RuntimeDep, who: TenantUser, model: str, body: Annotated[Any, Body()]
) -> Ok[list[Record]]:
    return Ok(data=rt.tenant_data.create(who.state, who.access, model, body))


@router.put("/data/{model}", summary="Update records by id (all or none)", responses=_WRITE)
def update_many(
    rt: RuntimeDep, who: TenantUser, model: str, body: Annotated[Any, Body()]
) -> Ok[list[Record]]:
    return Ok(data=rt.tenant_data.update_many(who.state, who.access, model, body))


@router.patch("/data/{model}", summary="Change the records a where matches", responses=_WRITE)
def patch(
    rt: RuntimeDep, who: TenantUser, model: str, body: Annotated[Any, Body()], where: Where = None
) -> Ok[list[Record]]:
    return Ok(data=rt.tenant_data.patch(who.state, who.access, model, where, body))


@router.delete("/data/{model}", summary="Delete records (soft by default)", responses=_WRITE)
def delete(
    rt: RuntimeDep,
    who: TenantUser,
    model: str,
    where: Where = None,
    permanent: Permanent = False,
    body: Annotated[Any, Body()] = None,
) -> Ok[list[Record]]:
    data = rt.tenant_data.delete(
        who.state, who.access, model, where=where, ids=body, permanent=permanent
    )
    return Ok(data=data)


@router.get("/data/{model}/{record_id}", summary="One record", responses=_READ)
def get_one(
    rt: RuntimeDep, who: TenantUser, model: str, record_id: str, include_trashed: bool = False
) -> Ok[Record]:
    data = rt.tenant_data.get(
        who.state, who.access, model, record_id, include_trashed=include_trashed
    )
    return Ok(data=data)


@router.put("/data/{model}/{record_id}", summary="Update one record", responses=_WRITE)
def update_one(
    rt: RuntimeDep, who: TenantUser, model: str, record_id: str, body: Annotated[Any, Body()]
) -> Ok[Record]:
    return Ok(data=rt.tenant_data.update(who.state, who.access, model, record_id, body))


@router.delete("/data/{model}/{record_id}", summary="Delete one record", responses=_WRITE)
def delete_one(
    rt: RuntimeDep, who: TenantUser, model: str, record_id: str, permanent: Permanent = False
) -> Ok[Record]:
    data = rt.tenant_data.delete_one(who.state, who.access, model, record_id, permanent=permanent)
    return Ok(data=data)
