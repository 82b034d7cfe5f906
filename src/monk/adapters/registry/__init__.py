"""The tenant registry and operations journal in the system database.

Functions take an open connection to the system database (whose search_path finds the registry)
and return immutable snapshots; decisions are made over those snapshots in the service layer.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg import Cursor, sql
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

from monk.adapters.registry.locks import (  # re-exported: callers know them as registry's
    SERVE_PURPOSE as SERVE_PURPOSE,
)
from monk.adapters.registry.locks import (
    advisory_key as advisory_key,
)
from monk.adapters.registry.locks import (
    dead_keyholders as dead_keyholders,
)
from monk.adapters.registry.locks import (
    hold_keyholder_lock as hold_keyholder_lock,
)
from monk.adapters.registry.locks import (
    keyholder_session_alive as keyholder_session_alive,
)
from monk.adapters.registry.locks import (
    mark_serving as mark_serving,
)
from monk.adapters.registry.locks import (
    serving_keyholders as serving_keyholders,
)
from monk.adapters.registry.locks import (
    try_lock as try_lock,
)
from monk.adapters.registry.locks import (
    unlock as unlock,
)
from monk.adapters.registry.locks import (
    unlock_if_held as unlock_if_held,
)
from monk.adapters.registry.locks import (
    wait_lock as wait_lock,
)
from monk.core.tenant_names import TenantName
from monk.errors import HashCollision, TenantExists

Conn = psycopg.Connection[Any]


@dataclass(frozen=True)
class Tenant:
    id: UUID
    name: str
    name_key: str
    database: str
    host: str
    is_active: bool
    tenant_type: str
    status: str
    template_key: str | None
    template_version: str | None
    role_name: str | None
    step: str | None
    migration_level: int
    idempotency_key: str | None
    access_read: list[UUID]
    access_edit: list[UUID]
    access_full: list[UUID]
    access_deny: list[UUID]
    archive_path: str | None
    archive_size: int | None
    archive_sha256: str | None
    archived_at: datetime | None
    archive_server_version: str | None
    created_at: datetime
    updated_at: datetime
    trashed_at: datetime | None
    deleted_at: datetime | None
    connection_limit: int | None = None  # the tenant's own; None: the installation's default


def rendered(composed: sql.Composable) -> sql.SQL:
    """A constant composition rendered once, for statements run on every provision: psycopg
    re-quotes each ``Identifier`` at every execution (some 40 µs for a row's 20 columns)."""
    return sql.SQL(composed.as_string())


_COLUMNS = rendered(sql.SQL(", ").join(sql.Identifier(f.name) for f in dataclasses.fields(Tenant)))
TENANT_COLUMNS = _COLUMNS  # for statements composed elsewhere that return a Tenant


def _select(where: sql.Composable) -> sql.Composed:
    return sql.SQL("SELECT {} FROM tenants WHERE ").format(_COLUMNS) + where


def get_live(conn: Conn, name_key: str) -> Tenant | None:
    """The live (not deleted) tenant with this identity."""
    with conn.cursor(row_factory=class_row(Tenant)) as cur:
        cur.execute(_select(sql.SQL("name_key = %s AND deleted_at IS NULL")), (name_key,))
        return cur.fetchone()


def lock_and_find(
    conn: Conn, name: TenantName, *, ready_spares_of: tuple[str, str] | None = None
) -> tuple[bool, Tenant | None, bool]:
    """``try_lock`` on the name's database, and the live tenant with this identity (else the
    live one holding its database: a hash collision), and whether a ready spare of
    ``ready_spares_of`` (host, template) exists, in one round trip (pipelined)."""
    with conn.cursor(row_factory=class_row(Tenant)) as cur:
        # Read after the block: a fetch inside a pipeline costs a round trip of its own.
        with conn.pipeline():
            locked_cur = conn.execute(
                "SELECT pg_try_advisory_lock(%s)", (advisory_key(name.database),), prepare=True
            )
            spares_cur = None
            if ready_spares_of is not None:
                spares_cur = conn.execute(
                    "SELECT EXISTS (SELECT 1 FROM spares WHERE host = %s AND template_key = %s"
                    " AND status = 'ready')",
                    ready_spares_of,
                    prepare=True,
                )
            cur.execute(
                _select(
                    sql.SQL(
                        "deleted_at IS NULL AND (name_key = %s OR database = %s)"
                        " ORDER BY name_key = %s DESC LIMIT 1"
                    )
                ),
                (name.key, name.database, name.key),
                prepare=True,
            )
        row = locked_cur.fetchone()
        spares = spares_cur.fetchone() if spares_cur is not None else None
        return bool(row and row[0]), cur.fetchone(), bool(spares and spares[0])


@contextmanager
def pipelined_transaction(
    conn: Conn, *, after_commit: Callable[[], object] | None = None
) -> Iterator[None]:
    """One transaction, queued whole in a pipeline and sent with one Sync: one round trip.
    (psycopg's ``transaction()`` inside a pipeline syncs at its start when anything is queued
    and again at its COMMIT.) Not for use inside another pipeline, whose nesting would sync.
    Read results after the block: a fetch inside it costs a round trip. On any error the
    transaction is rolled back before the error propagates. ``after_commit`` queues statements
    to run once the COMMIT succeeded, in the same round trip (skipped if it failed)."""
    try:
        with conn.pipeline():
            conn.execute("BEGIN")
            yield
            conn.execute("COMMIT")
            if after_commit is not None:
                after_commit()
    except BaseException:
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE and not conn.closed:
            conn.rollback()
        raise


def get_live_by_database(conn: Conn, database: str) -> Tenant | None:
    with conn.cursor(row_factory=class_row(Tenant)) as cur:
        cur.execute(_select(sql.SQL("database = %s AND deleted_at IS NULL")), (database,))
        return cur.fetchone()


def get_latest_deleted(conn: Conn, name_key: str) -> Tenant | None:
    with conn.cursor(row_factory=class_row(Tenant)) as cur:
        cur.execute(
            _select(sql.SQL("name_key = %s AND deleted_at IS NOT NULL ORDER BY deleted_at DESC")),
            (name_key,),
        )
        return cur.fetchone()


def get_by_id(conn: Conn, tenant_id: UUID) -> Tenant | None:
    with conn.cursor(row_factory=class_row(Tenant)) as cur:
        cur.execute(_select(sql.SQL("id = %s")), (tenant_id,))
        return cur.fetchone()


def list_tenants(
    conn: Conn,
    *,
    statuses: Sequence[str] | None = None,
    template: str | None = None,
    include_trashed: bool = False,
    include_deleted: bool = False,
    limit: int = 100,
    offset: int = 0,
) -> list[Tenant]:
    clauses: list[sql.Composable] = [sql.SQL("TRUE")]
    params: list[Any] = []
    if statuses:
        clauses.append(sql.SQL("status = ANY(%s)"))
        params.append(list(statuses))
    if template:
        clauses.append(sql.SQL("template_key = %s"))
        params.append(template)
    if not include_trashed:
        clauses.append(sql.SQL("trashed_at IS NULL"))
    if not include_deleted:
        clauses.append(sql.SQL("deleted_at IS NULL"))
    query = _select(sql.SQL(" AND ").join(clauses)) + sql.SQL(
        " ORDER BY created_at, id LIMIT %s OFFSET %s"
    )
    with conn.cursor(row_factory=class_row(Tenant)) as cur:
        cur.execute(query, [*params, limit, offset])
        return cur.fetchall()


def all_live(conn: Conn, host: str) -> list[Tenant]:
    with conn.cursor(row_factory=class_row(Tenant)) as cur:
        cur.execute(_select(sql.SQL("deleted_at IS NULL AND host = %s")), (host,))
        return cur.fetchall()


def live_databases_elsewhere(conn: Conn, host: str) -> set[str]:
    """The databases and roles of live tenants of every host but ``host``: on ``host`` such a
    name is a move's copy (in flight, or the old one queued as ``drop_copy``), not an orphan."""
    rows = conn.execute(
        "SELECT database, role_name FROM tenants WHERE deleted_at IS NULL AND host <> %s",
        (host,),
    ).fetchall()
    return {name for row in rows for name in row if name is not None}


def fetch_tenant(cur: Cursor[Tenant]) -> Tenant:
    row = cur.fetchone()
    cur.close()
    assert row is not None, "the tenant row vanished"
    return row


@contextmanager
def intent_errors(conn: Conn, name: TenantName) -> Iterator[None]:
    """A unique violation on the intent (the name, or its hash, is taken) becomes
    TenantExists or HashCollision; for a statement or pipeline that holds the intent's
    transaction (``tenants.reserve``)."""
    try:
        yield
    except psycopg.errors.UniqueViolation:
        if conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
            conn.rollback()  # a pipeline reports the error after queueing the COMMIT
        raise exists_error(conn, name) from None


def exists_error(conn: Conn, name: TenantName) -> TenantExists | HashCollision:
    """Which conflict it is: the same tenant, or another name with the same hash."""
    holder = get_live_by_database(conn, name.database)
    if holder is not None and holder.name_key != name.key:
        return HashCollision(
            f"tenant name {name.display!r} hashes to {name.database}, which tenant "
            f"{holder.name!r} already uses; choose another name",
            database=name.database,
        )
    return TenantExists(f"tenant {name.display!r} already exists", database=name.database)


def update(conn: Conn, tenant_id: UUID, **fields: Any) -> Tenant:
    """Set ``fields`` on the tenant row (in the caller's transaction, if any)."""
    return fetch_tenant(queue_update(conn, tenant_id, **fields))


def queue_update(conn: Conn, tenant_id: UUID, **fields: Any) -> Cursor[Tenant]:
    """``update`` without waiting for the row (see ``queue_intent``)."""
    values = [Jsonb(v) if isinstance(v, dict) else v for v in fields.values()]
    cur = conn.cursor(row_factory=class_row(Tenant))
    cur.execute(_update_query(tuple(fields)), [*values, tenant_id])
    return cur


@functools.lru_cache(maxsize=64)
def _update_query(keys: tuple[str, ...]) -> sql.SQL:
    assignments = sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(k)) for k in keys)
    return rendered(
        sql.SQL("UPDATE tenants SET {} WHERE id = %s RETURNING {}").format(assignments, _COLUMNS)
    )


