"""Server-level administration: databases, roles, sessions. Cluster-global objects only.

Each call takes the ServerTarget the object lives on (monk spreads tenants over several servers)
and an open autocommit connection to that server's maintenance database where it needs one: the
caller decides how long a connection lives. PostgreSQL errors become monk errors here.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from monk.core.clone_strategy import CloneChoice
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

FILE_COPY_METHOD_SINCE = 180000
"""server_version_num from which ``file_copy_method`` (copy or clone) exists."""
_STRATEGY_SQL = {"wal_log": "WAL_LOG", "file_copy": "FILE_COPY"}


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


def tables_present(conn: Conn, names: Iterable[str], *, schema: str = "public") -> set[str]:
    """Which of the tables ``names`` exist in ``schema`` of the database ``conn`` is on (a
    connection to that database, not to the maintenance database)."""
    rows = conn.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = %s AND tablename = ANY(%s)",
        (schema, list(names)),
    ).fetchall()
    return {str(r[0]) for r in rows}


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


# pg_database.datconnlimit of a database an interrupted DROP DATABASE left behind (PostgreSQL
# 15.4+/16+): it can only be dropped; ALTER DATABASE and connections are refused.
INVALID_DATCONNLIMIT = -2


@dataclass(frozen=True)
class DatabaseState:
    """What the server really has for a database, to compare with what monk set."""

    name: str
    allow_connections: bool
    connection_limit: int
    is_template: bool
    owner: str
    comment: str | None
    # (grantee, privilege) from the effective ACL (NULL means the defaults: PUBLIC may
    # CONNECT and TEMPORARY); grantee "PUBLIC" for the public pseudo-role.
    grants: frozenset[tuple[str, str]]
    # ALTER DATABASE … SET values (for every role), by lower-cased name
    settings: Mapping[str, str] = field(default_factory=dict)

    @property
    def invalid(self) -> bool:
        return self.connection_limit == INVALID_DATCONNLIMIT

    def public_may_connect(self) -> bool:
        return ("PUBLIC", "CONNECT") in self.grants


@dataclass(frozen=True)
class RoleState:
    name: str
    can_login: bool
    connection_limit: int
    comment: str | None


def database_states(conn: Conn, names: Iterable[str] | None = None) -> dict[str, DatabaseState]:
    """Each database's (or those of ``names``') connection flag, limit, owner, mark and
    grants, in one query."""
    wanted = None if names is None else list(names)
    rows = conn.execute(
        "SELECT d.datname, d.datallowconn, d.datconnlimit, d.datistemplate,"
        " pg_get_userbyid(d.datdba), shobj_description(d.oid, 'pg_database'),"
        " coalesce((SELECT array_agg(ARRAY[CASE WHEN a.grantee = 0 THEN 'PUBLIC'"
        " ELSE pg_get_userbyid(a.grantee) END, a.privilege_type])"
        " FROM aclexplode(coalesce(d.datacl, acldefault('d', d.datdba))) AS a), '{}'),"
        " (SELECT s.setconfig FROM pg_db_role_setting s"
        " WHERE s.setdatabase = d.oid AND s.setrole = 0)"
        " FROM pg_database d WHERE %s::text[] IS NULL OR d.datname = ANY(%s::text[])",
        (wanted, wanted),
    ).fetchall()
    out = {}
    for name, allow, limit, is_template, owner, comment, grants, config in rows:
        settings = {}
        for item in config or ():  # type: ignore[attr-defined]
            key, _, value = str(item).partition("=")
            settings[key.lower()] = value
        out[str(name)] = DatabaseState(
            name=str(name),
            allow_connections=bool(allow),
            connection_limit=int(str(limit)),
            is_template=bool(is_template),
            owner=str(owner),
            comment=None if comment is None else str(comment),
            grants=frozenset((str(g[0]), str(g[1])) for g in grants or ()),  # type: ignore[attr-defined]
            settings=settings,
        )
    return out


def role_states(conn: Conn) -> dict[str, RoleState]:
    rows = conn.execute(
        "SELECT rolname, rolcanlogin, rolconnlimit, shobj_description(oid, 'pg_authid')"
        " FROM pg_roles"
    ).fetchall()
    return {
        str(name): RoleState(
            str(name), bool(login), int(str(limit)), None if comment is None else str(comment)
        )
        for name, login, limit, comment in rows
    }


def revoke_database_access(conn: Conn, database: str, grantees: Iterable[str]) -> None:
    """Every privilege on ``database`` of each of ``grantees`` ("PUBLIC" included) revoked."""
    validate_database_name(database)
    db = sql.Identifier(database)
    for grantee in grantees:
        who = sql.SQL("PUBLIC") if grantee == "PUBLIC" else sql.Identifier(grantee)
        conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM {} CASCADE").format(db, who))


def current_role(conn: Conn) -> str:
    row = conn.execute("SELECT current_user").fetchone()
    return str(row[0]) if row else ""


def own_scram_verifier(conn: Conn) -> str | None:
    """The stored password verifier of the connected role (pg_authid: superusers only); None
    when it cannot be read or there is none."""
    try:
        with conn.transaction():
            row = conn.execute(
                "SELECT rolpassword FROM pg_authid WHERE rolname = current_user"
            ).fetchone()
    except psycopg.errors.InsufficientPrivilege:
        return None
    return None if row is None or row[0] is None else str(row[0])


def role_verifier(conn: Conn, name: str) -> str | None:
    """The stored password verifier of role ``name`` (pg_authid: superusers only); None when
    it cannot be read or there is none."""
    try:
        with conn.transaction():
            row = conn.execute(
                "SELECT rolpassword FROM pg_authid WHERE rolname = %s", (name,)
            ).fetchone()
    except psycopg.errors.InsufficientPrivilege:
        return None
    return None if row is None or row[0] is None else str(row[0])


def is_invalid_database(conn: Conn, name: str) -> bool:
    row = conn.execute(
        "SELECT datconnlimit FROM pg_database WHERE datname = %s", (name,)
    ).fetchone()
    return row is not None and int(str(row[0])) == INVALID_DATCONNLIMIT


def revoke_public_connect(conn: Conn, databases: Iterable[str]) -> list[str]:
    """REVOKE CONNECT … FROM PUBLIC on each existing database that grants it; returns which
    did (idempotent: a second call revokes nothing)."""
    revoked = []
    for name in databases:
        validate_database_name(name)
        row = conn.execute(
            "SELECT has_database_privilege('public', oid, 'CONNECT') FROM pg_database"
            " WHERE datname = %s",
            (name,),
        ).fetchone()
        if row is not None and row[0]:
            conn.execute(
                sql.SQL("REVOKE CONNECT, TEMPORARY ON DATABASE {} FROM PUBLIC").format(
                    sql.Identifier(name)
                )
            )
            revoked.append(name)
    return revoked


def reserved_connections(conn: Conn) -> dict[str, object]:
    """What keeps connections for monk when tenants saturate the server: the superuser and
    (PostgreSQL 16+) pg_use_reserved_connections reserves, and whether monk's admin may use
    them."""
    row = conn.execute(
        "SELECT current_setting('max_connections')::int,"
        " current_setting('superuser_reserved_connections')::int,"
        " coalesce(current_setting('reserved_connections', true), '0')::int,"
        " (SELECT rolsuper FROM pg_roles WHERE rolname = current_user),"
        # CASE: the role exists from PostgreSQL 16 on only, and pg_has_role fails without it.
        " CASE WHEN to_regrole('pg_use_reserved_connections') IS NULL THEN false"
        " ELSE pg_has_role(current_user, 'pg_use_reserved_connections', 'USAGE') END"
    ).fetchone()
    assert row is not None
    return {
        "max_connections": int(str(row[0])),
        "superuser_reserved": int(str(row[1])),
        "reserved": int(str(row[2])),
        "superuser": bool(row[3]),
        "may_use_reserved": bool(row[4]),
    }


def create_database(
    conn: Conn,
    name: str,
    *,
    template: str | None = None,
    owner: str | None = None,
    choice: CloneChoice | None = None,
) -> None:
    """CREATE DATABASE (optionally a clone of ``template``). Needs an autocommit connection.

    ``choice``: the clone's STRATEGY (``monk.core.clone_strategy``); for FILE_COPY on
    PostgreSQL 18+, ``file_copy_method`` is set in the session first, to ``clone`` or ``copy``
    as chosen, whatever the server's configuration says. None: the server's default.

    Raises DatabaseExists, DatabaseMissing (template), or TemplateBusy (55006: sessions on it).
    """
    validate_database_name(name)
    query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template is not None:
        validate_database_name(template)
        query += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
    if owner is not None:
        query += sql.SQL(" OWNER {}").format(sql.Identifier(validate_role_name(owner)))
    if choice is not None:
        query += sql.SQL(" STRATEGY {}").format(sql.SQL(_STRATEGY_SQL[choice.strategy]))
        if choice.strategy == "file_copy" and conn.info.server_version >= FILE_COPY_METHOD_SINCE:
            # A session setting (context user): CREATE DATABASE cannot run in a transaction
            # block, so it cannot be SET LOCAL; every FILE_COPY sets it again.
            conn.execute("SET file_copy_method = " + ("clone" if choice.clone else "copy"))
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
        # No TEMPLATE clause clones template1.
        source = template or "template1"
        raise TemplateBusy(
            f"template database {source!r} is in use by other sessions", template=source
        ) from exc


def drop_database(conn: Conn, name: str, *, force: bool = True, missing_ok: bool = True) -> bool:
    """DROP DATABASE [IF EXISTS] … WITH (FORCE): ends its sessions first. True if dropped."""
    validate_database_name(name)
    if not database_exists(conn, name):
        if missing_ok:
            return False
        raise DatabaseMissing(f"database {name!r} does not exist")
    row = conn.execute(
        "SELECT datistemplate, datconnlimit FROM pg_database WHERE datname = %s", (name,)
    ).fetchone()
    # A template database cannot be dropped (42809) until it is an ordinary one again; an
    # invalid one (an interrupted drop) refuses every ALTER but can be dropped as it is.
    if row is not None and row[0] and int(str(row[1])) != INVALID_DATCONNLIMIT:
        conn.execute(
            sql.SQL("ALTER DATABASE {} WITH IS_TEMPLATE false").format(sql.Identifier(name))
        )
    query = sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name))
    if force:
        query += sql.SQL(" WITH (FORCE)")
    # Past its lock, DROP DATABASE marks the database invalid and waits for a forced
    # checkpoint, as long as the server's dirty buffers take to write. Cutting that wait short
    # saves nothing (the checkpoint goes on) and leaves an invalid database whose next drop
    # waits for a checkpoint again: so no statement timeout for it. The wait for the lock,
    # which another session may hold for ever, keeps the session's statement timeout.
    conn.execute(
        "SELECT set_config('lock_timeout', current_setting('statement_timeout'), false),"
        " set_config('statement_timeout', '0', false)"
    )
    try:
        conn.execute(query)
    except psycopg.errors.ObjectInUse as exc:
        raise InvalidState(f"database {name!r} is in use: {exc}") from None
    except psycopg.errors.LockNotAvailable:
        raise InvalidState(
            f"database {name!r} is locked by another session: its drop gave up waiting"
        ) from None
    finally:
        # A broken session is the pool's to discard; the drop's own error is the one to raise.
        with contextlib.suppress(psycopg.OperationalError):
            conn.execute("RESET lock_timeout")
            conn.execute("RESET statement_timeout")
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


def create_role(
    conn: Conn,
    name: str,
    *,
    password_verifier: str,
    login: bool = True,
    connection_limit: int = -1,
) -> None:
    """A role whose password is given as a SCRAM verifier: no plaintext reaches the server
    (nor its logs)."""
    validate_role_name(name)
    try:
        conn.execute(
            sql.SQL("CREATE ROLE {} {} CONNECTION LIMIT {} PASSWORD {}").format(
                sql.Identifier(name),
                sql.SQL("LOGIN" if login else "NOLOGIN"),
                sql.Literal(int(connection_limit)),
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


def set_role_connection_limit(conn: Conn, name: str, limit: int) -> None:
    validate_role_name(name)
    conn.execute(
        sql.SQL("ALTER ROLE {} CONNECTION LIMIT {}").format(
            sql.Identifier(name), sql.Literal(int(limit))
        )
    )


def allows_connections(conn: Conn, name: str) -> bool | None:
    """Whether ``name`` accepts connections (None: no such database)."""
    row = conn.execute(
        "SELECT datallowconn FROM pg_database WHERE datname = %s", (name,)
    ).fetchone()
    return None if row is None else bool(row[0])


def set_allow_connections(conn: Conn, name: str, allow: bool) -> None:
    validate_database_name(name)
    conn.execute(
        sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {}").format(
            sql.Identifier(name), sql.Literal(allow)
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


@dataclass(frozen=True)
class ServerFacts:
    """What ``monk host add`` and ``check`` ask of a server, in one round trip."""

    version: str
    version_num: int
    system_identifier: str
    user: str
    superuser: bool
    createdb: bool
    createrole: bool


def round_trip_ms(conn: Conn) -> float:
    """The time of one trivial statement on ``conn``: the network and the server's answer."""
    started = time.perf_counter()
    conn.execute("SELECT 1")
    return (time.perf_counter() - started) * 1000


