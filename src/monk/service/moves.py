"""Tenant moves between hosts and host drains (issue 13, item 5).

A move, under the tenant's lock, journaled step by step on its operations row (kind
``move``): **freeze** (this process's pooled connections evicted, the role NOLOGIN, its
sessions ended: every new connection is refused from here), **role** (made on the target with
the source's SCRAM verifier, so the tenant's password keeps working; where the source's admin
cannot read ``pg_authid`` a new password, returned once), **copy** (``pg_dump | pg_restore``
streamed between the servers; ``-j`` for a large tenant), **verify** (every table's row
count and the catalog fingerprint, on both sides), **switch** (``tenants.host``, the journal's
``switched``, a ``tenant.moved`` event and the old copy's ``drop_copy`` job in one
transaction), **unfreeze** (the role LOGIN on the target: the first accepted connection).

The journal says where the data is after a crash: before ``switched`` the source holds it and
the target's half-made copy is dropped; from ``switched`` on, the target. ``finish_dead``
(``monk doctor --repair``, or the next move of the tenant) takes a move whose process died
(its lock is free) to one of those two ends.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import psycopg

from monk.adapters import dump, registry
from monk.adapters.postgres import admin, template_db
from monk.adapters.postgres.catalog import read_catalog
from monk.adapters.postgres.connection import (
    ServerTarget,
    connect,
    open_checked,
    open_connection,
    translate,
)
from monk.adapters.postgres.tenant_copy import row_counts
from monk.adapters.registry import Operation, Tenant, operations
from monk.adapters.registry import hosts as host_registry
from monk.adapters.registry import moves as journal
from monk.core import scram
from monk.core.catalog import Catalog, differences
from monk.core.lifecycle import TenantStatus
from monk.errors import (
    DrainRunning,
    HostNotFound,
    HostUnavailable,
    InvalidRequest,
    InvalidState,
    MonkError,
    MoveRunning,
    OperationFailed,
    TenantNotFound,
)
from monk.service import root_users
from monk.service.pipeline import Credentials, Pipeline, TenantView, describe

log = logging.getLogger(__name__)

KIND = journal.MOVE
UNFINISHED = "unfinished_move"
MOVABLE = (TenantStatus.ACTIVE, TenantStatus.DISABLED, TenantStatus.TRASHED)
# A tenant at least this large is copied with pg_dump -Fd -j / pg_restore -j (parallel needs a
# seekable archive on disk); a smaller one streams through a pipe, with no file at all.
PARALLEL_FROM_BYTES = 256 * 1024 * 1024
PARALLEL_JOBS = 4
_MAX_BACKOFF_S = 3600


@dataclass(frozen=True)
class MoveResult:
    """What a move did: the tenant as it ends up (with new credentials when they had to be
    rotated), and its measurements."""

    view: TenantView
    op_id: UUID
    from_host: str
    to_host: str
    result: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "operation_id": str(self.op_id),
            "from": self.from_host,
            "to": self.to_host,
            **self.result,
            "tenant": self.view.as_dict(),
        }


def _now() -> str:
    return datetime.now(UTC).isoformat()


class Move:
    """One move: ``begin`` checks and locks (a refusal changes nothing), ``execute`` moves."""

    def __init__(
        self,
        svc: Pipeline,
        lock_conn: psycopg.Connection[Any],
        tenant: Tenant,
        to_host: str,
        *,
        jobs: int | None,
    ) -> None:
        self.svc = svc
        self.reg = lock_conn
        self.tenant = tenant
        self.from_host = tenant.host
        self.to_host = to_host
        self.jobs = jobs
        self.op_id: UUID | None = None
        self.credentials: Credentials | None = None

    # ------------------------------------------------------------ begin

    def start(self) -> UUID:
        """Probe both servers (a host that is down: HostUnavailable, nothing made), decide how
        the credentials travel, and journal the move."""
        svc, tenant = self.svc, self.tenant
        self.source = svc.hosts.target(self.from_host)
        self.target = svc.hosts.target(self.to_host)
        for t in (self.source, self.target):
            open_checked(t, purpose="move").close()
        role = tenant.role_name
        with svc.hosts.pools(self.from_host).admin() as adm:
            verifier = admin.role_verifier(adm, role) if role else None
            size = admin.database_size(adm, tenant.database) or 0
        if role and verifier is None:
            # The source's admin cannot read pg_authid (not a superuser): the verifier cannot
            # travel, so the tenant gets a new password, known from the start (the 202 of the
            # API shows it once), valid once the move is done.
            password = scram.generate_password()
            self.credentials = Credentials(role, password)
            verifier = svc.verifier(password)
        self.verifier = verifier
        self.size = size
        self.was_open = tenant.status == TenantStatus.ACTIVE
        params = {
            "tenant_id": str(tenant.id),
            "from": self.from_host,
            "to": self.to_host,
            "role": role,
            "was_open": self.was_open,
            "credentials": "rotated" if self.credentials else "kept",
        }
        with self.reg.transaction():
            self.op_id = registry.start_operation(
                self.reg,
                KIND,
                tenant.name_key,
                database=tenant.database,
                host=self.from_host,
                params=params,
            )
            journal.record(self.reg, self.op_id, "started", {"bytes": size})
        return self.op_id

    # ------------------------------------------------------------ execute

    def execute(self) -> MoveResult:
        """Run the steps; on a failure before the switch, undo (target's copy dropped, the
        tenant reopened on the source) and raise. Releases the lock either way."""
        try:
            return self._execute()
        finally:
            with contextlib.suppress(psycopg.Error):
                registry.unlock(self.reg, self.tenant.database)
            self.reg.close()

    def _execute(self) -> MoveResult:
        svc, tenant, op_id = self.svc, self.tenant, self.op_id
        assert op_id is not None
        src_pools = svc.hosts.pools(self.from_host)
        dst_pools = svc.hosts.pools(self.to_host)
        role = tenant.role_name
        started = time.perf_counter()
        measured: dict[str, Any] = {}
        frozen_at: float | None = None
        step = "prepare"
        sessions = contextlib.ExitStack()
        try:
            if self.was_open:
                # A root user still waiting is written before the copy that takes it along.
                root_users.write_pending(svc, tenant)
            # prepare, before the freeze (the downtime is the copy's alone): the role, with the
            # source's verifier and unable to log in yet, and an empty database it owns. A
            # leftover of an earlier attempt goes first (the role cannot go while it owns one).
            with dst_pools.admin() as adm:
                admin.drop_database(adm, tenant.database)
                if role:
                    svc.make_role_on(
                        dst_pools,
                        role,
                        verifier=self.verifier or "",
                        login=False,
                        connection_limit=svc.connection_limit(tenant),
                    )
                admin.create_database(adm, tenant.database, template="template0", owner=role)
                if role:
                    # Ownership, connect rights, the build's settings, the connection limit:
                    # none of it depends on the data, so none of it waits in the downtime.
                    svc.configure_on(
                        None,
                        dst_pools,
                        tenant.database,
                        role,
                        svc.database_settings(tenant),
                        svc.connection_limit(tenant),
                    )
            journal.record(self.reg, op_id, "prepared", {})
            svc.checkpoint("move-prepared")

            # freeze: every new connection is refused from here (the role cannot log in and
            # PUBLIC has no CONNECT); the copy's own sessions are monk's admin's.
            step = "freeze"
            svc.hosts.evict(self.from_host, tenant.database)
            with src_pools.admin() as adm:
                if role and admin.role_exists(adm, role):
                    admin.set_role_login(adm, role, login=False)
                frozen_at = time.perf_counter()
                admin.terminate_sessions(adm, tenant.database)
                if admin.allows_connections(adm, tenant.database) is False:
                    # A disabled or trashed tenant's database is closed: opened for monk's
                    # admin alone while it is copied (its role cannot log in, PUBLIC has no
                    # CONNECT), as an archive does it.
                    admin.set_allow_connections(adm, tenant.database, True)
            measured["frozen_at"] = _now()
            journal.record(self.reg, op_id, "frozen", {"frozen_at": measured["frozen_at"]})
            svc.checkpoint("move-frozen")

            step = "copy"
            t0 = time.perf_counter()
            jobs = self.jobs or (PARALLEL_JOBS if self.size >= PARALLEL_FROM_BYTES else 1)
            # The sessions the ownership fix-up and the verification use, opened while the copy
            # runs: a first login into a database just restored builds its caches (~5-10 ms
            # each), which would otherwise count in the downtime.
            opening = svc.side_threads().submit(self._open_sessions, sessions)
            try:
                dump.copy(
                    self.source,
                    self.target,
                    tenant.database,
                    role=role or admin_role(dst_pools),
                    jobs=jobs,
                    work_dir=svc.settings.data_dir / "moves",
                )
            finally:
                opening.exception()  # waits: the sessions are registered for closing
            src_db, dst_db = opening.result()
            measured["restore_ms"] = round((time.perf_counter() - t0) * 1000, 1)
            if role:
                template_db.own_like_a_clone(dst_db, role, tenant.database)
                dst_db.commit()
            measured["copy_ms"] = round((time.perf_counter() - t0) * 1000, 1)
            measured["jobs"] = jobs
            journal.record(self.reg, op_id, "copied", {"copy_ms": measured["copy_ms"]})
            svc.checkpoint("move-copied")

            step = "verify"
            t0 = time.perf_counter()
            measured |= self._verify(src_db, dst_db)
            sessions.close()
            measured["verify_ms"] = round((time.perf_counter() - t0) * 1000, 1)
            journal.record(self.reg, op_id, "verified", {"verify_ms": measured["verify_ms"]})
            svc.checkpoint("move-verified")

            step = "switch"
            if not journal.switch(
                self.reg,
                op_id=op_id,
                tenant_id=tenant.id,
                from_host=self.from_host,
                to_host=self.to_host,
                role=role,
                result={},
            ):
                raise InvalidState(f"tenant {tenant.name!r} changed during the move")
        except BaseException as exc:
            with contextlib.suppress(Exception):
                sessions.close()  # before the undo: a session would hold off its DROP DATABASE
            self._undo(step, exc)
            raise self._failure(step, exc) from exc
        svc.checkpoint("move-switched")
        # unfreeze: the target's copy accepts its first connection (a disabled or trashed
        # tenant's stays closed, as it was on the source).
        with dst_pools.admin() as adm:
            if self.was_open and role:
                admin.set_role_login(adm, role, login=True)
            elif not self.was_open:
                admin.set_allow_connections(adm, tenant.database, False)
        unfrozen_at = time.perf_counter()
        measured["unfrozen_at"] = _now()
        if frozen_at is not None and self.was_open:
            measured["downtime_ms"] = round((unfrozen_at - frozen_at) * 1000, 1)
        # The old copy accepts no connection at all while its drop is queued.
        with contextlib.suppress(MonkError, psycopg.Error), src_pools.admin() as adm:
            admin.set_allow_connections(adm, tenant.database, False)
        measured["total_ms"] = round((time.perf_counter() - started) * 1000, 1)
        measured["credentials"] = "rotated" if self.credentials else "kept"
        registry.finish_operation(self.reg, op_id, "done", step="done", result=measured)
        log.info(
            "moved tenant %s from %s to %s (downtime %s ms)",
            tenant.name,
            self.from_host,
            self.to_host,
            measured.get("downtime_ms"),
        )
        # The old copy now, if its host answers; else the queue's worker does it later.
        with contextlib.suppress(MonkError):
            work_drops(svc, move=op_id)
        fresh = registry.get_by_id(self.reg, tenant.id) or tenant
        return MoveResult(
            svc.view(fresh, self.credentials), op_id, self.from_host, self.to_host, measured
        )

    def _open_sessions(
        self, sessions: contextlib.ExitStack
    ) -> tuple[psycopg.Connection[Any], psycopg.Connection[Any]]:
        """monk's admin sessions in the tenant's database on the source and on the target
        (closed with ``sessions``)."""
        src = sessions.enter_context(connect(self.source, self.tenant.database, purpose="move"))
        dst = sessions.enter_context(connect(self.target, self.tenant.database, purpose="move"))
        return src, dst

    def _verify(
        self, src_db: psycopg.Connection[Any], dst_db: psycopg.Connection[Any]
    ) -> dict[str, Any]:
        """Every table's row count and the catalog fingerprint, the same on both sides."""

        def read(db: psycopg.Connection[Any]) -> tuple[dict[str, int], Catalog]:
            with db.transaction():
                db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                return row_counts(db), read_catalog(db)

        # Both sides at once: the verification is part of the downtime.
        other = self.svc.side_threads().submit(read, dst_db)
        seen = {"source": read(src_db), "target": other.result()}
        (src_counts, src_fp), (dst_counts, dst_fp) = seen["source"], seen["target"]
        if src_counts != dst_counts:
            differ = sorted(
                t
                for t in src_counts.keys() | dst_counts.keys()
                if src_counts.get(t) != dst_counts.get(t)
            )
            raise OperationFailed(
                f"the copy's row counts differ from the source's in {', '.join(differ[:5])}",
                step="verify",
            )
        if src_fp.fingerprint() != dst_fp.fingerprint():
            named = "; ".join(str(d) for d in differences(src_fp, dst_fp)[:3])
            raise OperationFailed(
                f"the copy's catalog fingerprint differs from the source's: {named}",
                step="verify",
            )
        return {
            "tables": len(src_counts),
            "rows": sum(src_counts.values()),
            "fingerprint": src_fp.fingerprint(),
        }

    def _lost_host(self) -> HostUnavailable | None:
        """The source or target host, if it no longer answers."""
        for target in (self.target, self.source):
            if (lost := _probe(target)) is not None:
                return lost
        return None

    def _undo(self, step: str, exc: BaseException) -> None:
        """Before the switch: the source still holds the tenant. Drop the target's copy (queued
        if its host does not answer), reopen the source, journal it undone."""
        assert self.op_id is not None
        try:
            drop_copy(self.svc, self.to_host, self.tenant.database, self.tenant.role_name)
        except Exception as drop_exc:
            log.warning(
                "move of %s: the target's copy stays queued for dropping: %s",
                self.tenant.name,
                drop_exc,
            )
            with contextlib.suppress(psycopg.Error):
                journal.queue_drop(
                    self.reg,
                    subject=self.tenant.name_key,
                    database=self.tenant.database,
                    host=self.to_host,
                    role=self.tenant.role_name,
                    move=self.op_id,
                )
        with contextlib.suppress(Exception):
            reopen(self.svc, self.from_host, self.tenant)
        with contextlib.suppress(psycopg.Error):
            registry.finish_operation(
                self.reg, self.op_id, "undone", step=step, error=describe(exc)
            )

    def _failure(self, step: str, exc: BaseException) -> BaseException:
        if isinstance(exc, OperationFailed) and (lost := self._lost_host()) is not None:
            # pg_dump or pg_restore lost a server: say which host, as a retryable 503.
            exc = lost
        if isinstance(exc, MonkError):
            exc.message = f"move of {self.tenant.name!r} failed at {step} and was undone: " + (
                exc.message
            )
            return exc
        if (known := translate(exc)) is not None:
            known.message = f"move of {self.tenant.name!r} failed at {step} and was undone: " + (
                known.message
            )
            return known
        if isinstance(exc, Exception):
            return OperationFailed(
                f"move of {self.tenant.name!r} failed at {step} and was undone: {describe(exc)}",
                step=step,
            )
        return exc


