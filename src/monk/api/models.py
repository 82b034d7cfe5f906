"""Request and response bodies of the HTTP API (they make the OpenAPI document complete)."""

from __future__ import annotations

import dataclasses
import types
import typing
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, create_model

from monk.api.envelope import Failure
from monk.service.operations import Operation
from monk.service.templates import TemplateBuild
from monk.service.upgrades import DEFAULT_PARALLEL
from monk.settings import MAX_TENANT_CONNECTION_LIMIT


def _as_sent(annotation: Any) -> Any:
    """The JSON type of a dataclass field's type: ids and times are sent as strings."""
    if annotation in (UUID, datetime):
        return str
    if isinstance(annotation, types.UnionType):
        sent = [_as_sent(arg) for arg in typing.get_args(annotation)]
        union = sent[0]
        for arg in sent[1:]:
            union = union | arg
        return union
    return annotation


def fields_of(record: type[Any], **documented: Any) -> type[BaseModel]:
    """A response model with the fields of the service's dataclass ``record``, in its order
    and of its types (as sent); ``documented`` gives some of them a narrower type or a
    description, as ``(type, Field(...))``. The API class derives from it (one class per
    model, so the OpenAPI document names it)."""
    hints = typing.get_type_hints(record)
    unknown = set(documented) - set(hints)
    if unknown:
        raise TypeError(f"{record.__name__} has no field(s) {sorted(unknown)}")
    fields: dict[str, Any] = {
        f.name: documented.get(f.name, (_as_sent(hints[f.name]), ...))
        for f in dataclasses.fields(record)
    }
    model: type[BaseModel] = create_model(f"{record.__name__}Fields", **fields)
    return model


class TenantRestore(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str | None = Field(
        None,
        description="A purged tenant: the host to restore its archive on (default: placement "
        "chooses). A trashed tenant is restored on its own host.",
    )


class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        ...,
        description="Tenant name as the caller knows it, e.g. 'Acme Corp'.",
        examples=["Acme Corp"],
    )
    template: str = Field("basic", description="Template key to clone from.", examples=["basic"])
    host: str | None = Field(
        None, description="The host to place the tenant on (default: placement chooses)."
    )
    placement: dict[str, str] | None = Field(
        None,
        description='Labels the host must have, e.g. {"zone": "eu-1"} (docs/hosts.md).',
        examples=[{"zone": "eu-1"}],
    )
    connection_limit: int | None = Field(
        None,
        ge=1,
        le=MAX_TENANT_CONNECTION_LIMIT,
        description="CONNECTION LIMIT of the tenant's role; default MONK_TENANT_CONNECTION_LIMIT.",
    )
    root_password: str | None = Field(
        None,
        min_length=1,
        max_length=1024,
        description="Password of the tenant's first user, root (default: generated, and "
        "returned once in root_user). Never stored but as its argon2id hash.",
    )


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    username: str = Field(..., description="Login name: a lowercase letter, then a-z 0-9 _.")
    access: Literal["root", "full", "edit", "read", "deny"] = "read"
    password: str | None = Field(
        None, min_length=1, max_length=1024, description="Default: generated, returned once."
    )


class PasswordChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    password: str | None = Field(
        None, min_length=1, max_length=1024, description="Default: generated, returned once."
    )


class UserOut(BaseModel):
    id: str
    username: str
    name: str
    access: str
    created_at: str | None
    updated_at: str | None
    password: str | None = Field(None, description="Only when monk generated it: shown once.")


class LoginIn(BaseModel):
    """Fields are optional here so that a missing one gets the origin's own code."""

    tenant: str | None = None
    username: str | None = None
    password: str | None = None
    format: str | None = None


class LoginUser(BaseModel):
    id: str
    username: str
    tenant: str
    tenant_id: str
    access: str


class LoginOut(BaseModel):
    token: str
    expires_in: int
    user: LoginUser


class WhoAmI(BaseModel):
    user_id: str
    username: str
    tenant: str
    tenant_id: str
    database: str
    access: str
    tenant_status: str


class TenantPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    is_active: bool | None = Field(None, description="false disables, true enables.")
    connection_limit: int | None = Field(
        None,
        ge=1,
        le=MAX_TENANT_CONNECTION_LIMIT,
        description="The role's own CONNECTION LIMIT; null: back to MONK_TENANT_CONNECTION_LIMIT.",
    )


