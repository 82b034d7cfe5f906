"""The schema compiler, without a database: compiled SQL is rendered with ``as_string(None)``."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from psycopg import sql
from psycopg.types.json import Jsonb

from monk.core.schema_compiler import (
    COMPILER_VERSION,
    CompiledTable,
    compile_template,
    core_tables_ddl,
    schema_checksum,
    seed_statements,
)
from monk.errors import InvalidTemplateSource
from tests.strategies import template_schemas

ACCOUNT_ID = "a0000000-0000-4000-8000-000000000001"


def render(statement: sql.Composable) -> str:
    return statement.as_string(None)


def table_of(props: dict[str, Any], required: list[str] | None = None) -> CompiledTable:
    document: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        document["required"] = required
    return compile_template({"thing": document}).tables[0]


def column_sql(prop: dict[str, Any], *, required: bool = False) -> str:
    """The column definition line of a single property named ``p``."""
    create = render(table_of({"p": prop}, ["p"] if required else None).create)
    return next(
        line.strip().rstrip(",") for line in create.splitlines() if line.strip().startswith('"p"')
    )


def checks_sql(prop: dict[str, Any]) -> list[str]:
    create = render(table_of({"p": prop}).create)
    return [line.strip().rstrip(",") for line in create.splitlines() if "CHECK" in line]


def refused(schemas: dict[str, Any]) -> str:
    with pytest.raises(InvalidTemplateSource) as caught:
        compile_template(schemas)
    return str(caught.value)


# --- type mapping --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prop", "pg_type"),
    [
        ({"type": "string", "format": "uuid"}, "uuid"),
        ({"type": "string", "format": "date-time"}, "timestamp with time zone"),
        ({"type": "string", "format": "date"}, "date"),
        ({"type": "string", "format": "email"}, "text"),
        ({"type": "string", "format": "uri"}, "text"),
        ({"type": "string", "maxLength": 40}, "character varying(40)"),
        ({"type": "string", "maxLength": 255}, "character varying(255)"),
        ({"type": "string", "maxLength": 256}, "text"),
        ({"type": "string"}, "text"),
        ({"type": "string", "enum": ["a", "b"]}, "text"),
        ({"enum": ["a", "b"]}, "text"),
        ({"enum": [1, 2]}, "bigint"),
        ({"enum": [1, 2.5]}, "numeric"),
        ({"enum": ["a", 1]}, "jsonb"),
        ({"type": "integer"}, "bigint"),
        ({"type": "number"}, "numeric"),
        ({"type": ["integer", "number"]}, "numeric"),
        ({"type": "boolean"}, "boolean"),
        ({"type": "array"}, "jsonb"),
        ({"type": "object"}, "jsonb"),
        ({"type": ["string", "integer"]}, "jsonb"),
        ({"type": ["string", "null"]}, "text"),
        ({}, "jsonb"),
    ],
)
def test_type_mapping(prop: dict[str, Any], pg_type: str) -> None:
    column = table_of({"p": prop}).columns[0]
    assert str(column.pg_type) == pg_type
    assert column_sql(prop).startswith(f'"p" {pg_type}')


def test_required_is_not_null_unless_null_is_allowed() -> None:
    assert column_sql({"type": "string"}, required=True) == '"p" text NOT NULL'
    assert column_sql({"type": "string"}) == '"p" text'
    assert column_sql({"type": ["string", "null"]}, required=True) == '"p" text'


@pytest.mark.parametrize(
    ("prop", "default"),
    [
        ({"type": "string", "default": "it's"}, "DEFAULT 'it''s'"),
        ({"type": "number", "default": 0.1}, "DEFAULT 0.1"),
        ({"type": "integer", "default": 7}, "DEFAULT 7"),
        ({"type": "boolean", "default": False}, "DEFAULT false"),
        ({"type": "object", "default": {"a": 1}}, "DEFAULT '{\"a\": 1}'::jsonb"),
    ],
)
def test_defaults_are_literals(prop: dict[str, Any], default: str) -> None:
    assert column_sql(prop).endswith(default)


def test_a_default_must_satisfy_its_property() -> None:
    message = refused(
        {
            "t": {
                "type": "object",
                "properties": {"n": {"type": "integer", "minimum": 1, "default": 0}},
            }
        }
    )
    assert "schemas/t.json" in message
    assert "'n'" in message
    assert "default" in message


# --- CHECK constraints ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prop", "check"),
    [
        ({"enum": ["a", "b"]}, """CONSTRAINT "thing_p_enum" CHECK ("p" IN ('a', 'b'))"""),
        (
            {"type": "integer", "enum": [1, 2]},
            """CONSTRAINT "thing_p_enum" CHECK ("p" IN (1, 2))""",
        ),
        (
            {"enum": ["a", 1]},
            """CONSTRAINT "thing_p_enum" CHECK ("p" IN ('"a"'::jsonb, '1'::jsonb))""",
        ),
        ({"type": "integer", "minimum": 0}, 'CONSTRAINT "thing_p_min" CHECK ("p" >= 0)'),
        ({"type": "integer", "maximum": 9}, 'CONSTRAINT "thing_p_max" CHECK ("p" <= 9)'),
        (
            {"type": "number", "exclusiveMinimum": 0.5},
            'CONSTRAINT "thing_p_xmin" CHECK ("p" > 0.5)',
        ),
        ({"type": "number", "exclusiveMaximum": 10}, 'CONSTRAINT "thing_p_xmax" CHECK ("p" < 10)'),
        (
            {"type": "string", "minLength": 2},
            'CONSTRAINT "thing_p_minlen" CHECK (char_length("p") >= 2)',
        ),
        (
            {"type": "string", "maxLength": 300},
            'CONSTRAINT "thing_p_maxlen" CHECK (char_length("p") <= 300)',
        ),
        (
            {"type": "string", "pattern": "^[a-z]+$"},
            """CONSTRAINT "thing_p_pattern" CHECK ("p" ~ '^[a-z]+$')""",
        ),
        (
            {"type": "string", "format": "uri"},
            """CONSTRAINT "thing_p_format" CHECK ("p" ~ '^[a-zA-Z][a-zA-Z0-9+.-]*:')""",
        ),
        ({"type": "array"}, """CONSTRAINT "thing_p_type" CHECK (jsonb_typeof("p") = 'array')"""),
        ({"type": "object"}, """CONSTRAINT "thing_p_type" CHECK (jsonb_typeof("p") = 'object')"""),
    ],
)
def test_each_enforced_keyword_becomes_a_named_check(prop: dict[str, Any], check: str) -> None:
    assert checks_sql(prop) == [check]


def test_email_format_check() -> None:
    [check] = checks_sql({"type": "string", "format": "email"})
    assert check.startswith('CONSTRAINT "thing_p_format" CHECK ("p" ~')
    assert "@" in check


def test_varchar_enforces_max_length_itself() -> None:
    assert checks_sql({"type": "string", "maxLength": 20}) == []


def test_enum_values_the_type_excludes_are_dropped() -> None:
    assert checks_sql({"type": ["integer", "null"], "enum": [1, "x", None]}) == [
        'CONSTRAINT "thing_p_enum" CHECK ("p" IN (1))'
    ]
    assert checks_sql({"type": ["string", "null"], "enum": [None]}) == [
        'CONSTRAINT "thing_p_enum" CHECK ("p" IS NULL)'
    ]


def test_string_keywords_on_typed_formats_are_left_to_seed_validation() -> None:
    assert checks_sql({"type": "string", "format": "uuid", "pattern": "^0", "minLength": 36}) == []


def test_long_names_give_short_deterministic_constraint_names() -> None:
    table, column = "t" * 63, "c" * 63
    schemas = {table: {"type": "object", "properties": {column: {"type": "integer", "minimum": 0}}}}
    first = compile_template(schemas).tables[0]
    again = compile_template(schemas).tables[0]
    [check] = first.columns[0].checks
    assert len(check.name) <= 63
    assert re.fullmatch(r"t{54}_[0-9a-f]{8}", check.name)
    assert check.name == again.columns[0].checks[0].name


# --- the shape of every table --------------------------------------------------------------------


def test_every_table_has_the_system_columns_primary_key_and_trigger() -> None:
    table = table_of({"p": {"type": "string"}})
    create = render(table.create)
    for line in [
        '"id" uuid NOT NULL DEFAULT gen_random_uuid()',
        "\"access_read\" uuid[] NOT NULL DEFAULT '{}'",
        "\"access_deny\" uuid[] NOT NULL DEFAULT '{}'",
        '"created_at" timestamp with time zone NOT NULL DEFAULT now()',
        '"updated_at" timestamp with time zone NOT NULL DEFAULT now()',
        '"trashed_at" timestamp with time zone',
        '"deleted_at" timestamp with time zone',
        'CONSTRAINT "thing_pkey" PRIMARY KEY ("id")',
    ]:
        assert line in create
    assert render(table.trigger) == (
        'CREATE TRIGGER "monk_touch_updated_at" BEFORE UPDATE ON "thing" '
        'FOR EACH ROW EXECUTE FUNCTION "monk_touch_updated_at"()'
    )


def test_core_tables_ddl() -> None:
    statements = [render(statement) for statement in core_tables_ddl()]
    assert statements[0].startswith('CREATE FUNCTION "monk_touch_updated_at"()')
    creates = [s for s in statements if s.startswith("CREATE TABLE")]
    assert [s.split('"')[1] for s in creates] == ["users", "schemas", "columns"]
    users, schemas, columns = creates
    assert """CHECK ("access" IN ('root', 'full', 'edit', 'read', 'deny'))""" in users
    assert 'CONSTRAINT "users_auth_key" UNIQUE ("auth")' in users
    assert 'CONSTRAINT "schemas_table_name_key" UNIQUE ("table_name")' in schemas
    assert "'pending', 'active', 'disabled', 'system'" in schemas
    assert 'UNIQUE ("schema_name", "column_name")' in columns
    assert sum(s.startswith("CREATE TRIGGER") for s in statements) == 3


# --- references and order ------------------------------------------------------------------------


def reference(target: Any) -> dict[str, Any]:
    return {"type": "string", "format": "uuid", "x-monk-reference": target}


def test_a_reference_is_a_foreign_key_with_an_index() -> None:
    compiled = compile_template(
        {
            "contact": {"type": "object", "properties": {"account_id": reference("account")}},
            "account": {"type": "object", "properties": {}},
        }
    )
    assert [table.name for table in compiled.tables] == ["account", "contact"]
    contact = compiled.tables[1]
    assert (
        'CONSTRAINT "contact_account_id_fkey" FOREIGN KEY ("account_id") '
        'REFERENCES "account" ("id") ON DELETE RESTRICT'
    ) in render(contact.create)
    assert [render(index) for index in contact.indexes] == [
        'CREATE INDEX "contact_account_id_idx" ON "contact" ("account_id")'
    ]


def test_ddl_lists_referenced_tables_first() -> None:
    compiled = compile_template(
        {
            "a": {"type": "object", "properties": {"b_id": reference("b"), "c_id": reference("c")}},
            "b": {"type": "object", "properties": {"c_id": reference("c")}},
            "c": {"type": "object", "properties": {"parent": reference("c")}},
        }
    )
    creates = [
        render(s).split('"')[1] for s in compiled.ddl() if render(s).startswith("CREATE TABLE")
    ]
    assert creates == ["c", "b", "a"]


@pytest.mark.parametrize(
    ("action", "sql_action"), [("cascade", "CASCADE"), ("set null", "SET NULL")]
)
def test_on_delete(action: str, sql_action: str) -> None:
    table = table_of({"parent": reference({"schema": "thing", "on_delete": action})})
    assert f"ON DELETE {sql_action}" in render(table.create)


def test_set_null_on_a_required_reference_is_refused() -> None:
    prop = reference({"schema": "t", "on_delete": "set null"})
    message = refused({"t": {"type": "object", "properties": {"r": prop}, "required": ["r"]}})
    assert "set null" in message


@pytest.mark.parametrize(
    "prop",
    [
        {"type": "string", "x-monk-reference": "t"},
        {"type": "integer", "x-monk-reference": "t"},
        reference({"schema": "t", "on_delete": "explode"}),
        reference({"table": "t"}),
        reference(3),
    ],
)
def test_malformed_references_are_refused(prop: dict[str, Any]) -> None:
    message = refused({"t": {"type": "object", "properties": {"r": prop}}})
    assert "schemas/t.json: property 'r'" in message
    assert "x-monk-reference" in message


def test_a_reference_to_an_unknown_schema_is_refused() -> None:
    message = refused({"t": {"type": "object", "properties": {"r": reference("ghost")}}})
    assert "unknown schema 'ghost'" in message


def test_a_reference_cycle_is_refused() -> None:
    message = refused(
        {
            "a": {"type": "object", "properties": {"b_id": reference("b")}},
            "b": {"type": "object", "properties": {"a_id": reference("a")}},
        }
    )
    assert "cycle" in message


# --- names and documents that are refused --------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("Account", "must match"),
        ("1st", "must match"),
        ("with-dash", "must match"),
        ("x" * 64, "longer than 63 bytes"),
        ("select", "reserved word"),
        ("users", "core tables"),
        ("columns", "core tables"),
        ("users_pkey", "already used by monk's core tables"),
    ],
)
def test_bad_schema_names_are_refused(name: str, problem: str) -> None:
    message = refused({name: {"type": "object", "properties": {}}})
    assert message.startswith(f"schemas/{name}.json")
    assert problem in message


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("Name", "must match"),
        ("full name", "must match"),
        ("c" * 64, "longer than 63 bytes"),
        ("order", "reserved word"),
        ("id", "system column"),
        ("updated_at", "system column"),
        ("access_read", "system column"),
        ("xmin", "PostgreSQL system column"),
        ("ctid", "PostgreSQL system column"),
    ],
)
def test_bad_column_names_are_refused(name: str, problem: str) -> None:
    message = refused({"t": {"type": "object", "properties": {name: {"type": "string"}}}})
    assert message.startswith(f"schemas/t.json: property {name!r}")
    assert problem in message


def test_a_table_may_not_take_another_tables_index_name() -> None:
    message = refused(
        {
            "a": {"type": "object", "properties": {"b_id": reference("b")}},
            "b": {"type": "object", "properties": {}},
            "a_b_id_idx": {"type": "object", "properties": {}},
        }
    )
    assert "'a_b_id_idx'" in message


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ({"type": "object", "properties": {"p": {"type": "strin"}}}, "not a valid JSON Schema"),
        ({"type": "object", "properties": {"p": {"minLength": -1}}}, "not a valid JSON Schema"),
        ({"type": "object", "properties": [], "required": "p"}, "not a valid JSON Schema"),
        ({"type": "array", "items": {}}, '"type": "object"'),
        ({"type": "object"}, '"type": "object"'),
        ({"type": "object", "properties": {}, "required": ["p"]}, "not in properties"),
        ({"type": "object", "properties": {"p": True}}, "must be a JSON Schema object"),
        ([], "must contain a JSON object"),
    ],
)
def test_invalid_documents_are_refused(document: Any, problem: str) -> None:
    message = refused({"t": document})
    assert message.startswith("schemas/t.json")
    assert problem in message


# --- registry rows -------------------------------------------------------------------------------


def test_registry_rows() -> None:
    document = {
        "type": "object",
        "required": ["n"],
        "properties": {
            "n": {"type": "number", "minimum": 0.1, "maximum": 5, "description": "A number"},
            "tags": {"type": "array", "enum": [["a"], ["b"]]},
            "parent": reference({"schema": "t", "on_delete": "cascade"}),
        },
    }
    compiled = compile_template({"t": document})
    (schema_sql, schema_params), *column_rows = compiled.registry_inserts()
    assert render(schema_sql).startswith('INSERT INTO "schemas" ("name", "table_name", "status"')
    name, table_name, status, definition, field_count, checksum = schema_params
    assert (name, table_name, status, field_count) == ("t", "t", "active", 3)
    assert isinstance(definition, Jsonb)
    assert definition.obj == document
    assert checksum == schema_checksum(document)

    rows = [dict(zip(columns_of(query), params, strict=True)) for query, params in column_rows]
    n, tags, parent = rows
    assert n["pg_type"] == "numeric"
    assert n["is_required"] is True
    assert (n["minimum"], n["maximum"]) == (Decimal("0.1"), 5)
    assert n["description"] == "A number"
    assert tags["is_array"] is True
    assert tags["enum_values"].obj == [["a"], ["b"]]
    assert (parent["reference_schema"], parent["reference_on_delete"]) == ("t", "cascade")


def columns_of(query: sql.Composable) -> list[str]:
    listed = render(query).split("(", 1)[1].split(")", 1)[0]
    return [name.strip().strip('"') for name in listed.split(",")]


def test_checksum_ignores_key_order() -> None:
    assert schema_checksum({"a": 1, "b": [1, 2]}) == schema_checksum({"b": [1, 2], "a": 1})
    assert schema_checksum({"a": 1}) != schema_checksum({"a": 2})
    assert re.fullmatch(r"[0-9a-f]{64}", schema_checksum({}))


def test_compiler_version_is_a_nonempty_string() -> None:
    assert isinstance(COMPILER_VERSION, str)
    assert COMPILER_VERSION


# --- seed data -----------------------------------------------------------------------------------

SEED_SCHEMAS = {
    "account": {
        "type": "object",
        "additionalProperties": False,
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "minLength": 1},
            "email": {"type": "string", "format": "email"},
            "joined": {"type": "string", "format": "date-time"},
            "born": {"type": "string", "format": "date"},
            "score": {"type": "number"},
            "prefs": {
                "type": "object",
                "properties": {"theme": {"enum": ["light", "dark"]}},
            },
        },
    },
    "contact": {
        "type": "object",
        "properties": {"account_id": reference("account"), "tags": {"type": "array"}},
    },
}


def seed(data: dict[str, list[Any]]) -> list[tuple[sql.Composed, tuple[Any, ...]]]:
    return seed_statements(compile_template(SEED_SCHEMAS), data)


def test_seed_statements_are_parameterized_and_ordered() -> None:
    statements = seed(
        {
            "contact": [{"account_id": ACCOUNT_ID, "tags": ["x"]}, {}],
            "account": [
                {"id": ACCOUNT_ID, "name": "Acme", "score": 1.1, "prefs": {"theme": "dark"}}
            ],
        }
    )
    rendered = [render(query) for query, _ in statements]
    assert rendered == [
        'INSERT INTO "account" ("id", "name", "score", "prefs") VALUES (%s, %s, %s, %s)',
        'INSERT INTO "contact" ("account_id", "tags") VALUES (%s, %s)',
        'INSERT INTO "contact" DEFAULT VALUES',
    ]
    account_params = statements[0][1]
    assert account_params[:3] == (ACCOUNT_ID, "Acme", Decimal("1.1"))
    assert isinstance(account_params[3], Jsonb)
    assert isinstance(statements[1][1][1], Jsonb)


@pytest.mark.parametrize(
    ("record", "field", "problem"),
    [
        ({}, "name", "required"),
        ({"name": ""}, "name", "non-empty"),
        ({"name": "a", "email": "nope"}, "email", "email"),
        ({"name": "a", "joined": "2025-01-01"}, "joined", "date-time"),
        ({"name": "a", "joined": "2025-01-01T10:00:00"}, "joined", "date-time"),
        ({"name": "a", "born": "2025-02-30"}, "born", "date"),
        ({"name": "a", "score": "high"}, "score", "number"),
        ({"name": "a", "prefs": {"theme": "pink"}}, "prefs.theme", "pink"),
        ({"name": "a", "extra": 1}, "extra", "not a property"),
        ({"name": "a", "created_at": "2025-01-01T00:00:00Z"}, "created_at", "system column"),
        ({"name": "a", "id": "not-a-uuid"}, "id", "not a uuid"),
    ],
)
def test_bad_seed_records_name_file_index_and_field(
    record: dict[str, Any], field: str, problem: str
) -> None:
    good = {"name": "fine"}
    with pytest.raises(InvalidTemplateSource) as caught:
        seed({"account": [good, good, record]})
    message = str(caught.value)
    assert message.startswith(f"data/account.json: record 2: field {field!r}: ")
    assert problem in message
    assert caught.value.details == {"file": "data/account.json", "index": 2, "field": field}


def test_a_seed_record_must_be_an_object() -> None:
    with pytest.raises(InvalidTemplateSource, match=r"data/account.json: record 0: must be"):
        seed({"account": ["Acme"]})


def test_seed_data_without_a_schema_is_refused() -> None:
    with pytest.raises(InvalidTemplateSource, match=r"data/ghost.json: there is no schema"):
        seed({"ghost": []})


def test_good_formats_pass_seed_validation() -> None:
    record = {
        "name": "a",
        "email": "a@b.example",
        "joined": "2025-01-01T10:00:00.123+02:00",
        "born": "2000-02-29",
    }
    assert len(seed({"account": [record]})) == 1


# --- generated schemas ---------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(template_schemas())
def test_the_compiler_accepts_every_generated_template(schemas: dict[str, Any]) -> None:
    compiled = compile_template(schemas)
    assert sorted(table.name for table in compiled.tables) == sorted(schemas)
    position = {table.name: index for index, table in enumerate(compiled.tables)}
    for table in compiled.tables:
        for column in table.columns:
            if column.reference:
                assert position[column.reference.schema] <= position[table.name]
            for check in column.checks:
                assert len(check.name) <= 63
        render(table.create)
    assert len(compiled.registry_inserts()) == len(schemas) + sum(
        len(document["properties"]) for document in schemas.values()
    )


def test_core_upgrade_lists_what_each_later_compiler_changed_in_monks_tables() -> None:
    from monk.core.schema_compiler import CORE_UPGRADES, core_upgrade

    assert core_upgrade(COMPILER_VERSION) == []
    assert core_upgrade("2", "3") == list(CORE_UPGRADES["3"])
    assert core_upgrade("1", "3") == core_upgrade("2", "3")  # 2 changed nothing to replay
    assert core_upgrade(None, "3") == list(CORE_UPGRADES["3"])
