"""Tenant moves between hosts in the system database: the journal of a move (an operations row
of kind ``move``), the switch of ``tenants.host``, and the ``drop_copy`` queue of the copies
a move leaves behind (migration 0018)."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

from monk.adapters.registry import Operation, rendered

Conn = psycopg.Connection[Any]

MOVE = "move"
DROP_COPY = "drop_copy"
HOST_DRAIN = "host_drain"

_OP_COLUMNS = rendered(
    sql.SQL(", ").join(sql.Identifier(f) for f in Operation.__dataclass_fields__)
)


def running(conn: Conn, subject: str | None = None) -> list[Operation]:
    """Moves journaled as running (all, or of the tenant ``subject``), oldest first."""
    where: sql.Composable = sql.SQL("kind = 'move' AND state = 'running'")
    params: list[Any] = []
    if subject is not None:
        where += sql.SQL(" AND subject = %s")
        params.append(subject)
    with conn.cursor(row_factory=class_row(Operation)) as cur:
        cur.execute(
            sql.SQL("SELECT {} FROM operations WHERE {} ORDER BY created_at").format(
                _OP_COLUMNS, where
            ),
            params,
        )
        return cur.fetchall()


def running_drains(conn: Conn, host: str) -> list[Operation]:
    """Drains of ``host`` journaled as running, oldest first."""
    with conn.cursor(row_factory=class_row(Operation)) as cur:
        cur.execute(
            sql.SQL(
                "SELECT {} FROM operations WHERE kind = %s AND subject = %s AND state = 'running'"
                " ORDER BY created_at"
            ).format(_OP_COLUMNS),
            (HOST_DRAIN, host),
        )
        return cur.fetchall()


def record(conn: Conn, op_id: UUID, step: str, result: dict[str, Any]) -> None:
    """The move reached ``step``; ``result`` merged into what it recorded so far."""
    conn.execute(
        "UPDATE operations SET step = %s, result = coalesce(result, '{}') || %s,"
        " updated_at = now() WHERE id = %s",
        (step, Jsonb(result), op_id),
    )


def switch(
    conn: Conn,
    *,
    op_id: UUID,
    tenant_id: UUID,
    from_host: str,
    to_host: str,
    role: str | None,
    result: dict[str, Any],
) -> bool:
    """In one transaction: the tenant's row names ``to_host``, a ``tenant.moved`` event, the
    move's journal says ``switched``, and the copy on ``from_host`` is queued for dropping.
    False (nothing changed) if the row no longer names ``from_host``."""
    with conn.transaction():
        row = conn.execute(
            "UPDATE tenants SET host = %s, updated_at = now() WHERE id = %s AND host = %s"
            " AND deleted_at IS NULL"
            " RETURNING name_key, database",
            (to_host, tenant_id, from_host),
        ).fetchone()
        if row is None:
            return False
        name_key, database = str(row[0]), str(row[1])
        conn.execute(
            "INSERT INTO events (kind, tenant_id, payload)"
            " SELECT 'tenant.moved', t.id, jsonb_build_object('id', t.id, 'name', t.name,"
            "  'database', t.database, 'host', t.host, 'from_host', %s::text,"
            "  'status', t.status, 'template', t.template_key,"
            "  'template_version', t.template_version)"
            " FROM tenants t WHERE t.id = %s",
            (from_host, tenant_id),
        )
        record(conn, op_id, "switched", result)
        queue_drop(conn, subject=name_key, database=database, host=from_host, role=role, move=op_id)
    return True


def queue_drop(
    conn: Conn, *, subject: str, database: str, host: str, role: str | None, move: UUID
) -> UUID:
    """Queue the drop of a copy of ``database`` (and its role) on ``host``."""
    row = conn.execute(
        "INSERT INTO operations (kind, subject, database, host, state, params)"
        " VALUES ('drop_copy', %s, %s, %s, 'queued', %s) RETURNING id",
        (subject, database, host, Jsonb({"role": role, "move": str(move)})),
    ).fetchone()
    assert row is not None
    return UUID(str(row[0]))


def live_host(conn: Conn, database: str) -> str | None:
    """The host the live tenant of ``database`` is on (None: no live tenant)."""
    row = conn.execute(
        "SELECT host FROM tenants WHERE database = %s AND deleted_at IS NULL", (database,)
    ).fetchone()
    return None if row is None else str(row[0])


def movable(conn: Conn, host: str) -> list[tuple[str, str | None]]:
    """(name, template key) of the tenants a drain moves off ``host``: every live one whose
    database is there (active, disabled or trashed), oldest first."""
    rows = conn.execute(
        "SELECT name, template_key FROM tenants WHERE host = %s AND deleted_at IS NULL"
        " AND status IN ('active', 'disabled', 'trashed') ORDER BY created_at",
        (host,),
    ).fetchall()
    return [(str(r[0]), None if r[1] is None else str(r[1])) for r in rows]
