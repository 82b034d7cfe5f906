"""Helpers of the schema-change tests: apply recorded upgrade steps the way the fleet runner
does (BRIEF12's contract), and read a database's catalog for comparison."""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql

from monk.adapters.registry.upgrades import UpgradeStep

Conn = psycopg.Connection[Any]


@contextmanager
def tenant_clone(admin_url: str, template: str) -> Iterator[Conn]:
    """A clone of ``template`` owned by a login role of its own, as a tenant's is, and a
    connection to it as that role (not a superuser): steps must run with the owner's rights."""
    name = f"sc_tenant_{secrets.token_hex(6)}"
    password = secrets.token_urlsafe(12)
    with psycopg.connect(admin_url, autocommit=True) as adm:
        adm.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(name), sql.Literal(password)
            )
        )
        adm.execute(
            sql.SQL("CREATE DATABASE {} OWNER {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(name), sql.Identifier(template)
            )
        )
    try:
        with psycopg.connect(
            admin_url, dbname=name, user=name, password=password, autocommit=True
        ) as db:
            yield db
    finally:
        with psycopg.connect(admin_url, autocommit=True) as adm:
            adm.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
            adm.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def apply_steps(db: Conn, steps: Sequence[UpgradeStep]) -> None:
    """Each step in ONE transaction: its script as the database owner role, then monk.build."""
    for step in steps:
        with db.transaction():
            db.execute("SET LOCAL ROLE pg_database_owner")
            for chunk in step.script:
                db.execute(chunk.encode())  # simple query protocol: several statements a chunk
            db.execute("RESET ROLE")
            db.execute(
                "UPDATE monk.build SET version = %s, level = %s, upgraded_at = now()",
                (step.to_version, step.level),
            )


_CATALOG_QUERIES = {
    "tables": (
        "SELECT c.relname, c.relowner::regrole::text FROM pg_class c"
        " WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p')"
    ),
    "columns": (
        "SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,"
        " pg_get_expr(d.adbin, d.adrelid), col_description(c.oid, a.attnum)"
        " FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid"
        " LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum"
        " WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p')"
        "  AND a.attnum > 0 AND NOT a.attisdropped"
    ),
    "constraints": (
        "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid), convalidated"
        " FROM pg_constraint WHERE connamespace = 'public'::regnamespace"
    ),
    "indexes": (
        "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'"
    ),
    "triggers": (
        "SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(oid) FROM pg_trigger"
        " WHERE NOT tgisinternal"
    ),
    "schemas": ("SELECT (to_jsonb(s) - 'id' - 'created_at' - 'updated_at')::text FROM schemas s"),
    "columns_rows": (
        "SELECT (to_jsonb(c) - 'id' - 'created_at' - 'updated_at')::text FROM columns c"
    ),
}


def catalog(db: Conn) -> dict[str, list[tuple[Any, ...]]]:
    """Tables, columns (type, NOT NULL, default, comment), constraints (definition, validated),
    indexes, triggers and the ``schemas``/``columns`` rows (no ids or timestamps), each sorted:
    what a database upgraded step by step must share with a fresh clone."""
    return {
        name: sorted((tuple(row) for row in db.execute(query).fetchall()), key=repr)
        for name, query in _CATALOG_QUERIES.items()
    }


def differences(got: dict[str, list[Any]], want: dict[str, list[Any]]) -> list[str]:
    """Readable differences between two ``catalog`` results (empty when equal)."""
    out = []
    for name in want:
        for row in sorted(set(got[name]) - set(want[name]), key=repr):
            out.append(f"{name}: extra {row}")
        for row in sorted(set(want[name]) - set(got[name]), key=repr):
            out.append(f"{name}: missing {row}")
    return out
