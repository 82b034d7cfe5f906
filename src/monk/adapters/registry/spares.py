"""The warm pool's spares in the system database: their rows, and the one-statement handout.

A spare's rows go ``creating`` -> ``ready`` (-> deleted by the handout that consumes it); the
creator holds the spare's advisory lock, so the reconciler can tell a live creation from a crash.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.rows import class_row

from monk.adapters.registry import TENANT_COLUMNS, Tenant

Conn = psycopg.Connection[Any]


@dataclass(frozen=True)
class SpareRow:
    id: UUID
    database: str
    status: str
    tenant_id: UUID | None


@dataclass(frozen=True)
class PickedSpare:
    """A ready spare taken under its row lock (the caller's transaction holds it)."""

    id: UUID
    database: str
    template_key: str


def counts(conn: Conn, host: str) -> dict[tuple[str, str], int]:
    """Spares being made or ready, per (template key, version)."""
    rows = conn.execute(
        "SELECT template_key, template_version, count(*) FROM spares"
        " WHERE host = %s AND status IN ('creating', 'ready') GROUP BY 1, 2",
        (host,),
    ).fetchall()
    return {(str(k), str(v)): int(str(n)) for k, v, n in rows}


def status_counts(conn: Conn, host: str) -> list[tuple[str, str, str, int]]:
    """(template key, version, status, count) of every spare of ``host``."""
    rows = conn.execute(
        "SELECT template_key, template_version, status, count(*) FROM spares"
        " WHERE host = %s GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
        (host,),
    ).fetchall()
    return [(str(k), str(v), str(s), int(str(n))) for k, v, s, n in rows]


def rows(conn: Conn, host: str) -> list[SpareRow]:
    found = conn.execute(
        "SELECT id, database, status, tenant_id FROM spares WHERE host = %s", (host,)
    ).fetchall()
    return [SpareRow(r[0], str(r[1]), str(r[2]), r[3]) for r in found]


def insert(
    conn: Conn,
    *,
    host: str,
    template_key: str,
    template_version: str,
    database: str,
    keyholder: UUID,
) -> UUID:
    """A spare being made (``creating``)."""
    row = conn.execute(
        "INSERT INTO spares (host, template_key, template_version, database, keyholder)"
        " VALUES (%s, %s, %s, %s, %s) RETURNING id",
        (host, template_key, template_version, database, keyholder),
    ).fetchone()
    assert row is not None
    return UUID(str(row[0]))


def set_version(conn: Conn, spare_id: UUID, template_version: str) -> None:
    conn.execute(
        "UPDATE spares SET template_version = %s WHERE id = %s", (template_version, spare_id)
    )


def mark_ready(conn: Conn, spare_id: UUID, migration_level: int) -> None:
    conn.execute(
        "UPDATE spares SET status = 'ready', ready_at = now(), migration_level = %s WHERE id = %s",
        (migration_level, spare_id),
    )


def delete(conn: Conn, spare_id: UUID) -> None:
    conn.execute("DELETE FROM spares WHERE id = %s", (spare_id,))


def set_keyholder(conn: Conn, spare_id: UUID, keyholder: UUID) -> None:
    conn.execute("UPDATE spares SET keyholder = %s WHERE id = %s", (keyholder, spare_id))


def is_ready_and_held_by(conn: Conn, host: str, database: str, keyholder: UUID) -> bool:
    row = conn.execute(
        "SELECT 1 FROM spares WHERE host = %s AND database = %s AND status = 'ready'"
        " AND keyholder = %s",
        (host, database, keyholder),
    ).fetchone()
    return row is not None


def pick_ready(
    conn: Conn,
    host: str,
    *,
    template_key: str | None = None,
    not_version: str | None = None,
    keyholders: list[UUID] | None = None,
) -> PickedSpare | None:
    """One ready spare of ``host`` (of ``template_key``; not of ``not_version``; whose keyholder
    is one of ``keyholders`` or none), locked for the caller's transaction (SKIP LOCKED: two
    callers never pick the same)."""
    row = conn.execute(
        "SELECT id, database, template_key FROM spares WHERE host = %(host)s"
        " AND status = 'ready'"
        " AND (%(key)s::text IS NULL OR template_key = %(key)s)"
        " AND (%(not_version)s::text IS NULL OR template_version <> %(not_version)s)"
        " AND (%(keyholders)s::uuid[] IS NULL OR keyholder IS NULL"
        " OR keyholder = ANY(%(keyholders)s::uuid[]))"
        " LIMIT 1 FOR UPDATE SKIP LOCKED",
        {"host": host, "key": template_key, "not_version": not_version, "keyholders": keyholders},
    ).fetchone()
    return None if row is None else PickedSpare(UUID(str(row[0])), str(row[1]), str(row[2]))


_HAND_OUT = sql.SQL(
    "SELECT {} FROM hand_out_spare(%(lock)s, %(id)s, %(name)s, %(name_key)s, %(database)s,"
    " %(role)s, %(host)s, %(template)s, %(idempotency_key)s, %(keyholder)s, %(spare)s)"
).format(TENANT_COLUMNS)


def hand_out(conn: Conn, **params: Any) -> Tenant | None:
    """``hand_out_spare`` (the system function): the spare handed out as the tenant, active,
    in one statement; None when it declined."""
    cur = conn.cursor(row_factory=class_row(Tenant))
    return cur.execute(_HAND_OUT, params, prepare=True).fetchone()