def server_facts(conn: Conn) -> ServerFacts:
    row = conn.execute(
        "SELECT current_setting('server_version'), current_setting('server_version_num')::int,"
        " (SELECT system_identifier::text FROM pg_control_system()), current_user,"
        " rolsuper, rolcreatedb, rolcreaterole FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
    assert row is not None
    version, num, ident, user, superuser, createdb, createrole = row
    return ServerFacts(
        str(version),
        int(str(num)),
        str(ident),
        str(user),
        bool(superuser),
        bool(createdb),
        bool(createrole),
    )


def revoke_all_from_public(conn: Conn, name: str) -> None:
    """REVOKE ALL ON DATABASE … FROM PUBLIC (CONNECT and TEMPORARY)."""
    validate_database_name(name)
    conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(name)))


def comment_on_database(conn: Conn, name: str, comment: str) -> None:
    validate_database_name(name)
    conn.execute(
        sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(name), sql.Literal(comment))
    )


def databases_commented(conn: Conn, prefix: str, comment: str) -> list[str]:
    """The databases whose name starts with ``prefix`` and whose comment is ``comment``."""
    like = prefix.replace("\\", "\\\\").replace("_", r"\_").replace("%", r"\%") + "%"
    rows = conn.execute(
        "SELECT datname FROM pg_database WHERE datname LIKE %s"
        " AND shobj_description(oid, 'pg_database') = %s ORDER BY 1",
        (like, comment),
    ).fetchall()
    return [str(name) for (name,) in rows]


