"""Console sessions in the system database, by the hash of their id."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg

Conn = psycopg.Connection[Any]


def open_session(conn: Conn, id_hash: bytes, operator: str, ttl_seconds: int) -> datetime:
    """A new session, valid for ``ttl_seconds``; the expired ones are forgotten on the way (the
    table never grows without bound). Returns when it expires."""
    conn.execute("DELETE FROM console_sessions WHERE expires_at <= now()")
    row = conn.execute(
        "INSERT INTO console_sessions (id_hash, operator, expires_at)"
        " VALUES (%s, %s, now() + make_interval(secs => %s)) RETURNING expires_at",
        (id_hash, operator, ttl_seconds),
    ).fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def find(conn: Conn, id_hash: bytes) -> tuple[str, datetime] | None:
    """The operator and expiry of a session that has not expired."""
    row = conn.execute(
        "SELECT operator, expires_at FROM console_sessions"
        " WHERE id_hash = %s AND expires_at > now()",
        (id_hash,),
    ).fetchone()
    return (str(row[0]), row[1]) if row else None


def close(conn: Conn, id_hash: bytes) -> None:
    conn.execute("DELETE FROM console_sessions WHERE id_hash = %s", (id_hash,))
