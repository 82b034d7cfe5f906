"""SQL run inside a tenant's database to check a copy of it (a move between hosts): the
exact row count of every table, read in one statement."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

Conn = psycopg.Connection[Any]

# Every ordinary table outside the system schemas (a partitioned table's rows are counted in
# its partitions, which are ordinary tables).
_TABLES = (
    "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
    " WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')"
    " AND n.nspname NOT LIKE 'pg\\_%' ORDER BY 1, 2"
)


def row_counts(conn: Conn) -> dict[str, int]:
    """``schema.table`` -> its exact row count, for every user table of the connected
    database, in one repeatable-read snapshot."""
    tables = [(str(s), str(t)) for s, t in conn.execute(_TABLES).fetchall()]
    if not tables:
        return {}
    parts = [
        sql.SQL("SELECT {}::text, count(*) FROM ONLY {}.{}").format(
            sql.Literal(f"{s}.{t}"), sql.Identifier(s), sql.Identifier(t)
        )
        for s, t in tables
    ]
    rows = conn.execute(sql.SQL(" UNION ALL ").join(parts)).fetchall()
    return {str(name): int(n) for name, n in rows}
