"""JSON Schema documents → PostgreSQL DDL, registry rows and seed inserts. Pure: no I/O.

Every statement is a ``psycopg.sql.Composed``; identifiers go through ``sql.Identifier`` and values
through ``sql.Literal`` or query parameters, so no name or value from a template source is ever
spliced into SQL text. Nothing here connects to a database: the build service executes, in order,

    1. ``core_tables_ddl()``                         trigger function; users, schemas, columns
    2. ``compiled.ddl()``                            CREATE TABLE, indexes, trigger per schema
    3. ``compiled.registry_inserts()``               rows of ``schemas`` and ``columns``
    4. ``seed_statements(compiled, data)``           the seed records
    5. the template's migrations

``compile_template`` and ``seed_statements`` raise ``InvalidTemplateSource`` for every problem they
can see, so calling both before creating a database keeps bad input away from PostgreSQL.

Mapping (``pg_type`` is spelled as PostgreSQL's ``format_type()`` prints it, so a health check can
compare the registry with the catalog directly):

    string + format uuid / date-time / date   uuid / timestamp with time zone / date
    string + maxLength 1..255                  character varying(n)
    other string (incl. email, uri, enum)      text
    integer                                    bigint  (JSON integers routinely exceed int4;
                                                        JavaScript's safe range needs 53 bits)
    number                                     numeric (exact: 0.1 stays 0.1)
    boolean                                    boolean
    array, object, several or no types         jsonb

Enforced in the database as named CHECK constraints: ``enum``; ``minimum``, ``maximum``,
``exclusiveMinimum``, ``exclusiveMaximum`` on integer/number; ``minLength``, ``maxLength``,
``pattern`` and the email/uri formats on text columns; the JSON type of array/object columns.
``pattern`` is written for ECMA-262 regular expressions while PostgreSQL's ``~`` uses its own
Advanced Regular Expressions. The common subset (classes, quantifiers, anchors, ``\\d``/``\\w``/
``\\s``, lookahead) behaves the same and both search unanchored, but ECMA-only syntax such as
named groups or ``\\p{…}`` is rejected by PostgreSQL when the table is created. Keywords the
database cannot check cheaply (nested object shapes, ``items``, ``multipleOf``, string keywords on
uuid/date columns) are enforced only on seed data, by ``jsonschema``.

References between schemas use the extension keyword ``x-monk-reference`` on a
``{"type": "string", "format": "uuid"}`` property, either the target schema's name or
``{"schema": name, "on_delete": "cascade" | "restrict" | "set null"}`` (default ``restrict``). It
becomes a foreign key to the target's ``id`` plus an index on the column. Tables are created so that
referenced tables come first; a schema may reference itself, a cycle between schemas is an error.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from graphlib import CycleError, TopologicalSorter
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import SchemaError, ValidationError, best_match
from psycopg import sql
from psycopg.types.json import Jsonb

from monk.core.identifiers import MAX_IDENTIFIER_BYTES
from monk.core.system_columns import SYSTEM_COLUMN_DEFS, SYSTEM_COLUMNS
from monk.errors import InvalidTemplateSource

COMPILER_VERSION = "3"
"""Bump whenever the output for the same input changes: it is part of every template version."""

# What each compiler version changed in monk's own tables, as SQL that brings a database of the
# version before to this one (an upgrade step from a build of an older compiler runs them first).
# Version 2 added ``monk.build``, which the upgrade itself creates when a tenant lacks it.
CORE_UPGRADES: dict[str, tuple[str, ...]] = {
    "3": ("ALTER TABLE users ADD COLUMN IF NOT EXISTS password_hash text",),
}


def core_upgrade(from_version: str | None, to_version: str = COMPILER_VERSION) -> list[str]:
    """The ``CORE_UPGRADES`` statements from compiler ``from_version`` (exclusive) to
    ``to_version`` (inclusive), in order; all known ones when ``from_version`` is unknown."""
    start = int(from_version) if from_version and from_version.isdigit() else 0
    return [
        statement
        for version in range(start + 1, int(to_version) + 1)
        for statement in CORE_UPGRADES.get(str(version), ())
    ]


REFERENCE_KEYWORD = "x-monk-reference"
_ON_DELETE_SQL = {"cascade": "CASCADE", "restrict": "RESTRICT", "set null": "SET NULL"}
ON_DELETE_ACTIONS = tuple(_ON_DELETE_SQL)
TOUCH_FUNCTION = "monk_touch_updated_at"
CORE_TABLES = ("users", "schemas", "columns")
USER_ACCESS_LEVELS = ("root", "full", "edit", "read", "deny")
SCHEMA_STATUSES = ("pending", "active", "disabled", "system")

_SYSTEM_COLUMN_DEFS = SYSTEM_COLUMN_DEFS

# Hidden columns PostgreSQL puts on every table; the server refuses user columns of these names.
POSTGRES_SYSTEM_COLUMNS = frozenset({"tableoid", "xmin", "xmax", "cmin", "cmax", "ctid"})

# PostgreSQL's fully reserved key words and those reserved except as function or type names
# (categories "reserved" and "reserved (can be function or type)" of the SQL Key Words appendix).
RESERVED_WORDS = frozenset(
    """
    all analyse analyze and any array as asc asymmetric authorization binary both case cast check
    collate collation column concurrently constraint create cross current_catalog current_date
    current_role current_schema current_time current_timestamp current_user default deferrable
    desc distinct do else end except false fetch for foreign freeze from full grant group having
    ilike in initially inner intersect into is isnull join lateral leading left like limit
    localtime localtimestamp natural not notnull null offset on only or order outer overlaps
    placing primary references returning right select session_user similar some symmetric
    system_user table tablesample then to trailing true union unique user using variadic verbose
    when where window with
    """.split()  # noqa: SIM905 (a word list reads better than 95 quoted strings)
)

# One pattern for the database CHECK and the seed-data format check, so both agree.
EMAIL_PATTERN = r"^[^@\s]+@[^@\s]+$"
URI_PATTERN = r"^[a-zA-Z][a-zA-Z0-9+.-]*:"

_NAME_RE = re.compile(r"[a-z_][a-z0-9_]*")
_UUID_RE = re.compile(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")
_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)
_DATE_TIME_RE = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})", re.ASCII
)
_MAX_VARCHAR = 255

Statement = tuple[sql.Composed, tuple[Any, ...]]
"""A statement and its parameters (empty for DDL)."""


# --- types -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PgType:
    """A column type; ``str()`` is its ``format_type()`` spelling, stored in ``columns.pg_type``."""

    name: str
    length: int | None = None

    def __str__(self) -> str:
        return self.name if self.length is None else f"{self.name}({self.length})"

    def as_sql(self) -> sql.Composable:
        if self.length is None:
            return sql.SQL(self.name)
        return sql.SQL("{}({})").format(sql.SQL(self.name), sql.Literal(self.length))


TEXT = PgType("text")
UUID = PgType("uuid")
TIMESTAMPTZ = PgType("timestamp with time zone")
DATE = PgType("date")
BIGINT = PgType("bigint")
NUMERIC = PgType("numeric")
BOOLEAN = PgType("boolean")
JSONB = PgType("jsonb")

_FORMAT_TYPES = {"uuid": UUID, "date-time": TIMESTAMPTZ, "date": DATE}
_SCALAR_TYPES = {"integer": BIGINT, "number": NUMERIC, "boolean": BOOLEAN}
_FORMAT_PATTERNS = {"email": EMAIL_PATTERN, "uri": URI_PATTERN}


# --- format checking for seed data and defaults -----------------------------------------------

FORMAT_CHECKER = FormatChecker(formats=())
"""Checks exactly the formats that become column types or CHECKs, the way the database will.

