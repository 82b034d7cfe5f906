"""Statements run inside a tenant database by a fleet upgrade: its build record, the steps.

Each takes an open connection to the tenant's database (as monk's admin role) inside the one
transaction the upgrade is; the caller commits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

Conn = psycopg.Connection[Any]


def set_lock_timeout(conn: Conn, timeout_ms: int) -> None:
    """For this transaction: a lock the tenant's own sessions hold longer than this fails the
    statement (LockNotAvailable) instead of queueing every later session behind it."""
    conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{int(timeout_ms)}ms")))


def create_build_record(conn: Conn, key: str, version: str, level: int) -> None:
    """The build record of a tenant cloned before templates held one (from the registry's
    belief), in the upgrade's transaction. Owned by pg_database_owner like a template's."""
    conn.execute("CREATE SCHEMA IF NOT EXISTS monk AUTHORIZATION pg_database_owner")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS monk.build (key text NOT NULL, version text NOT NULL,"
        " level integer NOT NULL, upgraded_at timestamptz)"
    )
    conn.execute("ALTER TABLE monk.build OWNER TO pg_database_owner")
    conn.execute("DELETE FROM monk.build")
    conn.execute(
        "INSERT INTO monk.build (key, version, level) VALUES (%s, %s, %s)", (key, version, level)
    )


def apply_script(conn: Conn, script: Sequence[str]) -> None:
    """Run a step's chunks in order as ``pg_database_owner`` (what it creates belongs to the
    database's owner, like everything a template holds). Without parameters psycopg sends each
    chunk as a simple query: a chunk may hold several statements."""
    conn.execute("SET LOCAL ROLE pg_database_owner")
    for chunk in script:
        conn.execute(chunk.encode())
    conn.execute("RESET ROLE")


def set_build(conn: Conn, version: str, level: int) -> None:
    conn.execute(
        "UPDATE monk.build SET version = %s, level = %s, upgraded_at = now()", (version, level)
    )
