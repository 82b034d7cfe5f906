"""The registry reads ``monk doctor`` makes beside the tenants' (service/doctor.py): which spare
databases and spare roles the registry knows, to tell an orphan on the server from a spare."""

from __future__ import annotations

from typing import Any

import psycopg

Conn = psycopg.Connection[Any]


def spare_known(conn: Conn, database: str) -> bool:
    """Whether a ``spares`` row names ``database``."""
    return (
        conn.execute("SELECT 1 FROM spares WHERE database = %s", (database,)).fetchone() is not None
    )


def lock_spare_role_row(conn: Conn, role: str) -> bool:
    """Whether a ``spare_roles`` row names ``role``; if so it is locked (FOR UPDATE) until the
    caller's transaction ends, so the row cannot come or go while the caller decides."""
    row = conn.execute("SELECT 1 FROM spare_roles WHERE role = %s FOR UPDATE", (role,)).fetchone()
    return row is not None