``jsonschema``'s own checkers for date-time and uri need optional packages and its email check is
looser than the CHECK constraint; these accept what PostgreSQL accepts, so a seed record that
validates also inserts.
"""


@FORMAT_CHECKER.checks("uuid")
def _is_uuid(value: object) -> bool:
    return not isinstance(value, str) or bool(_UUID_RE.fullmatch(value))


@FORMAT_CHECKER.checks("date", raises=ValueError)
def _is_date(value: object) -> bool:
    if not isinstance(value, str):
        return True
    return bool(_DATE_RE.fullmatch(value)) and bool(date.fromisoformat(value))


@FORMAT_CHECKER.checks("date-time", raises=ValueError)
def _is_date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    return bool(_DATE_TIME_RE.fullmatch(value)) and bool(datetime.fromisoformat(value))


@FORMAT_CHECKER.checks("email")
def _is_email(value: object) -> bool:
    return not isinstance(value, str) or bool(re.search(EMAIL_PATTERN, value))


@FORMAT_CHECKER.checks("uri")
def _is_uri(value: object) -> bool:
    return not isinstance(value, str) or bool(re.search(URI_PATTERN, value))


# --- compiled output ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """A foreign key from a property to another schema's ``id``."""

    schema: str
    on_delete: str


@dataclass(frozen=True)
class Check:
    """A named CHECK constraint; ``keyword`` is the JSON Schema keyword it enforces."""

    name: str
    keyword: str
    expression: sql.Composed