@dataclass(frozen=True)
class TemplateAccess:
    """How closed a template database is."""

    is_template: bool
    allows_connections: bool
    public_may_connect: bool


def template_access(conn: Conn, name: str) -> TemplateAccess | None:
    """IS_TEMPLATE, ALLOW_CONNECTIONS and PUBLIC's CONNECT of ``name``; None if it is missing."""
    row = conn.execute(
        "SELECT datistemplate, datallowconn, has_database_privilege('public', datname, 'CONNECT')"
        " FROM pg_database WHERE datname = %s",
        (name,),
    ).fetchone()
    if row is None:
        return None
    return TemplateAccess(bool(row[0]), bool(row[1]), bool(row[2]))


def sessions_opened(conn: Conn, databases: Sequence[str]) -> int:
    """Sessions ever established on ``databases`` (pg_stat_database.sessions, PostgreSQL 14+;
    counted when a session ends), read afresh."""
    conn.execute("SELECT pg_stat_clear_snapshot()")
    row = conn.execute(
        "SELECT coalesce(sum(sessions), 0) FROM pg_stat_database WHERE datname = ANY(%s)",
        (list(databases),),
    ).fetchone()
    return int(str(row[0])) if row else 0


# ---------------------------------------------------------------- monk's functions on a host
#
# The provision's server-side steps (obtain a role: ``make_tenant_role``; configure:
# ``configure_tenant_database``; a spare handed out: ``rename_spare_into``) are written once, as
# functions of the system database (migrations). A host of the fleet has no system database:
# monk copies those functions, as the system database defines them, into a database of its own
# on the host (named like the system database, made by the admin role, which CREATEDB allows),
# and calls them there.

