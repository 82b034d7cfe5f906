"""Advisory locks on the system database: a tenant's (one key, from its database name) and a
process's keyholder lock (two keys), which a running ``monk serve`` holds too, naming its
session. A session lock is released with its session, kill -9 included: how the reconciler
tells a running operation from a crashed one."""

from __future__ import annotations

import hashlib
from typing import Any
from uuid import UUID

import psycopg

from monk.adapters.postgres.connection import APPLICATION_NAME

Conn = psycopg.Connection[Any]


def advisory_key(database: str) -> int:
    """A signed 64-bit advisory lock key for an object name (the tenant hash fits as is)."""
    raw = int.from_bytes(hashlib.sha256(database.encode()).digest()[:8], "big")
    return raw - (1 << 64) if raw >= (1 << 63) else raw


def try_lock(conn: Conn, database: str) -> bool:
    """Session advisory lock on a tenant: held by whoever works on it; a dead worker's lock is
    released with its connection, which is how the reconciler tells running from crashed."""
    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (advisory_key(database),)).fetchone()
    return bool(row and row[0])


def wait_lock(conn: Conn, database: str) -> None:
    """The tenant's session lock, waiting for whoever holds it."""
    conn.execute("SELECT pg_advisory_lock(%s)", (advisory_key(database),))


def unlock(conn: Conn, database: str, *, prepare: bool | None = None) -> None:
    """``prepare``: for a hot path (psycopg then plans it once per session)."""
    conn.execute("SELECT pg_advisory_unlock(%s)", (advisory_key(database),), prepare=prepare)


def unlock_if_held(conn: Conn, database: str) -> None:
    """``unlock`` when this session holds the lock (a statement that failed may or may not
    have taken it), without the server's warning when it does not."""
    key = advisory_key(database)
    conn.execute(
        "SELECT pg_advisory_unlock(%s) FROM pg_locks WHERE locktype = 'advisory'"
        " AND pid = pg_backend_pid() AND objsubid = 1"
        " AND classid::bigint = (%s >> 32) & 4294967295 AND objid::bigint = %s & 4294967295",
        (key, key, key),
    )


# Keyholders: the process whose memory holds the passwords of its spares and spare roles
# (column ``keyholder``) holds this session advisory lock, keyed by its instance id, from
# before it writes its first such row to its end. Its lock gone means its passwords are gone:
# only then may another process adopt its spares or drop its spare roles. (The two-key form
# keeps these apart from the tenants' one-key locks.) A running ``monk serve`` holds it on a
# session named ``SERVING``: how a tool that needs the installation to itself (``monk bench``)
# tells that a server is at work on it.
KEYHOLDER_LOCK_SPACE = 0x6D6B6800  # "mkh\0"
SERVE_PURPOSE = "serve"
SERVING = f"{APPLICATION_NAME}:{SERVE_PURPOSE}"  # the application_name of a serve's session


def hold_keyholder_lock(conn: Conn, instance_id: UUID) -> bool:
    """Take this process's keyholder lock on ``conn`` (a connection kept for that alone)."""
    row = conn.execute(
        "SELECT pg_try_advisory_lock(%s, hashtext(%s::text))",
        (KEYHOLDER_LOCK_SPACE, instance_id),
    ).fetchone()
    return bool(row and row[0])


def mark_serving(conn: Conn) -> None:
    """Name the keyholder lock's session as a running ``monk serve``'s (``SERVING``)."""
    conn.execute("SELECT set_config('application_name', %s, false)", (SERVING,))


def serving_keyholders(conn: Conn) -> int:
    """How many sessions named ``SERVING`` (``monk serve`` processes) hold a keyholder lock
    on this system database."""
    row = conn.execute(
        "SELECT count(*) FROM pg_locks AS l JOIN pg_stat_activity AS a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 AND l.classid = %s"
        " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        " AND a.application_name = %s",
        (KEYHOLDER_LOCK_SPACE, SERVING),
    ).fetchone()
    return int(row[0]) if row else 0


def keyholder_session_alive(conn: Conn) -> bool:
    """False if the keyholder lock's session is gone (a server restart ends every session)."""
    try:
        conn.execute("SELECT 1")
    except psycopg.Error:
        return False
    return True


_DEAD_KEYHOLDERS = {
    # A NULL keyholder (a spare no process claims) counts as dead. The transaction-level try
    # succeeds only where no live session holds the keyholder's lock, and is released at once.
    "spares": "SELECT k FROM (SELECT DISTINCT keyholder AS k FROM spares"
    " WHERE keyholder IS DISTINCT FROM %(me)s) AS s"
    " WHERE k IS NULL OR pg_try_advisory_xact_lock(%(space)s, hashtext(k::text))",
    "spare_roles": "SELECT k FROM (SELECT DISTINCT keyholder AS k FROM spare_roles"
    " WHERE keyholder IS DISTINCT FROM %(me)s) AS s"
    " WHERE k IS NULL OR pg_try_advisory_xact_lock(%(space)s, hashtext(k::text))",
}


def dead_keyholders(conn: Conn, me: UUID, *, of: str) -> list[UUID | None]:
    """Keyholders other than ``me`` of rows of ``of`` (``spares`` or ``spare_roles``) whose
    process is gone; their lock cannot come back (an instance id is never reused)."""
    with conn.transaction():
        rows = conn.execute(
            _DEAD_KEYHOLDERS[of], {"me": me, "space": KEYHOLDER_LOCK_SPACE}
        ).fetchall()
    return [r[0] for r in rows]
