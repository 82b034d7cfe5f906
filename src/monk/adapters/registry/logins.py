"""Failed-login counts (table ``login_failures``) and the tenant state read by tenant requests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

import psycopg


def blocked_for(
    conn: psycopg.Connection[Any], tenant_key: str, username: str, *, max_failures: int, window: int
) -> int:
    """Seconds left of this (tenant, user)'s window if it has used up its failures, else 0."""
    row = conn.execute(
        "SELECT ceil(extract(epoch FROM window_start + make_interval(secs => %s) - now()))"
        " FROM login_failures WHERE tenant_key = %s AND username = %s AND failures >= %s"
        " AND window_start + make_interval(secs => %s) > now()",
        (window, tenant_key, username, max_failures, window),
    ).fetchone()
    return max(int(row[0]), 1) if row is not None else 0


def record_failure(
    conn: psycopg.Connection[Any], tenant_key: str, username: str, *, window: int
) -> int:
    """Count one failure (a window that has passed starts over); the count in the window."""
    row = conn.execute(
        "INSERT INTO login_failures AS f (tenant_key, username, failures) VALUES (%s, %s, 1)"
        " ON CONFLICT (tenant_key, username) DO UPDATE SET"
        "   failures = CASE WHEN f.window_start + make_interval(secs => %s) > now()"
        "                   THEN f.failures + 1 ELSE 1 END,"
        "   window_start = CASE WHEN f.window_start + make_interval(secs => %s) > now()"
        "                   THEN f.window_start ELSE now() END"
        " RETURNING failures",
        (tenant_key, username, window, window),
    ).fetchone()
    assert row is not None
    return int(row[0])


def clear_failures(conn: psycopg.Connection[Any], tenant_key: str, username: str) -> None:
    conn.execute(
        "DELETE FROM login_failures WHERE tenant_key = %s AND username = %s",
        (tenant_key, username),
    )


def forget_old_failures(conn: psycopg.Connection[Any], *, window: int) -> int:
    """Drop the counts whose window has passed (a failure starts them over anyway)."""
    cur = conn.execute(
        "DELETE FROM login_failures WHERE window_start + make_interval(secs => %s) < now()",
        (window,),
    )
    return cur.rowcount


@dataclass(frozen=True)
class TenantState:
    """What a tenant request needs to know of its tenant, read on every cache refresh."""

    id: UUID
    name: str
    status: str
    database: str
    host: str
    # The template build the tenant is at (key:version:level): what its models are cached by.
    build: str | None = None
    # The tenant's own role: the data routes run their statements as it (SET LOCAL ROLE).
    role: str | None = None


_STATE = (
    "SELECT id, name, status, database, host,"
    " coalesce(template_key, '') || ':' || coalesce(template_version, '') || ':'"
    " || coalesce(migration_level::text, ''), role_name"
    " FROM tenants WHERE id = ANY(%s)"
)


def tenant_states(conn: psycopg.Connection[Any], tenant_ids: list[UUID]) -> dict[UUID, TenantState]:
    """The tenants' current rows (by id: a name can be reused after a purge), in one query;
    an id with no row is missing from the answer."""
    rows = conn.execute(_STATE, (tenant_ids,)).fetchall()
    return {row[0]: TenantState(*row) for row in rows}


def tenant_state(conn: psycopg.Connection[Any], tenant_id: UUID) -> TenantState | None:
    """The tenant's current row."""
    return tenant_states(conn, [tenant_id]).get(tenant_id)