@dataclass(frozen=True)
class Column:
    """One property of a schema, as a column; ``json_type`` is None when it holds any JSON."""

    name: str
    json_type: str | None
    pg_type: PgType
    not_null: bool
    has_default: bool
    default: Any
    checks: tuple[Check, ...]
    reference: Reference | None
    definition: Mapping[str, Any]

    def to_sql_value(self, value: Any) -> Any:
        """A JSON value as the parameter or literal to store in this column."""
        return _sql_value(value, self.pg_type)


@dataclass(frozen=True)
class CompiledTable:
    """Everything to create and register one schema's table."""

    name: str
    definition: Mapping[str, Any]
    checksum: str
    columns: tuple[Column, ...]
    create: sql.Composed
    indexes: tuple[sql.Composed, ...]
    trigger: sql.Composed
    registry: tuple[Statement, ...]

    def column(self, name: str) -> Column:
        return next(column for column in self.columns if column.name == name)

    @property
    def relations(self) -> tuple[str, ...]:
        """Names this table puts in PostgreSQL's relation namespace: itself and its indexes."""
        indexes = (index_name(self.name, c.name) for c in self.columns if c.reference)
        return (self.name, _object_name(self.name, "pkey"), *indexes)


@dataclass(frozen=True)
class CompiledTemplate:
    """The tables of a template, referenced tables before the tables referencing them."""

    tables: tuple[CompiledTable, ...]

    def ddl(self) -> list[sql.Composed]:
        """CREATE TABLE, its indexes and its updated_at trigger, table after table."""
        return [
            statement
            for table in self.tables
            for statement in (table.create, *table.indexes, table.trigger)
        ]

    def registry_inserts(self) -> list[Statement]:
        """The ``schemas`` row and ``columns`` rows of every table."""
        return [statement for table in self.tables for statement in table.registry]


# --- names -------------------------------------------------------------------------------------


def _object_name(*parts: str) -> str:
    """A deterministic constraint or index name of at most 63 bytes.

    Longer names end in 8 hex digits of their hash instead of being cut by the server (which would
    merge names sharing a prefix). Every suffix used here (pkey, key, idx, fkey, min, enum, …)
    contains a non-hex letter, so a hashed name never equals an unhashed one.
    """
    name = "_".join(parts)
    if len(name) <= MAX_IDENTIFIER_BYTES:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[: MAX_IDENTIFIER_BYTES - 9]}_{digest}"


def index_name(table: str, column: str) -> str:
    """The index a reference puts on its column."""
    return _object_name(table, column, "idx")


def foreign_key_name(table: str, column: str) -> str:
    """The foreign key constraint of a reference."""
    return _object_name(table, column, "fkey")