def _probe(target: ServerTarget) -> HostUnavailable | None:
    try:
        open_checked(target, purpose="move").close()
    except HostUnavailable as exc:
        return exc
    except MonkError:
        return None
    return None


def admin_role(pools: Any) -> str:
    with pools.admin() as adm:
        return admin.current_role(adm)


def begin(svc: Pipeline, raw_name: str, to: str, *, jobs: int | None = None) -> Move:
    """Check and lock a move of ``raw_name`` to host ``to``, finish a dead earlier move of it
    first, and journal the new one. Refused (nothing changed): an unknown or same host, a
    draining target, a tenant in flight, another move of it running (MoveRunning, 409), a
    host that does not answer (HostUnavailable, 503)."""
    if jobs is not None and not 1 <= jobs <= 16:
        raise InvalidRequest("--jobs must be between 1 and 16", field="jobs")
    name = svc.name(raw_name)
    local = svc.hosts.local
    to_row = None
    if to != local.name:
        with svc.hosts.pools().system() as reg:
            to_row = host_registry.get(reg, to)
        if to_row is None:
            raise HostNotFound(f"host {to!r} is not registered ('monk host list')", host=to)
    else:
        with svc.hosts.pools().system() as reg:
            to_row = host_registry.get(reg, to)
    if to_row is not None and to_row.state == "draining":
        raise InvalidState(f"host {to!r} is draining: it takes no tenant", host=to)
    conn = open_connection(local, svc.settings.system_db_name, autocommit=True, purpose="move")
    try:
        tenant = registry.get_live(conn, name.key)
        if tenant is None:
            raise TenantNotFound(f"tenant {name.display!r} not found")
        if not registry.try_lock(conn, tenant.database):
            if journal.running(conn, name.key):
                raise MoveRunning(
                    f"tenant {tenant.name!r} is being moved by another process: follow it "
                    "with 'monk operations' or GET /api/root/operations/<id>",
                    tenant=tenant.name,
                )
            raise InvalidState(
                f"tenant {tenant.name!r} is busy with another operation; retry shortly"
            )
        try:
            for op in journal.running(conn, name.key):
                _finish(svc, conn, op)
            tenant = registry.get_by_id(conn, tenant.id) or tenant
            if tenant.status not in MOVABLE:
                raise InvalidState(
                    f"cannot move tenant {tenant.name!r}: it is {tenant.status}", tenant=tenant.name
                )
            if tenant.host == to:
                raise InvalidRequest(
                    f"tenant {tenant.name!r} is on host {to!r} already", field="to", host=to
                )
            move = Move(svc, conn, tenant, to, jobs=jobs)
            move.start()
        except BaseException:
            registry.unlock(conn, tenant.database)
            raise
    except BaseException:
        conn.close()
        raise
    return move


