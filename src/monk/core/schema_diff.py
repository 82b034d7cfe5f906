"""The change between two compiled templates, as DDL and registry row changes. Pure: no I/O.

``schema_change(old, new, migrations)`` returns what turns a database built from ``old`` into one
a fresh build of ``new`` would give (before either runs its migration files), using exactly the
compiler's object names:

    new table              CREATE TABLE (its checks and foreign keys inline: it is empty), its
                           indexes and its updated_at trigger
    new column             ADD COLUMN, nullable or with its default (NOT NULL only with one);
                           then its checks, foreign key and index as below
    new or changed check   the old one dropped; ADD … NOT VALID, then VALIDATE CONSTRAINT
                           (the end state is a fresh build's: validated; inside a step's one
                           transaction the table's lock is held until commit either way)
    new or changed ref.    the foreign key ADD … NOT VALID, then VALIDATE; CREATE INDEX
    removed check / ref.   dropped (the column's index with its reference)
    varchar widened        ALTER COLUMN TYPE varchar(longer) or text (no table rewrite, no
                           index rebuild: the relation files stay the same)
    NOT NULL removed       ALTER COLUMN DROP NOT NULL
    default set/changed    ALTER COLUMN SET DEFAULT / DROP DEFAULT (only new rows see it)
    registry               the ``schemas`` and ``columns`` rows a fresh build of ``new`` holds:
                           inserted, updated (every field) or deleted

Everything else could lose or refuse data already stored, so it raises ``InvalidTemplateSource``
naming the schema and property, and saying how to write it as a migration file instead: a
removed property or schema, a type changed or narrowed, a new required property without a
default, an optional property made required. A migration file runs on a fresh build too, where
the tables are made from the new schemas; the advice is written so the same file works on both.

One removal is accepted: a property (or a whole schema) removed while a migration file of the
new source drops its column (or table), i.e. holds ``ALTER TABLE t … DROP [COLUMN] [IF EXISTS]
c`` (``DROP TABLE [IF EXISTS] t``): one added with the removal, or one an earlier build already
ran (the column is then gone from every database). The diff leaves the catalog to that file and
deletes the registry rows. The file must say ``IF EXISTS``: on a fresh build the column was never
created.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from psycopg import sql

from monk.core.schema_compiler import (
    Check,
    Column,
    CompiledTable,
    CompiledTemplate,
    check_clause,
    column_clause,
    column_row,
    foreign_key_clause,
    foreign_key_name,
    index_name,
    index_statement,
    schema_row,
)
from monk.errors import InvalidTemplateSource

VARCHAR = "character varying"


@dataclass(frozen=True)
class SchemaChange:
    """The statements of a change, in the order they must run (values are literals)."""

    ddl: tuple[sql.Composed, ...]
    """Catalog changes."""
    registry: tuple[sql.Composed, ...]
    """``schemas`` / ``columns`` row changes."""

    @property
    def statements(self) -> list[sql.Composed]:
        return [*self.ddl, *self.registry]

    def __bool__(self) -> bool:
        return bool(self.ddl or self.registry)


def schema_change(
    old: CompiledTemplate, new: CompiledTemplate, migrations: Sequence[str] = ()
) -> SchemaChange:
    """The change from ``old`` to ``new``; ``migrations``: the SQL of the migration files of
    ``new`` (only read to accept a removal one of them carries out). Raises
    InvalidTemplateSource for a change that is not safe to apply to a database holding data."""
    before = {table.name: table for table in old.tables}
    after = {table.name: table for table in new.tables}
    dropped_by_file = _comment_free(migrations)
    for name in sorted(set(before) - set(after)):
        dropped = _drops_table(dropped_by_file, name)
        if dropped is None:
            raise _removed_table(name)
        if not dropped:
            raise _drop_without_if_exists(name, None, f'DROP TABLE IF EXISTS "{name}";')
    ddl: list[sql.Composed] = []
    registry: list[sql.Composed] = []
    for name in sorted(set(before) - set(after)):
        registry.append(_delete("schemas", {"name": name}))
    # First every new table, in creation order: existing tables may gain references to them.
    for table in new.tables:
        if table.name not in before:
            ddl += [table.create, *table.indexes, table.trigger]
            registry += _insert_rows(table)
    for table in new.tables:
        if table.name in before:
            ddl += _table_change(before[table.name], table, dropped_by_file)
            registry += _registry_change(before[table.name], table)
    return SchemaChange(tuple(ddl), tuple(registry))


# --- unsafe changes -------------------------------------------------------------------------------


def _error(schema: str, prop: str | None, problem: str) -> InvalidTemplateSource:
    where = f"schemas/{schema}.json" + ("" if prop is None else f": property {prop!r}")
    return InvalidTemplateSource(
        f"{where}: {problem}", schema=schema, property=prop, change="unsafe"
    )


def _removed_table(table: str) -> InvalidTemplateSource:
    return _error(
        table,
        None,
        "removed (the schema file is gone), and monk never drops a table that tenants hold "
        "data in: to drop it, add a migration file with "
        f'DROP TABLE IF EXISTS "{table}"; to the same build '
        "(IF EXISTS: a fresh build never creates it); otherwise keep the schema",
    )


def _removed_column(table: str, column: str, added: Sequence[str]) -> InvalidTemplateSource:
    rename = ""
    if added:
        rename = (
            f"; to rename it (to {added[0]!r}?), keep {column!r} in the schema instead of the "
            f'new name and add a migration file with ALTER TABLE "{table}" RENAME COLUMN '
            f'"{column}" TO "{added[0]}"; (its columns row follows the catalog)'
        )
    return _error(
        table,
        column,
        "removed from the schema, and monk never drops a column that tenants hold data in: "
        f'to drop it, add a migration file with ALTER TABLE "{table}" DROP COLUMN IF EXISTS '
        f'"{column}"; to the same build (IF EXISTS: a fresh build never creates it){rename}',
    )


def _drop_without_if_exists(
    table: str, column: str | None, statement: str
) -> InvalidTemplateSource:
    what = "column" if column is not None else "table"
    return _error(
        table,
        column,
        f"removed, and a migration file drops its {what} without IF EXISTS, which fails on a "
        f"fresh build (the {what} is never created there): write {statement} (a file an "
        f"earlier build already ran cannot change: keep the {'property' if column else 'schema'}"
        " then)",
    )


def _required_without_default(table: str, column: str) -> InvalidTemplateSource:
    return _error(
        table,
        column,
        "new, required and without a default, so rows already stored would have no value: give "
        'it a "default", or add it as optional and add a migration file that fills it and runs '
        f'ALTER TABLE "{table}" ALTER COLUMN "{column}" SET NOT NULL; '
        "(its columns row follows the catalog)",
    )


def _made_required(table: str, column: str) -> InvalidTemplateSource:
    return _error(
        table,
        column,
        "made required (NOT NULL), and rows already stored may hold NULL: keep it optional in "
        "the schema and add a migration file that fills the NULLs and runs "
        f'ALTER TABLE "{table}" ALTER COLUMN "{column}" SET NOT NULL; '
        "(its columns row follows the catalog)",
    )


def _type_changed(table: str, old: Column, new: Column) -> InvalidTemplateSource:
    narrowing = old.pg_type.name in (VARCHAR, "text") and new.pg_type.name == VARCHAR
    kind = "narrowed" if narrowing else "changed"
    return _error(
        table,
        new.name,
        f"type {kind} from {old.pg_type} to {new.pg_type}, which values already stored may "
        "not fit: keep the old type in the schema and add a migration file with "
        f'ALTER TABLE "{table}" ALTER COLUMN "{new.name}" TYPE {new.pg_type} USING …; '
        "(its columns row follows the catalog)",
    )


# --- one table ------------------------------------------------------------------------------------


def _table_change(old: CompiledTable, new: CompiledTable, files: str) -> list[sql.Composed]:
    before = {column.name: column for column in old.columns}
    after = {column.name: column for column in new.columns}
    added = [name for name in after if name not in before]
    for name in before:
        if name in after:
            continue
        dropped = _drops_column(files, new.name, name)
        if dropped is None:
            raise _removed_column(new.name, name, added)
        if not dropped:
            statement = f'ALTER TABLE "{new.name}" DROP COLUMN IF EXISTS "{name}";'
            raise _drop_without_if_exists(new.name, name, statement)
    for name in added:
        if after[name].not_null and not after[name].has_default:
            raise _required_without_default(new.name, name)
    for name, column in after.items():
        if name in before:
            _check_safe(new.name, before[name], column)

    table = sql.Identifier(new.name)
    drops: list[sql.Composed] = []
    alters: list[sql.Composed] = []
    adds: list[sql.Composed] = []
    validates: list[sql.Composed] = []

    def alter(action: sql.Composable) -> sql.Composed:
        return sql.SQL("ALTER TABLE {} {}").format(table, action)

    def add_constraint(clause: sql.Composed, name: str) -> None:
        adds.append(alter(sql.SQL("ADD {} NOT VALID").format(clause)))
        validates.append(alter(sql.SQL("VALIDATE CONSTRAINT {}").format(sql.Identifier(name))))

    for name, column in after.items():
        was = before.get(name)
        if was is None:
            alters.append(alter(sql.SQL("ADD COLUMN {}").format(column_clause(column))))
            old_checks: Mapping[str, Check] = {}
        else:
            alters += [alter(action) for action in _column_alters(was, column)]
            old_checks = {check.name: check for check in was.checks}
        new_checks = {check.name: check for check in column.checks}
        for check_name, check in old_checks.items():
            if check_name not in new_checks or not _same(new_checks[check_name], check):
                drops.append(alter(_drop_constraint(check_name)))
        for check_name, check in new_checks.items():
            if check_name not in old_checks or not _same(old_checks[check_name], check):
                add_constraint(check_clause(check), check_name)
        old_ref = was.reference if was is not None else None
        if old_ref != column.reference:
            if old_ref is not None:
                drops.append(alter(_drop_constraint(foreign_key_name(new.name, name))))
                index = sql.Identifier(index_name(new.name, name))
                drops.append(sql.SQL("DROP INDEX IF EXISTS {}").format(index))
            if column.reference is not None:
                add_constraint(
                    foreign_key_clause(new.name, column), foreign_key_name(new.name, name)
                )
                adds.append(index_statement(new.name, name))
    return [*drops, *alters, *adds, *validates]


def _check_safe(table: str, old: Column, new: Column) -> None:
    if old.pg_type != new.pg_type and not _widens(old, new):
        raise _type_changed(table, old, new)
    if new.not_null and not old.not_null:
        raise _made_required(table, new.name)


def _widens(old: Column, new: Column) -> bool:
    """varchar(n) → varchar(m ≥ n) or text: PostgreSQL changes only the catalog (no rewrite,
    no index rebuild), and every value stored fits."""
    if old.pg_type.name != VARCHAR:
        return False
    if new.pg_type.name == "text":
        return True
    return new.pg_type.name == VARCHAR and (new.pg_type.length or 0) >= (old.pg_type.length or 0)


def _column_alters(old: Column, new: Column) -> Iterator[sql.Composed]:
    column = sql.Identifier(new.name)
    if old.pg_type != new.pg_type:
        yield sql.SQL("ALTER COLUMN {} TYPE {}").format(column, new.pg_type.as_sql())
    if old.not_null and not new.not_null:
        yield sql.SQL("ALTER COLUMN {} DROP NOT NULL").format(column)
    old_default = (old.has_default, _literal(old.to_sql_value(old.default)))
    new_default = (new.has_default, _literal(new.to_sql_value(new.default)))
    if old_default != new_default or (new.has_default and old.pg_type != new.pg_type):
        if new.has_default:
            value = sql.Literal(new.to_sql_value(new.default))
            yield sql.SQL("ALTER COLUMN {} SET DEFAULT {}").format(column, value)
        else:
            yield sql.SQL("ALTER COLUMN {} DROP DEFAULT").format(column)


def _drop_constraint(name: str) -> sql.Composed:
    # IF EXISTS: a tenant's migration may already have dropped it; the end state is the same.
    return sql.SQL("DROP CONSTRAINT IF EXISTS {}").format(sql.Identifier(name))


def _same(a: Check, b: Check) -> bool:
    """Same constraint, compared as SQL text (``Jsonb`` values compare by identity, and
    Python's ``1 == True`` would hide a changed JSON enum)."""
    return a.keyword == b.keyword and a.expression.as_string(None) == b.expression.as_string(None)


def _literal(value: Any) -> str:
    return sql.Literal(value).as_string(None)


# --- registry rows --------------------------------------------------------------------------------


def _insert_rows(table: CompiledTable) -> list[sql.Composed]:
    rows = [("schemas", schema_row(table))]
    rows += [("columns", column_row(table.name, column)) for column in table.columns]
    return [_insert(name, row) for name, row in rows]


def _registry_change(old: CompiledTable, new: CompiledTable) -> list[sql.Composed]:
    if old.checksum == new.checksum:
        return []
    schema = schema_row(new)
    out = [_update("schemas", _without(schema, "name"), {"name": new.name})]
    before = {column.name: column_row(old.name, column) for column in old.columns}
    after = {column.name: column_row(new.name, column) for column in new.columns}
    for name in before:
        if name not in after:
            out.append(_delete("columns", {"schema_name": new.name, "column_name": name}))
    for name, row in after.items():
        if name not in before:
            out.append(_insert("columns", row))
        elif _literal_row(before[name]) != _literal_row(row):
            key = {"schema_name": new.name, "column_name": name}
            out.append(_update("columns", _without(row, *key), key))
    return out


def _literal_row(row: Mapping[str, Any]) -> dict[str, str]:
    """A row as SQL literals, to compare (see ``_same``)."""
    return {name: _literal(value) for name, value in row.items()}


def _without(row: Mapping[str, Any], *names: str) -> dict[str, Any]:
    return {name: value for name, value in row.items() if name not in names}


def _values(values: Iterable[Any]) -> sql.Composed:
    return sql.SQL(", ").join([sql.Literal(value) for value in values])


def _names(names: Iterable[str]) -> sql.Composed:
    return sql.SQL(", ").join([sql.Identifier(name) for name in names])


def _where(key: Mapping[str, Any]) -> sql.Composed:
    return sql.SQL(" AND ").join(
        [sql.SQL("{} = {}").format(sql.Identifier(k), sql.Literal(v)) for k, v in key.items()]
    )


def _insert(table: str, row: Mapping[str, Any]) -> sql.Composed:
    return sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
        sql.Identifier(table), _names(row), _values(row.values())
    )