def set_step(conn: Conn, tenant_id: UUID, step: str) -> None:
    """Journal a completed step. Not synchronous: a step lost to a crash is found by the
    reconciler from what exists on the server, so it need not wait for a disk flush."""
    with conn.transaction():
        conn.execute("SET LOCAL synchronous_commit = off")
        conn.execute("UPDATE tenants SET step = %s WHERE id = %s", (step, tenant_id))


def delete_row(conn: Conn, tenant_id: UUID) -> None:
    conn.execute("DELETE FROM tenants WHERE id = %s", (tenant_id,))


def remember_idempotency_key(
    conn: Conn, key: str, request: dict[str, Any]
) -> tuple[bool, dict[str, Any]]:
    """Record ``request`` under ``key`` unless the key is known: (whether this call recorded
    it, the request recorded under the key). Autocommit: a concurrent first use of the key
    waits for ours to commit, then reads it."""
    row = conn.execute(
        "INSERT INTO idempotency_keys (key, request) VALUES (%s, %s)"
        " ON CONFLICT (key) DO NOTHING RETURNING request",
        (key, Jsonb(request)),
    ).fetchone()
    if row is not None:
        return True, dict(row[0])
    # A new statement, so a new snapshot: the row that conflicted is visible now.
    row = conn.execute("SELECT request FROM idempotency_keys WHERE key = %s", (key,)).fetchone()
    if row is None:  # forgotten in between (its request failed): record ours
        return remember_idempotency_key(conn, key, request)
    return False, dict(row[0])