def move(svc: Pipeline, raw_name: str, to: str, *, jobs: int | None = None) -> MoveResult:
    """``monk tenant move NAME --to HOST``: begin and execute in this process."""
    return begin(svc, raw_name, to, jobs=jobs).execute()


# ------------------------------------------------------------ recovery


def reopen(svc: Pipeline, host: str, tenant: Tenant) -> None:
    """The tenant's copy on ``host`` as its status wants it: an active one open and its role
    able to log in; a disabled or trashed one closed, as ``disable`` leaves it."""
    is_open = tenant.status == TenantStatus.ACTIVE
    with svc.hosts.pools(host).admin() as adm:
        if not admin.database_exists(adm, tenant.database):
            return
        admin.set_allow_connections(adm, tenant.database, is_open)
        if tenant.role_name and admin.role_exists(adm, tenant.role_name):
            admin.set_role_login(adm, tenant.role_name, login=is_open)


def drop_copy(svc: Pipeline, host: str, database: str, role: str | None) -> None:
    with svc.hosts.pools(host).admin() as adm:
        admin.drop_database(adm, database)
        if role:
            admin.drop_role(adm, role)


def _finish(svc: Pipeline, conn: psycopg.Connection[Any], op: Operation) -> str:
    """Take the dead move ``op`` to an end (the caller holds the tenant's lock): switched, the
    target is opened and the old copy's drop is queued (the switch queued it); not switched,
    the target's copy is dropped (or queued) and the source reopened."""
    tenant = registry.get_by_id(conn, UUID(op.params["tenant_id"]))
    src, dst = str(op.params["from"]), str(op.params["to"])
    if tenant is None or tenant.deleted_at is not None:
        registry.finish_operation(conn, op.id, "failed", error="the tenant is gone")
        return "tenant gone"
    if tenant.host == dst:
        reopen(svc, dst, tenant)
        with contextlib.suppress(MonkError, psycopg.Error), svc.hosts.pools(src).admin() as adm:
            admin.set_allow_connections(adm, tenant.database, False)
        registry.finish_operation(
            conn, op.id, "done", step="done", result={**(op.result or {}), "recovered": True}
        )
        log.warning("finished the dead move of %s to %s", tenant.name, dst)
        return f"moved to {dst} (finished)"
    try:
        drop_copy(svc, dst, tenant.database, tenant.role_name)
    except MonkError as exc:
        journal.queue_drop(
            conn,
            subject=tenant.name_key,
            database=tenant.database,
            host=dst,
            role=tenant.role_name,
            move=op.id,
        )
        log.warning(
            "dead move of %s: its copy on %s is queued for dropping: %s",
            tenant.name,
            dst,
            exc.message,
        )
    reopen(svc, src, tenant)
    registry.finish_operation(conn, op.id, "undone", error="process died; undone")
    log.warning("undid the dead move of %s to %s", tenant.name, dst)
    return f"stays on {src} (undone)"


