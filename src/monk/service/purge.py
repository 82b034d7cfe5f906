"""Purge (archive, drop, forget) through a persisted queue, archives, and restore from archive.

A purge request disables the tenant and records it as ``deleting`` with a queued ``purge``
operation, then returns: the drop costs a forced checkpoint. A worker (the HTTP service in the
background, or the CLI before it exits) claims the job with FOR UPDATE SKIP LOCKED and does it
inside that claiming transaction, so a worker killed half-way leaves the job queued, and every
step is idempotent (archive again, drop if exists). A job that fails is recorded (error, one
more attempt) and stays queued, due again after a backoff; workers claim only due jobs, so it
never holds back the jobs queued after it.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
from psycopg.pq import TransactionStatus

from monk.adapters import dump, registry
from monk.adapters.postgres import admin, template_db
from monk.adapters.postgres.connection import connect, translate
from monk.adapters.postgres.pools import ServerPools
from monk.adapters.registry import Operation, Tenant, operations
from monk.core import lifecycle
from monk.core.lifecycle import Action
from monk.core.tenant_names import TenantName
from monk.errors import InvalidState, MonkError, OperationFailed, TenantNotFound
from monk.service.pipeline import Pipeline, TenantView

log = logging.getLogger(__name__)


def request_purge(
    svc: Pipeline, raw_name: str, *, archive: bool = True, forget: bool = False
) -> tuple[TenantView, UUID]:
    """Disable the tenant, mark it ``deleting`` and queue its purge; returns at once."""
    with svc.locked(raw_name) as (reg, pools, tenant):
        lifecycle.check(Action.PURGE, tenant.status, tenant=tenant.name)
        with pools.admin() as adm:
            exists = admin.database_exists(adm, tenant.database)
        if exists:
            svc.close_tenant(pools, tenant)
        with reg.transaction():
            tenant = registry.update(
                reg,
                tenant.id,
                status="deleting",
                is_active=False,
                step="queued",
                trashed_at=tenant.trashed_at or datetime.now(UTC),
            )
            op = registry.start_operation(
                reg,
                "purge",
                tenant.name_key,
                database=tenant.database,
                host=tenant.host,
                state="queued",
                params={"tenant_id": str(tenant.id), "archive": archive, "forget": forget},
            )
        return svc.view(tenant), op


def purge(
    svc: Pipeline, raw_name: str, *, archive: bool = True, forget: bool = False, wait: bool = True
) -> tuple[TenantView, bool]:
    """Queue the tenant's purge and, with ``wait``, finish it here. Returns the tenant as it
    ends up, and whether ``forget`` removed its row (the view is then its last one)."""
    view, op = request_purge(svc, raw_name, archive=archive, forget=forget)
    if not wait:
        return view, False
    work_queue(svc, only=op)
    with svc.hosts.pools().system() as reg:
        row = registry.get_by_id(reg, view.tenant.id)
    return (view, True) if row is None else (svc.view(row), False)


# A failed job waits 2^attempts seconds (at most an hour) before it is tried again.
_MAX_BACKOFF_S = 3600


def work_queue(svc: Pipeline, *, only: UUID | None = None) -> int:
    """Run the due queued purges until none is left (or until ``only`` is done); returns how
    many were done. A job that fails is recorded (its error, one more attempt) and left queued
    for a later attempt with backoff, and the worker goes on with the next: one failing purge
    never holds back the others. ``only`` failing raises, as ``OperationFailed``."""
    done = 0
    pools = svc.hosts.pools()
    while True:
        with pools.system() as reg, reg.transaction():
            op = registry.claim_queued(reg, "purge")
            if op is None:
                return done
            error = _attempt(svc, reg, pools, op)
        if error is not None and op.id == only:
            raise error
        if error is None:
            done += 1
        if only is not None and op.id == only:
            return done


def queue_counts(svc: Pipeline) -> tuple[int, int]:
    """Purges queued, and how many of them are waiting to be retried after a failure."""
    with svc.hosts.pools().system() as reg:
        return operations.queue_counts(reg, "purge")


def purge_now(
    svc: Pipeline, reg: psycopg.Connection[Any], pools: ServerPools, tenant: Tenant
) -> None:
    """Finish the queued purge of ``tenant`` right here, due or not (the caller holds the
    tenant's lock). A failure is recorded on the job, as the worker's, and raised."""
    with pools.system() as worker, worker.transaction():
        op = registry.claim_queued(worker, "purge", database=tenant.database)
        if op is None:
            raise InvalidState(f"tenant {tenant.name!r} is being purged by another worker")
        error = _attempt(svc, worker, pools, op, tenant=tenant)
    if error is not None:
        raise error


def _attempt(
    svc: Pipeline,
    reg: psycopg.Connection[Any],
    pools: ServerPools,
    op: Operation,
    *,
    tenant: Tenant | None = None,
) -> OperationFailed | None:
    """One attempt at the claimed job ``op`` in the claiming transaction. On a failure the
    step's savepoint is rolled back (a step done before it, such as the archive, stays), the
    failure is recorded on the job, which stays queued, and returned."""
    try:
        if tenant is None:
            _run_job(svc, reg, op)
        else:
            _purge(svc, reg, pools, tenant, op)
        return None
    except Exception as exc:
        if reg.info.transaction_status == TransactionStatus.INERROR:
            raise  # the registry's own session failed: the claim is rolled back, as a crash
        known = exc if isinstance(exc, MonkError) else translate(exc)
        message = known.message if known is not None else str(exc).strip() or type(exc).__name__
        after = min(2 ** (op.attempts + 1), _MAX_BACKOFF_S)
        attempts = operations.retry_later(reg, op.id, error=message, after_s=after)
        log.warning(
            "purge of %s failed (attempt %d), retried in %ds: %s",
            op.subject,
            attempts,
            after,
            message,
        )
        failed = OperationFailed(
            f"purge of {op.subject!r} failed (attempt {attempts}): {message}; it stays queued"
            f" and is retried in {after}s by monk serve's worker (or monk doctor --repair)",
            step=op.step or "queued",
            attempts=attempts,
        )
        failed.__cause__ = exc
        return failed


def _run_job(svc: Pipeline, reg: psycopg.Connection[Any], op: Operation) -> None:
    tenant = registry.get_by_id(reg, UUID(op.params["tenant_id"]))
    if tenant is None or tenant.status != "deleting":
        registry.finish_operation(reg, op.id, "failed", error="tenant is no longer deleting")
        return
    # The job is ours (row lock); the tenant lock keeps other operations on it out meanwhile.
    if not registry.try_lock(reg, tenant.database):
        raise InvalidState(f"tenant {tenant.name!r} is busy")
    try:
        # The worker claims jobs of every host; each one runs on its tenant's host.
        _purge(svc, reg, svc.hosts.pools(tenant.host), tenant, op)
    finally:
        registry.unlock(reg, tenant.database)


def _purge(
    svc: Pipeline,
    reg: psycopg.Connection[Any],
    pools: ServerPools,
    tenant: Tenant,
    op: Operation,
) -> None:
    with pools.admin() as adm:
        exists = admin.database_exists(adm, tenant.database)
        # An interrupted DROP DATABASE (disk full, crash) left it invalid: nothing can connect
        # to it, so there is nothing to archive; it can only be dropped, which the purge wants.
        invalid = exists and admin.is_invalid_database(adm, tenant.database)
    if invalid:
        log.warning(
            "database %s of %s is invalid: dropped without archive", tenant.database, tenant.name
        )
    if op.params.get("archive", True) and exists and not invalid:
        # Recorded on the row at once: if the drop then fails, the failure is recorded in
        # this transaction too, and an attempt over the then invalid database keeps it.
        with reg.transaction():
            registry.update(reg, tenant.id, **_archive_fields(svc, pools, tenant))
            registry.set_operation_step(reg, op.id, "archived")
    svc.checkpoint("purge-archived")
    with reg.transaction():
        with pools.admin() as adm:
            admin.drop_database(adm, tenant.database)
            registry.set_operation_step(reg, op.id, "dropped")
            svc.checkpoint("purge-dropped")
            if tenant.role_name:
                admin.drop_role(adm, tenant.role_name)
        if op.params.get("forget"):
            registry.delete_row(reg, tenant.id)
        else:
            registry.update(
                reg,
                tenant.id,
                status="deleted",
                is_active=False,
                step="deleted",
                deleted_at=datetime.now(UTC),
            )
        registry.finish_operation(reg, op.id, "done", step="done")
    log.info("purged tenant %s (%s)", tenant.name, tenant.database)


def _archive_fields(svc: Pipeline, pools: ServerPools, tenant: Tenant) -> dict[str, Any]:
    """pg_dump the tenant (briefly open to monk's admin only: the tenant's role is NOLOGIN and
    PUBLIC has no CONNECT on it)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    path = svc.settings.archives / f"{tenant.database}-{stamp}.dump"
    with pools.admin() as adm:
        reopen = admin.allows_connections(adm, tenant.database) is False
        if reopen:
            admin.set_allow_connections(adm, tenant.database, True)
        try:
            archive = dump.dump(pools.target, tenant.database, path)
        finally:
            if reopen:
                admin.set_allow_connections(adm, tenant.database, False)
        version = admin.server_version(adm)
    return {
        "archive_path": str(archive.path),
        "archive_size": archive.size,
        "archive_sha256": archive.sha256,
        "archived_at": datetime.now(UTC),
        "archive_server_version": version,
    }


def archive(svc: Pipeline, raw_name: str) -> TenantView:
    """Archive a live tenant now (pg_dump, custom format); recorded on its registry row."""
    with svc.locked(raw_name) as (reg, pools, tenant):
        lifecycle.check(Action.ARCHIVE, tenant.status, tenant=tenant.name)
        fields = _archive_fields(svc, pools, tenant)
        tenant = registry.update(reg, tenant.id, **fields)
        return svc.view(tenant)


def _archived(reg: psycopg.Connection[Any], name: TenantName) -> Tenant:
    """The tenant's latest purged row, which must have an archive."""
    gone = registry.get_latest_deleted(reg, name.key)
    if gone is None:
        raise TenantNotFound(f"tenant {name.display!r} not found")
    if not gone.archive_path:
        raise InvalidState(
            f"tenant {name.display!r} was purged without an archive; it cannot be restored"
        )
    return gone


def restore_from_archive(svc: Pipeline, name: TenantName, host: str | None = None) -> TenantView:
    """A purged tenant back into a fresh database under the same name and hash, on ``host``
    (default: where placement puts a new tenant of its template, as a provision; an archive
    is a plain dump, so any host of the fleet can take it)."""
    with svc.hosts.pools().system() as reg:
        template = _archived(reg, name).template_key
    # Where it goes, chosen with no registry session held (placement takes its own).
    pools = svc.hosts.pools(svc.hosts.placement(host, template=template or None).name)
    with svc.hosts.pools().system() as reg:
        gone = _archived(reg, name)
        archive_path = gone.archive_path
        assert archive_path is not None
        if not registry.try_lock(reg, name.database):
            raise InvalidState(f"tenant {name.display!r} is busy with another operation")
        try:
            path = Path(archive_path)
            if not path.is_file() or dump.sha256_file(path) != gone.archive_sha256:
                raise InvalidState(f"archive {path} of {name.display!r} is missing or damaged")
            # The pipeline's first step, as a provision's: the intent row (which holds the
            # name while the database is rebuilt), its journal entry (a running 'restore')
            # and a spare role renamed into the tenant's, if this process has one.
            intent = svc.reserve(
                reg,
                pools,
                TenantName(display=gone.name, key=gone.name_key, database=gone.database),
                template_key=gone.template_key or "",
                template_version=gone.template_version or "",
                template_database="template0",
                idempotency_key=None,
                have_lock=True,
                operation="restore",
                params={"archive": archive_path},
                host=pools.target.name,
            )
            assert intent is not None  # with the lock held, a taken name raises
            tenant, op = intent.tenant, intent.op
            step = "role"
            try:
                credentials = svc.obtain_role(reg, pools, intent, name.role)
                step = "database"
                with pools.admin() as adm:
                    # Owned by the tenant's role from the start: the restore runs as that role
                    # and the public schema belongs to the database owner.
                    # template0: no session can block it (see the template build).
                    admin.create_database(
                        adm, tenant.database, template="template0", owner=name.role
                    )
                svc.checkpoint("restore-created")
                step = "restore"
                dump.restore(pools.target, tenant.database, path, role=name.role)
                with connect(pools.target, tenant.database, purpose="restore") as db:
                    template_db.own_like_a_clone(db, name.role, tenant.database)
                step = "configure"
                # A dump holds no ALTER DATABASE … SET: the build's settings, as a clone.
                svc.configure_on(
                    reg,
                    pools,
                    tenant.database,
                    name.role,
                    svc.database_settings(gone),
                    svc.connection_limit(gone),
                )
                with reg.transaction():
                    # The restored tenant keeps its identity: the purged row comes back to
                    # life (same id and created_at; its 'deleted' -> 'active' update is what
                    # the events trigger announces as tenant.restored), and the intent row,
                    # which only held the name while the database was rebuilt, goes (a
                    # 'provisioning' row's delete announces nothing).
                    registry.delete_row(reg, tenant.id)
                    restored = registry.update(
                        reg,
                        gone.id,
                        status="active",
                        is_active=True,
                        step="active",
                        role_name=name.role,
                        host=pools.target.name,
                        trashed_at=None,
                        deleted_at=None,
                    )
                    registry.finish_operation(reg, op, "done", step="active")
            except BaseException as exc:
                svc.undo_provision(reg, pools, tenant)
                registry.finish_operation(reg, op, "failed", step=step, error=str(exc))
                if isinstance(exc, MonkError):
                    raise
                if (known := translate(exc)) is not None:
                    raise known from exc
                if isinstance(exc, Exception):
                    raise OperationFailed(
                        f"restoring {name.display!r} failed at step {step!r} and was undone: {exc}",
                        step=step,
                    ) from exc
                raise
        finally:
            registry.unlock(reg, name.database)
    return svc.view(restored, credentials)
