"""The warm pool's spares in the system database: their rows, and the one-statement handout.

A spare's rows go ``creating`` -> ``ready`` (-> deleted by the handout that consumes it); the
creator holds the spare's advisory lock, so the reconciler can tell a live creation from a crash.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import psycopg
from psycopg import Cursor, sql
from psycopg.rows import class_row

from monk.adapters.registry import TENANT_COLUMNS, Tenant, rendered
from monk.adapters.registry.locks import advisory_key
from monk.core.tenant_names import TenantName

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
    not_keyholder: UUID | None = None,
    database: str | None = None,
    exclude: Sequence[UUID] = (),
) -> PickedSpare | None:
    """The oldest ready spare of ``host`` (of ``template_key``; not of ``not_version``; whose
    keyholder is one of ``keyholders`` or none; whose keyholder is not ``not_keyholder``; named
    ``database``; not one of ``exclude``), locked for the caller's transaction (SKIP LOCKED: two
    callers never pick the same)."""
    row = conn.execute(
        "SELECT id, database, template_key FROM spares WHERE host = %(host)s"
        " AND status = 'ready'"
        " AND (%(key)s::text IS NULL OR template_key = %(key)s)"
        " AND (%(not_version)s::text IS NULL OR template_version <> %(not_version)s)"
        " AND (%(keyholders)s::uuid[] IS NULL OR keyholder IS NULL"
        " OR keyholder = ANY(%(keyholders)s::uuid[]))"
        " AND (%(not_keyholder)s::uuid IS NULL OR keyholder IS DISTINCT FROM %(not_keyholder)s)"
        " AND (%(database)s::text IS NULL OR database = %(database)s)"
        " AND id <> ALL(%(exclude)s::uuid[])"
        " ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED",
        {
            "host": host,
            "key": template_key,
            "not_version": not_version,
            "keyholders": keyholders,
            "not_keyholder": not_keyholder,
            "database": database,
            "exclude": list(exclude),
        },
    ).fetchone()
    return None if row is None else PickedSpare(UUID(str(row[0])), str(row[1]), str(row[2]))


_HAND_OUT = rendered(
    sql.SQL(
        "SELECT {} FROM hand_out_spare(%(lock)s, %(id)s, %(name)s, %(name_key)s, %(database)s,"
        " %(role)s, %(host)s, %(template)s, %(idempotency_key)s, %(keyholder)s, %(spare)s,"
        " %(verifier)s, %(connection_limit)s)"
    ).format(TENANT_COLUMNS)
)


def queue_hand_out(
    conn: Conn,
    name: TenantName,
    *,
    tenant_id: UUID,
    host: str,
    template: str,
    idempotency_key: str | None,
    keyholder: UUID,
    spare: str | None,
    verifier: str | None,
    connection_limit: int | None,
) -> Cursor[Tenant]:
    """The warm handout, ``hand_out_spare`` (the system function): a ready spare of the
    template's current build becomes the tenant, active, in one statement. ``spare``: the one
    whose password the caller knows as ``keyholder`` (None: the oldest ready one, whose password
    ``verifier`` replaces); ``connection_limit``: the tenant's own. Queued: read it with
    ``fetchone`` after the caller's transaction; no row when the function declined (the name
    busy or taken, no such spare ready)."""
    cur = conn.cursor(row_factory=class_row(Tenant))
    cur.execute(
        _HAND_OUT,
        {
            "lock": advisory_key(name.database),
            "id": tenant_id,
            "name": name.display,
            "name_key": name.key,
            "database": name.database,
            "role": name.role,
            "host": host,
            "template": template,
            "idempotency_key": idempotency_key,
            "keyholder": keyholder,
            "spare": spare,
            "verifier": verifier,
            "connection_limit": connection_limit,
        },
        prepare=True,
    )
    return cur


def status(conn: Conn, spare_id: UUID) -> str | None:
    """The warm-pool spare's status (None: its row is gone)."""
    row = conn.execute("SELECT status FROM spares WHERE id = %s", (spare_id,)).fetchone()
    return None if row is None else str(row[0])


@dataclass(frozen=True)
class ClaimedSpare:
    id: UUID
    database: str
    template_version: str
    migration_level: int


def claim(
    conn: Conn,
    host: str,
    *,
    template_key: str,
    template_version: str,
    tenant_id: UUID,
    database: str | None,
) -> ClaimedSpare | None:
    """A ready spare of the build on ``host`` (the one named ``database``, else the oldest),
    marked ``claimed`` by the tenant ``tenant_id`` (a handout on a host of the fleet, whose
    renames run there, not in this statement). None: no such spare ready."""
    row = conn.execute(
        "UPDATE spares SET status = 'claimed', tenant_id = %(tenant)s WHERE id = ("
        " SELECT id FROM spares WHERE host = %(host)s AND template_key = %(key)s"
        " AND template_version = %(version)s AND status = 'ready'"
        " AND (%(database)s::text IS NULL OR database = %(database)s)"
        " ORDER BY created_at LIMIT 1 FOR UPDATE SKIP LOCKED)"
        " RETURNING id, database, template_version, coalesce(migration_level, 0)",
        {
            "tenant": tenant_id,
            "host": host,
            "key": template_key,
            "version": template_version,
            "database": database,
        },
    ).fetchone()
    if row is None:
        return None
    return ClaimedSpare(UUID(str(row[0])), str(row[1]), str(row[2]), int(str(row[3])))


def claimed_by(conn: Conn, tenant_id: UUID) -> list[tuple[UUID, str]]:
    """(id, database) of the spares claimed by the tenant ``tenant_id``."""
    rows = conn.execute(
        "SELECT id, database FROM spares WHERE status = 'claimed' AND tenant_id = %s",
        (tenant_id,),
    ).fetchall()
    return [(UUID(str(r[0])), str(r[1])) for r in rows]


def forget_host(conn: Conn, host: str) -> int:
    """Delete the rows of every spare of a host that is removed; returns how many."""
    return conn.execute("DELETE FROM spares WHERE host = %s", (host,)).rowcount