def unfinished_problems(svc: Pipeline) -> list[Any]:
    """Moves whose process died, as doctor problems."""
    from monk.core.reconcile import Problem

    found = []
    with svc.hosts.pools().system() as reg:
        for op in journal.running(reg):
            if op.database and registry.try_lock(reg, op.database):
                registry.unlock(reg, op.database)
                found.append(
                    Problem(
                        UNFINISHED,
                        op.database,
                        f"move {op.id} of {op.subject} from {op.params.get('from')} to "
                        f"{op.params.get('to')} stopped with its process at {op.step}",
                        "finish it if switched (else undo it): the tenant active on one host",
                    )
                )
    return found


def finish_dead(svc: Pipeline) -> list[str]:
    """``monk doctor --repair``: every dead move to an end, then the queued drops."""
    done = []
    local = svc.hosts.local
    with connect(local, svc.settings.system_db_name, autocommit=True, purpose="move") as conn:
        for op in journal.running(conn):
            if not op.database or not registry.try_lock(conn, op.database):
                continue
            try:
                done.append(f"{op.database}: {_finish(svc, conn, op)}")
            except MonkError as exc:
                done.append(f"{op.database}: failed: {exc.message}")
            finally:
                registry.unlock(conn, op.database)
    dropped = work_drops(svc)
    if dropped:
        done.append(f"dropped {dropped} copies left by moves")
    return done