def _name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a table or column name, or None if it can."""
    if not _NAME_RE.fullmatch(name):
        return "must match ^[a-z_][a-z0-9_]*$"
    if len(name.encode()) > MAX_IDENTIFIER_BYTES:
        return f"is longer than {MAX_IDENTIFIER_BYTES} bytes"
    if name in RESERVED_WORDS:
        return "is a PostgreSQL reserved word"
    return None


def schema_checksum(definition: Mapping[str, Any]) -> str:
    """sha256 of a schema's canonical JSON (sorted keys, no spaces), as kept in ``schemas``."""
    canonical = json.dumps(definition, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _error(schema: str, problem: str, prop: str | None = None) -> InvalidTemplateSource:
    where = f"schemas/{schema}.json" + ("" if prop is None else f": property {prop!r}")
    return InvalidTemplateSource(f"{where}: {problem}", schema=schema, property=prop)


# --- SQL building blocks -----------------------------------------------------------------------


def _join(parts: Iterable[sql.Composable], separator: str = ", ") -> sql.Composed:
    return sql.SQL(separator).join(list(parts))


def _fixed_column(name: str, spec: str) -> sql.Composed:
    """A column whose type and constraints are constant SQL written in this module."""
    return _join([sql.Identifier(name), sql.SQL(spec)], " ")


def _create_table(
    table: str, columns: Sequence[sql.Composable], constraints: Sequence[sql.Composable]
) -> sql.Composed:
    """CREATE TABLE: system columns, then ``columns``, the primary key and ``constraints``."""
    system = [_fixed_column(name, spec) for name, spec in _SYSTEM_COLUMN_DEFS]
    primary_key = sql.SQL("CONSTRAINT {} PRIMARY KEY ({})").format(
        sql.Identifier(_object_name(table, "pkey")), sql.Identifier("id")
    )
    body = _join([*system, *columns, primary_key, *constraints], ",\n  ")
    return sql.SQL("CREATE TABLE {} (\n  {}\n)").format(sql.Identifier(table), body)


# Constraint-name suffix per enforced keyword (each has a non-hex letter, see ``_object_name``).
_CHECK_SUFFIXES = {
    "enum": "enum",
    "minimum": "min",
    "maximum": "max",
    "exclusiveMinimum": "xmin",
    "exclusiveMaximum": "xmax",
    "minLength": "minlen",
    "maxLength": "maxlen",
    "pattern": "pattern",
    "format": "format",
    "type": "type",
}


def _check(table: str, column: str, keyword: str, expression: sql.Composed) -> Check:
    return Check(_object_name(table, column, _CHECK_SUFFIXES[keyword]), keyword, expression)


def check_clause(check: Check) -> sql.Composed:
    return sql.SQL("CONSTRAINT {} CHECK ({})").format(sql.Identifier(check.name), check.expression)


def _compare(column: str, operator: str, value: sql.Composable) -> sql.Composed:
    return _join([sql.Identifier(column), sql.SQL(operator), value], " ")


def _one_of(column: str, values: Sequence[Any]) -> sql.Composed:
    """``column IN (values)``; with no values the column can only be NULL."""
    if not values:
        return sql.SQL("{} IS NULL").format(sql.Identifier(column))
    return sql.SQL("{} IN ({})").format(sql.Identifier(column), _join(map(sql.Literal, values)))


def _char_length(column: str, operator: str, length: int) -> sql.Composed:
    length_of = sql.SQL("char_length({})").format(sql.Identifier(column))
    return _join([length_of, sql.SQL(operator), sql.Literal(length)], " ")


def _jsonb_typeof(column: str, json_type: str) -> sql.Composed:
    return sql.SQL("jsonb_typeof({}) = {}").format(sql.Identifier(column), sql.Literal(json_type))


def _unique(table: str, columns: Sequence[str]) -> sql.Composed:
    return sql.SQL("CONSTRAINT {} UNIQUE ({})").format(
        sql.Identifier(_object_name(table, *columns, "key")), _join(map(sql.Identifier, columns))
    )


def _touch_trigger(table: str) -> sql.Composed:
    return sql.SQL(
        "CREATE TRIGGER {} BEFORE UPDATE ON {} FOR EACH ROW EXECUTE FUNCTION {}()"
    ).format(sql.Identifier(TOUCH_FUNCTION), sql.Identifier(table), sql.Identifier(TOUCH_FUNCTION))


def insert_statement(table: str, row: Mapping[str, Any]) -> Statement:
    """A parameterized INSERT of ``row`` (column → value) into ``table``."""
    if not row:
        return sql.SQL("INSERT INTO {} DEFAULT VALUES").format(sql.Identifier(table)), ()
    query = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
        sql.Identifier(table),
        _join(map(sql.Identifier, row)),
        _join(sql.Placeholder() for _ in row),
    )
    return query, tuple(row.values())


# --- core tables -------------------------------------------------------------------------------

_TOUCH_BODY = """
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END;
"""

# Unique keys of the core tables; each is also an index, i.e. a relation name.
_CORE_UNIQUE_KEYS: Mapping[str, tuple[tuple[str, ...], ...]] = {
    "users": (("auth",),),
    "schemas": (("name",), ("table_name",)),
    "columns": (("schema_name", "column_name"),),
}

CORE_RELATIONS = frozenset(
    name
    for table, keys in _CORE_UNIQUE_KEYS.items()
    for name in (
        table,
        _object_name(table, "pkey"),
        *(_object_name(table, *k, "key") for k in keys),
    )
)
"""Relation names (tables and indexes) of the core tables, which no schema may take."""


def _core_table(
    table: str, columns: Sequence[tuple[str, str]], checks: Sequence[Check] = ()
) -> list[sql.Composed]:
    constraints = [_unique(table, key) for key in _CORE_UNIQUE_KEYS[table]]
    constraints += [check_clause(check) for check in checks]
    return [
        _create_table(table, [_fixed_column(*c) for c in columns], constraints),
        _touch_trigger(table),
    ]