def _update(table: str, row: Mapping[str, Any], key: Mapping[str, Any]) -> sql.Composed:
    return sql.SQL("UPDATE {} SET ({}) = ROW({}) WHERE {}").format(
        sql.Identifier(table), _names(row), _values(row.values()), _where(key)
    )


def _delete(table: str, key: Mapping[str, Any]) -> sql.Composed:
    return sql.SQL("DELETE FROM {} WHERE {}").format(sql.Identifier(table), _where(key))


# --- removals carried out by a migration file -----------------------------------------------------

_COMMENTS = re.compile(r"--[^\n]*|/\*.*?\*/", re.DOTALL)


def _comment_free(migrations: Sequence[str]) -> str:
    return "\n;\n".join(_COMMENTS.sub(" ", text) for text in migrations)


def _name(name: str) -> str:
    """A table or column name as SQL may write it: bare, quoted, schema-qualified by public."""
    return (
        rf'(?:(?:public|"public")\s*\.\s*)?(?:{re.escape(name)}|"{re.escape(name)}")(?=[\s;,)]|$)'
    )


def _drops_column(text: str, table: str, column: str) -> bool | None:
    """Whether the migrations drop ``table.column``: None if not at all, False if some drop
    lacks IF EXISTS (it fails on a fresh build, where the column never exists), else True."""
    pattern = (
        rf"\bALTER\s+TABLE\s+(?:IF\s+EXISTS\s+)?(?:ONLY\s+)?{_name(table)}[^;]*?"
        rf"\bDROP\s+(?:COLUMN\s+)?(IF\s+EXISTS\s+)?{_name(column)}"
    )
    return _drop_state(pattern, text)


def _drops_table(text: str, table: str) -> bool | None:
    """As ``_drops_column``, for ``DROP TABLE``."""
    pattern = rf"\bDROP\s+TABLE\s+(IF\s+EXISTS\s+)?(?:[^;]*?,\s*)?{_name(table)}"
    return _drop_state(pattern, text)


def _drop_state(pattern: str, text: str) -> bool | None:
    found = [match.group(1) is not None for match in re.finditer(pattern, text, re.IGNORECASE)]
    return all(found) if found else None
