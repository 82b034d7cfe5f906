"""The doctor's rules: what is inconsistent between the registry and the server, decided over
a snapshot of both (pure: no I/O). ``service/doctor.py`` takes the snapshot and repairs.

The rules read a snapshot's rows through the protocols below (the registry's ``Tenant``, the
admin adapter's ``DatabaseState`` and ``RoleState``, the pool's spare rows fit them), so the
core imports nothing of the adapters.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from monk.core import lifecycle
from monk.core.lifecycle import SETTLED, TenantStatus

# Events undelivered for longer than this while observers are configured are a problem.
EVENT_BACKLOG_S = 600


class TenantRow(Protocol):
    """What the rules read of a registry row."""

    @property
    def name(self) -> str: ...
    @property
    def database(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def role_name(self) -> str | None: ...
    @property
    def step(self) -> str | None: ...
    @property
    def template_key(self) -> str | None: ...
    @property
    def template_version(self) -> str | None: ...
    @property
    def connection_limit(self) -> int | None: ...


class SpareRowFacts(Protocol):
    @property
    def database(self) -> str: ...
    @property
    def status(self) -> str: ...


class DatabaseFacts(Protocol):
    """What the server really has for a database."""

    @property
    def allow_connections(self) -> bool: ...
    @property
    def is_template(self) -> bool: ...
    @property
    def owner(self) -> str: ...
    @property
    def grants(self) -> frozenset[tuple[str, str]]: ...
    @property
    def settings(self) -> Mapping[str, str]: ...
    @property
    def invalid(self) -> bool: ...
    @property
    def comment(self) -> str | None: ...
    def public_may_connect(self) -> bool: ...


class RoleFacts(Protocol):
    @property
    def can_login(self) -> bool: ...
    @property
    def connection_limit(self) -> int: ...


class DriftFacts(Protocol):
    """What the rules read of a tenant's last drift check."""

    @property
    def name(self) -> str: ...
    @property
    def database(self) -> str: ...
    @property
    def template_version(self) -> str | None: ...
    @property
    def drifted(self) -> bool | None: ...
    @property
    def differences(self) -> Sequence[Mapping[str, str]]: ...
    @property
    def registry_version(self) -> str | None: ...


@dataclass(frozen=True)
class Problem:
    kind: str  # stuck_operation | missing_database | missing_role | orphan_database | ...
    subject: str  # database, role or template name
    detail: str
    repair: str  # what --repair does about it
    tenants: tuple[str, ...] = ()  # the tenants concerned, when the subject is a template key
    host: str | None = None  # the host it was found on (set by the doctor, per host)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "subject": self.subject,
            "host": self.host,
            "detail": self.detail,
            "repair": self.repair,
        }
        if self.tenants:
            out["tenants"] = list(self.tenants)
        return out


@dataclass(frozen=True)
class Snapshot:
    """The registry and the server, read once (``service.doctor.take_snapshot``)."""

    tenants: tuple[TenantRow, ...]
    crashed: frozenset[str]  # databases of provisioning/deleting rows whose worker is gone
    queued_purges: frozenset[str]  # databases with a queued purge job
    databases: frozenset[str]  # tenant_* databases on the server that are ours (or unmarked)
    roles: frozenset[str]  # tenant_* roles that are ours (or unmarked)
    template_leftovers: tuple[str, ...]
    crashed_spares: tuple[SpareRowFacts, ...]  # creator or claimer gone
    spare_databases: frozenset[str]  # monk_spare_* databases and roles that are ours
    spare_roles: frozenset[str]
    spare_names: frozenset[str]  # databases named by spare rows
    pooled_roles: frozenset[str] = frozenset()  # monk_role_* roles that are ours
    pooled_role_rows: frozenset[str] = frozenset()  # roles named by spare_roles rows
    # unclaimed spare_roles rows of a dead keyholder whose role is not on the server
    lost_role_rows: frozenset[str] = frozenset()
    # unclaimed spare_roles rows of a dead keyholder whose role is on the server: nobody knows
    # its password any more (it lived in the dead process's memory)
    dead_role_rows: frozenset[str] = frozenset()
    # events undelivered for over EVENT_BACKLOG_S while observers are configured
    stale_events: int = 0
    stale_events_error: str | None = None
    # What the server really has for tenant, spare and template databases and tenant roles.
    db_states: Mapping[str, DatabaseFacts] = field(default_factory=dict)
    role_states: Mapping[str, RoleFacts] = field(default_factory=dict)
    admin_role: str = ""
    default_connection_limit: int = -1
    current_templates: tuple[str, ...] = ()  # databases of the current template builds
    # Databases outside monk's tenants and templates that PUBLIC (every tenant role) may
    # connect to, and the connection reserves (warnings: the server may not be monk's).
    public_databases: tuple[str, ...] = ()
    reserves: Mapping[str, object] = field(default_factory=dict)
    # What one monk process may open: its connection budget and its two pools (0: unknown).
    own_connections: int = 0
    # database settings each template build (key, version) gives its clones
    build_settings: Mapping[tuple[str, str], Mapping[str, str]] = field(default_factory=dict)
    # the version of each key's current build, and the last drift check of each live tenant
    current_versions: Mapping[str, str] = field(default_factory=dict)
    drift_checks: tuple[DriftFacts, ...] = ()
    # queued purges that failed: database -> (failed attempts, the last error)
    failing_purges: Mapping[str, tuple[int, str]] = field(default_factory=dict)
    # the ownership mark configure writes on every tenant database (None: not checked)
    mark: str | None = None


