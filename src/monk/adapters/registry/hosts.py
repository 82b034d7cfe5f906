"""The fleet's hosts in the system database (table ``hosts``, migration 0012)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

Conn = psycopg.Connection[Any]

LOCAL_ID = UUID(int=0)
"""The local host's row (made when its state, capacity or clone support is first recorded)
has this id: one per registry."""


@dataclass(frozen=True)
class HostRow:
    name: str
    id: UUID
    is_local: bool
    url: str | None
    system_identifier: str | None
    capacity: int | None
    labels: dict[str, str]
    state: str
    server_version: str | None
    added_at: datetime
    updated_at: datetime
    checked_at: datetime | None
    check_ok: bool | None
    check_error: str | None
    check_latency_ms: float | None
    clone_support: bool | None
    """Can the server's data directory clone files (file_copy_method = clone)? None: unknown."""
    clone_detail: str | None
    clone_checked_at: datetime | None


_COLUMNS = sql.SQL(", ").join(sql.Identifier(f.name) for f in dataclasses.fields(HostRow))


def get(conn: Conn, name: str) -> HostRow | None:
    with conn.cursor(row_factory=class_row(HostRow)) as cur:
        cur.execute(sql.SQL("SELECT {} FROM hosts WHERE name = %s").format(_COLUMNS), (name,))
        return cur.fetchone()


def list_all(conn: Conn) -> list[HostRow]:
    with conn.cursor(row_factory=class_row(HostRow)) as cur:
        cur.execute(sql.SQL("SELECT {} FROM hosts ORDER BY name").format(_COLUMNS))
        return cur.fetchall()


def find_server(conn: Conn, *, url: str, system_identifier: str) -> HostRow | None:
    """A host already registered with this URL or on this cluster."""
    with conn.cursor(row_factory=class_row(HostRow)) as cur:
        cur.execute(
            sql.SQL("SELECT {} FROM hosts WHERE url = %s OR system_identifier = %s LIMIT 1").format(
                _COLUMNS
            ),
            (url, system_identifier),
        )
        return cur.fetchone()


def insert(
    conn: Conn,
    *,
    name: str,
    host_id: UUID,
    url: str,
    system_identifier: str,
    capacity: int | None,
    labels: Mapping[str, str],
    server_version: str,
    latency_ms: float,
) -> HostRow:
    """A new host, checked just now (raises UniqueViolation on a name, URL or cluster taken)."""
    with conn.cursor(row_factory=class_row(HostRow)) as cur:
        cur.execute(
            sql.SQL(
                "INSERT INTO hosts (name, id, url, system_identifier, capacity, labels, "
                "server_version, checked_at, check_ok, check_latency_ms) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, now(), true, %s) RETURNING {}"
            ).format(_COLUMNS),
            (
                name,
                host_id,
                url,
                system_identifier,
                capacity,
                Jsonb(dict(labels)),
                server_version,
                latency_ms,
            ),
        )
        row = cur.fetchone()
    assert row is not None
    return row


def ensure_local(conn: Conn, name: str, host_id: UUID) -> None:
    """The local host's row (made when its state is first set; it is listed without one)."""
    conn.execute(
        "INSERT INTO hosts (name, id, is_local) VALUES (%s, %s, true) ON CONFLICT DO NOTHING",
        (name, host_id),
    )


def set_state(conn: Conn, name: str, state: str) -> HostRow | None:
    with conn.cursor(row_factory=class_row(HostRow)) as cur:
        cur.execute(
            sql.SQL(
                "UPDATE hosts SET state = %s, updated_at = now() WHERE name = %s RETURNING {}"
            ).format(_COLUMNS),
            (state, name),
        )
        return cur.fetchone()


def update(
    conn: Conn,
    name: str,
    *,
    capacity: int | None,
    set_capacity: bool,
    labels: Mapping[str, str] | None,
) -> HostRow | None:
    """Set a host's capacity (``set_capacity``: None is no limit) and/or replace its labels."""
    with conn.cursor(row_factory=class_row(HostRow)) as cur:
        cur.execute(
            sql.SQL(
                "UPDATE hosts SET capacity = CASE WHEN %s THEN %s ELSE capacity END, "
                "labels = coalesce(%s, labels), updated_at = now() WHERE name = %s RETURNING {}"
            ).format(_COLUMNS),
            (set_capacity, capacity, None if labels is None else Jsonb(dict(labels)), name),
        )
        return cur.fetchone()