def forget_idempotency_key(conn: Conn, key: str, request: dict[str, Any]) -> None:
    """The request recorded under ``key`` failed and made nothing: the key is free again."""
    conn.execute(
        "DELETE FROM idempotency_keys WHERE key = %s AND request = %s", (key, Jsonb(request))
    )


# ---------------------------------------------------------------- operations journal


@dataclass(frozen=True)
class Operation:
    id: UUID
    kind: str
    subject: str
    database: str | None
    host: str
    state: str
    step: str | None
    error: str | None
    params: dict[str, Any]
    result: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    # a queued job's failed attempts, and when it is due again (None: at once)
    attempts: int = 0
    next_attempt_at: datetime | None = None


_OP_COLUMNS = rendered(
    sql.SQL(", ").join(sql.Identifier(f.name) for f in dataclasses.fields(Operation))
)


def start_operation(
    conn: Conn,
    kind: str,
    subject: str,
    *,
    database: str | None,
    host: str,
    state: str = "running",
    params: dict[str, Any] | None = None,
    op_id: UUID | None = None,
) -> UUID:
    """Journal an operation; with ``op_id`` given nothing is read back (pipeline-friendly)."""
    if op_id is not None:
        conn.execute(
            "INSERT INTO operations (id, kind, subject, database, host, state, params)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (op_id, kind, subject, database, host, state, Jsonb(params or {})),
            prepare=True,
        )
        return op_id
    row = conn.execute(
        "INSERT INTO operations (kind, subject, database, host, state, params)"
        " VALUES (%s, %s, %s, %s, %s, %s) RETURNING id",
        (kind, subject, database, host, state, Jsonb(params or {})),
    ).fetchone()
    assert row is not None
    return UUID(str(row[0]))


