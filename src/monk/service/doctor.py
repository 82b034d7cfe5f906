"""Reconciliation: compare the registry with the server, report each inconsistency, repair it.

The state is read once into an immutable snapshot; problems are decided over it (pure), and
repairs are the lifecycle's own finish/undo steps, each under the tenant's advisory lock so a
repair never races a live operation. The same reconciliation runs when the service starts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from monk.adapters import registry
from monk.adapters.postgres import admin
from monk.adapters.postgres.admin import DatabaseState, RoleState
from monk.adapters.registry import Tenant
from monk.core.tenant_names import is_tenant_database
from monk.service import pool, role_pool
from monk.service import templates as template_service
from monk.service.tenants import TenantService

log = logging.getLogger(__name__)

SETTLED = ("active", "disabled", "trashed")
_EVENT_BACKLOG_S = 600


@dataclass(frozen=True)
class Problem:
    kind: str  # stuck_operation | missing_database | missing_role | orphan_database | ...
    subject: str  # database, role or template name
    detail: str
    repair: str  # what --repair does about it

    def as_dict(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "subject": self.subject,
            "detail": self.detail,
            "repair": self.repair,
        }


@dataclass(frozen=True)
class Snapshot:
    tenants: tuple[Tenant, ...]
    crashed: frozenset[str]  # databases of provisioning/deleting rows whose worker is gone
    queued_purges: frozenset[str]  # databases with a queued purge job
    databases: frozenset[str]  # tenant_* databases on the server that are ours (or unmarked)
    roles: frozenset[str]  # tenant_* roles that are ours (or unmarked)
    template_leftovers: tuple[str, ...]
    crashed_spares: tuple[pool.SpareRow, ...]  # creator or claimer gone
    spare_databases: frozenset[str]  # monk_spare_* databases and roles that are ours
    spare_roles: frozenset[str]
    spare_names: frozenset[str]  # databases named by spare rows
    pooled_roles: frozenset[str] = frozenset()  # monk_role_* roles that are ours
    pooled_role_rows: frozenset[str] = frozenset()  # roles named by spare_roles rows
    # events undelivered for over _EVENT_BACKLOG_S while observers are configured
    stale_events: int = 0
    stale_events_error: str | None = None
    # What the server really has for tenant, spare and template databases and tenant roles.
    db_states: Mapping[str, DatabaseState] = field(default_factory=dict)
    role_states: Mapping[str, RoleState] = field(default_factory=dict)
    admin_role: str = ""
    default_connection_limit: int = -1
    current_templates: tuple[str, ...] = ()  # databases of the current template builds
    # Databases outside monk's tenants and templates that PUBLIC (every tenant role) may
    # connect to, and the connection reserves (warnings: the server may not be monk's).
    public_databases: tuple[str, ...] = ()
    reserves: Mapping[str, object] = field(default_factory=dict)
    # database settings each template build (key, version) gives its clones
    build_settings: Mapping[tuple[str, str], Mapping[str, str]] = field(default_factory=dict)


def take_snapshot(svc: TenantService) -> Snapshot:
    pools = svc.hosts.pools()
    mark = svc.ownership_mark()
    with pools.system() as reg:
        tenants = tuple(registry.all_live(reg, pools.target.name))
        crashed = set()
        for t in tenants:
            if t.status in ("provisioning", "deleting") and registry.try_lock(reg, t.database):
                registry.unlock(reg, t.database)
                crashed.add(t.database)
        spares = pool.spare_rows(reg, pools.target.name)
        by_id = {t.id: t for t in tenants}
        crashed_spares = []
        for row in spares:
            if row.status == "ready":
                continue
            holder = by_id.get(row.tenant_id) if row.tenant_id else None
            lock_name = holder.database if holder is not None else row.database
            if registry.try_lock(reg, lock_name):
                registry.unlock(reg, lock_name)
                crashed_spares.append(row)
        stale_events, stale_error = 0, None
        if svc.settings.hooks:
            backlog = reg.execute(
                "SELECT count(*), (array_agg(last_error ORDER BY seq DESC))[1] FROM events"
                " WHERE delivered_at IS NULL"
                " AND created_at < now() - make_interval(secs => %s)",
                (_EVENT_BACKLOG_S,),
            ).fetchone()
            if backlog is not None:
                stale_events, stale_error = int(backlog[0]), backlog[1]
        # Rows before roles: a spare role made in between (role and row commit together) is
        # seen as a role without a row, which the repair checks again under the row's lock.
        role_rows = frozenset(
            str(r[0]) for r in reg.execute("SELECT role FROM spare_roles").fetchall()
        )
        queued = {
            op.database
            for op in registry.list_operations(reg, states=["queued"], kind="purge", limit=10_000)
            if op.database
        }
        current_templates = tuple(
            b.database for b in template_service.current_builds(reg, pools.target.name)
        )
        build_settings = template_service.settings_by_build(reg, pools.target.name)
    with pools.admin() as adm:
        all_dbs = admin.database_states(adm)
        all_roles = admin.role_states(adm)
        admin_role = admin.current_role(adm)
        reserves = admin.reserved_connections(adm)
    # Names carrying this installation's mark, or no mark (a crash right after CREATE, before
    # COMMENT): another installation's objects on a shared server are left alone.
    db_rows = {n for n, st in all_dbs.items() if st.comment in (None, mark)}
    server_roles = {n for n, st in all_roles.items() if st.comment in (None, mark)}
    leftovers = tuple(template_service.find_leftovers(pools.target, svc.settings))
    ours = {n for n in db_rows if is_tenant_database(n) or pool.is_spare_name(n)}
    ours |= {t.database for t in tenants} | set(current_templates)
    public = tuple(
        sorted(
            n
            for n, st in all_dbs.items()
            if st.allow_connections
            and st.public_may_connect()
            and not is_tenant_database(n)
            and not pool.is_spare_name(n)
            and n not in current_templates
        )
    )
    return Snapshot(
        tenants=tenants,
        crashed=frozenset(crashed),
        queued_purges=frozenset(queued),
        databases=frozenset(n for n in db_rows if is_tenant_database(n)),
        roles=frozenset(n for n in server_roles if is_tenant_database(n)),
        template_leftovers=leftovers,
        crashed_spares=tuple(crashed_spares),
        spare_databases=frozenset(n for n in db_rows if pool.is_spare_name(n)),
        spare_roles=frozenset(n for n in server_roles if pool.is_spare_name(n)),
        spare_names=frozenset(r.database for r in spares),
        pooled_roles=frozenset(n for n in server_roles if role_pool.is_spare_role_name(n)),
        pooled_role_rows=role_rows,
        stale_events=stale_events,
        stale_events_error=str(stale_error) if stale_error is not None else None,
        db_states={n: st for n, st in all_dbs.items() if n in ours},
        role_states={n: st for n, st in all_roles.items() if is_tenant_database(n)},
        admin_role=admin_role,
        default_connection_limit=svc.settings.tenant_connection_limit,
        current_templates=current_templates,
        public_databases=public,
        reserves=reserves,
        build_settings=build_settings,
    )


def access_drift(
    tenant: Tenant,
    db: DatabaseState | None,
    role: RoleState | None,
    admin_role: str,
    connection_limit: int,
    settings: Mapping[str, str] | None = None,
) -> list[str]:
    """Pure: how the tenant's database and role differ from what monk set for its status
    (active: connections allowed, LOGIN; disabled, trashed: neither; both: the role owns the
    database, nobody but the role and monk's admin has a grant, the role's connection limit,
    the template build's database ``settings`` (None: unknown) with their values)."""
    if db is None or db.invalid or not tenant.role_name:
        return []
    is_open = tenant.status == "active"
    out = []
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
            if t.status == "provisioning":
                problems.append(
                    Problem(
                        "stuck_operation",
                        t.database,
                        f"provisioning of {t.name!r} stopped after step {t.step!r}: "
                        "its process is gone",
                        "undo: drop database and role, remove the row",
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
    if snap.stale_events:
        problems.append(
            Problem(
                "undelivered_events",
                "events",
                f"{snap.stale_events} tenant event(s) undelivered for over "
                f"{_EVENT_BACKLOG_S // 60} minutes (is monk serve running? last error: "
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
    return problems


def warnings(snap: Snapshot) -> list[Problem]:
    """Pure: what monk cannot decide for a server it may not own; reported, never repaired,
    and not a reason for a non-zero exit."""
    out: list[Problem] = []
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
    return out


def repair(svc: TenantService, problems: list[Problem]) -> list[str]:
    """Fix each problem with the lifecycle's own steps; returns what was done."""
    from monk.service.purge import work_queue

    done: list[str] = []
    pools = svc.hosts.pools()
    by_db = {}
    with pools.system() as reg:
        by_db = {t.database: t for t in registry.all_live(reg, pools.target.name)}
    for p in problems:
        if p.kind in ("stuck_operation", "queued_purge"):
            tenant = by_db.get(p.subject)
            if tenant is None:
                continue
            with pools.system() as reg:
                if not registry.try_lock(reg, tenant.database):
                    done.append(f"{p.subject}: busy, skipped")
                    continue
                try:
                    fresh = registry.get_by_id(reg, tenant.id)
                    if fresh is not None:
                        if fresh.status == "deleting" and p.kind == "stuck_operation":
                            registry.start_operation(
                                reg,
                                "purge",
                                fresh.name_key,
                                database=fresh.database,
                                host=fresh.host,
                                state="queued",
                                params={
                                    "tenant_id": str(fresh.id),
                                    "archive": True,
                                    "forget": False,
                                },
                            )
                        done.append(f"{p.subject}: {svc.repair(reg, pools, fresh)}")
                finally:
                    registry.unlock(reg, tenant.database)
        elif p.kind == "invalid_database" and p.subject in by_db:
            done.append(f"{p.subject}: {_drop_invalid_tenant(svc, by_db[p.subject])}")
        elif p.kind == "access_drift" and p.subject in by_db:
            tenant = by_db[p.subject]
            with pools.system() as reg:
                if not registry.try_lock(reg, tenant.database):
                    done.append(f"{p.subject}: busy, skipped")
                    continue
                try:
                    fresh = registry.get_by_id(reg, tenant.id)
                    if fresh is not None and fresh.status in SETTLED:
                        done.append(f"{p.subject}: {svc.restore_access(fresh)}")
                finally:
                    registry.unlock(reg, tenant.database)
        elif p.kind == "open_template":
            with pools.admin() as adm:
                admin.revoke_public_connect(adm, [p.subject])
                admin.close_database(adm, p.subject, as_template=True)
            done.append(f"{p.subject}: closed")
        elif p.kind == "missing_database":
            tenant = by_db[p.subject]
            with pools.system() as reg:
                registry.update(
                    reg,
                    tenant.id,
                    status="deleted",
                    is_active=False,
                    deleted_at=_now(),
                    step="database missing",
                )
            done.append(f"{p.subject}: marked deleted")
        elif p.kind in ("orphan_database", "stray_role"):
            drop = admin.drop_database if p.kind == "orphan_database" else admin.drop_role
            with pools.system() as reg, pools.admin() as adm:
                # Under the name's lock: a provision that starts now waits for us, not the reverse.
                if not registry.try_lock(reg, p.subject):
                    done.append(f"{p.subject}: busy, skipped")
                    continue
                try:
                    if registry.get_live_by_database(reg, p.subject) is None:
                        drop(adm, p.subject)
                        done.append(f"{p.subject}: dropped")
                finally:
                    registry.unlock(reg, p.subject)
    crashed_spares = {row.database: row for row in _crashed_spare_rows(svc)}
    spare_rows = {}
    if any(p.kind == "invalid_database" for p in problems):
        with pools.system() as reg:
            spare_rows = {r.database: r for r in pool.spare_rows(reg, pools.target.name)}
    for p in problems:
        if p.kind == "invalid_database" and p.subject in spare_rows:
            done.append(f"{p.subject}: {pool.repair_spare(svc, spare_rows[p.subject])}")
        elif p.kind == "stuck_spare" and p.subject in crashed_spares:
            done.append(f"{p.subject}: {pool.repair_spare(svc, crashed_spares[p.subject])}")
        elif p.kind == "orphan_spare":
            with pools.system() as reg, pools.admin() as adm:
                if registry.try_lock(reg, p.subject):
                    try:
                        known = reg.execute(
                            "SELECT 1 FROM spares WHERE database = %s", (p.subject,)
                        ).fetchone()
                        if known is None:
                            admin.drop_database(adm, p.subject)
                            admin.drop_role(adm, p.subject)
                            done.append(f"{p.subject}: dropped")
                    finally:
                        registry.unlock(reg, p.subject)
        elif p.kind == "orphan_spare_role":
            with pools.system() as reg, reg.transaction():
                known = reg.execute(
                    "SELECT 1 FROM spare_roles WHERE role = %s FOR UPDATE", (p.subject,)
                ).fetchone()
                if known is None:
                    with pools.admin() as adm:
                        admin.drop_role(adm, p.subject)
                    done.append(f"{p.subject}: dropped")
    if any(p.kind == "template_leftover" for p in problems):
        for name in template_service.cleanup_leftovers(pools.target, svc.settings):
            done.append(f"{name}: dropped")
    work_queue(svc)
    return done


def _drop_invalid_tenant(svc: TenantService, tenant: Tenant) -> str:
    """A settled tenant whose database an interrupted DROP DATABASE left invalid: its data is
    gone; drop what is left and its role, and mark it deleted (its name becomes free)."""
    pools = svc.hosts.pools(tenant.host)
    with pools.system() as reg:
        if not registry.try_lock(reg, tenant.database):
            return "busy, skipped"
        try:
            fresh = registry.get_by_id(reg, tenant.id)
            if fresh is None or fresh.status not in SETTLED:
                return "changed meanwhile, left alone"
            with pools.admin() as adm:
                if not admin.is_invalid_database(adm, tenant.database):
                    return "no longer invalid, left alone"
                admin.drop_database(adm, tenant.database)
                if tenant.role_name:
                    admin.drop_role(adm, tenant.role_name)
            registry.update(
                reg,
                tenant.id,
                status="deleted",
                is_active=False,
                deleted_at=_now(),
                step="invalid database dropped",
            )
        finally:
            registry.unlock(reg, tenant.database)
    return "invalid database dropped, tenant marked deleted"


def _crashed_spare_rows(svc: TenantService) -> list[pool.SpareRow]:
    pools = svc.hosts.pools()
    with pools.system() as reg:
        return [r for r in pool.spare_rows(reg, pools.target.name) if r.status != "ready"]


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)
