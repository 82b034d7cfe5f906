"""Read the catalog of schema ``public`` of a template or tenant database (see
``monk.core.catalog``): one statement, one round trip.

Objects that belong to an extension are left out (they are the extension's, not the template's).
"""

from __future__ import annotations

from typing import Any

import psycopg

from monk.core.catalog import Catalog, Column, MetaRow, Named, meta_row

Conn = psycopg.Connection[Any]

# The metadata rows without what differs from one database to the next for the same schema.
_META_VOLATILE = ["id", "created_at", "updated_at"]

_NOT_EXTENSION = (
    " AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass"
    "  AND d.objid = c.oid AND d.deptype = 'e')"
)

_READ = (
    "WITH rel AS (SELECT c.oid, c.relname FROM pg_class c"
    " WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p')"
    + _NOT_EXTENSION
    + ")"
    " SELECT"
    " (SELECT coalesce(jsonb_agg(relname), '[]') FROM rel),"
    " (SELECT coalesce(jsonb_agg(jsonb_build_array(rel.relname, a.attname,"
    "   format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(ad.adbin, ad.adrelid))),"
    "   '[]')"
    "  FROM rel JOIN pg_attribute a ON a.attrelid = rel.oid AND a.attnum > 0"
    "   AND NOT a.attisdropped"
    "  LEFT JOIN pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum),"
    " (SELECT coalesce(jsonb_agg(jsonb_build_array(rel.relname, con.conname,"
    "   pg_get_constraintdef(con.oid))), '[]')"
    # NOT NULL is the columns' (PostgreSQL 18 also lists it as a constraint, 15 does not).
    "  FROM rel JOIN pg_constraint con ON con.conrelid = rel.oid AND con.contype <> 'n'),"
    " (SELECT coalesce(jsonb_agg(jsonb_build_array(rel.relname, i.relname,"
    "   pg_get_indexdef(i.oid))), '[]')"
    "  FROM rel JOIN pg_index x ON x.indrelid = rel.oid JOIN pg_class i ON i.oid = x.indexrelid),"
    " (SELECT coalesce(jsonb_agg(jsonb_build_array(rel.relname, t.tgname,"
    "   pg_get_triggerdef(t.oid))), '[]')"
    "  FROM rel JOIN pg_trigger t ON t.tgrelid = rel.oid AND NOT t.tgisinternal),"
    # monk's metadata, if the core tables are there (a tenant may have dropped them).
    " CASE WHEN to_regclass('public.schemas') IS NOT NULL THEN"
    "  (SELECT coalesce(jsonb_agg(to_jsonb(s) - %(volatile)s::text[]), '[]')"
    "   FROM public.schemas s) END,"
    " CASE WHEN to_regclass('public.columns') IS NOT NULL THEN"
    "  (SELECT coalesce(jsonb_agg(to_jsonb(c) - %(volatile)s::text[]), '[]')"
    "   FROM public.columns c) END"
)


def read_catalog(conn: Conn) -> Catalog:
    """The catalog of the connected database's schema ``public`` and its metadata rows."""
    row = conn.execute(_READ, {"volatile": _META_VOLATILE}).fetchone()
    assert row is not None
    tables, columns, constraints, indexes, triggers, schema_rows, column_rows = row
    return Catalog.of(
        tables=tables,
        columns=(Column(t, n, ty, bool(nn), d) for t, n, ty, nn, d in columns),
        constraints=(Named(*c) for c in constraints),
        indexes=(Named(*i) for i in indexes),
        triggers=(Named(*t) for t in triggers),
        schema_rows=(_schema_row(r) for r in schema_rows or ()),
        column_rows=(_column_row(r) for r in column_rows or ()),
    )


def _schema_row(fields: dict[str, Any]) -> MetaRow:
    return meta_row(str(fields.get("name")), fields)


def _column_row(fields: dict[str, Any]) -> MetaRow:
    return meta_row(f"{fields.get('schema_name')}.{fields.get('column_name')}", fields)
