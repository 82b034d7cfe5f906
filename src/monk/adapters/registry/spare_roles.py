"""Spare roles in the system database: rows and roles made, claimed and dropped together by the
system functions ``make_spare_role``, ``claim_spare_role`` and ``drop_spare_roles``."""

from __future__ import annotations

from typing import Any
from uuid import UUID

import psycopg

Conn = psycopg.Connection[Any]


def make(conn: Conn, role: str, *, verifier: str, mark: str, keyholder: UUID) -> None:
    """The role (LOGIN, with the password of ``verifier``, marked) and its row, in one
    transaction."""
    conn.execute("SELECT make_spare_role(%s, %s, %s, %s)", (role, verifier, mark, keyholder))


def held_by(conn: Conn, keyholder: UUID) -> set[str]:
    rows = conn.execute("SELECT role FROM spare_roles WHERE keyholder = %s", (keyholder,))
    return {str(r[0]) for r in rows.fetchall()}


def count(conn: Conn) -> int:
    row = conn.execute("SELECT count(*) FROM spare_roles").fetchone()
    return int(row[0]) if row else 0


def drop(conn: Conn, *, keep: UUID | None, only: UUID | None) -> int:
    """Drop the spare roles of every keyholder but ``keep`` (None: none spared), only of
    ``only`` (None: of any); returns how many."""
    row = conn.execute("SELECT drop_spare_roles(%s, %s)", (keep, only)).fetchone()
    return int(row[0]) if row else 0
