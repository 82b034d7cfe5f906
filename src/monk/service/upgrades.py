"""Fleet upgrades: bring the tenants of a template key to a build, resumably.

One tenant's upgrade is ONE transaction in its own database, as the admin role, under monk's
per-tenant lock (no lifecycle operation runs on it meanwhile), with a short ``lock_timeout``:
read ``monk.build`` FOR UPDATE (created from the registry's belief for a tenant cloned before
templates held one); if it is already at the target, nothing; else each recorded step's script
as ``pg_database_owner``, then ``monk.build`` updated; commit. Then the registry follows
(``tenants.template_version``, ``migration_level``). A lock the tenant's sessions hold longer
than ``MONK_UPGRADE_LOCK_TIMEOUT`` makes the attempt fail fast ("busy"): it is retried later in
the run, at most ``BUSY_ATTEMPTS`` times, so the tenant's application is never blocked longer
than the timeout.

A run is an operations row plus one row per selected tenant (pending, running, done, failed
with the error, skipped with why). The canary wave goes first and must finish without a
failure; then the rest, on ``parallel`` worker threads (one system and one tenant connection
each). The process holds the key's upgrade lock while it runs: a second process gets
UpgradeRunning, and a run whose lock is free is dead; the next run of the key (or ``monk doctor
--repair``) resumes it. The tenant's ``monk.build`` is the truth: a tenant the dead run had
started is simply upgraded again, which finds it at the target if its transaction committed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import psycopg

from monk.adapters import registry
from monk.adapters.postgres import admin, upgrade_db
from monk.adapters.postgres.connection import ServerTarget, open_connection
from monk.adapters.registry import Operation, upgrades
from monk.adapters.registry import templates as template_builds
from monk.adapters.registry import upgrade_runs as runs
from monk.adapters.registry.upgrade_runs import RunTenant, Selected
from monk.core.lifecycle import TenantStatus
from monk.core.reconcile import Problem
from monk.core.template_names import validate_template_key
from monk.errors import (
    InvalidRequest,
    MonkError,
    OperationNotFound,
    TemplateNotFound,
    UpgradeRunning,
)
from monk.service import pool
from monk.service.pipeline import Pipeline, describe

log = logging.getLogger(__name__)

KIND = runs.KIND
ON_ERROR = ("stop", "continue")
# A tenant busy (a lock held longer than the timeout, or a lifecycle operation on it) is
# tried again later in the run, this many times in all, then failed "busy".
BUSY_ATTEMPTS = 5
_BUSY_BACKOFF_S = 0.5
MAX_PARALLEL = 64
# Measured on 2 cores, 1,000 tenants (docs/benchmarks.md): 8 threads beat 4 by 1-26 % (a
# tenant's time is partly waits: connection start-up, commit, round trips); 16 gained -3 to
# +17 % more and doubles the connections (one to the system database, one to a tenant each).
DEFAULT_PARALLEL = 8


@dataclass(frozen=True)
class UpgradeOptions:
    to_version: str | None = None  # default: the key's current build
    tenants: tuple[str, ...] = ()  # names; default: every tenant of the key
    canary: int = 0
    parallel: int = DEFAULT_PARALLEL
    on_error: str = "stop"

    def check(self) -> None:
        if self.on_error not in ON_ERROR:
            raise InvalidRequest(
                f"on_error must be 'stop' or 'continue', not {self.on_error!r}", field="on_error"
            )
        if not 1 <= self.parallel <= MAX_PARALLEL:
            raise InvalidRequest(
                f"parallel must be between 1 and {MAX_PARALLEL}, not {self.parallel}",
                field="parallel",
            )
        if self.canary < 0:
            raise InvalidRequest(f"canary must be 0 or more, not {self.canary}", field="canary")


@dataclass(frozen=True)
class TenantResult:
    name: str
    database: str
    state: str
    from_version: str | None
    to_version: str | None
    level: int | None
    reason: str | None
    attempts: int
    canary: bool

    @classmethod
    def of(cls, row: RunTenant) -> TenantResult:
        return cls(
            row.name,
            row.database,
            row.state,
            row.from_version,
            row.to_version,
            row.level,
            row.reason,
            row.attempts,
            row.canary,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "database": self.database,
            "state": self.state,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "level": self.level,
            "reason": self.reason,
            "attempts": self.attempts,
            "canary": self.canary,
        }


@dataclass(frozen=True)
class RunReport:
    """A run as the edges render it (a dry run: nothing written, ``operation_id`` None)."""

    operation_id: UUID | None
    key: str
    to_version: str
    state: str  # planned (dry run), running, done, failed
    resumed: bool
    counts: dict[str, int]
    tenants: list[TenantResult]
    error: str | None = None
    elapsed_s: float | None = None

    @property
    def failed(self) -> list[TenantResult]:
        return [t for t in self.tenants if t.state == "failed"]

    def as_dict(self) -> dict[str, Any]:
        return {
            "operation_id": str(self.operation_id) if self.operation_id else None,
            "template": self.key,
            "to_version": self.to_version,
            "state": self.state,
            "resumed": self.resumed,
            "counts": self.counts,
            "error": self.error,
            "elapsed_s": self.elapsed_s,
            "tenants": [t.as_dict() for t in self.tenants],
        }


@dataclass(frozen=True)
class Progress:
    total: int
    counts: dict[str, int]

    @property
    def finished(self) -> int:
        return sum(self.counts.get(s, 0) for s in ("done", "failed", "skipped"))


ProgressFn = Callable[[Progress], None]

# ---------------------------------------------------------------------- one tenant


@dataclass(frozen=True)
class _Outcome:
    state: str  # done, failed, skipped, busy
    reason: str | None = None
    from_version: str | None = None
    level: int | None = None


class _Failed(Exception):
    """The tenant cannot be upgraded (a message for its row)."""


class _Paths:
    """The steps from each version met to the target, and how to log in to the tenants,
    computed once per run and host: each host records its own builds' steps (the same
    versions), and has its own admin role."""

    def __init__(self, key: str, to_version: str) -> None:
        self.key, self.to = key, to_version
        self._lock = threading.Lock()
        self._by_from: dict[tuple[str, str], list[upgrades.UpgradeStep] | None] = {}

    def steps(
        self, sysc: psycopg.Connection[Any], host: str, from_version: str
    ) -> list[upgrades.UpgradeStep]:
        with self._lock:
            if (host, from_version) not in self._by_from:
                self._by_from[host, from_version] = upgrades.path(
                    sysc, host, self.key, from_version, self.to
                )
            found = self._by_from[host, from_version]
        if found is None:
            raise _Failed(
                f"no upgrade path from build {from_version} to {self.to} on host {host!r} "
                "(no chain of recorded builds leads there: 'monk template build' builds it "
                "on every host)"
            )
        return found


def _upgrade_tenant(
    svc: Pipeline,
    sysc: psycopg.Connection[Any],
    tenant_id: UUID,
    database: str,
    paths: _Paths,
    op_id: UUID | None,
) -> _Outcome:
    """Upgrade one tenant (see the module's docstring), on the caller's system connection:
    one round trip to claim it (lock, row, run's row), one to record it and unlock."""
    locked, tenant = runs.claim(sysc, op_id, tenant_id, database)
    if not locked:
        return _Outcome("busy", "another operation holds the tenant")
    released = False  # the unlock went with the registry's done (one round trip)
    try:
        if tenant is None or tenant.deleted_at is not None or tenant.database != database:
            return _Outcome("skipped", "purged before its turn")
        if tenant.status not in (TenantStatus.ACTIVE, TenantStatus.DISABLED):
            return _Outcome("skipped", f"{tenant.status} at its turn")
        target = svc.hosts.login_target(tenant.host)
        svc.checkpoint("upgrade-started")
        if tenant.status == TenantStatus.ACTIVE:
            outcome = _apply(
                svc, sysc, tenant, paths, op_id, target, lambda: registry.unlock(sysc, database)
            )
            released = outcome.state == "done"
            return outcome
        # A disabled tenant's database takes no connections; its role cannot log in, so
        # opening it for the upgrade's own session lets no one else in. Closed again after,
        # also when an earlier attempt died with it open (kill -9).
        pools = svc.hosts.pools(tenant.host)
        with contextlib.ExitStack() as stack:
            # On its own server: the registry's session where that is the local one.
            adm = sysc if pools.keeps_registry else stack.enter_context(pools.admin())
            admin.set_allow_connections(adm, tenant.database, True)
            try:
                return _apply(svc, sysc, tenant, paths, op_id, target, None)
            finally:
                admin.set_allow_connections(adm, tenant.database, False)
    finally:
        if not released:
            registry.unlock(sysc, database)


def _apply(
    svc: Pipeline,
    sysc: psycopg.Connection[Any],
    tenant: registry.Tenant,
    paths: _Paths,
    op_id: UUID | None,
    target: ServerTarget,
    release: Callable[[], None] | None,
) -> _Outcome:
    """The tenant's transaction: BEGIN + its build record FOR UPDATE (one round trip), the
    steps' chunks + the record's update (one simple query), COMMIT (durable: the truth)."""
    from_version: str | None = None
    ms = int(svc.settings.upgrade_lock_timeout * 1000)
    try:
        conn = open_connection(
            target, tenant.database, autocommit=True, purpose="upgrade", lock_timeout_ms=ms
        )
        with conn:
            record = upgrade_db.begin_read_build(conn)
            if record is None:
                if tenant.template_version is None:
                    raise _Failed("neither its database nor the registry names its build")
                # Cloned before templates held a build record: one from the registry's
                # belief, committed on its own (it says where the database is), then as usual.
                with conn.transaction():
                    upgrade_db.create_build_record(
                        conn, paths.key, tenant.template_version, tenant.migration_level
                    )
                record = upgrade_db.begin_read_build(conn)
                if record is None:
                    raise _Failed("its build record could not be made")
            key, from_version, level = record
            if key != paths.key:
                raise _Failed(f"its database records template {key!r}, not {paths.key!r}")
            already = from_version == paths.to
            if not already and tenant.migration_level > level:
                # Provisioned while its source had migrations its build lacked: they ran then
                # (the registry's level) but its build record does not know; the step from its
                # build holds them again. Refused rather than applied twice.
                raise _Failed(
                    f"it ran migrations up to level {tenant.migration_level} when provisioned, "
                    f"beyond its build {from_version} (level {level}); the step would run them "
                    "again: bring it forward by hand, then set monk.build"
                )
            if not already:
                steps = paths.steps(sysc, tenant.host, from_version)
                chunks = [chunk for step in steps for chunk in step.script]
                level = steps[-1].level if steps else level
                try:
                    upgrade_db.apply_steps(conn, chunks, paths.to, level)
                except psycopg.errors.LockNotAvailable:
                    raise
                except psycopg.Error as exc:
                    raise _Failed(_which_failed(conn, chunks, exc)) from None
                svc.checkpoint("upgrade-applied")
            conn.execute(b"COMMIT")
    except psycopg.errors.LockNotAvailable as exc:
        return _Outcome("busy", f"lock_timeout: {describe(exc)}", from_version)
    except _Failed as exc:
        return _Outcome("failed", str(exc), from_version)
    except psycopg.Error as exc:
        return _Outcome("failed", describe(exc), from_version)
    svc.checkpoint("upgrade-committed")
    runs.record_done(
        sysc,
        op_id,
        tenant.id,
        from_version=from_version,
        version=paths.to,
        level=level,
        reason="already at the target (its database said so)" if already else None,
        after_commit=release,
    )
    return _Outcome("done", None, from_version, level)


def _which_failed(conn: psycopg.Connection[Any], chunks: Sequence[str], exc: psycopg.Error) -> str:
    """The error of a step run as one query, naming the chunk that failed (found by running
    them again one by one, rolled back; a failing step is rare, so the fast path pays
    nothing for it)."""
    if isinstance(exc, psycopg.OperationalError) or conn.closed:
        return describe(exc)
    try:
        found = upgrade_db.locate_failure(conn, chunks)
    except psycopg.Error:
        return describe(exc)
    if found is None:
        return describe(exc)
    i, again = found
    lines = [line.strip() for line in chunks[i].splitlines() if line.strip()]
    first = lines[0] if lines else ""
    first = first if len(first) <= 120 else first[:117] + "..."
    return f"{describe(again)} (in part {i + 1} of {len(chunks)} of the upgrade: {first})"


def upgrade_one(svc: Pipeline, tenant_id: UUID) -> str | None:
    """Bring one tenant to its key's current build outside a run (a restore from the trash or
    the archive brings it back up to date); None when done, else why not."""
    with svc.hosts.pools().system() as sysc:
        tenant = registry.get_by_id(sysc, tenant_id)
        if tenant is None or tenant.template_key is None:
            return "no template"
        database = tenant.database
        # Its own host's current build and steps: each host records its own.
        build = template_builds.current_build(sysc, tenant.template_key, tenant.host)
        if build is None or build.version == tenant.template_version:
            return None
        paths = _Paths(tenant.template_key, build.version)
        for attempt in range(BUSY_ATTEMPTS):
            outcome = _upgrade_tenant(svc, sysc, tenant_id, database, paths, None)
            if outcome.state != "busy":
                break
            time.sleep(_BUSY_BACKOFF_S * (attempt + 1))
    if outcome.state == "done":
        return None
    return f"{outcome.state}: {outcome.reason}"


# ---------------------------------------------------------------------- a run


def plan(svc: Pipeline, key: str, options: UpgradeOptions) -> RunReport:
    """What a run would do (``--dry-run``): its tenants, pending or skipped with why. Nothing
    is written and no tenant database is opened."""
    options.check()
    pools = svc.hosts.pools()
    with pools.system() as reg:
        to_version = _target_version(reg, pools.target.name, key, options.to_version)
        selected = _select(reg, svc, pools.target.name, key, to_version, options)
    tenants = [
        TenantResult(
            s.name, s.database, s.state, s.from_version, to_version, None, s.reason, 0, s.canary
        )
        for s in selected
    ]
    return RunReport(None, key, to_version, "planned", False, _count(tenants), tenants)


def _count(tenants: Sequence[TenantResult]) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in tenants:
        out[t.state] = out.get(t.state, 0) + 1
    return out


def _target_version(reg: psycopg.Connection[Any], host: str, key: str, wanted: str | None) -> str:
    validate_template_key(key)
    current = template_builds.current_build(reg, key, host)
    if wanted is None:
        if current is None:
            raise TemplateNotFound(f"template {key!r} has no current build to upgrade to")
        return current.version
    known = {b.version for b in template_builds.list_builds(reg, host, key) if b.status != "failed"}
    if wanted not in known:
        raise InvalidRequest(
            f"template {key!r} has no build {wanted!r} to upgrade to", field="to_version"
        )
    return wanted


def _select(
    reg: psycopg.Connection[Any],
    svc: Pipeline,
    host: str,
    key: str,
    to_version: str,
    options: UpgradeOptions,
) -> list[Selected]:
    """The run's tenants in order: every tenant of the key on every host (or those named),
    pending, or skipped with why. Tenants the registry shows at the target are skipped: no
    connection. (``host``: the run's, which keeps the registry.)"""
    tenants = runs.tenants_of_key(reg, None, key)
    if options.tenants:
        wanted = {svc.name(n).key: n for n in options.tenants}
        tenants = [t for t in tenants if t.name_key in wanted]
        unknown = sorted(set(wanted) - {t.name_key for t in tenants})
        if unknown:
            raise InvalidRequest(
                f"no live tenant of template {key!r} named {', '.join(map(repr, unknown))}",
                field="tenants",
            )
    out: list[Selected] = []
    canaries = 0
    for t in tenants:
        reason = None
        if t.status == TenantStatus.TRASHED:
            reason = "trashed: upgraded when restored"
        elif t.status not in (TenantStatus.ACTIVE, TenantStatus.DISABLED):
            reason = f"{t.status}: another operation owns it (a later run takes it)"
        elif t.template_version == to_version:
            reason = "already at the target"
        canary = reason is None and canaries < options.canary
        canaries += canary
        out.append(
            Selected(
                t.id,
                t.name,
                t.database,
                canary,
                "skipped" if reason else "pending",
                t.template_version,
                reason,
            )
        )
    # The canary wave first, then the rest, each oldest first.
    return sorted(out, key=lambda s: not s.canary)


class Run:
    """A run this process owns (it holds the key's upgrade lock until ``execute`` returns)."""

    def __init__(
        self,
        svc: Pipeline,
        lock_conn: psycopg.Connection[Any],
        op: Operation,
        *,
        resumed: bool,
        parallel: int,
    ) -> None:
        self.svc = svc
        self.lock_conn = lock_conn
        self.op_id = op.id
        self.key = op.subject
        self.host = op.host
        self.to_version = str(op.params["to_version"])
        self.on_error = str(op.params.get("on_error", "stop"))
        self.resumed = resumed
        self.parallel = parallel
        self._closed = False

    def close(self) -> None:
        """Release the run's lock (its run, if not finished, is then dead: resumable)."""
        if not self._closed:
            self._closed = True
            with contextlib.suppress(psycopg.Error):
                self.lock_conn.close()

    def execute(self, progress: ProgressFn | None = None) -> RunReport:
        started = time.monotonic()
        pools = self.svc.hosts.pools(self.host)
        try:
            with pools.system() as reg:
                total = sum(runs.counts(reg, self.op_id).values())
                rows = runs.run_tenants(reg, self.op_id, ["pending"])
                current = _current_version(reg, self.host, self.key)
            if current == self.to_version:
                # Spares of older builds are dropped (the refiller clones new ones from the
                # swapped template in milliseconds): cheaper and simpler than upgrading each.
                pool.retire_stale(self.svc, self.key, host=self.host)
            paths = _Paths(self.key, self.to_version)
            tracker = _Tracker(self, total, progress)
            tracker.report()
            canary = [r for r in rows if r.canary]
            rest = [r for r in rows if not r.canary]
            error: str | None = None
            if canary:
                self.svc.checkpoint("upgrade-canary")
                failures = self._wave(canary, paths, tracker, stop_on_error=True)
                if failures:
                    error = f"the canary wave failed ({failures} tenant(s)): the run stopped"
            if error is None and rest:
                failures = self._wave(rest, paths, tracker, stop_on_error=self.on_error == "stop")
                if failures and self.on_error == "stop":
                    error = "a tenant failed and --on-error is stop: the run stopped"
            with pools.system() as reg:
                left = runs.counts(reg, self.op_id)
                unfinished = left.get("pending", 0) + left.get("running", 0)
                if error is None and unfinished:
                    error = f"{unfinished} tenant(s) left unfinished: a worker failed (see the log)"
                if error is not None:
                    runs.skip_open(reg, self.op_id, f"not scheduled: {error}")
                counts = runs.counts(reg, self.op_id)
                failed = counts.get("failed", 0)
                if error is None and failed:
                    error = f"{failed} tenant(s) failed"
                registry.finish_operation(
                    reg,
                    self.op_id,
                    "failed" if error is not None else "done",
                    step="finished",
                    error=error,
                    result={
                        "counts": counts,
                        "to_version": self.to_version,
                        "resumed": self.resumed,
                    },
                )
            tracker.report()
            return report(self.svc, self.op_id, elapsed_s=time.monotonic() - started)
        finally:
            self.close()

    def _wave(
        self, rows: Sequence[RunTenant], paths: _Paths, tracker: _Tracker, *, stop_on_error: bool
    ) -> int:
        """Upgrade ``rows`` on up to ``parallel`` threads; the number that failed."""
        queue = _Queue([_Item(r.tenant_id, r.database) for r in rows])
        failures = [0]
        mutex = threading.Lock()

        def work() -> None:
            target = self.svc.hosts.target(self.host)
            conn: psycopg.Connection[Any] | None = None
            try:
                conn = open_connection(
                    target, self.svc.settings.system_db_name, autocommit=True, purpose="upgrade"
                )
                runs.relax_commits(conn)
                while (item := queue.get()) is not None:
                    outcome = self._one(conn, item, paths)
                    requeue = outcome.state == "busy"  # _one fails it after the last try
                    if outcome.state == "failed":
                        with mutex:
                            failures[0] += 1
                        if stop_on_error:
                            queue.stop()
                    queue.done(item, requeue=requeue)
                    tracker.add("" if requeue else outcome.state)
            except Exception:
                log.exception("an upgrade worker failed; its tenants stay pending")
                queue.stop()
                with mutex:
                    failures[0] += 1
            finally:
                if conn is not None:
                    conn.close()

        threads = [
            threading.Thread(target=work, name=f"monk-upgrade-{i}", daemon=True)
            for i in range(min(self.parallel, len(rows)))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return failures[0]

    def _one(self, conn: psycopg.Connection[Any], item: _Item, paths: _Paths) -> _Outcome:
        item.attempts += 1
        try:
            outcome = _upgrade_tenant(
                self.svc, conn, item.tenant_id, item.database, paths, self.op_id
            )
        except (psycopg.Error, MonkError) as exc:
            outcome = _Outcome("failed", describe(exc))
        if outcome.state == "busy":
            if item.attempts < BUSY_ATTEMPTS:
                item.not_before = time.monotonic() + _BUSY_BACKOFF_S * item.attempts
                runs.mark(conn, self.op_id, item.tenant_id, "pending", reason=outcome.reason)
                return outcome
            outcome = _Outcome(
                "failed",
                f"busy: {BUSY_ATTEMPTS} attempts, each stopped by a lock held longer than "
                f"{self.svc.settings.upgrade_lock_timeout:g}s ({outcome.reason})",
                outcome.from_version,
            )
        if outcome.state in ("failed", "skipped"):
            runs.mark(
                conn,
                self.op_id,
                item.tenant_id,
                outcome.state,
                reason=outcome.reason,
                from_version=outcome.from_version,
            )
        return outcome


@dataclass
class _Item:
    tenant_id: UUID
    database: str
    attempts: int = 0
    not_before: float = 0.0


class _Queue:
    """The wave's tenants; a busy one goes back to the end, not before its backoff."""

    def __init__(self, items: Sequence[_Item]) -> None:
        self._items = deque(items)
        self._in_flight = 0
        self._stopped = False
        self._cv = threading.Condition()

    def get(self) -> _Item | None:
        with self._cv:
            while not self._stopped:
                now = time.monotonic()
                for item in self._items:
                    if item.not_before <= now:
                        self._items.remove(item)
                        self._in_flight += 1
                        return item
                if self._items:
                    self._cv.wait(timeout=min(i.not_before for i in self._items) - now)
                elif self._in_flight == 0:
                    return None
                else:
                    self._cv.wait()
            return None

    def done(self, item: _Item, *, requeue: bool) -> None:
        with self._cv:
            self._in_flight -= 1
            if requeue:
                self._items.append(item)
            self._cv.notify_all()

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify_all()


@dataclass
class _Tracker:
    run: Run
    total: int
    progress: ProgressFn | None
    counts: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        with self.run.svc.hosts.pools(self.run.host).system() as reg:
            self.counts = runs.counts(reg, self.run.op_id)

    def add(self, state: str) -> None:
        if not state:
            return
        with self._lock:
            self.counts["pending"] = self.counts.get("pending", 0) - 1
            self.counts[state] = self.counts.get(state, 0) + 1
        self.report()

    def report(self) -> None:
        if self.progress is not None:
            with self._lock:
                snapshot = dict(self.counts)
            self.progress(Progress(self.total, snapshot))


def begin(svc: Pipeline, key: str, options: UpgradeOptions) -> Run:
    """Start a run of ``key``, or resume the dead one (with its recorded target, tenants and
    on-error policy; ``options.parallel`` applies). UpgradeRunning if another process runs one.
    Nothing is upgraded yet: ``Run.execute`` does it."""
    options.check()
    validate_template_key(key)
    pools = svc.hosts.pools()
    host = pools.target.name
    lock_conn = open_connection(
        pools.target, svc.settings.system_db_name, autocommit=True, purpose="upgrade-run"
    )
    try:
        if not runs.try_run_lock(lock_conn, host, key):
            running = runs.unfinished_runs(lock_conn, host, key)
            which = f" (operation {running[-1].id})" if running else ""
            raise UpgradeRunning(
                f"template {key!r} is being upgraded by another process{which}: wait for it "
                "to finish, or follow it with GET /api/root/operations/<id>",
                template=key,
            )
        dead = runs.unfinished_runs(lock_conn, host, key)
        if dead:
            op = dead[0]
            with lock_conn.transaction():
                runs.reset_running(lock_conn, op.id)
                registry.set_operation_step(lock_conn, op.id, "resumed")
            log.info("resuming upgrade run %s of %s", op.id, key)
            return Run(svc, lock_conn, op, resumed=True, parallel=options.parallel)
        to_version = _target_version(lock_conn, host, key, options.to_version)
        selected = _select(lock_conn, svc, host, key, to_version, options)
        params = {
            "to_version": to_version,
            "tenants": list(options.tenants),
            "canary": options.canary,
            "on_error": options.on_error,
        }
        with lock_conn.transaction():
            op_id = registry.start_operation(
                lock_conn, KIND, key, database=None, host=host, params=params
            )
            runs.add_tenants(lock_conn, op_id, to_version, selected)
        op = _operation(lock_conn, op_id)
        return Run(svc, lock_conn, op, resumed=False, parallel=options.parallel)
    except BaseException:
        lock_conn.close()
        raise


def resume(svc: Pipeline, op_id: UUID, *, parallel: int = DEFAULT_PARALLEL) -> Run:
    """Take over the dead run ``op_id`` (``monk doctor --repair``)."""
    with svc.hosts.pools().system() as reg:
        op = _operation(reg, op_id)
    return begin(svc, op.subject, UpgradeOptions(parallel=parallel))


def _current_version(reg: psycopg.Connection[Any], host: str, key: str) -> str | None:
    build = template_builds.current_build(reg, key, host)
    return build.version if build else None


def _operation(reg: psycopg.Connection[Any], op_id: UUID) -> Operation:
    found = registry.get_operation(reg, op_id)
    if found is None:
        raise OperationNotFound(f"operation {op_id} not found")
    return found


def report(svc: Pipeline, op_id: UUID, *, elapsed_s: float | None = None) -> RunReport:
    """A run's progress and per-tenant results, from the system database."""
    with svc.hosts.pools().system() as reg:
        op = _operation(reg, op_id)
        if op.kind != KIND:
            raise OperationNotFound(f"operation {op_id} is not a template upgrade")
        rows = runs.run_tenants(reg, op_id)
        counts = runs.counts(reg, op_id)
        dead = op.state == "running" and runs.run_lock_free(reg, op.host, op.subject)
    tenants = [TenantResult.of(r) for r in rows]
    state = "dead" if dead else op.state
    return RunReport(
        op.id,
        op.subject,
        str(op.params.get("to_version")),
        state,
        op.step == "resumed" or bool((op.result or {}).get("resumed")),
        counts,
        tenants,
        op.error,
        elapsed_s,
    )


def dead_runs(svc: Pipeline) -> list[Operation]:
    """Runs marked running whose process is gone (``monk doctor``)."""
    pools = svc.hosts.pools()
    with pools.system() as reg:
        return [
            op
            for op in runs.unfinished_runs(reg, pools.target.name)
            if runs.run_lock_free(reg, op.host, op.subject)
        ]


# ---------------------------------------------------------------------- monk doctor

UNFINISHED = "unfinished_upgrade"


def unfinished_problems(svc: Pipeline) -> list[Problem]:
    """A run whose process died before it finished (``monk doctor``)."""
    out = []
    for op in dead_runs(svc):
        with svc.hosts.pools().system() as reg:
            counts = runs.counts(reg, op.id)
        left = counts.get("pending", 0) + counts.get("running", 0)
        out.append(
            Problem(
                UNFINISHED,
                op.subject,
                f"upgrade run {op.id} to {op.params.get('to_version')} stopped with its process: "
                f"{left} tenant(s) not finished",
                "resume the run (or run the same `monk template upgrade` again)",
            )
        )
    return out


def finish_dead_runs(svc: Pipeline) -> list[str]:
    """Resume and finish each dead run (``monk doctor --repair``); a line per run."""
    lines = []
    for op in dead_runs(svc):
        what = f"upgrade run {op.id} of {op.subject}"
        try:
            result = resume(svc, op.id).execute()
        except MonkError as exc:
            lines.append(f"{what}: cannot finish it: {exc.message}")
            continue
        counts = ", ".join(f"{n} {s}" for s, n in sorted(result.counts.items()))
        failed = "; ".join(f"{t.name}: {t.reason}" for t in result.failed)
        lines.append(f"{what}: finished ({counts})" + (f"; failed: {failed}" if failed else ""))
    return lines