class ArchiveOut(BaseModel):
    path: str = Field(
        ..., description="The dump file, its server folder shown as <archives> (no server path)."
    )
    size: int | None
    sha256: str | None
    archived_at: str | None
    server_version: str | None


class RootUserOut(BaseModel):
    username: str
    password: str


class TenantOut(BaseModel):
    id: str
    name: str
    database: str
    host: str
    address: str = Field(description="Where the tenant's host listens, as connection_url names it.")
    port: int
    template: str | None
    template_version: str | None
    status: str
    is_active: bool
    tenant_type: str
    role: str | None
    migration_level: int
    connection_limit: int | None = Field(
        None, description="The CONNECTION LIMIT of the tenant's role (its own or the default)."
    )
    created_at: str | None
    updated_at: str | None
    trashed_at: str | None
    deleted_at: str | None
    archive: ArchiveOut | None = None
    connection_url: str | None = Field(
        None, description="Only in answers that issue a password (create, rotate, restore)."
    )
    root_user: RootUserOut | None = Field(
        None, description="Only in the create answer: the first tenant user and its password."
    )
    provisioned_from: Literal["pool", "clone"] | None = Field(
        None, description="Only in the create answer: a warm-pool spare or a fresh clone."
    )
    replayed: bool | None = Field(
        None,
        description="Only in the answer to a retry with the first request's Idempotency-Key:"
        " the tenant that request made, without its password (shown once).",
    )
    credentials_note: str | None = Field(
        None, description="With replayed: how to get a password (rotate the credentials)."
    )


class HealthCheck(BaseModel):
    check: str
    ok: bool
    detail: Any = None


class TenantHealth(BaseModel):
    name: str
    database: str
    status: str = Field(..., description="healthy, warning or error")
    tenant_status: str
    template: str | None
    template_version: str | None
    size_bytes: int | None
    checks: list[HealthCheck]


# The response models below derive from the service's dataclasses: mypy cannot follow a base
# made at run time (hence the ignores); the OpenAPI document names each class.
class OperationOut(fields_of(Operation)):  # type: ignore[misc]
    pass


class EventOut(BaseModel):
    """A tenant event (see ``monk.service.events``): what observers receive, and its delivery."""

    id: str
    seq: int
    type: str
    tenant: dict[str, Any]
    created_at: str
    attempts: int
    next_attempt_at: str
    delivered_at: str | None
    last_error: str | None


class HostHealth(BaseModel):
    name: str
    state: str = Field(..., description="active or draining (the registry's)")
    reachable: bool = Field(..., description="monk could connect to it just now")
    server_version: str | None = None
    error: str | None = Field(default=None, description="why not reachable")
    error_code: str | None = Field(default=None, description="HOST_UNAVAILABLE, …")


class ServiceHealth(BaseModel):
    status: str
    database: str
    server_version: str | None = None
    error: str | None = None
    hosts: list[HostHealth] | None = Field(
        default=None,
        description="Each host: the local one first, then the fleet's (absent when the "
        "system database cannot be read). A host that is down does not make /health fail: "
        "its tenants get HOST_UNAVAILABLE, the others are served.",
    )
    server_restarts: int | None = Field(
        default=None,
        description="Restarts of the embedded server by this monk serve (absent: external server)",
    )
    last_restart_reason: str | None = None
    last_restart_at: str | None = Field(
        default=None, description="ISO 8601 time of the last restart"
    )


class ServiceHealthFailure(Failure):
    """/health's 503: the failure envelope, with the health body still under ``data``."""

    data: ServiceHealth


class TemplateBuildRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    force: bool = Field(False, description="Rebuild even when the current build has the version.")


_TEMPLATE_BUILD_FIELDS = fields_of(
    TemplateBuild,
    version=(str, Field(..., description="Content hash of the source and the compiler.")),
    status=(Literal["building", "ready", "failed", "retired", "dropped"], ...),
    is_current=(bool, Field(..., description="The build new tenants are cloned from.")),
    source=(
        Literal["builtin", "MONK_TEMPLATE_PATH", "--source"] | None,
        Field(
            ...,
            description="Where the build's source folder is: built in, in MONK_TEMPLATE_PATH, "
            "or a folder given to 'monk template build KEY --source DIR' (the path is not shown).",
        ),
    ),
)


class TemplateBuildOut(_TEMPLATE_BUILD_FIELDS):  # type: ignore[misc, valid-type]
    """One build of a template (a row of ``template_builds``)."""


