"""Create the system database and bring its schema up to date.

Migrations are the numbered files ``migrations/NNNN_<name>.sql``, applied in order, each in its
own transaction together with its row in ``schema_migrations``. A session-level advisory lock
serialises monk processes, so two concurrent ``monk init`` never apply one migration twice.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources

import psycopg
from psycopg import sql

from monk.adapters.postgres.connection import ServerTarget, connect
from monk.errors import ConfigError

log = logging.getLogger(__name__)

_MIGRATION_FILE = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")
# An arbitrary constant: the advisory lock key of "migrating monk's system database".
MIGRATION_LOCK_KEY = 0x6D6F6E6B


@dataclass(frozen=True)
class Migration:
    number: int
    name: str
    sql_text: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql_text.encode()).hexdigest()


def bundled_migrations() -> list[Migration]:
    found = []
    for entry in resources.files("monk.system.migrations").iterdir():
        match = _MIGRATION_FILE.fullmatch(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.number)
    numbers = [m.number for m in found]
    if numbers != list(range(1, len(found) + 1)):
        raise RuntimeError(f"system migrations are not numbered 1..n: {numbers}")
    return found


@dataclass(frozen=True)
class InitResult:
    created_database: bool
    applied: list[str]


def check_admin_role(target: ServerTarget) -> None:
    """Refuse early when the admin role cannot create databases and roles."""
    with connect(target, purpose="init") as conn:
        row = conn.execute(
            "SELECT rolsuper, rolcreatedb, rolcreaterole, current_user FROM pg_roles "
            "WHERE rolname = current_user"
        ).fetchone()
    assert row is not None
    superuser, createdb, createrole, user = row
    missing = (
        []
        if superuser
        else [n for n, ok in (("CREATEDB", createdb), ("CREATEROLE", createrole)) if not ok]
    )
    if missing:
        raise ConfigError(
            f"MONK_DATABASE_URL: role {user!r} lacks {' and '.join(missing)}; monk needs a "
            "superuser or a role with CREATEDB and CREATEROLE"
        )


def ensure_system_database(target: ServerTarget, system_db: str) -> InitResult:
    """Idempotently create the system database, its schema, and apply pending migrations."""
    check_admin_role(target)
    created = _create_database_if_missing(target, system_db)
    applied = _migrate(target, system_db)
    return InitResult(created_database=created, applied=applied)


def is_current(target: ServerTarget, system_db: str) -> bool:
    """Whether the admin role may do monk's work and the system database exists with every
    bundled migration applied: two connections and two reads, no lock, no DDL (what every
    command but ``monk init`` asks before it starts). False on any doubt:
    ``ensure_system_database`` then does the work, or says what is wrong."""
    # The maintenance database first: a connection to a database that does not exist fails
    # like a server that is down (no SQLSTATE), which would trip the server's breaker.
    with connect(target, autocommit=True, purpose="init") as conn:
        row = conn.execute(
            "SELECT (SELECT rolsuper OR (rolcreatedb AND rolcreaterole) FROM pg_roles"
            " WHERE rolname = current_user),"
            " EXISTS (SELECT 1 FROM pg_database WHERE datname = %s)",
            (system_db,),
        ).fetchone()
    if row is None or not (row[0] and row[1]):
        return False
    query = sql.SQL("SELECT number, checksum FROM {}.schema_migrations").format(
        sql.Identifier(system_db)
    )
    try:
        with connect(target, system_db, autocommit=True, purpose="init") as conn:
            rows = conn.execute(query).fetchall()
    except psycopg.Error:
        return False  # no schema or table yet
    done = {int(str(n)): str(c) for n, c in rows}
    bundled = bundled_migrations()
    if any(m.number not in done for m in bundled):
        return False
    _warn_changed(bundled, done)
    return True


def _warn_changed(bundled: list[Migration], done: dict[int, str]) -> None:
    for migration in bundled:
        if migration.number in done and done[migration.number] != migration.checksum:
            log.warning(
                "system migration %04d_%s changed since it was applied",
                migration.number,
                migration.name,
            )


def _create_database_if_missing(target: ServerTarget, system_db: str) -> bool:
    with connect(target, autocommit=True, purpose="init") as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (system_db,)
        ).fetchone()
        if exists:
            return False
        try:
            # template0: a session on template1 (tenants may hold one) cannot block start-up.
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE template0").format(sql.Identifier(system_db))
            )
        except psycopg.errors.DuplicateDatabase:
            return False  # another monk process won the race: same outcome
        except psycopg.errors.UniqueViolation:
            return False  # the race can also surface as a catalog unique violation
        log.info("created system database %s", system_db)
        return True


def _migrate(target: ServerTarget, system_db: str) -> list[str]:
    schema = sql.Identifier(system_db)
    applied: list[str] = []
    with connect(target, system_db, autocommit=True, purpose="migrate") as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        try:
            with conn.transaction():
                conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
                conn.execute(
                    sql.SQL(
                        "CREATE TABLE IF NOT EXISTS {}.schema_migrations ("
                        " number integer PRIMARY KEY, name text NOT NULL,"
                        " checksum text NOT NULL,"
                        " applied_at timestamptz NOT NULL DEFAULT now())"
                    ).format(schema)
                )
                # Tenant roles must not reach the registry: only the admin role connects.
                conn.execute(
                    sql.SQL("REVOKE CONNECT, TEMPORARY ON DATABASE {} FROM PUBLIC").format(
                        sql.Identifier(system_db)
                    )
                )
                # Sessions on the system database find the registry without qualification.
                conn.execute(
                    sql.SQL("ALTER DATABASE {} SET search_path = {}, public").format(
                        sql.Identifier(system_db), schema
                    )
                )
            done = {
                int(str(n)): str(c)
                for n, c in conn.execute(
                    sql.SQL("SELECT number, checksum FROM {}.schema_migrations").format(schema)
                ).fetchall()
            }
            bundled = bundled_migrations()
            _warn_changed(bundled, done)
            for migration in bundled:
                if migration.number in done:
                    continue
                with conn.transaction():
                    conn.execute(sql.SQL("SET LOCAL search_path = {}, public").format(schema))
                    conn.execute(migration.sql_text.encode())
                    conn.execute(
                        sql.SQL(
                            "INSERT INTO {}.schema_migrations (number, name, checksum) "
                            "VALUES (%s, %s, %s)"
                        ).format(schema),
                        (migration.number, migration.name, migration.checksum),
                    )
                applied.append(f"{migration.number:04d}_{migration.name}")
                log.info("applied system migration %04d_%s", migration.number, migration.name)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
    return applied