def record_check(
    conn: Conn,
    name: str,
    *,
    ok: bool,
    error: str | None,
    latency_ms: float | None,
    server_version: str | None,
) -> None:
    """The outcome of a check; a failed one keeps the last known server version."""
    conn.execute(
        "UPDATE hosts SET checked_at = now(), check_ok = %s, check_error = %s, "
        "check_latency_ms = %s, server_version = coalesce(%s, server_version) WHERE name = %s",
        (ok, error, latency_ms, server_version, name),
    )


def clone_support(conn: Conn, name: str) -> tuple[bool | None, str | None]:
    """What was detected of the host's file cloning: (supported, how it was found); (None,
    None) when never detected (or the local host has no row yet)."""
    row = conn.execute(
        "SELECT clone_support, clone_detail FROM hosts WHERE name = %s", (name,)
    ).fetchone()
    if row is None:
        return None, None
    return (None if row[0] is None else bool(row[0])), (None if row[1] is None else str(row[1]))


def record_clone_support(conn: Conn, name: str, *, supported: bool, detail: str) -> None:
    conn.execute(
        "UPDATE hosts SET clone_support = %s, clone_detail = %s, clone_checked_at = now() "
        "WHERE name = %s",
        (supported, detail, name),
    )


def delete_unused(conn: Conn, name: str) -> HostRow | None:
    """Delete a (remote) host that no live tenant records, in one statement; None if it has
    tenants (or is gone). A provision that places a tenant there must hold the host's row
    (FOR KEY SHARE) until it commits, so that this cannot remove it under the provision."""
    with conn.transaction(), conn.cursor(row_factory=class_row(HostRow)) as cur:
        # Waits for provisions placing onto it (their FOR KEY SHARE): the count below then
        # sees their intents (a new statement, a new snapshot).
        cur.execute("SELECT 1 FROM hosts WHERE name = %s FOR UPDATE", (name,))
        cur.execute(
            sql.SQL(
                "DELETE FROM hosts h WHERE name = %s AND NOT is_local AND NOT EXISTS "
                "(SELECT 1 FROM tenants t WHERE t.host = h.name AND t.deleted_at IS NULL) "
                "RETURNING {}"
            ).format(_COLUMNS),
            (name,),
        )
        return cur.fetchone()


def tenant_status_counts(conn: Conn) -> list[tuple[str, str, int]]:
    """(host, status, count) of the live (not purged) tenants, /metrics' gauge."""
    rows = conn.execute(
        "SELECT host, status, count(*) FROM tenants WHERE deleted_at IS NULL"
        " GROUP BY 1, 2 ORDER BY 1, 2"
    ).fetchall()
    return [(str(h), str(s), int(str(n))) for h, s, n in rows]


def spare_status_counts(conn: Conn) -> list[tuple[str, str, int]]:
    """(host, status, count) of the warm spares of every host, /metrics' gauge."""
    rows = conn.execute(
        "SELECT host, status, count(*) FROM spares GROUP BY 1, 2 ORDER BY 1, 2"
    ).fetchall()
    return [(str(h), str(s), int(str(n))) for h, s, n in rows]


def live_tenant_counts(conn: Conn) -> dict[str, int]:
    """Live (not purged) tenants per host, as tenants.host records them."""
    rows = conn.execute(
        "SELECT host, count(*) FROM tenants WHERE deleted_at IS NULL GROUP BY host"
    ).fetchall()
    return {str(r[0]): int(r[1]) for r in rows}


# ``host add`` holds this transaction lock on its new row's id from before it stores the
# password to its commit: a password file without a row is an add in flight while the lock is
# held, and the leftover of a killed add once it is free (the two-key form keeps it apart).
_ADD_LOCK_SPACE = 0x6D6B6801


def hold_add_lock(conn: Conn, host_id: UUID) -> None:
    """Inside the add's transaction."""
    conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s::text))", (_ADD_LOCK_SPACE, host_id))


def abandoned(conn: Conn, candidates: set[UUID]) -> set[UUID]:
    """Which of ``candidates`` (ids of password files) no row has and no add is making."""
    if not candidates:
        return set()
    with conn.transaction():
        rows = conn.execute(
            "SELECT c FROM unnest(%s::uuid[]) AS c WHERE NOT EXISTS "
            "(SELECT 1 FROM hosts WHERE hosts.id = c) "
            "AND pg_try_advisory_xact_lock(%s, hashtext(c::text))",
            (list(candidates), _ADD_LOCK_SPACE),
        ).fetchall()
    return {UUID(str(r[0])) for r in rows}