def core_tables_ddl() -> list[sql.Composed]:
    """The trigger function and the core tables ``users``, ``schemas``, ``columns``."""
    touch = sql.SQL("CREATE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql AS {}").format(
        sql.Identifier(TOUCH_FUNCTION), sql.Literal(_TOUCH_BODY)
    )
    users = _core_table(
        "users",
        [
            ("name", "text NOT NULL"),
            ("auth", "text NOT NULL"),
            ("access", "text NOT NULL"),
            # argon2id (PHC string) of the user's password; NULL: cannot log in
            ("password_hash", "text"),
        ],
        [_check("users", "access", "enum", _one_of("access", USER_ACCESS_LEVELS))],
    )
    schemas = _core_table(
        "schemas",
        [
            ("name", "text NOT NULL"),
            ("table_name", "text NOT NULL"),
            ("status", "text NOT NULL DEFAULT 'pending'"),
            ("definition", "jsonb NOT NULL"),
            ("field_count", "integer NOT NULL"),
            ("checksum", "text NOT NULL"),
        ],
        [
            _check("schemas", "status", "enum", _one_of("status", SCHEMA_STATUSES)),
            _check("schemas", "definition", "type", _jsonb_typeof("definition", "object")),
            _check(
                "schemas", "field_count", "minimum", _compare("field_count", ">=", sql.Literal(0))
            ),
            _check(
                "schemas",
                "checksum",
                "pattern",
                _compare("checksum", "~", sql.Literal("^[0-9a-f]{64}$")),
            ),
        ],
    )
    columns = _core_table(
        "columns",
        [
            (
                "schema_name",
                "text NOT NULL REFERENCES schemas (name) ON DELETE CASCADE ON UPDATE CASCADE",
            ),
            ("column_name", "text NOT NULL"),
            ("pg_type", "text NOT NULL"),
            ("is_required", "boolean NOT NULL DEFAULT false"),
            ("default_value", "jsonb"),
            ("minimum", "numeric"),
            ("maximum", "numeric"),
            ("exclusive_minimum", "numeric"),
            ("exclusive_maximum", "numeric"),
            ("min_length", "integer"),
            ("max_length", "integer"),
            ("pattern", "text"),
            ("format", "text"),
            ("enum_values", "jsonb"),
            ("is_array", "boolean NOT NULL DEFAULT false"),
            ("description", "text"),
            ("reference_schema", "text"),
            ("reference_on_delete", "text"),
        ],
        [
            _check("columns", "enum_values", "type", _jsonb_typeof("enum_values", "array")),
            _check(
                "columns",
                "reference_on_delete",
                "enum",
                _one_of("reference_on_delete", ON_DELETE_ACTIONS),
            ),
        ],
    )
    return [touch, *users, *schemas, *columns]


# --- compiling schemas -------------------------------------------------------------------------

_REFERENCE_VALIDATOR = Draft202012Validator(
    {
        "oneOf": [
            {"type": "string"},
            {
                "type": "object",
                "properties": {
                    "schema": {"type": "string"},
                    "on_delete": {"enum": list(ON_DELETE_ACTIONS)},
                },
                "required": ["schema"],
                "additionalProperties": False,
            },
        ]
    }
)
_NUMERIC_BOUNDS = (
    ("minimum", ">="),
    ("maximum", "<="),
    ("exclusiveMinimum", ">"),
    ("exclusiveMaximum", "<"),
)


def compile_template(schemas: Mapping[str, Mapping[str, Any]]) -> CompiledTemplate:
    """Validate and compile a template's schemas (schema name → JSON Schema document).

    Raises ``InvalidTemplateSource`` naming the schema file and the property for anything the
    meta-schema or monk's rules refuse, for references to unknown schemas and for cycles.
    """
    tables = {name: _compile_table(name, schemas[name]) for name in sorted(schemas)}
    ordered = tuple(tables[name] for name in _creation_order(tables))
    _check_relation_names(ordered)
    return CompiledTemplate(ordered)


def _compile_table(name: str, definition: Mapping[str, Any]) -> CompiledTable:
    validator = _document_validator(name, definition)
    properties = definition["properties"]
    required = set(definition.get("required", ()))
    columns = tuple(
        _compile_column(name, prop, properties[prop], prop in required, validator)
        for prop in properties
    )
    constraints = [check_clause(check) for column in columns for check in column.checks]
    constraints += [foreign_key_clause(name, column) for column in columns if column.reference]
    checksum = schema_checksum(definition)
    return CompiledTable(
        name=name,
        definition=definition,
        checksum=checksum,
        columns=columns,
        create=_create_table(name, [column_clause(column) for column in columns], constraints),
        indexes=tuple(index_statement(name, column.name) for column in columns if column.reference),
        trigger=_touch_trigger(name),
        registry=(
            _schema_row(name, definition, checksum),
            *(_column_row(name, column) for column in columns),
        ),
    )


def _document_validator(name: str, definition: Mapping[str, Any]) -> Draft202012Validator:
    """Check a schema document as a whole; return a validator for its values."""
    problem = _name_problem(name)
    if problem:
        raise _error(name, f"schema name {name!r} {problem}")
    if name in CORE_TABLES:
        raise _error(name, f"schema name {name!r} is taken by one of monk's core tables")
    if not isinstance(definition, Mapping):
        raise _error(name, "must contain a JSON object")
    try:
        Draft202012Validator.check_schema(definition)
    except SchemaError as exc:
        raise _error(
            name, f"not a valid JSON Schema (Draft 2020-12) at {exc.json_path}: {exc.message}"
        ) from None
    if definition.get("type") != "object" or not isinstance(definition.get("properties"), Mapping):
        raise _error(name, 'the top level must be {"type": "object", "properties": {...}}')
    undeclared = sorted(set(definition.get("required", ())) - set(definition["properties"]))
    if undeclared:
        raise _error(name, f"required names {undeclared}, which are not in properties")
    return Draft202012Validator(definition, format_checker=FORMAT_CHECKER)


