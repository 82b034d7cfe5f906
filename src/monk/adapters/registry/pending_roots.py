"""Root users waiting to be written into their tenant's database (see migration 0025)."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import psycopg

Conn = psycopg.Connection[Any]


def queue_add(conn: Conn, tenant_id: UUID, password_hash: str) -> None:
    """Queued in the caller's (pipelined) transaction: the activation commits it."""
    conn.execute(
        "INSERT INTO pending_roots (tenant_id, password_hash) VALUES (%s, %s)",
        (tenant_id, password_hash),
        prepare=True,
    )


def lock(conn: Conn, tenant_id: UUID) -> str | None:
    """The waiting hash, its row locked until the caller's transaction ends (so two writers
    never both write it); None when nothing waits."""
    row = conn.execute(
        "SELECT password_hash FROM pending_roots WHERE tenant_id = %s FOR UPDATE",
        (tenant_id,),
    ).fetchone()
    return str(row[0]) if row else None


def forget(conn: Conn, tenant_id: UUID) -> None:
    conn.execute("DELETE FROM pending_roots WHERE tenant_id = %s", (tenant_id,))


def waiting(conn: Conn, *, older_than_seconds: float = 0.0) -> list[UUID]:
    """The tenants whose root user waits, oldest first."""
    rows = conn.execute(
        "SELECT tenant_id FROM pending_roots"
        " WHERE created_at <= now() - make_interval(secs => %s) ORDER BY created_at",
        (older_than_seconds,),
    ).fetchall()
    return [r[0] for r in rows]