# ------------------------------------------------------------ the drop queue


def work_drops(svc: Pipeline, *, move: UUID | None = None) -> int:
    """The copies moves left behind, dropped (queued ``drop_copy`` jobs; with ``move``, those of
    that move only, due or not). A copy whose tenant is live on that host again (moved back)
    is left alone. A failure is recorded on its job, retried later with backoff."""
    done = 0
    pools = svc.hosts.pools()
    claimed: set[UUID] = set()
    while True:
        with pools.system() as reg, reg.transaction():
            op = None
            if move is not None:
                for candidate in _drops_of(reg, move):
                    if candidate not in claimed:
                        op = registry.claim_queued(reg, journal.DROP_COPY, op_id=candidate)
                        if op is not None:
                            break
            else:
                op = registry.claim_queued(reg, journal.DROP_COPY)
            if op is None or op.id in claimed:
                return done
            claimed.add(op.id)
            try:
                if op.database and journal.live_host(reg, op.database) != op.host:
                    drop_copy(svc, op.host, op.database, op.params.get("role"))
                registry.finish_operation(reg, op.id, "done", step="dropped")
                done += 1
            except Exception as exc:
                known = exc if isinstance(exc, MonkError) else translate(exc)
                message = known.message if known is not None else describe(exc)
                after = min(2 ** (op.attempts + 1), _MAX_BACKOFF_S)
                operations.retry_later(reg, op.id, error=message, after_s=after)
                log.warning(
                    "the copy of %s on %s was not dropped (retried in %ds): %s",
                    op.database,
                    op.host,
                    after,
                    message,
                )
                if isinstance(exc, HostNotFound):
                    registry.finish_operation(reg, op.id, "failed", error=message)