def _compile_column(
    table: str, name: str, prop: Any, required: bool, validator: Draft202012Validator
) -> Column:
    problem = _name_problem(name)
    if problem:
        raise _error(table, f"column name {problem}", name)
    if name in SYSTEM_COLUMNS:
        raise _error(table, "is a system column that monk adds to every table", name)
    if name in POSTGRES_SYSTEM_COLUMNS:
        raise _error(table, "is the name of a PostgreSQL system column", name)
    if not isinstance(prop, Mapping):
        raise _error(table, "must be a JSON Schema object (true/false schemas have no type)", name)
    json_type, nullable = _json_type(prop)
    pg_type = _pg_type(json_type, prop)
    not_null = required and not nullable
    if "default" in prop:
        _check_default(table, name, prop, validator)
    return Column(
        name=name,
        json_type=json_type,
        pg_type=pg_type,
        not_null=not_null,
        has_default="default" in prop,
        default=prop.get("default"),
        checks=tuple(_checks(table, name, json_type, pg_type, prop)),
        reference=_reference(table, name, prop, pg_type, not_null),
        definition=prop,
    )


def _type_of(value: Any) -> str:
    """The JSON Schema type of a JSON value (1.0 is an integer, as JSON Schema says)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _json_type(prop: Mapping[str, Any]) -> tuple[str | None, bool]:
    """The one JSON type of a property's values (None: several or any) and whether null is allowed.

    Without ``type`` the type is inferred from ``enum``; ``["integer", "number"]`` is a number.
    """
    declared = prop.get("type")
    if isinstance(declared, str):
        types = {declared}
    elif declared is not None:
        types = set(declared)
    elif "enum" in prop:
        types = {_type_of(value) for value in prop["enum"]}
    else:
        return None, True
    concrete = types - {"null"}
    if concrete == {"integer", "number"}:
        concrete = {"number"}
    return (concrete.pop() if len(concrete) == 1 else None), "null" in types


def _pg_type(json_type: str | None, prop: Mapping[str, Any]) -> PgType:
    if json_type != "string":
        return _SCALAR_TYPES.get(json_type or "", JSONB)
    format_type = _FORMAT_TYPES.get(prop.get("format", ""))
    if format_type is not None:
        return format_type
    max_length = prop.get("maxLength")
    if max_length is not None and 0 < max_length <= _MAX_VARCHAR:
        return PgType("character varying", max_length)
    return TEXT


def _sql_value(value: Any, pg_type: PgType) -> Any:
    """A JSON value as the parameter or literal for a column of ``pg_type``.

    JSON null is SQL NULL; jsonb columns take a ``Jsonb``; floats become ``Decimal`` from their
    shortest repr, so numeric columns store the number as written rather than its binary neighbour.
    """
    if value is None:
        return None
    if pg_type == JSONB:
        return Jsonb(value)
    if isinstance(value, float):
        return Decimal(repr(value))
    return value


def _allowed_by_type(value: Any, json_type: str | None) -> bool:
    """Whether an enum value can pass the property's ``type`` too (others can never validate)."""
    if value is None:
        return False
    kind = _type_of(value)
    return json_type is None or kind == json_type or (json_type, kind) == ("number", "integer")


def _checks(
    table: str, column: str, json_type: str | None, pg_type: PgType, prop: Mapping[str, Any]
) -> Iterator[Check]:
    """The CHECK constraints that enforce what the column type alone does not."""
    if "enum" in prop:
        allowed = [_sql_value(v, pg_type) for v in prop["enum"] if _allowed_by_type(v, json_type)]
        yield _check(table, column, "enum", _one_of(column, allowed))
    if pg_type in (BIGINT, NUMERIC):
        for keyword, operator in _NUMERIC_BOUNDS:
            if keyword in prop:
                bound = sql.Literal(_sql_value(prop[keyword], pg_type))
                yield _check(table, column, keyword, _compare(column, operator, bound))
    if pg_type.name in (TEXT.name, "character varying"):
        if prop.get("minLength", 0) > 0:
            yield _check(table, column, "minLength", _char_length(column, ">=", prop["minLength"]))
        if "maxLength" in prop and pg_type.length is None:
            yield _check(table, column, "maxLength", _char_length(column, "<=", prop["maxLength"]))
        if "pattern" in prop:
            pattern = sql.Literal(prop["pattern"])
            yield _check(table, column, "pattern", _compare(column, "~", pattern))
        if prop.get("format") in _FORMAT_PATTERNS:
            pattern = sql.Literal(_FORMAT_PATTERNS[prop["format"]])
            yield _check(table, column, "format", _compare(column, "~", pattern))
    if json_type in ("array", "object"):
        yield _check(table, column, "type", _jsonb_typeof(column, json_type))