def finish_operation(
    conn: Conn,
    op_id: UUID,
    state: str,
    *,
    step: str | None = None,
    error: str | None = None,
    result: dict[str, Any] | None = None,
) -> None:
    conn.execute(
        "UPDATE operations SET state = %s, step = coalesce(%s, step), error = %s,"
        " result = %s, updated_at = now(),"
        " finished_at = CASE WHEN %s IN ('done', 'failed', 'undone') THEN now() END"
        " WHERE id = %s",
        (state, step, error, Jsonb(result) if result is not None else None, state, op_id),
    )


def set_operation_step(conn: Conn, op_id: UUID, step: str) -> None:
    with conn.transaction():
        conn.execute("SET LOCAL synchronous_commit = off")
        conn.execute(
            "UPDATE operations SET step = %s, updated_at = now() WHERE id = %s", (step, op_id)
        )


def get_operation(conn: Conn, op_id: UUID) -> Operation | None:
    with conn.cursor(row_factory=class_row(Operation)) as cur:
        cur.execute(
            sql.SQL("SELECT {} FROM operations WHERE id = %s").format(_OP_COLUMNS), (op_id,)
        )
        return cur.fetchone()


def list_operations(
    conn: Conn,
    *,
    states: Sequence[str] | None = None,
    kind: str | None = None,
    subject: str | None = None,
    limit: int = 100,
) -> list[Operation]:
    clauses: list[sql.Composable] = [sql.SQL("TRUE")]
    params: list[Any] = []
    if states:
        clauses.append(sql.SQL("state = ANY(%s)"))
        params.append(list(states))
    if kind:
        clauses.append(sql.SQL("kind = %s"))
        params.append(kind)
    if subject:
        clauses.append(sql.SQL("subject = %s"))
        params.append(subject)
    query = sql.SQL("SELECT {} FROM operations WHERE {} ORDER BY created_at DESC LIMIT %s").format(
        _OP_COLUMNS, sql.SQL(" AND ").join(clauses)
    )
    with conn.cursor(row_factory=class_row(Operation)) as cur:
        cur.execute(query, [*params, limit])
        return cur.fetchall()


def claim_queued(
    conn: Conn, kind: str, *, database: str | None = None, op_id: UUID | None = None
) -> Operation | None:
    """Claim the oldest due queued operation of ``kind`` with FOR UPDATE SKIP LOCKED, in the
    caller's transaction: a crashed worker's transaction ends with it, so its job becomes
    claimable again. A job that failed waits for its ``next_attempt_at``, so the jobs queued
    after it go first; with ``database`` (that tenant's purge, asked for now) or ``op_id``
    (that job) it is taken whether due or not."""
    where: sql.Composable = sql.SQL("kind = %s AND state = 'queued'")
    params: list[Any] = [kind]
    if database is not None:
        where += sql.SQL(" AND database = %s")
        params.append(database)
    if op_id is not None:
        where += sql.SQL(" AND id = %s")
        params.append(op_id)
    if database is None and op_id is None:
        where += sql.SQL(" AND (next_attempt_at IS NULL OR next_attempt_at <= now())")
    with conn.cursor(row_factory=class_row(Operation)) as cur:
        cur.execute(
            sql.SQL(
                "SELECT {} FROM operations WHERE {} ORDER BY created_at LIMIT 1"
                " FOR UPDATE SKIP LOCKED"
            ).format(_OP_COLUMNS, where),
            params,
        )
        return cur.fetchone()