class TemplateBuildResultOut(TemplateBuildOut):
    built: bool = Field(
        ..., description="false: the current build already had this version (nothing done)."
    )
    hosts: list[dict[str, Any]] | None = Field(
        None,
        description="With hosts in the fleet: each host's answer (host, built, version, status, "
        "or error {code, message}); the build above is the local host's.",
    )


class TemplateCheckOut(BaseModel):
    """The health checks re-run on a scratch clone of the current build."""

    database: str
    ok: bool
    table_count: int
    record_count: int
    counts: dict[str, int] = Field(..., description="Rows per table of the clone.")
    problems: list[str]


class DriftDifferenceOut(BaseModel):
    kind: str = Field(..., description="table, column, constraint, index, trigger, schemas row…")
    subject: str = Field(..., description="The object's name (`table.column` for a column).")
    change: str = Field(..., description="added, missing, or what differs.")
    detail: str
    text: str = Field(..., examples=["column contact.note: added (text)"])


class DriftOut(BaseModel):
    """A tenant's drift check: its catalog compared with the build it claims to be at."""

    name: str
    database: str
    template_key: str | None
    template_version: str | None = Field(..., description="The build the tenant claims.")
    drifted: bool | None = Field(..., description="null: not compared (see `error`).")
    differences: list[DriftDifferenceOut]
    fingerprint: str | None = Field(..., description="sha256 of the tenant's catalog.")
    error: str | None
    checked_at: str
    status: str | None = None
    claimed_by: Literal["database", "registry"] | None = Field(
        default=None,
        description="Where the claim was read: the tenant's `monk.build` row, or the registry "
        "(a tenant cloned before monk kept one).",
    )
    expected_fingerprint: str | None = None


class FleetCountOut(BaseModel):
    version: str
    level: int
    status: str
    count: int
    current: bool


class FleetBuildOut(BaseModel):
    version: str
    status: str
    is_current: bool
    level: int
    retired_at: str | None
    tenants: int
    spares: int


class FleetCurrentOut(BaseModel):
    version: str
    level: int
    built_at: str | None
    fingerprint: str | None


class FleetBehindOut(BaseModel):
    count: int
    tenants: list[str]


class FleetDriftOut(BaseModel):
    checked: int
    drifted: int
    clean: int
    not_compared: int
    last_checked_at: str | None
    drifted_tenants: list[str]


class TemplateStatusOut(BaseModel):
    """Where the tenants of a key are, from the system database alone."""

    key: str
    current: FleetCurrentOut | None
    builds: list[FleetBuildOut]
    total: int
    tenants: list[FleetCountOut] = Field(..., description="Per (build, level, status).")
    spares: list[FleetCountOut]
    behind: FleetBehindOut = Field(
        ..., description="Active and disabled tenants at another build than the current one."
    )
    drift: FleetDriftOut = Field(..., description="The last drift check of each tenant.")
    hosts: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Each host with the key's build or tenants: host, current_version, tenants, "
        "behind (the counts above are over every host).",
    )


class HostCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        ...,
        description="Host name: lower-case letters, digits and '-', starting with a letter.",
        examples=["pg-eu-2"],
    )
    url: str = Field(
        ...,
        description="Admin URL of the server (its password is stored apart and never shown).",
        examples=["postgresql://monk_admin:secret@127.0.0.1:5433/postgres"],
    )
    password: str | None = Field(None, description="The admin role's password, if not in the URL.")
    capacity: int | None = Field(
        None, ge=0, le=1_000_000, description="Tenants it may hold (default: no limit)."
    )
    labels: dict[str, str] = Field(
        default_factory=dict, description='Labels for placement, e.g. {"zone": "eu-1"}.'
    )
    templates: bool = Field(
        True,
        description="Build the local host's current templates there, as 'monk host add' does "
        "(false: as --no-templates).",
    )


class HostPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    capacity: int | None = Field(
        None, ge=0, le=1_000_000, description="Tenants it may hold; null: no limit."
    )
    labels: dict[str, str] | None = Field(None, description="Replaces every label.")


class HostLastCheck(BaseModel):
    at: str | None
    ok: bool | None
    error: str | None
    latency_ms: float | None


class HostFileCloning(BaseModel):
    supported: bool | None = Field(
        description="The server clones files (PostgreSQL 18's file_copy_method = clone on a "
        "reflink filesystem): its clones are FILE_COPY + clone. null: not detected yet."
    )
    detail: str | None = Field(description="How it was found.")
    at: str | None


