"""SQL run inside a tenant database on its core table ``users`` (one row per tenant user)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql

Conn = psycopg.Connection[Any]


@dataclass(frozen=True)
class UserRow:
    id: UUID
    name: str
    auth: str
    access: str
    password_hash: str | None
    created_at: Any
    updated_at: Any


_COLUMNS = "id, name, auth, access, password_hash, created_at, updated_at"
_LIVE = "trashed_at IS NULL AND deleted_at IS NULL"


def has_password_column(conn: Conn) -> bool:
    """False in a tenant cloned from a build older than tenant users (compiler version 3)."""
    row = conn.execute(
        "SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('public.users')"
        " AND attname = 'password_hash' AND NOT attisdropped"
    ).fetchone()
    return row is not None


def find(conn: Conn, auth: str) -> UserRow | None:
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM public.users WHERE auth = %s AND {_LIVE}",
        (auth,),
    ).fetchone()
    return UserRow(*row) if row is not None else None


def find_by_id(conn: Conn, user_id: UUID) -> UserRow | None:
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM public.users WHERE id = %s AND {_LIVE}",
        (user_id,),
    ).fetchone()
    return UserRow(*row) if row is not None else None


def access_query(user_id: UUID) -> sql.Composed:
    """``access_of`` as one statement with its value inlined (``sql.Literal``), to be sent
    together with others in one simple-query round trip."""
    return sql.SQL("SELECT access FROM public.users WHERE id = {} AND " + _LIVE).format(
        sql.Literal(user_id)
    )


def access_of(conn: Conn, user_id: UUID) -> str | None:
    """The user's access level now; None if the user was removed."""
    row = conn.execute(
        f"SELECT access FROM public.users WHERE id = %s AND {_LIVE}", (user_id,)
    ).fetchone()
    return str(row[0]) if row is not None else None


def list_users(conn: Conn) -> list[UserRow]:
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM public.users WHERE {_LIVE} ORDER BY auth"
    ).fetchall()
    return [UserRow(*r) for r in rows]


def insert(conn: Conn, *, name: str, auth: str, access: str, password_hash: str) -> UserRow | None:
    """The new user, or None if a user of that login name exists."""
    row = conn.execute(
        "INSERT INTO public.users (name, auth, access, password_hash) VALUES (%s, %s, %s, %s)"
        f" ON CONFLICT (auth) DO NOTHING RETURNING {_COLUMNS}",
        (name, auth, access, password_hash),
    ).fetchone()
    return UserRow(*row) if row is not None else None


def set_password(conn: Conn, auth: str, password_hash: str) -> bool:
    cur = conn.execute(
        f"UPDATE public.users SET password_hash = %s WHERE auth = %s AND {_LIVE}",
        (password_hash, auth),
    )
    return cur.rowcount > 0


def remove(conn: Conn, auth: str) -> bool:
    cur = conn.execute("DELETE FROM public.users WHERE auth = %s", (auth,))
    return cur.rowcount > 0


ROOT = "root"


def put_root(conn: Conn, password_hash: str, *, replace: bool = True) -> bool:
    """The ``root`` user (access ``root``) with ``password_hash``: made, or its hash replaced (a
    spare adopted by another process gets a new one; not with ``replace`` False: a root user
    written since, whose password may have changed, is kept), in one statement and transaction:
    on an autocommit connection one round trip (the session's ``synchronous_commit`` applies).
    False when the database predates tenant users (no ``users.password_hash``): nothing
    written."""
    query = (
        "INSERT INTO public.users (name, auth, access, password_hash)"
        " VALUES (%(root)s, %(root)s, 'root', %(hash)s) ON CONFLICT (auth) "
        + (
            "DO UPDATE SET password_hash = excluded.password_hash, access = 'root'"
            if replace
            else "DO NOTHING"
        )
    )
    params = {"root": ROOT, "hash": password_hash}
    try:
        if conn.autocommit:
            conn.execute(query, params)
        else:
            with conn.transaction():
                conn.execute(query, params)
    except (psycopg.errors.UndefinedColumn, psycopg.errors.UndefinedTable):
        return False
    return True