def _drops_of(reg: psycopg.Connection[Any], move: UUID) -> list[UUID]:
    return [
        op.id
        for op in registry.list_operations(reg, states=["queued"], kind=journal.DROP_COPY)
        if op.params.get("move") == str(move)
    ]


# ------------------------------------------------------------ drain


@dataclass
class DrainResult:
    host: str
    moved: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def as_dict(self) -> dict[str, Any]:
        return {"host": self.host, "moved": self.moved, "failed": self.failed, "ok": self.ok}

    def progress(self, done: int, total: int) -> dict[str, Any]:
        """What the journal records: so far, ``done`` of ``total`` tenants dealt with."""
        return {"total": total, "done": done, "moved": self.moved, "failed": self.failed}


class Drain:
    """One drain of a host: ``begin_drain`` marks it draining, locks and journals it (a
    refusal changes nothing), ``execute`` moves its tenants off, recording its progress on its
    operations row (kind ``host_drain``: total, done, moved, failed)."""

    def __init__(
        self,
        svc: Pipeline,
        lock_conn: psycopg.Connection[Any],
        host: str,
        *,
        parallel: int,
        tenants: list[tuple[str, str | None]],
        op_id: UUID,
    ) -> None:
        self.svc = svc
        self.reg = lock_conn
        self.host = host
        self.parallel = parallel
        self.tenants = tenants
        self.op_id = op_id

    def execute(self, progress: Callable[[int, int], None] | None = None) -> DrainResult:
        """Move every tenant off, at most ``parallel`` at once, each to the host placement
        picks for its template; the journal ends ``done`` (all moved) or ``failed`` (some
        stayed: which, and why). Releases the lock either way."""
        try:
            return self._execute(progress)
        except BaseException as exc:
            with contextlib.suppress(psycopg.Error):
                registry.finish_operation(
                    self.reg, self.op_id, "failed", step="stopped", error=describe(exc)
                )
            raise
        finally:
            with contextlib.suppress(psycopg.Error):
                registry.unlock(self.reg, drain_lock(self.host))
            self.reg.close()

    def _execute(self, progress: Callable[[int, int], None] | None) -> DrainResult:
        svc, host = self.svc, self.host
        result = DrainResult(host)
        total = len(self.tenants)
        if progress is not None:
            progress(0, total)

        def one(name: str, template: str | None) -> MoveResult:
            target = svc.hosts.placement(None, template=template)
            if target.name == host:
                raise InvalidState(f"no other host can take tenant {name!r}")
            return move(svc, name, target.name)

        with ThreadPoolExecutor(self.parallel, thread_name_prefix="monk-drain") as pool:
            futures = {pool.submit(one, n, t): n for n, t in self.tenants}
            for i, fut in enumerate(as_completed(futures), 1):
                name = futures[fut]
                try:
                    r = fut.result()
                    downtime = r.result.get("downtime_ms")
                    result.moved.append({"tenant": name, "to": r.to_host, "downtime_ms": downtime})
                except MonkError as exc:
                    result.failed.append({"tenant": name, "error": exc.message})
                except Exception as exc:
                    result.failed.append({"tenant": name, "error": describe(exc)})
                journal.record(self.reg, self.op_id, "moving", result.progress(i, total))
                if progress is not None:
                    progress(i, total)
        registry.finish_operation(
            self.reg,
            self.op_id,
            "done" if result.ok else "failed",
            step="drained",
            error=None if result.ok else f"{len(result.failed)} of {total} tenant(s) not moved",
            result=result.progress(total, total),
        )
        return result


