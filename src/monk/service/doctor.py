"""Reconciliation: compare the registry with the server, report each inconsistency, repair it.

The state is read once into an immutable snapshot; problems are decided over it (pure), and
repairs are the lifecycle's own finish/undo steps, each under the tenant's advisory lock so a
repair never races a live operation. The same reconciliation runs when the service starts.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from monk.adapters import registry
from monk.adapters.postgres import admin
from monk.adapters.postgres.pools import ServerPools
from monk.adapters.registry import Tenant, fleet
from monk.adapters.registry import events as outbox
from monk.adapters.registry import reconcile as reconcile_reads
from monk.adapters.registry import spare_roles as spare_role_rows
from monk.adapters.registry import templates as template_builds
from monk.core import lifecycle
from monk.core.lifecycle import SETTLED, Action, TenantStatus
from monk.core.reconcile import EVENT_BACKLOG_S, Problem, Snapshot, access_drift, diagnose, warnings
from monk.core.tenant_names import is_tenant_database
from monk.errors import MonkError
from monk.service import host_templates, moves, pool, role_pool, root_users, upgrades
from monk.service.tenants import TenantService

log = logging.getLogger(__name__)

# The rules are the core's; this module reads the snapshot they decide over, and repairs.
__all__ = ["Problem", "Snapshot", "access_drift", "diagnose", "repair", "take_snapshot", "warnings"]


def take_snapshot(svc: TenantService, host: str | None = None) -> Snapshot:
    """The registry's rows of ``host`` (default: the local one) and that server's objects."""
    pools = svc.hosts.pools(host)
    here = pools.target.name
    local = pools.keeps_registry
    mark = svc.ownership_mark()
    with pools.system() as reg:
        tenants = tuple(registry.all_live(reg, pools.target.name))
        elsewhere = registry.live_databases_elsewhere(reg, pools.target.name)
        crashed = set()
        for t in tenants:
            if t.status in lifecycle.IN_FLIGHT and registry.try_lock(reg, t.database):
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
        if svc.settings.hooks and local:  # the outbox is the registry's, reported once
            stale_events, stale_error = outbox.undelivered_backlog(
                reg, older_than_s=EVENT_BACKLOG_S
            )
        # Rows before roles: a spare role made in between (role and row commit together; on a
        # host of the fleet the row commits first) is seen as a role without a row, which the
        # repair checks again under the row's lock.
        role_row_list = spare_role_rows.rows(reg, None if local else here)
        role_rows = frozenset(r.role for r in role_row_list)
        # A row whose maker died between the row and the role (a host of the fleet): its
        # role never came. A live keyholder's may be being made right now: left alone. A dead
        # keyholder's row whose role is there: a role nobody can claim (its password died with
        # the process), left to the next 'monk serve' before 'dead_spare_role'.
        dead = set(registry.dead_keyholders(reg, svc.instance_id, of="spare_roles"))
        maybe_lost = [r.role for r in role_row_list if r.tenant_id is None and r.keyholder in dead]
        queued_ops = registry.list_operations(reg, states=["queued"], kind="purge", limit=10_000)
        queued_ops = [op for op in queued_ops if (op.host or svc.hosts.local.name) == here]
        queued = {op.database for op in queued_ops if op.database}
        failing = {
            op.database: (op.attempts, op.error or "")
            for op in queued_ops
            if op.database and op.attempts > 0
        }
        current_templates = tuple(
            b.database for b in template_builds.current_builds(reg, pools.target.name)
        )
        build_settings = template_builds.settings_by_build(reg, pools.target.name)
        current_builds = template_builds.current_builds(reg, pools.target.name)
        drift_checks = tuple(fleet.drift_checks(reg, pools.target.name, drifted_only=True))
    with pools.admin() as adm:
        all_dbs = admin.database_states(adm)
        all_roles = admin.role_states(adm)
        admin_role = admin.current_role(adm)
        reserves = admin.reserved_connections(adm)
    # Names carrying this installation's mark, or no mark (a crash right after CREATE, before
    # COMMENT): another installation's objects on a shared server are left alone.
    db_rows = {n for n, st in all_dbs.items() if st.comment in (None, mark)}
    server_roles = {n for n, st in all_roles.items() if st.comment in (None, mark)}
    leftovers = tuple(host_templates.service_of(svc, here).find_leftovers())
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
        databases=frozenset(n for n in db_rows if is_tenant_database(n) and n not in elsewhere),
        roles=frozenset(n for n in server_roles if is_tenant_database(n) and n not in elsewhere),
        template_leftovers=leftovers,
        crashed_spares=tuple(crashed_spares),
        spare_databases=frozenset(n for n in db_rows if pool.is_spare_name(n)),
        spare_roles=frozenset(n for n in server_roles if pool.is_spare_name(n)),
        spare_names=frozenset(r.database for r in spares),
        pooled_roles=frozenset(n for n in server_roles if role_pool.is_spare_role_name(n)),
        pooled_role_rows=role_rows,
        lost_role_rows=frozenset(r for r in maybe_lost if r not in all_roles),
        dead_role_rows=frozenset(r for r in maybe_lost if r in all_roles),
        stale_events=stale_events,
        stale_events_error=stale_error,
        db_states={n: st for n, st in all_dbs.items() if n in ours},
        role_states={n: st for n, st in all_roles.items() if is_tenant_database(n)},
        admin_role=admin_role,
        default_connection_limit=svc.settings.tenant_connection_limit,
        current_templates=current_templates,
        public_databases=public,
        reserves=reserves,
        own_connections=svc.settings.host_connections + 2 * svc.settings.pool_size,
        build_settings=build_settings,
        current_versions={b.key: b.version for b in current_builds},
        drift_checks=drift_checks,
        failing_purges=failing,
        mark=mark,
    )


def repair(svc: TenantService, problems: list[Problem], host: str | None = None) -> list[str]:
    """Fix each problem of ``host`` (default: the local one) with the lifecycle's own steps,
    on that host; returns what was done."""
    from monk.service.purge import work_queue

    done: list[str] = []
    pools = svc.hosts.pools(host)
    by_db = {}
    with pools.system() as reg:
        by_db = {t.database: t for t in registry.all_live(reg, pools.target.name)}
    for p in problems:
        if p.kind in ("stuck_operation", "queued_purge", "failing_purge"):
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
                        if fresh.status == TenantStatus.DELETING and p.kind == "stuck_operation":
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
                        try:
                            done.append(f"{p.subject}: {svc.repair(reg, pools, fresh)}")
                        except MonkError as exc:
                            # A failed purge is recorded on its job and retried later: the
                            # other problems are repaired meanwhile.
                            done.append(f"{p.subject}: failed: {exc.message}")
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
                    status=TenantStatus.DELETED,
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
    crashed_spares = {row.database: row for row in _crashed_spare_rows(svc, pools)}
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
                        if not reconcile_reads.spare_known(reg, p.subject):
                            admin.drop_database(adm, p.subject)
                            admin.drop_role(adm, p.subject)
                            done.append(f"{p.subject}: dropped")
                    finally:
                        registry.unlock(reg, p.subject)
        elif p.kind == "lost_spare_role":
            done.append(f"{p.subject}: {role_pool.repair_lost_row(svc, p.subject, host=host)}")
        elif p.kind == "dead_spare_role":
            done.append(f"{p.subject}: {role_pool.repair_dead_row(svc, p.subject, host=host)}")
        elif p.kind == "orphan_spare_role":
            with pools.system() as reg, reg.transaction():
                if not reconcile_reads.lock_spare_role_row(reg, p.subject):
                    with pools.admin() as adm:
                        admin.drop_role(adm, p.subject)
                    done.append(f"{p.subject}: dropped")
    if any(p.kind == "template_leftover" for p in problems):
        for name in host_templates.service_of(svc, pools.target.name).cleanup_leftovers():
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
            if fresh is None or not lifecycle.allowed(Action.MARK_DELETED, fresh.status):
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
                status=lifecycle.after(Action.MARK_DELETED, fresh.status),
                is_active=False,
                deleted_at=_now(),
                step="invalid database dropped",
            )
        finally:
            registry.unlock(reg, tenant.database)
    return "invalid database dropped, tenant marked deleted"


def _crashed_spare_rows(svc: TenantService, pools: ServerPools) -> list[pool.SpareRow]:
    with pools.system() as reg:
        return [r for r in pool.spare_rows(reg, pools.target.name) if r.status != "ready"]


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


@dataclass(frozen=True)
class Checkup:
    """What ``monk doctor`` reports: the problems found, what was repaired, what remains, and
    the warnings (reported, never repaired)."""

    problems: list[Problem]
    repaired: list[str]
    remaining: list[Problem]
    warnings: list[Problem]


HOST_UNAVAILABLE = "host_unavailable"


def _diagnose_every_host(svc: TenantService) -> tuple[list[Problem], list[Problem]]:
    """Problems and warnings of every host, each naming its host. A host that cannot be read
    (down, refusing monk's admin) is one problem of its own; the others are still checked."""
    problems: list[Problem] = []
    warned: list[Problem] = []
    for host in host_templates.every_host(svc):
        try:
            snap = take_snapshot(svc, host)
        except MonkError as exc:
            if host == svc.hosts.local.name:
                raise  # the registry's own server: nothing can be checked
            problems.append(
                Problem(
                    HOST_UNAVAILABLE,
                    host,
                    f"host {host!r} could not be checked: {exc.message}",
                    "none: start the server (or fix monk's access), then run 'monk doctor' "
                    "again; 'monk host check' says why",
                    host=host,
                )
            )
            continue
        problems += [dataclasses.replace(p, host=host) for p in diagnose(snap)]
        warned += [dataclasses.replace(p, host=host) for p in warnings(snap)]
    return problems, warned


def checkup(svc: TenantService, *, repair_them: bool = False) -> Checkup:
    """Diagnose every host; with ``repair_them``, repair each problem on its host and diagnose
    again."""
    dead_moves = moves.unfinished_problems(svc)
    # Moves whose process died first: each ends with its tenant on one host, so the snapshots
    # below see no half-moved copy (moves.py).
    moved = moves.finish_dead(svc) if repair_them else []
    problems, warned = _diagnose_every_host(svc)
    # Fleet upgrade runs whose process died: reported here, and finished by --repair (not at
    # ``monk serve``'s start-up, which repairs ``diagnose``'s problems only: a run may be long).
    problems += upgrades.unfinished_problems(svc) + dead_moves + root_users.problems(svc)
    if not repair_them:
        return Checkup(problems, [], problems, warned)
    repaired: list[str] = []
    by_host: dict[str, list[Problem]] = {}
    for p in problems:
        skip = (upgrades.UNFINISHED, moves.UNFINISHED, HOST_UNAVAILABLE, root_users.ROOT_WAITING)
        if p.kind not in skip and p.host is not None:
            by_host.setdefault(p.host, []).append(p)
    for host, found in by_host.items():
        lines = repair(svc, found, host)
        # On one server the lines read as before; a fleet's name their host.
        repaired += lines if host == svc.hosts.local.name else [f"{x} (on {host})" for x in lines]
    repaired += upgrades.finish_dead_runs(svc) + moved
    if any(p.kind == root_users.ROOT_WAITING for p in problems):
        written = root_users.write_all_pending(svc)
        repaired.append(f"root users written: {written}")
    remaining, _ = _diagnose_every_host(svc)
    remaining += upgrades.unfinished_problems(svc) + moves.unfinished_problems(svc)
    remaining += root_users.problems(svc)
    return Checkup(problems, repaired, remaining, warned)