def access_drift(
    tenant: TenantRow,
    db: DatabaseFacts | None,
    role: RoleFacts | None,
    admin_role: str,
    connection_limit: int,
    settings: Mapping[str, str] | None = None,
    mark: str | None = None,
) -> list[str]:
    """Pure: how the tenant's database and role differ from what monk set for its status
    (active: connections allowed, LOGIN; disabled, trashed: neither; both: the role owns the
    database, nobody but the role and monk's admin has a grant, the role's connection limit,
    the template build's database ``settings`` (None: unknown) with their values, and the
    ownership ``mark`` (None: not checked), which only configure writes: a database without it
    lost its configure (on a host of the fleet that commit does not wait for the disk, so a
    host crash right after a provision can take it; the repair runs it again)."""
    if db is None or db.invalid or not tenant.role_name:
        return []
    is_open = lifecycle.is_open(tenant.status)
    out = []
    if mark is not None and db.comment != mark:
        out.append("database lacks monk's mark: its configure did not commit")
    if db.allow_connections != is_open:
        out.append(
            f"database {'allows' if db.allow_connections else 'refuses'} connections "
            f"while {tenant.status}"
        )
    if role is not None and role.can_login != is_open:
        out.append(f"role {'can' if role.can_login else 'cannot'} log in while {tenant.status}")
    if db.owner != tenant.role_name:
        out.append(f"database owned by {db.owner}, not {tenant.role_name}")
    others = sorted({f"{g} {p}" for g, p in db.grants if g not in (tenant.role_name, admin_role)})
    if others:
        out.append(f"grants monk did not set: {', '.join(others)}")
    if (tenant.role_name, "CONNECT") not in db.grants:
        out.append(f"{tenant.role_name} may not CONNECT")
    if role is not None and role.connection_limit != connection_limit:
        out.append(f"role connection limit {role.connection_limit}, not {connection_limit}")
    for key, value in sorted((settings or {}).items()):
        have = db.settings.get(key.lower())
        if have != value:
            out.append(f"setting {key} is {'unset' if have is None else repr(have)}, not {value!r}")
    return out


