"""/api/root/template: build, inspect, check, drop and prune template databases.

Builds read only the configured sources (the built-ins and ``MONK_TEMPLATE_PATH``): the HTTP API
never takes a server path, nor shows one (a build's ``source`` is where it is, not its path).
Builds and checks take seconds, so the routes are plain ``def`` functions, which FastAPI runs in
its threadpool.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query, status

from monk.api.deps import Root, RuntimeDep
from monk.api.envelope import CHANGE, GROW, READ, READ_ONE, Ok, responses
from monk.api.models import (
    DriftOut,
    TemplateBuildOut,
    TemplateBuildRequest,
    TemplateBuildResultOut,
    TemplateCheckOut,
    TemplateStatusOut,
    TemplateUpgradeRequest,
    TemplateUpgradeStartedOut,
)
from monk.api.public import scrubbed
from monk.core.template_names import validate_template_key
from monk.service import drift, fleet
from monk.service import templates as template_service
from monk.service.upgrades import UpgradeOptions
from monk.settings import Settings

router = APIRouter(prefix="/api/root/template", tags=["templates"])

Key = Annotated[str, Path(description="Template key, e.g. `basic`.", examples=["basic"])]
Version = Annotated[
    str | None,
    Query(description="A build version (16 hex digits); default: the current build."),
]


def _public(settings: Settings, build: template_service.TemplateBuild) -> dict[str, Any]:
    """The build as HTTP clients see it: where its source is, not the server path."""
    origin = template_service.source_origin(settings, build.source)
    out: dict[str, Any] = scrubbed(settings, build.as_dict() | {"source": None})
    return out | {"source": origin}


def _out(settings: Settings, build: template_service.TemplateBuild) -> TemplateBuildOut:
    out: TemplateBuildOut = TemplateBuildOut.model_validate(_public(settings, build))
    return out


@router.get("", summary="List template builds (newest first per key)", responses=READ)
def list_templates(
    rt: RuntimeDep,
    _: Root,
    key: Annotated[str | None, Query(description="Only the builds of this key.")] = None,
    all_: Annotated[
        bool,
        Query(
            alias="all",
            description="Also the dropped builds (failed and retired ones are always listed).",
        ),
    ] = False,
) -> Ok[list[TemplateBuildOut]]:
    if key is not None:
        validate_template_key(key)
    builds = rt.tenants.templates.list_builds(key, everything=all_)
    return Ok(data=[_out(rt.settings, b) for b in builds])


# Before "/{key}": "prune" is a path of its own, not a template key.
@router.post(
    "/prune",
    summary="Drop the retired builds that no live tenant was cloned from",
    responses=READ,
)
def prune_templates(
    rt: RuntimeDep,
    _: Root,
    key: Annotated[str | None, Query(description="Only the builds of this key.")] = None,
) -> Ok[list[TemplateBuildOut]]:
    if key is not None:
        validate_template_key(key)
    dropped = rt.tenants.templates.prune(key)
    return Ok(data=[_out(rt.settings, b) for b in dropped])


@router.get(
    "/{key}",
    summary="The current build of a template (or one version of it)",
    responses=READ_ONE,
)
def show_template(
    rt: RuntimeDep, _: Root, key: Key, version: Version = None
) -> Ok[TemplateBuildOut]:
    return Ok(data=_out(rt.settings, rt.tenants.templates.show(key, version)))


@router.post(
    "/{key}",
    summary="Build a template from its configured source and swap it in",
    responses=GROW,
    description="A no-op (`built: false`) when the current build already has the source's "
    "version, unless `force`. Only sources monk is configured with (built-in and "
    "`MONK_TEMPLATE_PATH`) can be built.",
)
def build_template(
    rt: RuntimeDep,
    _: Root,
    key: Key,
    body: Annotated[TemplateBuildRequest | None, Body()] = None,
) -> Ok[TemplateBuildResultOut]:
    from monk.service import host_templates

    force = body.force if body is not None else False
    answers = host_templates.build_everywhere(rt.tenants, key, force=force)
    local = answers[0]
    if local.error is not None:
        rt.metrics.template_builds.labels(result=local.error.code).inc()
        raise local.error
    assert local.result is not None
    result = local.result
    rt.metrics.template_builds.labels(result="ok" if result.built else "up_to_date").inc()
    hosts = None
    if len(answers) > 1:
        # Another host's failure is its own (its failed row says why): 200, listed here.
        hosts = [{k: v for k, v in a.as_dict().items() if k in _HOST_FIELDS} for a in answers]
    return Ok(
        data=TemplateBuildResultOut.model_validate(
            _public(rt.settings, result.build) | {"built": result.built, "hosts": hosts}
        )
    )


_HOST_FIELDS = ("host", "built", "version", "status", "database", "duration_ms", "error")


@router.post(
    "/{key}/check",
    summary="Re-run the health checks on the current build (in a scratch clone)",
    responses=responses(400, 401, 403, 404, 422, 500, 503, 507),
    description="`ok: false` with the `problems` found; the template itself is never opened.",
)
def check_template(rt: RuntimeDep, _: Root, key: Key) -> Ok[TemplateCheckOut]:
    report = rt.tenants.templates.check(key)
    return Ok(data=TemplateCheckOut.model_validate(report.as_dict()))


@router.get(
    "/{key}/status",
    summary="Where the tenants of a key are: per build, level and status",
    responses=READ_ONE,
    description="From the system database alone: tenants per (build version, migration "
    "level, status), the current build, spares per build, the tenants behind the current "
    "build, the last drift checks.",
)
def template_status(rt: RuntimeDep, _: Root, key: Key) -> Ok[TemplateStatusOut]:
    return Ok(data=TemplateStatusOut.model_validate(fleet.template_status(rt.tenants, key)))


@router.get(
    "/{key}/drift",
    summary="The last drift check of each tenant of a key",
    responses=READ,
    description="As kept in the system database; `POST` checks every tenant now.",
)
def last_drift(rt: RuntimeDep, _: Root, key: Key) -> Ok[list[DriftOut]]:
    validate_template_key(key)
    rows = drift.last_results(rt.tenants, key)
    return Ok(data=[DriftOut.model_validate(r.as_dict()) for r in rows])


@router.post(
    "/{key}/drift",
    summary="Compare every tenant of a key with the build it claims to be at",
    responses=READ_ONE,
    description="One connection per tenant, `parallel` at a time; each result is kept. "
    "Answers when every tenant was checked.",
)
def check_drift(
    rt: RuntimeDep,
    _: Root,
    key: Key,
    parallel: Annotated[int, Query(ge=1, le=64, description="Tenants checked at once.")] = 4,
) -> Ok[list[DriftOut]]:
    results = drift.template_drift(rt.tenants, key, parallel=parallel)
    return Ok(data=[DriftOut.model_validate(r.as_dict()) for r in results])


@router.delete(
    "/{key}",
    summary="Drop a build and its database",
    responses=CHANGE,
    description="Default: the current build. Without `force`, refuses (409) the current build "
    "and a build that live tenants were cloned from.",
)
def drop_template(
    rt: RuntimeDep,
    _: Root,
    key: Key,
    version: Version = None,
    force: Annotated[
        bool, Query(description="Drop even the current build or one tenants need.")
    ] = False,
) -> Ok[TemplateBuildOut]:
    build = rt.tenants.templates.drop(key, version, force=force)
    return Ok(data=_out(rt.settings, build))


@router.post(
    "/{key}/upgrade",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Bring the tenants of a template to a build (a fleet upgrade, in the background)",
    responses=CHANGE,
    description="Answered at once with the run's operation id; `monk serve` runs it in the "
    "background. Follow it with `GET /api/root/operations/{id}`. A dead run of the key (its "
    "process killed) is resumed instead of starting a new one; a run in progress: 409.",
)
def upgrade_template(
    rt: RuntimeDep,
    _: Root,
    key: Key,
    body: Annotated[TemplateUpgradeRequest | None, Body()] = None,
) -> Ok[TemplateUpgradeStartedOut]:
    body = body or TemplateUpgradeRequest()
    options = UpgradeOptions(
        to_version=body.to_version,
        tenants=tuple(body.tenants),
        canary=body.canary,
        parallel=body.parallel,
        on_error=body.on_error,
    )
    run = rt.start_upgrade(key, options)
    return Ok(
        data=TemplateUpgradeStartedOut(
            operation_id=str(run.op_id),
            template=run.key,
            to_version=run.to_version,
            resumed=run.resumed,
        )
    )