def _check_default(
    table: str, column: str, prop: Mapping[str, Any], validator: Draft202012Validator
) -> None:
    """Refuse a default its own property schema rejects (evolve keeps $ref resolution working)."""
    error = best_match(validator.evolve(schema=prop).iter_errors(prop["default"]))
    if error is not None:
        raise _error(
            table, f"default {prop['default']!r} fails its own schema: {error.message}", column
        )


def _reference(
    table: str, column: str, prop: Mapping[str, Any], pg_type: PgType, not_null: bool
) -> Reference | None:
    if REFERENCE_KEYWORD not in prop:
        return None
    spec = prop[REFERENCE_KEYWORD]
    error = best_match(_REFERENCE_VALIDATOR.iter_errors(spec))
    if error is not None:
        raise _error(
            table,
            f'{REFERENCE_KEYWORD} must be a schema name or {{"schema": name, "on_delete": '
            f"one of {list(ON_DELETE_ACTIONS)}}}: {error.message}",
            column,
        )
    if isinstance(spec, str):
        reference = Reference(spec, "restrict")
    else:
        reference = Reference(spec["schema"], spec.get("on_delete", "restrict"))
    if pg_type != UUID:
        raise _error(
            table, f'{REFERENCE_KEYWORD} needs {{"type": "string", "format": "uuid"}}', column
        )
    if reference.on_delete == "set null" and not_null:
        raise _error(table, 'on_delete "set null" is impossible on a required column', column)
    return reference


def column_clause(column: Column) -> sql.Composed:
    parts = [sql.Identifier(column.name), column.pg_type.as_sql()]
    if column.not_null:
        parts.append(sql.SQL("NOT NULL"))
    if column.has_default:
        parts.append(sql.SQL("DEFAULT {}").format(sql.Literal(column.to_sql_value(column.default))))
    return _join(parts, " ")


def foreign_key_clause(table: str, column: Column) -> sql.Composed:
    assert column.reference is not None
    return sql.SQL("CONSTRAINT {} FOREIGN KEY ({}) REFERENCES {} ({}) ON DELETE {}").format(
        sql.Identifier(foreign_key_name(table, column.name)),
        sql.Identifier(column.name),
        sql.Identifier(column.reference.schema),
        sql.Identifier("id"),
        sql.SQL(_ON_DELETE_SQL[column.reference.on_delete]),
    )


def index_statement(table: str, column: str) -> sql.Composed:
    return sql.SQL("CREATE INDEX {} ON {} ({})").format(
        sql.Identifier(index_name(table, column)), sql.Identifier(table), sql.Identifier(column)
    )


def schema_row(table: CompiledTable) -> dict[str, Any]:
    """The ``schemas`` row of a table (column → value), as a build inserts it."""
    return _schema_values(table.name, table.definition, table.checksum)


def _schema_values(name: str, definition: Mapping[str, Any], checksum: str) -> dict[str, Any]:
    return {
        "name": name,
        "table_name": name,
        "status": "active",
        "definition": Jsonb(definition),
        "field_count": len(definition["properties"]),
        "checksum": checksum,
    }


def _schema_row(name: str, definition: Mapping[str, Any], checksum: str) -> Statement:
    return insert_statement("schemas", _schema_values(name, definition, checksum))


def _column_row(table: str, column: Column) -> Statement:
    return insert_statement("columns", column_row(table, column))


def column_row(table: str, column: Column) -> dict[str, Any]:
    """The ``columns`` row of a property (column → value); ``is_required`` is NOT NULL, as the
    catalog has it."""
    prop = column.definition
    reference = column.reference
    return {
        "schema_name": table,
        "column_name": column.name,
        "pg_type": str(column.pg_type),
        "is_required": column.not_null,
        "default_value": Jsonb(column.default) if column.has_default else None,
        "minimum": _sql_value(prop.get("minimum"), NUMERIC),
        "maximum": _sql_value(prop.get("maximum"), NUMERIC),
        "exclusive_minimum": _sql_value(prop.get("exclusiveMinimum"), NUMERIC),
        "exclusive_maximum": _sql_value(prop.get("exclusiveMaximum"), NUMERIC),
        "min_length": prop.get("minLength"),
        "max_length": prop.get("maxLength"),
        "pattern": prop.get("pattern"),
        "format": prop.get("format"),
        "enum_values": Jsonb(prop["enum"]) if "enum" in prop else None,
        "is_array": column.json_type == "array",
        "description": prop.get("description"),
        "reference_schema": reference.schema if reference else None,
        "reference_on_delete": reference.on_delete if reference else None,
    }


