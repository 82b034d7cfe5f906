"""Fleet upgrade runs in the system database: the run's lock, its per-tenant rows, and the
registry's record of where each tenant is.

A run is an ``operations`` row (kind ``template_upgrade``, subject the template key) and one
``upgrade_tenants`` row per tenant it selected. The process running it holds the key's
upgrade lock (a session advisory lock) for its whole life: a ``running`` run whose lock is free
is dead (its process was killed), and the next run of the key resumes it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.rows import class_row

from monk.adapters.registry import (
    TENANT_COLUMNS,
    Operation,
    Tenant,
    list_operations,
    pipelined_transaction,
)
from monk.adapters.registry.locks import advisory_key

Conn = psycopg.Connection[Any]

KIND = "template_upgrade"

# Two-key advisory locks (space, hashtext(host:key)): apart from the tenants' one-key locks.
_RUN_LOCK_SPACE = 0x6D6B7570  # "mkup"


def _lock_name(host: str, key: str) -> str:
    return f"{host}:{key}"


def try_run_lock(conn: Conn, host: str, key: str) -> bool:
    """Take the key's upgrade lock for this session (held until it ends, kill -9 included)."""
    row = conn.execute(
        "SELECT pg_try_advisory_lock(%s, hashtext(%s))", (_RUN_LOCK_SPACE, _lock_name(host, key))
    ).fetchone()
    return bool(row and row[0])


def run_lock_free(conn: Conn, host: str, key: str) -> bool:
    """True when no other session holds the key's upgrade lock (its run, if any, is dead).
    The transaction-level try is released at once."""
    with conn.transaction():
        row = conn.execute(
            "SELECT pg_try_advisory_xact_lock(%s, hashtext(%s))",
            (_RUN_LOCK_SPACE, _lock_name(host, key)),
        ).fetchone()
    return bool(row and row[0])


@dataclass(frozen=True)
class RunTenant:
    """One tenant of a run, as its row says."""

    tenant_id: UUID
    name: str
    database: str
    canary: bool
    position: int
    state: str
    from_version: str | None
    to_version: str | None
    level: int | None
    reason: str | None
    attempts: int
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class Selected:
    """A tenant as the run first records it: pending, or skipped with why."""

    tenant_id: UUID
    name: str
    database: str
    canary: bool
    state: str
    from_version: str | None
    reason: str | None = None


def relax_commits(conn: Conn) -> None:
    """A run's worker session need not wait for its commits to reach the disk: what they
    record (a tenant's row, the registry's version) is rebuilt from the tenant's own
    ``monk.build`` if a crash loses it (a tenant the registry shows behind is upgraded again,
    which finds it at the target)."""
    conn.execute("SET synchronous_commit = off")


def tenants_of_key(conn: Conn, host: str | None, key: str) -> list[Tenant]:
    """The live tenants (not purged) cloned from ``key`` on ``host`` (None: on every host),
    oldest first."""
    with conn.cursor(row_factory=class_row(Tenant)) as cur:
        cur.execute(
            sql.SQL(
                "SELECT {} FROM tenants WHERE (host = %s OR %s::text IS NULL) AND template_key = %s"
                " AND deleted_at IS NULL ORDER BY created_at, id"
            ).format(TENANT_COLUMNS),
            (host, host, key),
        )
        return cur.fetchall()


def unfinished_runs(conn: Conn, host: str, key: str | None = None) -> list[Operation]:
    """The runs (of ``key``, or of every key) still marked running, oldest first."""
    runs = list_operations(conn, states=["running"], kind=KIND, subject=key, limit=1000)
    return sorted((r for r in runs if r.host == host), key=lambda r: r.created_at)


def add_tenants(conn: Conn, op_id: UUID, to_version: str, rows: Sequence[Selected]) -> None:
    """Record the run's tenants, in the order it schedules them (caller's transaction), in one
    statement: a thousand tenants cost one round trip."""
    conn.execute(
        "INSERT INTO upgrade_tenants (op_id, tenant_id, name, database, canary, position,"
        " state, from_version, to_version, reason, finished_at)"
        " SELECT %s, t.id, t.name, t.db, t.canary, t.pos - 1, t.state, t.from_version, %s,"
        "  t.reason, CASE WHEN t.state = 'skipped' THEN now() END"
        " FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::boolean[], %s::text[],"
        "  %s::text[], %s::text[]) WITH ORDINALITY"
        "  AS t (id, name, db, canary, state, from_version, reason, pos)",
        (
            op_id,
            to_version,
            [r.tenant_id for r in rows],
            [r.name for r in rows],
            [r.database for r in rows],
            [r.canary for r in rows],
            [r.state for r in rows],
            [r.from_version for r in rows],
            [r.reason for r in rows],
        ),
    )