HOST_FUNCTIONS = (
    "make_tenant_role",
    "configure_tenant_database",
    "rename_spare_into",
    "rename_spare_role",
)
_FUNCTIONS_MARK = "monk functions "


def ensure_database(conn: Conn, name: str, comment: str) -> bool:
    """``name`` exists (made, owned by the admin, with ``comment``, if it did not): True if
    made now. Two processes at once: one makes it, the other finds it."""
    validate_database_name(name)
    if database_exists(conn, name):
        return False
    try:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except (psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation):
        return False
    comment_on_database(conn, name, comment)
    return True


def installed_functions(conn: Conn, schema: str) -> str | None:
    """The version of monk's functions installed in ``schema`` of the database ``conn`` is on
    (None: none)."""
    row = conn.execute(
        "SELECT obj_description(to_regnamespace(%s), 'pg_namespace')", (schema,)
    ).fetchone()
    text = None if row is None or row[0] is None else str(row[0])
    return text.removeprefix(_FUNCTIONS_MARK) if text and text.startswith(_FUNCTIONS_MARK) else None


def install_functions(
    conn: Conn, schema: str, definitions: Sequence[tuple[str, str]], version: str
) -> bool:
    """Install ``definitions`` ((name, CREATE FUNCTION text of the system database), each
    qualified with ``schema``) in ``schema``, the schema marked with ``version``, in one
    transaction, one process at a time; False when that version was there already."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('monk host functions'))")
        if installed_functions(conn, schema) == version:
            return False
        ident = sql.Identifier(schema)
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
        for name, _ in definitions:
            # A changed signature would make CREATE OR REPLACE add an overload instead.
            conn.execute(sql.SQL("DROP FUNCTION IF EXISTS {}").format(sql.Identifier(schema, name)))
        for _, definition in definitions:
            conn.execute(definition.encode())
        conn.execute(
            sql.SQL("COMMENT ON SCHEMA {} IS {}").format(
                ident, sql.Literal(_FUNCTIONS_MARK + version)
            )
        )
        # Another admin role of the same server (a host re-added or updated with a role that
        # is no superuser) must call them too. Safe: they run with the caller's rights (no
        # SECURITY DEFINER), so they let no one do what its own role could not.
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO PUBLIC").format(ident))
    return True


def make_tenant_role(
    conn: Conn,
    schema: str,
    name: str,
    *,
    verifier: str,
    mark: str,
    login: bool,
    connection_limit: int,
) -> None:
    """Obtain a role on a host of the fleet: monk's ``make_tenant_role``, installed there
    (``install_functions``; ``conn`` is on that database)."""
    conn.execute(
        sql.SQL("SELECT {}(%s, %s, %s, %s, %s)").format(sql.Identifier(schema, "make_tenant_role")),
        (name, verifier, mark, login, connection_limit),
    )


def configure_database(
    conn: Conn,
    schema: str,
    database: str,
    role: str,
    mark: str,
    settings: Mapping[str, str],
    connection_limit: int,
) -> None:
    """Configure on a host of the fleet: monk's ``configure_tenant_database``, installed there
    (as ``make_tenant_role``). One statement (autocommit: its own transaction)."""
    validate_setting_names(settings)
    conn.execute(
        sql.SQL("SELECT {}(%s, %s, %s, %s, %s)").format(
            sql.Identifier(schema, "configure_tenant_database")
        ),
        (database, role, mark, Jsonb(dict(settings)), connection_limit),
    )


def rename_spare_into(
    conn: Conn,
    schema: str,
    spare: str,
    *,
    database: str,
    role: str,
    verifier: str | None,
    connection_limit: int | None,
) -> None:
    """A spare on a host of the fleet becomes the tenant's database and role: monk's
    ``rename_spare_into`` (the step ``hand_out_spare`` runs on the registry's server),
    installed there. ``verifier``: a new password (None: the spare's is kept)."""
    conn.execute(
        sql.SQL("SELECT {}(%s, %s, %s, %s, %s)").format(
            sql.Identifier(schema, "rename_spare_into")
        ),
        (spare, database, role, verifier, connection_limit),
    )


def rename_spare_role(conn: Conn, schema: str, spare: str, role: str) -> None:
    """A spare role on a host of the fleet, claimed in the registry, becomes the tenant's role:
    monk's ``rename_spare_role`` (the step ``claim_spare_role`` runs on the registry's
    server), installed there."""
    conn.execute(
        sql.SQL("SELECT {}(%s, %s)").format(sql.Identifier(schema, "rename_spare_role")),
        (spare, role),
    )


# ---------------------------------------------------------------- file cloning (PostgreSQL 18)


@dataclass(frozen=True)
class CloneFacts:
    """What the server says of its file cloning: whether it has ``file_copy_method`` at all,
    where its data directory is (None: not readable by this role) and which cluster it is."""

    version_num: int
    data_directory: str | None
    system_identifier: str | None


def clone_facts(conn: Conn) -> CloneFacts:
    """The data directory and ``pg_control_system()`` are a superuser's (or
    ``pg_read_all_settings``' / ``pg_monitor``'s) to read: for any other admin they are None."""
    try:
        row = conn.execute(
            "SELECT current_setting('server_version_num')::int,"
            " CASE WHEN r.rolsuper OR pg_has_role('pg_read_all_settings', 'USAGE')"
            "  THEN current_setting('data_directory') END,"
            " CASE WHEN r.rolsuper THEN (SELECT system_identifier::text"
            "  FROM pg_control_system()) END"
            " FROM pg_roles r WHERE r.rolname = current_user"
        ).fetchone()
    except psycopg.errors.InsufficientPrivilege:
        row = conn.execute(
            "SELECT current_setting('server_version_num')::int, NULL, NULL"
        ).fetchone()
    assert row is not None
    return CloneFacts(
        int(str(row[0])),
        None if row[1] is None else str(row[1]),
        None if row[2] is None else str(row[2]),
    )


def try_clone(conn: Conn, name: str, template: str, choice: CloneChoice) -> float:
    """Make ``name`` from ``template`` with ``choice`` and drop it again: the milliseconds the
    CREATE took. The server's error (e.g. a file_copy_method it refuses) is raised as it is."""
    started = time.perf_counter()
    create_database(conn, name, template=template, choice=choice)
    elapsed = (time.perf_counter() - started) * 1000
    drop_database(conn, name)
    return elapsed


def fill_probe_database(conn: Conn, megabytes: int) -> None:
    """In a database of its own (``conn`` connected to it): one table of about ``megabytes``
    MB, what a timing of FILE_COPY with and without clone copies."""
    conn.execute(
        "CREATE TABLE probe AS SELECT g AS id, repeat(md5(g::text), 30) AS v"
        " FROM generate_series(1, %s) AS g",
        (megabytes * 1024 * 1024 // 1000,),
    )


def checkpoint(conn: Conn) -> bool:
    """CHECKPOINT (superuser or pg_checkpoint); False when the role may not."""
    try:
        conn.execute("CHECKPOINT")
    except psycopg.errors.InsufficientPrivilege:
        return False
    return True


def wal_lsn(conn: Conn) -> str:
    """The server's current WAL insert position (``pg_current_wal_lsn``)."""
    row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    return str(row[0])


def wal_bytes_since(conn: Conn, lsn: str) -> int:
    """WAL bytes written since ``lsn`` (by every session of the server)."""
    row = conn.execute(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s::pg_lsn)", (lsn,)
    ).fetchone()
    assert row is not None
    return int(str(row[0]))
