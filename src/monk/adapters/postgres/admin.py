"""Server-level administration: databases, roles, sessions. Cluster-global objects only.

Each call takes the ServerTarget the object lives on (monk spreads tenants over several servers)
and an open autocommit connection to that server's maintenance database where it needs one: the
caller decides how long a connection lives. PostgreSQL errors become monk errors here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import psycopg
from psycopg import sql

from monk.core.identifiers import validate_database_name, validate_role_name
from monk.errors import (
    Conflict,
    DatabaseExists,
    DatabaseMissing,
    InvalidState,
    MonkError,
    TemplateBusy,
)

log = logging.getLogger(__name__)

Conn = psycopg.Connection[tuple[object, ...]]


def database_exists(conn: Conn, name: str) -> bool:
    row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    return row is not None


def role_exists(conn: Conn, name: str) -> bool:
    row = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone()
    return row is not None


def list_databases(conn: Conn, like: str) -> list[str]:
    """Database names matching the LIKE pattern ``like`` (escape ``_`` yourself)."""
    rows = conn.execute(
        "SELECT datname FROM pg_database WHERE datname LIKE %s ORDER BY datname", (like,)
    ).fetchall()
    return [str(r[0]) for r in rows]


def sessions_on(conn: Conn, dbname: str) -> list[int]:
    """Client sessions on ``dbname``: autovacuum workers enter even closed databases and leave
    by themselves (CREATE DATABASE and DROP DATABASE signal them)."""
    rows = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()"
        " AND backend_type = 'client backend'",
        (dbname,),
    ).fetchall()
    return [int(str(r[0])) for r in rows]


def terminate_sessions(conn: Conn, dbname: str) -> int:
    """End every other session on ``dbname``; returns how many were signalled."""
    rows = conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = %s AND pid <> pg_backend_pid()",
        (dbname,),
    ).fetchall()
    if rows:
        log.warning("ended %d session(s) on %s", len(rows), dbname)
    return len(rows)


def create_database(
    conn: Conn, name: str, *, template: str | None = None, owner: str | None = None
) -> None:
    """CREATE DATABASE (optionally a clone of ``template``). Needs an autocommit connection.

    Raises DatabaseExists, DatabaseMissing (template), or TemplateBusy (55006: sessions on it).
    """
    validate_database_name(name)
    query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template is not None:
        validate_database_name(template)
        query += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
    if owner is not None:
        query += sql.SQL(" OWNER {}").format(sql.Identifier(validate_role_name(owner)))
    try:
        conn.execute(query)
    except psycopg.errors.DuplicateDatabase:
        raise DatabaseExists(f"database {name!r} already exists", database=name) from None
    except psycopg.errors.UniqueViolation:
        # Two concurrent CREATEs of one name can collide in the catalog instead.
        raise DatabaseExists(f"database {name!r} already exists", database=name) from None
    except psycopg.errors.InvalidCatalogName:
        raise DatabaseMissing(f"template database {template!r} does not exist") from None
    except psycopg.errors.ObjectInUse as exc:
        raise TemplateBusy(
            f"template database {template!r} is in use by other sessions", template=template
        ) from exc


def drop_database(conn: Conn, name: str, *, force: bool = True, missing_ok: bool = True) -> bool:
    """DROP DATABASE [IF EXISTS] … WITH (FORCE): ends its sessions first. True if dropped."""
    validate_database_name(name)
    if not database_exists(conn, name):
        if missing_ok:
            return False
        raise DatabaseMissing(f"database {name!r} does not exist")
    # A template database cannot be dropped (42809) until it is an ordinary one again.
    conn.execute(sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE false").format(sql.Identifier(name)))
    query = sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name))
    if force:
        query += sql.SQL(" WITH (FORCE)")
    try:
        conn.execute(query)
    except psycopg.errors.ObjectInUse as exc:
        raise InvalidState(f"database {name!r} is in use: {exc}") from None
    return True


def rename_database(conn: Conn, old: str, new: str) -> None:
    validate_database_name(old)
    validate_database_name(new)
    try:
        conn.execute(
            sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
                sql.Identifier(old), sql.Identifier(new)
            )
        )
    except psycopg.errors.DuplicateDatabase:
        raise DatabaseExists(f"database {new!r} already exists") from None
    except psycopg.errors.InvalidCatalogName:
        raise DatabaseMissing(f"database {old!r} does not exist") from None
    except psycopg.errors.ObjectInUse as exc:
        raise InvalidState(f"database {old!r} is in use and cannot be renamed: {exc}") from None


def close_database(conn: Conn, name: str, *, as_template: bool) -> None:
    """Refuse new connections to ``name`` and end the ones it has (templates, disabled tenants)."""
    validate_database_name(name)
    conn.execute(
        sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false IS_TEMPLATE {}").format(
            sql.Identifier(name), sql.Literal(as_template)
        )
    )
    terminate_sessions(conn, name)


def validate_setting_names(settings: Mapping[str, str]) -> None:
    for key in settings:
        if not all(part.isidentifier() for part in key.split(".")):
            raise MonkError(f"invalid database setting name {key!r}")


def set_database_settings(conn: Conn, name: str, settings: Mapping[str, str]) -> None:
    """ALTER DATABASE … SET for each setting: a clone does not copy them."""
    validate_database_name(name)
    validate_setting_names(settings)
    for key, value in settings.items():
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET {} = {}").format(
                sql.Identifier(name),
                sql.SQL(".").join(sql.Identifier(p) for p in key.split(".")),
                sql.Literal(value),
            )
        )


def missing_extensions(conn: Conn, names: Sequence[str]) -> list[str]:
    """The extensions of ``names`` that the server cannot create (not installed there)."""
    if not names:
        return []
    rows = conn.execute(
        "SELECT name FROM pg_available_extensions WHERE name = ANY(%s)", (list(names),)
    ).fetchall()
    available = {str(row[0]) for row in rows}
    return [name for name in names if name not in available]


def create_extension(conn: Conn, name: str) -> None:
    """CREATE EXTENSION in the connected database (its default schema, ``public``)."""
    conn.execute(sql.SQL("CREATE EXTENSION IF NOT EXISTS {}").format(sql.Identifier(name)))


def create_role(conn: Conn, name: str, *, password_verifier: str, login: bool = True) -> None:
    """A role whose password is given as a SCRAM verifier: no plaintext reaches the server
    (nor its logs)."""
    validate_role_name(name)
    try:
        conn.execute(
            sql.SQL("CREATE ROLE {} {} PASSWORD {}").format(
                sql.Identifier(name),
                sql.SQL("LOGIN" if login else "NOLOGIN"),
                sql.Literal(password_verifier),
            )
        )
    except psycopg.errors.DuplicateObject:
        raise Conflict(f"role {name!r} already exists", role=name) from None


def set_role_password(conn: Conn, name: str, *, password_verifier: str) -> None:
    validate_role_name(name)
    conn.execute(
        sql.SQL("ALTER ROLE {} PASSWORD {}").format(
            sql.Identifier(name), sql.Literal(password_verifier)
        )
    )


def set_role_login(conn: Conn, name: str, *, login: bool) -> None:
    validate_role_name(name)
    conn.execute(
        sql.SQL("ALTER ROLE {} {}").format(
            sql.Identifier(name), sql.SQL("LOGIN" if login else "NOLOGIN")
        )
    )


def drop_role(conn: Conn, name: str) -> bool:
    """DROP ROLE IF EXISTS; True if it existed."""
    validate_role_name(name)
    if not role_exists(conn, name):
        return False
    conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))
    return True


def database_size(conn: Conn, name: str) -> int | None:
    row = conn.execute(
        "SELECT pg_database_size(oid) FROM pg_database WHERE datname = %s", (name,)
    ).fetchone()
    return int(str(row[0])) if row else None


def server_version(conn: Conn) -> str:
    row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "unknown"
