"""Statements run inside a template database being built (or a clone of one): the build's marker,
its role switches, and the catalog reads its health checks are made of.

Each takes an open connection to that database; the caller commits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from monk.core.system_columns import SYSTEM_COLUMNS

Conn = psycopg.Connection[Any]

MARKER_PREFIX = "monk template "


def write_marker(conn: Conn, key: str, version: str) -> None:
    """Record (key, version) in the database, as a comment every clone copies."""
    marker = f"{MARKER_PREFIX}{key} {version}"
    conn.execute(sql.SQL("COMMENT ON SCHEMA public IS {}").format(sql.Literal(marker)))


def clone_marker(conn: Conn) -> tuple[str, str] | None:
    """(key, version) of the build the connected database was cloned from, read from the
    comment every build writes on schema ``public``; None if there is none."""
    row = conn.execute("SELECT obj_description('public'::regnamespace, 'pg_namespace')").fetchone()
    text = str(row[0]) if row and row[0] else ""
    parts = text.removeprefix(MARKER_PREFIX).split(" ") if text.startswith(MARKER_PREFIX) else []
    return (parts[0], parts[1]) if len(parts) == 2 else None


# Inside every template, so inside every tenant: which build and migration level the database
# itself is at. An upgrade changes it in the transaction that changes the schema, so after any
# crash the database, not monk's memory of it, says how far it got. Schema ``monk`` keeps it out
# of the tenant's own namespace; pg_database_owner owns it like everything else in a template.
BUILD_RECORD = "monk.build"


def write_build_record(conn: Conn, key: str, version: str, level: int) -> None:
    """Create the build record of a template being built (run as the admin role)."""
    conn.execute("CREATE SCHEMA monk AUTHORIZATION pg_database_owner")
    conn.execute(
        "CREATE TABLE monk.build (key text NOT NULL, version text NOT NULL,"
        " level integer NOT NULL, upgraded_at timestamptz)"
    )
    conn.execute("ALTER TABLE monk.build OWNER TO pg_database_owner")
    conn.execute(
        "INSERT INTO monk.build (key, version, level) VALUES (%s, %s, %s)", (key, version, level)
    )


def read_build_record(conn: Conn, *, for_update: bool = False) -> tuple[str, str, int] | None:
    """(key, version, level) the connected database is at; None when it has no build record
    (cloned before monk kept one, or the tenant dropped it)."""
    if conn.execute("SELECT to_regclass('monk.build')").fetchone() in (None, (None,)):
        return None
    query = "SELECT key, version, level FROM monk.build" + (" FOR UPDATE" if for_update else "")
    row = conn.execute(query).fetchone()
    return (str(row[0]), str(row[1]), int(row[2])) if row else None


# The ``columns`` rows of registered tables brought in line with the catalog, after a build's
# migration files and at the end of every upgrade step (the step's script carries this text), so
# a migration may add, drop or alter columns without touching ``columns`` itself. For each table
# a ``schemas`` row names (docs/templates.md, "How columns rows follow the catalog"):
#   - the table is gone (a migration dropped it): its ``schemas`` row goes, its columns rows with it
#   - a row whose column is gone: deleted
#   - a row whose type or NOT NULL differs from the catalog: pg_type and is_required updated
#   - a column without a row (system columns aside): a row with schema_name, column_name,
#     pg_type (format_type), is_required (NOT NULL), is_array (a PostgreSQL array type) and
#     description (the column's COMMENT); every other field NULL or its default
# One statement (its parts share one read of the catalog), without parameters: a step's script
# runs it as it is.
SYNC_COLUMNS = (
    sql.SQL(
        """-- monk: the columns rows of registered tables follow the catalog