def diagnose(snap: Snapshot) -> list[Problem]:
    """Pure: every inconsistency in the snapshot."""
    problems: list[Problem] = []
    live_dbs = {t.database for t in snap.tenants}
    live_roles = {t.role_name for t in snap.tenants if t.role_name}
    for t in snap.tenants:
        if t.database in snap.crashed:
            if t.status == TenantStatus.PROVISIONING:
                problems.append(
                    Problem(
                        "stuck_operation",
                        t.database,
                        f"provisioning of {t.name!r} stopped after step {t.step!r}: "
                        "its process is gone",
                        "undo: drop database and role, remove the row",
                    )
                )
            elif t.database in snap.failing_purges:
                attempts, error = snap.failing_purges[t.database]
                problems.append(
                    Problem(
                        "failing_purge",
                        t.database,
                        f"purge of {t.name!r} failed {attempts} "
                        f"{'attempt' if attempts == 1 else 'attempts'}, last: {error}",
                        "try the purge now (it stays queued, retried with backoff)",
                    )
                )
            elif t.database in snap.queued_purges:
                problems.append(
                    Problem(
                        "queued_purge",
                        t.database,
                        f"purge of {t.name!r} is queued",
                        "run the purge now",
                    )
                )
            else:
                problems.append(
                    Problem(
                        "stuck_operation",
                        t.database,
                        f"purge of {t.name!r} has no queued job",
                        "finish: drop database and role, mark deleted",
                    )
                )
        elif t.status in SETTLED:
            state = snap.db_states.get(t.database)
            if state is not None and state.invalid:
                problems.append(
                    Problem(
                        "invalid_database",
                        t.database,
                        f"database of tenant {t.name!r} ({t.status}) is invalid: an "
                        "interrupted DROP DATABASE left it; its data is gone",
                        "drop it and mark the tenant deleted",
                    )
                )
                continue
            drift = access_drift(
                t,
                state,
                snap.role_states.get(t.role_name or ""),
                snap.admin_role,
                t.connection_limit or snap.default_connection_limit,
                snap.build_settings.get((t.template_key or "", t.template_version or "")),
                snap.mark,
            )
            if drift:
                problems.append(
                    Problem(
                        "access_drift",
                        t.database,
                        f"tenant {t.name!r} is {t.status} but: {'; '.join(drift)}",
                        f"restore what monk sets for a {t.status} tenant",
                    )
                )
            if t.database not in snap.databases:
                problems.append(
                    Problem(
                        "missing_database",
                        t.database,
                        f"tenant {t.name!r} is {t.status} but its database is missing",
                        "mark the tenant deleted (its name becomes free)",
                    )
                )
            if t.role_name and t.role_name not in snap.roles:
                problems.append(
                    Problem(
                        "missing_role",
                        t.role_name,
                        f"role of tenant {t.name!r} is missing",
                        "none: rotate credentials to recreate it",
                    )
                )
    for db in sorted(snap.databases - live_dbs):
        state = snap.db_states.get(db)
        invalid = " (invalid: an interrupted DROP DATABASE)" if state and state.invalid else ""
        problems.append(
            Problem(
                "orphan_database",
                db,
                f"tenant database with no live registry row{invalid}",
                "drop it",
            )
        )
    for name in snap.current_templates:
        state = snap.db_states.get(name)
        if state is None:
            continue
        opened = []
        if state.allow_connections:
            opened.append("allows connections")
        if state.public_may_connect():
            opened.append("grants CONNECT to PUBLIC")
        if not state.is_template:
            opened.append("is not marked IS_TEMPLATE")
        if opened:
            problems.append(
                Problem(
                    "open_template",
                    name,
                    f"current template build {' and '.join(opened)}",
                    "close it: no connections, CONNECT revoked from PUBLIC, IS_TEMPLATE",
                )
            )
    for role in sorted(snap.roles - live_roles):
        problems.append(
            Problem("stray_role", role, "tenant role with no live registry row", "drop it")
        )
    crashed_spare_dbs = {row.database for row in snap.crashed_spares}
    for name in sorted(snap.spare_names - crashed_spare_dbs):
        state = snap.db_states.get(name)
        if state is not None and state.invalid:
            problems.append(
                Problem(
                    "invalid_database",
                    name,
                    "warm-pool spare is invalid: an interrupted DROP DATABASE left it",
                    "drop the spare and its row",
                )
            )
    for row in snap.crashed_spares:
        problems.append(
            Problem(
                "stuck_spare",
                row.database,
                f"warm-pool spare left {row.status} by a process that is gone",
                "drop the spare and its row",
            )
        )
    for name in sorted((snap.spare_databases | snap.spare_roles) - snap.spare_names):
        problems.append(
            Problem("orphan_spare", name, "warm-pool spare with no registry row", "drop it")
        )
    for name in sorted(snap.pooled_roles - snap.pooled_role_rows):
        problems.append(
            Problem("orphan_spare_role", name, "spare role with no registry row", "drop it")
        )
    for name in sorted(snap.lost_role_rows):
        problems.append(
            Problem(
                "lost_spare_role",
                name,
                "spare role row whose role is not on the server (its maker died)",
                "delete the row",
            )
        )
    for name in sorted(snap.dead_role_rows):
        problems.append(
            Problem(
                "dead_spare_role",
                name,
                "spare role of a process that is gone (its password died with it)",
                "drop the role, then its row",
            )
        )
    if snap.stale_events:
        problems.append(
            Problem(
                "undelivered_events",
                "events",
                f"{snap.stale_events} tenant event(s) undelivered for over "
                f"{EVENT_BACKLOG_S // 60} minutes (is monk serve running? last error: "
                f"{snap.stale_events_error or 'none'})",
                "none: fix the webhook or run monk serve; delivery retries by itself",
            )
        )
    for name in snap.template_leftovers:
        problems.append(
            Problem(
                "template_leftover", name, "leftover of an interrupted template build", "drop it"
            )
        )
    problems += drifted(snap.drift_checks)
    return problems


