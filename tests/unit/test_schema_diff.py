"""The schema diff and the applied-migration rule, without a database (SQL rendered with
``as_string(None)``); tests/integration/test_template_changes.py runs the result on a server."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from psycopg import sql

from monk.core.schema_compiler import compile_template
from monk.core.schema_diff import SchemaChange, schema_change
from monk.core.upgrade_plan import MigrationEntry, check_applied_migrations
from monk.errors import InvalidTemplateSource
from tests.strategies import template_schemas

BASE: dict[str, Any] = {
    "account": {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "maxLength": 100},
            "bio": {"type": "string"},
            "kind": {"enum": ["a", "b"], "default": "a"},
            "size": {"type": "integer", "minimum": 0},
            "owner": {"type": "string", "format": "uuid"},
        },
    },
    "contact": {
        "type": "object",
        "properties": {
            "account_id": {"type": "string", "format": "uuid", "x-monk-reference": "account"},
            "email": {"type": "string", "format": "email"},
        },
    },
}


def edited(change: Any) -> dict[str, Any]:
    schemas = copy.deepcopy(BASE)
    change(schemas)
    return schemas


def diff(new: dict[str, Any], migrations: tuple[str, ...] = ()) -> SchemaChange:
    return schema_change(compile_template(BASE), compile_template(new), migrations)


def ddl(new: dict[str, Any], migrations: tuple[str, ...] = ()) -> list[str]:
    return [s.as_string(None) for s in diff(new, migrations).ddl]


def registry(new: dict[str, Any], migrations: tuple[str, ...] = ()) -> list[str]:
    return [s.as_string(None) for s in diff(new, migrations).registry]


def refused(new: dict[str, Any], migrations: tuple[str, ...] = ()) -> InvalidTemplateSource:
    with pytest.raises(InvalidTemplateSource) as caught:
        diff(new, migrations)
    return caught.value


def prop(schema: str, name: str, value: Any) -> Any:
    def change(s: dict[str, Any]) -> None:
        s[schema]["properties"][name] = value

    return change


def test_the_same_schemas_change_nothing() -> None:
    change = diff(copy.deepcopy(BASE))
    assert not change
    assert change.statements == []


def test_a_new_table_is_created_with_its_reference_index_and_trigger_and_registered() -> None:
    note = {
        "type": "object",
        "properties": {
            "account_id": {"type": "string", "format": "uuid", "x-monk-reference": "account"},
            "body": {"type": "string"},
        },
    }
    new = edited(lambda s: s.update(note=note))
    compiled = compile_template(new).tables
    table = next(t for t in compiled if t.name == "note")
    assert diff(new).ddl == (table.create, *table.indexes, table.trigger)
    assert 'CONSTRAINT "note_account_id_fkey" FOREIGN KEY' in ddl(new)[0]
    rows = registry(new)
    assert rows[0].startswith('INSERT INTO "schemas" ("name", "table_name", "status"')
    assert len(rows) == 3
    assert "VALUES ('note', 'account_id', 'uuid', false" in rows[1]
    assert "VALUES ('note', 'body', 'text', false" in rows[2]


def test_a_new_nullable_column_is_added_and_registered() -> None:
    new = edited(prop("account", "website", {"type": "string", "format": "uri"}))
    assert ddl(new) == [
        'ALTER TABLE "account" ADD COLUMN "website" text',
        'ALTER TABLE "account" ADD CONSTRAINT "account_website_format" CHECK ("website" ~ '
        "'^[a-zA-Z][a-zA-Z0-9+.-]*:') NOT VALID",
        'ALTER TABLE "account" VALIDATE CONSTRAINT "account_website_format"',
    ]
    rows = registry(new)
    assert rows[0].startswith('UPDATE "schemas" SET ("table_name", "status", "definition"')
    assert rows[0].endswith("WHERE \"name\" = 'account'")
    assert rows[1].startswith('INSERT INTO "columns"')
    assert "'account', 'website', 'text', false" in rows[1]
    assert len(rows) == 2


def test_a_new_required_column_with_a_default_is_not_null_with_that_default() -> None:
    def change(s: dict[str, Any]) -> None:
        s["account"]["properties"]["score"] = {"type": "integer", "default": 5}
        s["account"]["required"].append("score")

    assert ddl(edited(change)) == [
        'ALTER TABLE "account" ADD COLUMN "score" bigint NOT NULL DEFAULT 5'
    ]


def test_a_new_required_column_without_a_default_is_refused() -> None:
    def change(s: dict[str, Any]) -> None:
        s["account"]["properties"]["score"] = {"type": "integer"}
        s["account"]["required"].append("score")

    error = refused(edited(change))
    assert str(error) == (
        "schemas/account.json: property 'score': new, required and without a default, so rows "
        'already stored would have no value: give it a "default", or add it as optional and add '
        'a migration file that fills it and runs ALTER TABLE "account" ALTER COLUMN "score" SET '
        "NOT NULL; (its columns row follows the catalog)"
    )
    assert error.details == {"schema": "account", "property": "score", "change": "unsafe"}


def test_a_changed_enum_replaces_its_check_not_valid_then_validated() -> None:
    new = edited(prop("account", "kind", {"enum": ["a", "b", "c"], "default": "a"}))
    assert ddl(new) == [
        'ALTER TABLE "account" DROP CONSTRAINT IF EXISTS "account_kind_enum"',
        'ALTER TABLE "account" ADD CONSTRAINT "account_kind_enum" CHECK ("kind" IN '
        "('a', 'b', 'c')) NOT VALID",
        'ALTER TABLE "account" VALIDATE CONSTRAINT "account_kind_enum"',
    ]
    (update,) = [r for r in registry(new) if r.startswith('UPDATE "columns"')]
    assert '\'["a", "b", "c"]\'::jsonb' in update
    assert update.endswith("WHERE \"schema_name\" = 'account' AND \"column_name\" = 'kind'")


def test_new_and_removed_bounds_add_and_drop_checks() -> None:
    new = edited(prop("account", "size", {"type": "integer", "maximum": 10}))
    assert ddl(new) == [
        'ALTER TABLE "account" DROP CONSTRAINT IF EXISTS "account_size_min"',
        'ALTER TABLE "account" ADD CONSTRAINT "account_size_max" CHECK ("size" <= 10) NOT VALID',
        'ALTER TABLE "account" VALIDATE CONSTRAINT "account_size_max"',
    ]


def test_a_widened_varchar_changes_type_in_place() -> None:
    assert ddl(edited(prop("account", "name", {"type": "string", "maxLength": 200}))) == [
        'ALTER TABLE "account" ALTER COLUMN "name" TYPE character varying(200)'
    ]


def test_a_varchar_widened_beyond_255_becomes_text_with_a_length_check() -> None:
    assert ddl(edited(prop("account", "name", {"type": "string", "maxLength": 1000}))) == [
        'ALTER TABLE "account" ALTER COLUMN "name" TYPE text',
        'ALTER TABLE "account" ADD CONSTRAINT "account_name_maxlen" CHECK (char_length("name")'
        " <= 1000) NOT VALID",
        'ALTER TABLE "account" VALIDATE CONSTRAINT "account_name_maxlen"',
    ]


def test_a_length_limit_on_a_text_column_is_a_check() -> None:
    assert ddl(edited(prop("account", "bio", {"type": "string", "maxLength": 5000}))) == [
        'ALTER TABLE "account" ADD CONSTRAINT "account_bio_maxlen" CHECK (char_length("bio")'
        " <= 5000) NOT VALID",
        'ALTER TABLE "account" VALIDATE CONSTRAINT "account_bio_maxlen"',
    ]


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("name", {"type": "string", "maxLength": 50}, "type narrowed from character varying(100)"),
        ("bio", {"type": "string", "maxLength": 50}, "type narrowed from text"),
        ("size", {"type": "number"}, "type changed from bigint to numeric"),
        ("size", {"type": "string"}, "type changed from bigint to text"),
        ("owner", {"type": "string"}, "type changed from uuid to text"),
    ],
)
def test_a_type_narrowed_or_changed_is_refused(name: str, value: Any, problem: str) -> None:
    error = refused(edited(prop("account", name, value)))
    assert str(error).startswith(f"schemas/account.json: property {name!r}: {problem}")
    assert f'ALTER TABLE "account" ALTER COLUMN "{name}" TYPE' in str(error)


def test_an_optional_property_made_required_is_refused() -> None:
    error = refused(edited(lambda s: s["account"]["required"].append("bio")))
    assert str(error).startswith(
        "schemas/account.json: property 'bio': made required (NOT NULL), and rows already "
        "stored may hold NULL: keep it optional"
    )
    assert 'ALTER TABLE "account" ALTER COLUMN "bio" SET NOT NULL;' in str(error)


def test_a_required_property_made_optional_drops_not_null() -> None:
    assert ddl(edited(lambda s: s["account"].pop("required"))) == [
        'ALTER TABLE "account" ALTER COLUMN "name" DROP NOT NULL'
    ]


def test_a_changed_or_removed_default_is_set_or_dropped() -> None:
    changed = edited(prop("account", "kind", {"enum": ["a", "b"], "default": "b"}))
    assert ddl(changed) == ['ALTER TABLE "account" ALTER COLUMN "kind" SET DEFAULT \'b\'']
    removed = edited(prop("account", "kind", {"enum": ["a", "b"]}))
    assert ddl(removed) == ['ALTER TABLE "account" ALTER COLUMN "kind" DROP DEFAULT']


def test_a_new_reference_on_an_existing_column_is_a_validated_foreign_key_and_an_index() -> None:
    new = edited(
        prop(
            "account", "owner", {"type": "string", "format": "uuid", "x-monk-reference": "account"}
        )
    )
    assert ddl(new) == [
        'ALTER TABLE "account" ADD CONSTRAINT "account_owner_fkey" FOREIGN KEY ("owner") '
        'REFERENCES "account" ("id") ON DELETE RESTRICT NOT VALID',
        'CREATE INDEX "account_owner_idx" ON "account" ("owner")',
        'ALTER TABLE "account" VALIDATE CONSTRAINT "account_owner_fkey"',
    ]


def test_a_changed_or_removed_reference_drops_the_old_foreign_key() -> None:
    cascade = {"schema": "account", "on_delete": "cascade"}
    changed = edited(
        prop(
            "contact",
            "account_id",
            {"type": "string", "format": "uuid", "x-monk-reference": cascade},
        )
    )
    assert ddl(changed) == [
        'ALTER TABLE "contact" DROP CONSTRAINT IF EXISTS "contact_account_id_fkey"',
        'DROP INDEX IF EXISTS "contact_account_id_idx"',
        'ALTER TABLE "contact" ADD CONSTRAINT "contact_account_id_fkey" FOREIGN KEY ("account_id")'
        ' REFERENCES "account" ("id") ON DELETE CASCADE NOT VALID',
        'CREATE INDEX "contact_account_id_idx" ON "contact" ("account_id")',
        'ALTER TABLE "contact" VALIDATE CONSTRAINT "contact_account_id_fkey"',
    ]
    removed = edited(prop("contact", "account_id", {"type": "string", "format": "uuid"}))
    assert ddl(removed) == [
        'ALTER TABLE "contact" DROP CONSTRAINT IF EXISTS "contact_account_id_fkey"',
        'DROP INDEX IF EXISTS "contact_account_id_idx"',
    ]


def test_a_new_column_referencing_a_new_table_comes_after_that_table() -> None:
    def change(s: dict[str, Any]) -> None:
        s["tag"] = {"type": "object", "properties": {"label": {"type": "string"}}}
        s["contact"]["properties"]["tag_id"] = {
            "type": "string",
            "format": "uuid",
            "x-monk-reference": "tag",
        }

    statements = ddl(edited(change))
    assert statements[0].startswith('CREATE TABLE "tag"')
    assert statements[2:] == [
        'ALTER TABLE "contact" ADD COLUMN "tag_id" uuid',
        'ALTER TABLE "contact" ADD CONSTRAINT "contact_tag_id_fkey" FOREIGN KEY ("tag_id") '
        'REFERENCES "tag" ("id") ON DELETE RESTRICT NOT VALID',
        'CREATE INDEX "contact_tag_id_idx" ON "contact" ("tag_id")',
        'ALTER TABLE "contact" VALIDATE CONSTRAINT "contact_tag_id_fkey"',
    ]


def drop_bio(s: dict[str, Any]) -> None:
    del s["account"]["properties"]["bio"]


def test_a_removed_property_is_refused_with_the_migration_to_write() -> None:
    error = refused(edited(drop_bio))
    assert str(error) == (
        "schemas/account.json: property 'bio': removed from the schema, and monk never drops a "
        "column that tenants hold data in: to drop it, add a migration file with ALTER TABLE "
        '"account" DROP COLUMN IF EXISTS "bio"; to the same build (IF EXISTS: a fresh build '
        "never creates it)"
    )


def test_a_rename_is_refused_with_the_migration_to_write() -> None:
    def rename(s: dict[str, Any]) -> None:
        s["account"]["properties"]["about"] = s["account"]["properties"].pop("bio")

    error = str(refused(edited(rename)))
    assert "property 'bio': removed from the schema" in error
    assert (
        "to rename it (to 'about'?), keep 'bio' in the schema instead of the new name and add a "
        'migration file with ALTER TABLE "account" RENAME COLUMN "bio" TO "about";'
    ) in error


@pytest.mark.parametrize(
    "migration",
    [
        "ALTER TABLE account DROP COLUMN IF EXISTS bio;",
        'alter table "account" drop column if exists "bio"',
        "ALTER TABLE IF EXISTS public.account ADD COLUMN x int, DROP IF EXISTS bio;",
        "UPDATE account SET size = 0;\nALTER TABLE ONLY account\n DROP COLUMN IF EXISTS bio;",
    ],
)
def test_a_removed_property_with_a_migration_that_drops_it_is_accepted(migration: str) -> None:
    change = diff(edited(drop_bio), (migration,))
    assert change.ddl == ()
    assert [s.as_string(None) for s in change.registry][1:] == [
        'DELETE FROM "columns" WHERE "schema_name" = \'account\' AND "column_name" = \'bio\''
    ]


@pytest.mark.parametrize(
    "migration",
    [
        "-- ALTER TABLE account DROP COLUMN bio;\nSELECT 1;",
        "/* ALTER TABLE account DROP COLUMN bio; */",
        "ALTER TABLE account DROP COLUMN biography;",
        "ALTER TABLE contact DROP COLUMN bio;",
        "ALTER TABLE account ADD COLUMN x int; SELECT 'DROP COLUMN bio';",
    ],
)
def test_a_migration_that_does_not_drop_the_column_does_not_count(migration: str) -> None:
    refused(edited(drop_bio), (migration,))


def test_a_drop_without_if_exists_is_refused_before_a_fresh_build_fails_on_it() -> None:
    error = refused(edited(drop_bio), ("ALTER TABLE account DROP COLUMN bio;",))
    assert str(error) == (
        "schemas/account.json: property 'bio': removed, and a migration file drops its column "
        "without IF EXISTS, which fails on a fresh build (the column is never created there): "
        'write ALTER TABLE "account" DROP COLUMN IF EXISTS "bio"; (a file an earlier build '
        "already ran cannot change: keep the property then)"
    )
    error = refused(edited(lambda s: s.pop("contact")), ("DROP TABLE contact;",))
    assert str(error).startswith(
        "schemas/contact.json: removed, and a migration file drops its table without IF EXISTS"
    )
    assert 'write DROP TABLE IF EXISTS "contact";' in str(error)


def test_a_removed_schema_is_refused_unless_a_migration_drops_its_table() -> None:
    new = edited(lambda s: s.pop("contact"))
    assert str(refused(new)) == (
        "schemas/contact.json: removed (the schema file is gone), and monk never drops a table "
        "that tenants hold data in: to drop it, add a migration file with DROP TABLE IF EXISTS "
        '"contact"; to the same build (IF EXISTS: a fresh build never creates it); otherwise '
        "keep the schema"
    )
    change = diff(new, ("DROP TABLE IF EXISTS note, contact;",))
    assert change.ddl == ()
    assert [s.as_string(None) for s in change.registry] == [
        'DELETE FROM "schemas" WHERE "name" = \'contact\''
    ]


def entries(*files: tuple[int, str, str]) -> list[MigrationEntry]:
    return [MigrationEntry.of(*file) for file in files]


def test_applied_migrations_must_stay_as_they_were() -> None:
    applied = entries((1, "init", "CREATE TABLE a ();"), (2, "idx", "CREATE INDEX ON a (x);"))
    check_applied_migrations(applied, [*applied, *entries((3, "more", "SELECT 1;"))], "v1")
    # The same content under another name is the same migration.
    renamed = entries((1, "first", "CREATE TABLE a ();"), (2, "idx", "CREATE INDEX ON a (x);"))
    check_applied_migrations(applied, renamed, "v1")
    changed = entries((1, "init", "CREATE TABLE a (x int);"), (2, "idx", "CREATE INDEX ON a (x);"))
    with pytest.raises(InvalidTemplateSource) as caught:
        check_applied_migrations(applied, changed, "v1")
    assert str(caught.value) == (
        "migrations/0001_init.sql changed since build v1 applied it, and the tenants of that "
        "build ran the old text: restore the file as it was and add a new migration file "
        "(0003_….sql) with the change instead"
    )
    with pytest.raises(InvalidTemplateSource, match=r"^migrations/0002_idx\.sql disappeared"):
        check_applied_migrations(applied, applied[:1], "v1")
    replaced = entries((1, "init", "CREATE TABLE a ();"), (2, "other", "SELECT 2;"))
    with pytest.raises(
        InvalidTemplateSource,
        match=r"^migrations/0002_idx\.sql was replaced by migrations/0002_other",
    ):
        check_applied_migrations(applied, replaced, "v1")


def test_json_values_are_compared_as_sql_not_by_python_equality() -> None:
    """``Jsonb`` compares by identity and ``1 == True``: both would hide or invent changes."""
    any_json = {"enum": [1, "a", None], "default": 1}
    base = edited(prop("account", "extra", any_json))
    same = edited(prop("account", "extra", copy.deepcopy(any_json)))
    assert not schema_change(compile_template(base), compile_template(same))
    to_true = edited(prop("account", "extra", {"enum": [True, "a", None], "default": True}))
    change = schema_change(compile_template(base), compile_template(to_true))
    assert [s.as_string(None) for s in change.ddl] == [
        'ALTER TABLE "account" DROP CONSTRAINT IF EXISTS "account_extra_enum"',
        'ALTER TABLE "account" ALTER COLUMN "extra" SET DEFAULT \'true\'::jsonb',
        'ALTER TABLE "account" ADD CONSTRAINT "account_extra_enum" CHECK ("extra" IN '
        "('true'::jsonb, '\"a\"'::jsonb)) NOT VALID",
        'ALTER TABLE "account" VALIDATE CONSTRAINT "account_extra_enum"',
    ]


@settings(max_examples=100, deadline=None)
@given(template_schemas())
def test_a_template_against_itself_changes_nothing(schemas: dict[str, Any]) -> None:
    compiled = compile_template(schemas)
    assert not schema_change(compiled, compile_template(copy.deepcopy(schemas)))


@settings(max_examples=100, deadline=None)
@given(template_schemas())
def test_from_no_tables_the_change_is_a_fresh_build(schemas: dict[str, Any]) -> None:
    compiled = compile_template(schemas)
    change = schema_change(compile_template({}), compiled)
    assert [s.as_string(None) for s in change.ddl] == [s.as_string(None) for s in compiled.ddl()]
    # The rows a fresh build inserts, with literals instead of parameters.
    fresh = [
        query.as_string(None) % tuple(sql.Literal(value).as_string(None) for value in params)
        for query, params in compiled.registry_inserts()
    ]
    assert [s.as_string(None) for s in change.registry] == fresh