def drain_lock(host: str) -> str:
    """The advisory lock name a drain of ``host`` holds (its process's session: a drain whose
    process died has it free)."""
    return f"host_drain:{host}"


def begin_drain(svc: Pipeline, host: str, *, parallel: int = 2) -> Drain:
    """Check and lock a drain of ``host``, mark it draining (placement skips it), and journal
    it with the tenants to move. Refused, nothing changed: a bad ``parallel``, an unknown host
    (HostNotFound), another drain of it running (DrainRunning, 409). A drain journaled as
    running whose lock is free (its process died) is closed as failed first."""
    from monk.service import hosts as host_service

    if not 1 <= parallel <= 32:
        raise InvalidRequest("--parallel must be between 1 and 32", field="parallel")
    local = svc.hosts.local
    conn = open_connection(local, svc.settings.system_db_name, autocommit=True, purpose="drain")
    try:
        if not registry.try_lock(conn, drain_lock(host)):
            raise DrainRunning(
                f"host {host!r} is being drained by another process: follow it with "
                "'monk operations' or GET /api/root/operations/<id>",
                host=host,
            )
        try:
            host_service.set_state(svc, host, "draining")
            for dead in journal.running_drains(conn, host):
                registry.finish_operation(
                    conn, dead.id, "failed", error="its process ended before it finished"
                )
            tenants = journal.movable(conn, host)
            op_id = registry.start_operation(
                conn,
                journal.HOST_DRAIN,
                host,
                database=None,
                host=host,
                params={"parallel": parallel, "tenants": len(tenants)},
            )
            journal.record(conn, op_id, "started", DrainResult(host).progress(0, len(tenants)))
        except BaseException:
            registry.unlock(conn, drain_lock(host))
            raise
    except BaseException:
        conn.close()
        raise
    return Drain(svc, conn, host, parallel=parallel, tenants=tenants, op_id=op_id)


def drain(
    svc: Pipeline,
    host: str,
    *,
    parallel: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> DrainResult:
    """``monk host drain NAME``: begin and execute in this process."""
    return begin_drain(svc, host, parallel=parallel).execute(progress)


def report(op: Operation) -> dict[str, Any]:
    """A move's journal as ``GET /api/root/operations/{id}`` shows it."""
    return {"step": op.step, "state": op.state, **(op.params or {}), **(op.result or {})}


__all__ = [
    "KIND",
    "Drain",
    "Move",
    "MoveResult",
    "begin",
    "begin_drain",
    "drain",
    "drain_lock",
    "finish_dead",
    "move",
    "unfinished_problems",
    "work_drops",
]