def run_tenants(conn: Conn, op_id: UUID, states: Sequence[str] | None = None) -> list[RunTenant]:
    """The run's tenants (in ``states``, if given), in schedule order."""
    where = sql.SQL("op_id = %s")
    params: list[Any] = [op_id]
    if states:
        where = sql.SQL("op_id = %s AND state = ANY(%s)")
        params.append(list(states))
    with conn.cursor(row_factory=class_row(RunTenant)) as cur:
        cur.execute(
            sql.SQL(
                "SELECT tenant_id, name, database, canary, position, state, from_version,"
                " to_version, level, reason, attempts, started_at, finished_at"
                " FROM upgrade_tenants WHERE {} ORDER BY position"
            ).format(where),
            params,
        )
        return cur.fetchall()


def counts(conn: Conn, op_id: UUID) -> dict[str, int]:
    rows = conn.execute(
        "SELECT state, count(*) FROM upgrade_tenants WHERE op_id = %s GROUP BY state", (op_id,)
    ).fetchall()
    return {str(s): int(n) for s, n in rows}


def claim(
    conn: Conn, op_id: UUID | None, tenant_id: UUID, database: str
) -> tuple[bool, Tenant | None]:
    """The tenant's lock tried; then its registry row, read by a statement of its own (after
    the lock is held, so it sees what the lock's last holder committed); and the run's row
    marked running (the caller marks it again when the tenant does not go on): one round
    trip, a pipeline. (Whether the lock was taken, the row.)"""
    rows = conn.cursor(row_factory=class_row(Tenant))
    with conn.pipeline():
        lock = conn.execute("SELECT pg_try_advisory_lock(%s)", (advisory_key(database),))
        rows.execute(
            sql.SQL("SELECT {} FROM tenants WHERE id = %s").format(TENANT_COLUMNS), (tenant_id,)
        )
        if op_id is not None:
            mark_running(conn, op_id, tenant_id)
    held = lock.fetchone()
    tenant = rows.fetchone()
    rows.close()
    return bool(held and held[0]), tenant


def mark_running(conn: Conn, op_id: UUID, tenant_id: UUID) -> None:
    conn.execute(
        "UPDATE upgrade_tenants SET state = 'running', attempts = attempts + 1,"
        " started_at = now() WHERE op_id = %s AND tenant_id = %s",
        (op_id, tenant_id),
    )


def mark(
    conn: Conn,
    op_id: UUID,
    tenant_id: UUID,
    state: str,
    *,
    reason: str | None = None,
    from_version: str | None = None,
) -> None:
    """Set a tenant's state: pending again (busy), failed or skipped (with why)."""
    conn.execute(
        "UPDATE upgrade_tenants SET state = %s, reason = %s,"
        " from_version = coalesce(%s, from_version),"
        " finished_at = CASE WHEN %s IN ('failed', 'skipped') THEN now() END"
        " WHERE op_id = %s AND tenant_id = %s",
        (state, reason, from_version, state, op_id, tenant_id),
    )


def record_done(
    conn: Conn,
    op_id: UUID | None,
    tenant_id: UUID,
    *,
    from_version: str | None,
    version: str,
    level: int,
    reason: str | None = None,
    after_commit: Callable[[], object] | None = None,
) -> None:
    """The tenant's database committed at ``version`` / ``level``: the registry follows, and
    the run's row says done, in one transaction; then ``after_commit`` (the tenant's unlock),
    all in one round trip."""
    with pipelined_transaction(conn, after_commit=after_commit):
        conn.execute(
            "UPDATE tenants SET template_version = %s, migration_level = %s, updated_at = now()"
            " WHERE id = %s",
            (version, level, tenant_id),
        )
        if op_id is not None:
            conn.execute(
                "UPDATE upgrade_tenants SET state = 'done', level = %s, reason = %s,"
                " from_version = coalesce(%s, from_version), finished_at = now()"
                " WHERE op_id = %s AND tenant_id = %s",
                (level, reason, from_version, op_id, tenant_id),
            )


def skip_open(conn: Conn, op_id: UUID, reason: str) -> int:
    """Every tenant the run has not finished becomes skipped with ``reason`` (a stopped run)."""
    cur = conn.execute(
        "UPDATE upgrade_tenants SET state = 'skipped', reason = %s, finished_at = now()"
        " WHERE op_id = %s AND state IN ('pending', 'running')",
        (reason, op_id),
    )
    return cur.rowcount


def reset_running(conn: Conn, op_id: UUID) -> int:
    """A resumed run: the tenants its dead process had started are pending again (each one's
    own ``monk.build`` tells whether that process's upgrade committed)."""
    cur = conn.execute(
        "UPDATE upgrade_tenants SET state = 'pending' WHERE op_id = %s AND state = 'running'",
        (op_id,),
    )
    return cur.rowcount