class HostOut(BaseModel):
    name: str
    local: bool = Field(description="The server monk starts with: it keeps the system database.")
    url: str = Field(description="The admin URL, without its password.")
    state: Literal["active", "draining"]
    capacity: int | None
    tenants: int = Field(description="Live tenants the registry records on this host.")
    free: int | None
    labels: dict[str, str]
    server_version: str | None
    added_at: str | None
    last_check: HostLastCheck
    templates: list[dict[str, Any]] | None = Field(
        None,
        description="Answer to an add only: each current template built there (host, key, "
        "built, version, status, or error {code, message}); a failed build leaves the host added.",
    )
    file_cloning: HostFileCloning


class HostDrainRequest(BaseModel):
    """``POST /api/root/host/{name}/drain``: ``monk host drain NAME``."""

    model_config = ConfigDict(extra="forbid")

    move: bool = Field(
        default=True, description="Move its tenants off; false: only mark it draining."
    )
    parallel: int = Field(default=2, ge=1, le=32, description="Moves at once.")


class HostDrainOut(HostOut):
    operation_id: str | None = Field(
        None,
        description="The drain's operation (GET /api/root/operations/{id}: result.total, "
        "done, moved, failed); null when only marked.",
    )
    moving: int | None = Field(None, description="Tenants the drain moves off; null: none moved.")


class HostCheckOut(BaseModel):
    name: str
    ok: bool
    reachable: bool
    state: Literal["active", "draining"]
    server_version: str | None
    connect_ms: float | None
    latency_ms: float | None
    tenants: int
    capacity: int | None
    free: int | None
    error: str | None
    problems: list[str]


class TemplateUpgradeRequest(BaseModel):
    """``POST /api/root/template/{key}/upgrade``: the options of ``monk template upgrade``."""

    model_config = ConfigDict(extra="forbid")

    to_version: str | None = Field(
        default=None, description="The build to bring tenants to (default: the current build)."
    )
    tenants: list[str] = Field(
        default_factory=list, description="Only these tenants (default: every tenant of the key)."
    )
    canary: int = Field(
        default=0,
        ge=0,
        le=10_000,
        description="Upgrade this many first; any failure stops the run.",
    )
    parallel: int = Field(
        default=DEFAULT_PARALLEL, ge=1, le=64, description="Tenants upgraded at once."
    )
    on_error: Literal["stop", "continue"] = Field(
        default="stop",
        description="stop: schedule no more after a failure; continue: finish the rest.",
    )


class UpgradeTenantOut(BaseModel):
    name: str
    database: str
    state: Literal["pending", "running", "done", "failed", "skipped"]
    from_version: str | None
    to_version: str | None
    level: int | None
    reason: str | None = Field(description="failed: the error; skipped: why.")
    attempts: int
    canary: bool


class TemplateUpgradeOut(BaseModel):
    """A fleet upgrade run: its progress and per-tenant results."""

    operation_id: str | None
    template: str
    to_version: str
    state: Literal["running", "done", "failed", "dead"] = Field(
        description="dead: its process is gone before it finished; the same upgrade again "
        "(or `monk doctor --repair`) resumes it."
    )
    resumed: bool
    counts: dict[str, int]
    error: str | None
    elapsed_s: float | None
    tenants: list[UpgradeTenantOut]


class TemplateUpgradeStartedOut(BaseModel):
    operation_id: str
    template: str
    to_version: str
    resumed: bool = Field(description="An unfinished run of the key, resumed (not a new one).")


class TenantMoveRequest(BaseModel):
    """``POST /api/root/tenant/{name}/move``: ``monk tenant move NAME --to HOST``."""

    model_config = ConfigDict(extra="forbid")

    to: str = Field(description="The host to move the tenant to ('GET /api/root/host').")
    jobs: int | None = Field(
        default=None,
        ge=1,
        le=16,
        description="pg_dump/pg_restore -j (default: 1, or 4 from 256 MiB on).",
    )


class TenantMoveStartedOut(BaseModel):
    operation_id: str
    tenant: str
    from_host: str
    to_host: str
    credentials: str = Field(
        description="kept: the tenant's password keeps working; rotated: the source's admin "
        "cannot read pg_authid, so connection_url holds the new one (shown once, valid once "
        "the move is done)."
    )
    connection_url: str | None = None


class OperationDetailOut(OperationOut):
    upgrade: TemplateUpgradeOut | None = Field(
        default=None, description="For a template_upgrade operation: the run's per-tenant results."
    )