# Statuses of the tenants an upgrade brings forward (a trashed one follows when restored).
UPGRADED_STATUSES = frozenset({TenantStatus.ACTIVE, TenantStatus.DISABLED})


def behind_current(
    tenants: Iterable[TenantRow], current_versions: Mapping[str, str]
) -> dict[str, list[str]]:
    """Per template key, the names (sorted) of the active and disabled tenants the registry
    records at another build than the key's current one."""
    out: dict[str, list[str]] = {}
    for t in tenants:
        key = t.template_key
        if t.status not in UPGRADED_STATUSES or key is None or key not in current_versions:
            continue
        if t.template_version != current_versions[key]:
            out.setdefault(key, []).append(t.name)
    return {key: sorted(names, key=str.casefold) for key, names in sorted(out.items())}


def drifted(checks: Iterable[DriftFacts]) -> list[Problem]:
    """A tenant whose last drift check found differences. monk repairs none: the change was
    made by hand, and only its author knows whether to undo it or make it the template's."""
    out = []
    for c in checks:
        if not c.drifted:
            continue
        detail = (
            f"tenant {c.name!r} differs from its build {c.template_version}: "
            + "; ".join(d.get("text", "") for d in list(c.differences)[:3])
            + (f"; and {len(c.differences) - 3} more" if len(c.differences) > 3 else "")
        )
        if c.registry_version != c.template_version:
            # Upgraded (or restored) since: the finding may be out of date.
            detail += f" (checked at that build; the registry now records {c.registry_version})"
        out.append(
            Problem(
                "drifted",
                c.database,
                detail,
                "none: undo the change in the tenant's database, or make it a migration file "
                "of the template, build and upgrade; `monk tenant drift NAME` checks again",
            )
        )
    return out


def behind_warnings(snap: Snapshot) -> list[Problem]:
    return [
        Problem(
            "behind_build",
            key,
            f"{len(names)} tenant(s) of {key} are not at its current build "
            f"{snap.current_versions[key]}",
            f"none: `monk template upgrade {key}` brings them forward",
            tuple(names),
        )
        for key, names in behind_current(snap.tenants, snap.current_versions).items()
    ]


def warnings(snap: Snapshot) -> list[Problem]:
    """Pure: what monk cannot decide for a server it may not own, and tenants behind their
    key's current build (a state between a build and its upgrade); reported, never repaired,
    and not a reason for a non-zero exit."""
    out: list[Problem] = behind_warnings(snap)
    if snap.public_databases:
        out.append(
            Problem(
                "open_to_public",
                ", ".join(snap.public_databases),
                "PUBLIC may connect to these databases, so every tenant role can open a session "
                "there (a session on template1 blocks CREATE DATABASE from it)",
                "none: REVOKE CONNECT ON DATABASE … FROM PUBLIC where tenants have no business",
            )
        )
    r = snap.reserves
    if r and not r.get("superuser") and not (r.get("may_use_reserved") and r.get("reserved")):
        out.append(
            Problem(
                "no_reserved_connections",
                snap.admin_role,
                "monk's admin is not a superuser and has no reserved connections "
                f"(reserved_connections = {r.get('reserved')}, pg_use_reserved_connections "
                f"{'granted' if r.get('may_use_reserved') else 'not granted'}): tenants "
                "that fill max_connections lock monk out",
                "none: on PostgreSQL 16+ set reserved_connections and GRANT "
                "pg_use_reserved_connections to monk's admin",
            )
        )
    ordinary = _ordinary_slots(r)
    if ordinary is not None and snap.own_connections > ordinary:
        out.append(
            Problem(
                "connection_budget_too_large",
                snap.admin_role,
                f"one monk process may open {snap.own_connections} connections (its "
                "connection budget MONK_HOST_CONNECTIONS and its two pools of MONK_POOL_SIZE) "
                f"but the server has {ordinary} beside its reserves: under load the budget "
                "takes the reserve monk's admin is kept",
                "none: lower MONK_HOST_CONNECTIONS or raise max_connections "
                "(docs/configuration.md: sizing the connection budget)",
            )
        )
    return out


def _ordinary_slots(r: Mapping[str, object]) -> int | None:
    """max_connections less its reserves, if the snapshot read them."""
    try:
        return (
            int(str(r["max_connections"]))
            - int(str(r["superuser_reserved"]))
            - int(str(r.get("reserved", 0)))
        )
    except (KeyError, ValueError):
        return None