WITH catalog AS MATERIALIZED (
  SELECT s.name AS schema_name, a.attname::text AS column_name,
         format_type(a.atttypid, a.atttypmod) AS pg_type, a.attnotnull AS not_null,
         t.typcategory = 'A' AS is_array, col_description(a.attrelid, a.attnum) AS description,
         a.attnum
    FROM schemas s
    JOIN pg_class r ON r.relname = s.table_name AND r.relnamespace = 'public'::regnamespace
     AND r.relkind IN ('r', 'p')
    JOIN pg_attribute a ON a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped
    JOIN pg_type t ON t.oid = a.atttypid
   WHERE a.attname <> ALL ({}::text[])
), tables_gone AS (
  DELETE FROM schemas s WHERE NOT EXISTS (SELECT 1 FROM pg_class r
   WHERE r.relname = s.table_name AND r.relnamespace = 'public'::regnamespace
    AND r.relkind IN ('r', 'p'))
  RETURNING s.name
), columns_gone AS (
  DELETE FROM columns c
   WHERE NOT EXISTS (SELECT 1 FROM catalog k
    WHERE k.schema_name = c.schema_name AND k.column_name = c.column_name)
     AND c.schema_name NOT IN (SELECT name FROM tables_gone)
  RETURNING c.id
), columns_changed AS (
  UPDATE columns c SET pg_type = k.pg_type, is_required = k.not_null
    FROM catalog k
   WHERE k.schema_name = c.schema_name AND k.column_name = c.column_name
     AND (c.pg_type, c.is_required) IS DISTINCT FROM (k.pg_type, k.not_null)
  RETURNING c.id
)
INSERT INTO columns (schema_name, column_name, pg_type, is_required, is_array, description)
SELECT k.schema_name, k.column_name, k.pg_type, k.not_null, k.is_array, k.description
  FROM catalog k
 WHERE NOT EXISTS (SELECT 1 FROM columns c
  WHERE c.schema_name = k.schema_name AND c.column_name = k.column_name)
 ORDER BY k.schema_name, k.attnum"""
    )
    .format(sql.Literal(list(SYSTEM_COLUMNS)))
    .as_string(None)
)


def sync_columns(conn: Conn) -> None:
    """Run ``SYNC_COLUMNS`` (as the role that owns ``columns``)."""
    conn.execute(SYNC_COLUMNS.encode())


def own_like_a_clone(conn: Conn, role: str, database: str) -> None:
    """Give what ``role`` owns in the connected database to pg_database_owner, as in every
    clone (a restore from an archive creates its objects as the tenant's role), so that upgrade
    steps, run as pg_database_owner, may change them. The connected admin owns the database
    meanwhile: that makes it a member of pg_database_owner, which REASSIGN OWNED needs of a
    role that is no superuser (a managed server's admin), and keeps the database itself out
    of the reassignment; it goes back to ``role`` in the same transaction."""
    with conn.transaction():
        conn.execute(
            sql.SQL("ALTER DATABASE {} OWNER TO CURRENT_USER").format(sql.Identifier(database))
        )
        conn.execute(
            sql.SQL("REASSIGN OWNED BY {} TO pg_database_owner").format(sql.Identifier(role))
        )
        conn.execute(
            sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
                sql.Identifier(database), sql.Identifier(role)
            )
        )


def set_role(conn: Conn, role: str) -> None:
    conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))


def reset_role(conn: Conn) -> None:
    conn.execute("RESET ROLE")


def analyze(conn: Conn) -> None:
    conn.execute("ANALYZE")


def missing_registered_tables(conn: Conn) -> list[str]:
    """Tables a ``schemas`` row names that do not exist."""
    rows = conn.execute(
        "SELECT table_name FROM schemas WHERE to_regclass(format('public.%I', table_name)) IS NULL"
    ).fetchall()
    return [str(r[0]) for r in rows]


def registered_columns(conn: Conn) -> list[tuple[Any, ...]]:
    """Each ``columns`` row with what the catalog says of it: (schema, column, registered type,
    registered required, actual type or None, actual NOT NULL)."""
    return conn.execute(
        "SELECT c.schema_name, c.column_name, c.pg_type, c.is_required,"
        " format_type(a.atttypid, a.atttypmod), a.attnotnull"
        " FROM columns c JOIN schemas s ON s.name = c.schema_name"
        " LEFT JOIN pg_attribute a ON a.attrelid = to_regclass(format('public.%I', s.table_name))"
        "  AND a.attname = c.column_name AND a.attnum > 0 AND NOT a.attisdropped"
        " ORDER BY 1, 2"
    ).fetchall()


def unregistered_columns(conn: Conn, system_columns: Sequence[str]) -> list[tuple[str, str]]:
    """(table, column) of the columns of registered tables that no ``columns`` row names,
    ``system_columns`` aside."""
    rows = conn.execute(
        "SELECT s.table_name, a.attname FROM schemas s"
        " JOIN pg_attribute a ON a.attrelid = to_regclass(format('public.%%I', s.table_name))"
        " WHERE a.attnum > 0 AND NOT a.attisdropped AND a.attname <> ALL(%s)"
        "  AND NOT EXISTS (SELECT 1 FROM columns c"
        "   WHERE c.schema_name = s.name AND c.column_name = a.attname)"
        " ORDER BY 1, 2",
        (list(system_columns),),
    ).fetchall()
    return [(str(t), str(c)) for t, c in rows]


def unvalidated_constraints(conn: Conn) -> list[tuple[str, str]]:
    """(table, constraint) of the NOT VALID constraints in schema public."""
    rows = conn.execute(
        "SELECT conrelid::regclass::text, conname FROM pg_constraint"
        " WHERE NOT convalidated AND connamespace = 'public'::regnamespace ORDER BY 1, 2"
    ).fetchall()
    return [(str(t), str(n)) for t, n in rows]


def not_owned_by(conn: Conn, role: str) -> list[tuple[str, str]]:
    """(kind, name) of the relations and functions in public that ``role`` does not own."""
    rows = conn.execute(
        # Members of an extension belong to it (owned by whoever created it): not checked.
        "SELECT 'relation', relname::text FROM pg_class c"
        " WHERE relnamespace = 'public'::regnamespace"
        "  AND relowner <> %s::regrole AND NOT EXISTS (SELECT 1 FROM pg_depend d"
        "   WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')"
        " UNION ALL SELECT 'function', proname::text FROM pg_proc p"
        "  WHERE pronamespace = 'public'::regnamespace AND proowner <> %s::regrole"
        "  AND NOT EXISTS (SELECT 1 FROM pg_depend d"
        "   WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')"
        " ORDER BY 1, 2",
        (role, role),
    ).fetchall()
    return [(str(k), str(n)) for k, n in rows]


def public_tables(conn: Conn) -> list[str]:
    """The tables of schema public, by name."""
    rows = conn.execute(
        "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace"
        " AND relkind IN ('r', 'p') ORDER BY relname"
    ).fetchall()
    return [str(r[0]) for r in rows]


def row_count(conn: Conn, table: str) -> int:
    row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))).fetchone()
    return int(str(row[0])) if row else 0
