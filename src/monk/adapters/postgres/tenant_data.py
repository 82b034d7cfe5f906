"""SQL run inside a tenant database for the data API: the registered models (``schemas`` and
``columns`` rows) and the records of their tables.

Every statement is composed from names ``monk.core.data_query`` checked against the model's
registered fields (``sql.Identifier``) and values passed as parameters. A row with ``deleted_at``
set is never read or changed again; one with ``trashed_at`` set only when asked. A failure the
database reports about a value (a constraint, a malformed uuid or date) becomes a 400 naming
the record; the caller's transaction is rolled back, so nothing of the request is written.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from monk.adapters.postgres import tenant_users as users_db
from monk.core.data_query import Field, Model, columns_of
from monk.errors import InvalidQuery, RecordInvalid

Conn = psycopg.Connection[Any]

_MODELS = (
    "SELECT s.name, s.table_name, s.definition, c.column_name, c.pg_type, c.is_required"
    " FROM schemas s LEFT JOIN columns c ON c.schema_name = s.name"
    " WHERE s.status IN ('active', 'pending') ORDER BY s.name, c.id"
)


def begin(conn: Conn, role: str | None, user_id: UUID | None) -> str | None:
    """Open a transaction, run the rest of it as the tenant's own role (it owns the tenant's
    tables through pg_database_owner: monk's admin role, which the budget logs in as, does no
    data work itself) and read the user's access level now (None: no such live user), all in
    one round trip: a simple query of three statements (the values inlined by
    ``sql.Literal``), where BEGIN, SET LOCAL ROLE and the read were three. The caller commits
    (``Budget.commit``); the budget rolls back a connection handed back in a transaction."""
    parts: list[sql.Composable] = [sql.SQL("BEGIN")]
    if role is not None:
        parts.append(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
    if user_id is not None:
        parts.append(users_db.access_query(user_id))
    cur = conn.execute(sql.SQL("; ").join(parts), prepare=False)
    if user_id is None:
        return None
    while cur.description is None and cur.nextset():
        pass
    row = cur.fetchone()
    return str(row[0]) if row is not None else None


def load_models(conn: Conn) -> dict[str, Model]:
    """The tenant's registered models (schemas rows) with their fields (columns rows)."""
    found: dict[str, tuple[str, Any, list[Field]]] = {}
    for name, table, definition, column, pg_type, required in conn.execute(_MODELS):
        entry = found.setdefault(name, (table, definition, []))
        if column is not None:
            entry[2].append(Field(column, pg_type, bool(required)))
    return {name: Model.of(name, t, d, cols) for name, (t, d, cols) in found.items()}


def _json(value: Any) -> Any:
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


def _row(row: dict[str, Any]) -> dict[str, Any]:
    return {k: _json(v) for k, v in row.items()}


def _live(include_trashed: bool) -> sql.Composable:
    if include_trashed:
        return sql.SQL("deleted_at IS NULL")
    return sql.SQL("deleted_at IS NULL AND trashed_at IS NULL")


@contextmanager
def _refused(index: int | None = None) -> Iterator[None]:
    """A value the database refuses: a 400 naming the record (the transaction is aborted)."""
    where = f"record {index}: " if index is not None else ""
    try:
        yield
    except psycopg.errors.IntegrityError as exc:
        diag = exc.diag
        what = diag.column_name or diag.constraint_name or ""
        raise RecordInvalid(
            f"{where}{diag.message_primary or 'refused by the table'}"
            + (f" ({what})" if what and what not in (diag.message_primary or "") else ""),
            record=index,
            field=diag.column_name,
        ) from None
    except psycopg.errors.DataError as exc:
        message = exc.diag.message_primary or str(exc)
        if index is None:
            raise InvalidQuery(f"a value was refused: {message}") from None
        raise RecordInvalid(f"{where}{message}", record=index) from None


def select(
    conn: Conn,
    model: Model,
    fields: Sequence[str],
    condition: sql.Composable,
    params: Sequence[Any],
    *,
    order: sql.Composable,
    limit: int,
    offset: int,
    include_trashed: bool,
) -> list[dict[str, Any]]:
    query = sql.SQL("SELECT {} FROM {} WHERE {} AND {} ORDER BY {} LIMIT {} OFFSET {}").format(
        columns_of(fields),
        sql.Identifier(model.table),
        _live(include_trashed),
        condition,
        order,
        sql.Literal(limit),
        sql.Literal(offset),
    )
    with _refused(), conn.cursor(row_factory=dict_row) as cur:
        return [_row(r) for r in cur.execute(query, params)]


def get(
    conn: Conn, model: Model, record_id: str, *, include_trashed: bool
) -> dict[str, Any] | None:
    query = sql.SQL("SELECT {} FROM {} WHERE id = %s AND {}").format(
        columns_of(model.queryable()), sql.Identifier(model.table), _live(include_trashed)
    )
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(query, (record_id,)).fetchone()
    return _row(row) if row is not None else None


def insert(conn: Conn, model: Model, records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Insert every record, in the caller's transaction; the rows as stored."""
    out = []
    returning = columns_of(model.queryable())
    with conn.cursor(row_factory=dict_row) as cur:
        for i, values in enumerate(records):
            if values:
                query = sql.SQL("INSERT INTO {} ({}) VALUES ({}) RETURNING {}").format(
                    sql.Identifier(model.table),
                    columns_of(list(values)),
                    sql.SQL(", ").join(sql.Placeholder() for _ in values),
                    returning,
                )
            else:
                query = sql.SQL("INSERT INTO {} DEFAULT VALUES RETURNING {}").format(
                    sql.Identifier(model.table), returning
                )
            with _refused(i):
                row = cur.execute(query, list(values.values())).fetchone()
            assert row is not None
            out.append(_row(row))
    return out


def _set(values: dict[str, Any]) -> sql.Composable:
    return sql.SQL(", ").join(
        sql.SQL("{} = {}").format(sql.Identifier(k), sql.Placeholder()) for k in values
    )


def update(
    conn: Conn,
    model: Model,
    values: dict[str, Any],
    condition: sql.Composable,
    params: Sequence[Any],
    *,
    index: int | None = None,
) -> list[dict[str, Any]]:
    """Set ``values`` on the live, untrashed rows matching ``condition``; the rows changed.
    ``updated_at`` is set by the table's trigger."""
    query = sql.SQL("UPDATE {} SET {} WHERE {} AND {} RETURNING {}").format(
        sql.Identifier(model.table),
        _set(values),
        _live(False),
        condition,
        columns_of(model.queryable()),
    )
    with _refused(index), conn.cursor(row_factory=dict_row) as cur:
        return [_row(r) for r in cur.execute(query, [*values.values(), *params])]


def mark(
    conn: Conn,
    model: Model,
    column: str,
    condition: sql.Composable,
    params: Sequence[Any],
) -> list[dict[str, Any]]:
    """Set ``trashed_at`` (soft delete: untrashed rows) or ``deleted_at`` (permanent: trashed
    ones too) to now() on the rows matching ``condition``; the rows as they are now."""
    assert column in ("trashed_at", "deleted_at")
    query = sql.SQL("UPDATE {} SET {} = now() WHERE {} AND {} RETURNING {}").format(
        sql.Identifier(model.table),
        sql.Identifier(column),
        _live(column == "deleted_at"),
        condition,
        columns_of(model.queryable()),
    )
    with _refused(), conn.cursor(row_factory=dict_row) as cur:
        return [_row(r) for r in cur.execute(query, params)]


def by_id() -> sql.Composable:
    return sql.SQL("id = {}").format(sql.Placeholder())