def _creation_order(tables: Mapping[str, CompiledTable]) -> list[str]:
    """Table names, referenced before referencing; deterministic for the same input."""
    graph: dict[str, list[str]] = {}
    for name, table in tables.items():
        targets = set()
        for column in table.columns:
            if column.reference is None:
                continue
            if column.reference.schema not in tables:
                raise _error(
                    name,
                    f"{REFERENCE_KEYWORD} names unknown schema {column.reference.schema!r}",
                    column.name,
                )
            if column.reference.schema != name:
                targets.add(column.reference.schema)
        graph[name] = sorted(targets)
    try:
        return list(TopologicalSorter(graph).static_order())
    except CycleError as exc:
        cycle = list(exc.args[1])
        raise InvalidTemplateSource(
            f"schemas {' -> '.join(cycle)} reference each other in a cycle, so no table can be "
            "created first; make one of the references a plain uuid property",
            schemas=cycle,
        ) from None


def _check_relation_names(tables: Sequence[CompiledTable]) -> None:
    """Refuse a table or index name that another table, index or core table already takes."""
    owners = dict.fromkeys(CORE_RELATIONS, "monk's core tables")
    for table in tables:
        for relation in table.relations:
            if relation in owners:
                raise _error(
                    table.name,
                    f"needs the table or index name {relation!r}, "
                    f"already used by {owners[relation]}",
                )
            owners[relation] = f"schemas/{table.name}.json"


# --- seed data -----------------------------------------------------------------------------------


def seed_statements(
    compiled: CompiledTemplate, data: Mapping[str, Sequence[Any]]
) -> list[Statement]:
    """Validate seed records (schema name → records); return their INSERTs, referenced tables first.

    Besides its properties a record may give ``id`` (a uuid), so that other records can reference
    it; the other system columns are monk's to fill. Records of a self-referencing schema must list
    a parent before its children. Raises ``InvalidTemplateSource`` naming file, record index and
    field.
    """
    tables = {table.name: table for table in compiled.tables}
    unknown = sorted(set(data) - set(tables))
    if unknown:
        file = f"data/{unknown[0]}.json"
        raise InvalidTemplateSource(
            f"{file}: there is no schema schemas/{unknown[0]}.json for these records", file=file
        )
    statements = []
    for table in compiled.tables:
        validator = Draft202012Validator(table.definition, format_checker=FORMAT_CHECKER)
        for index, record in enumerate(data.get(table.name, ())):
            _check_record(table, validator, index, record)
            row = {
                key: value if key == "id" else table.column(key).to_sql_value(value)
                for key, value in record.items()
            }
            statements.append(insert_statement(table.name, row))
    return statements


def _seed_error(table: str, index: int, field: str | None, problem: str) -> InvalidTemplateSource:
    file = f"data/{table}.json"
    where = f"{file}: record {index}" + ("" if field is None else f": field {field!r}")
    return InvalidTemplateSource(f"{where}: {problem}", file=file, index=index, field=field)


def _check_record(
    table: CompiledTable, validator: Draft202012Validator, index: int, record: Any
) -> None:
    if not isinstance(record, Mapping):
        raise _seed_error(table.name, index, None, "must be a JSON object")
    for key, value in record.items():
        if key == "id":
            if not (isinstance(value, str) and _UUID_RE.fullmatch(value)):
                raise _seed_error(table.name, index, key, f"{value!r} is not a uuid")
        elif key in SYSTEM_COLUMNS:
            raise _seed_error(
                table.name, index, key, "is a system column; seed data may set only id"
            )
        elif key not in table.definition["properties"]:
            raise _seed_error(
                table.name, index, key, "is not a property of the schema, so no column holds it"
            )
    properties = {key: value for key, value in record.items() if key != "id"}
    error = best_match(validator.iter_errors(properties))
    if error is not None:
        raise _seed_error(table.name, index, _error_field(error), error.message)


def _error_field(error: ValidationError) -> str | None:
    """The dotted path of the field a validation error is about (the missing one for required)."""
    path = [str(part) for part in error.absolute_path]
    required, record = error.validator_value, error.instance
    if error.validator == "required" and isinstance(required, list) and isinstance(record, Mapping):
        path += [name for name in required if name not in record][:1]
    return ".".join(path) or None
