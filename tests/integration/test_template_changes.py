"""Template changes that compile: a database of build A, brought to C through B by the recorded
upgrade steps, has the catalog and registry rows of a fresh clone of C; unsafe edits and changed
applied migrations fail the build; migrations need no hand-written ``columns`` rows."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from monk.adapters.postgres import template_db
from monk.adapters.postgres.connection import ServerTarget, connect
from monk.adapters.registry import templates as builds
from monk.adapters.registry import upgrades
from monk.errors import InvalidTemplateSource
from monk.service.server import Server
from monk.service.templates import TemplateBuild, TemplateService
from monk.service.tenants import TenantService
from monk.settings import Settings
from tests.conftest import RunMonk
from tests.integration.schema_change_support import (
    apply_steps,
    catalog,
    differences,
    tenant_clone,
)
from tests.integration.template_support import (
    copy_builtin,
    drop_databases,
    drop_key,
    key_databases,
    new_key,
    read_json,
    scratch_clone,
    write_json,
)

Conn = psycopg.Connection[Any]


@pytest.fixture
def installed(settings: Settings) -> ServerTarget:
    target, _ = Server.from_settings(settings).init()
    return target


@pytest.fixture
def key(admin_url: str) -> Iterator[str]:
    k = new_key("sc")
    yield k
    drop_key(admin_url, k)


@pytest.fixture
def templates(settings: Settings, installed: ServerTarget) -> Iterator[TemplateService]:
    with TemplateService.open(settings, installed) as service:
        yield service


def edit_schema(path: Path, name: str, change: Any) -> None:
    document = read_json(path / "schemas" / f"{name}.json")
    change(document)
    write_json(path / "schemas" / f"{name}.json", document)


def add_migration(path: Path, name: str, text: str) -> None:
    (path / "migrations").mkdir(exist_ok=True)
    (path / "migrations" / name).write_text(text)


def to_b(path: Path) -> None:
    """Build B: a new table with a reference, a new nullable column, a new required column with
    a default, a changed enum, a widened varchar, and a migration adding a column by hand."""

    def account(d: dict[str, Any]) -> None:
        d["properties"]["website"] = {"type": "string", "format": "uri", "maxLength": 300}
        d["properties"]["account_type"]["enum"].append("enterprise")

    def contact(d: dict[str, Any]) -> None:
        d["properties"]["score"] = {"type": "integer", "minimum": 0, "default": 0}
        d["properties"]["job_title"]["maxLength"] = 200

    edit_schema(path, "account", account)
    edit_schema(path, "contact", contact)
    write_json(
        path / "schemas" / "note.json",
        {
            "type": "object",
            "required": ["account_id"],
            "properties": {
                "account_id": {
                    "type": "string",
                    "format": "uuid",
                    "x-monk-reference": {"schema": "account", "on_delete": "cascade"},
                },
                "body": {"type": "string"},
                "kind": {"enum": ["call", "mail"]},
            },
        },
    )
    add_migration(
        path,
        "0001_contact_note.sql",
        "ALTER TABLE contact ADD COLUMN note text;\n"
        "COMMENT ON COLUMN contact.note IS 'free text';\n",
    )


def to_c(path: Path) -> None:
    """Build C: a new table with a reference, referenced from an existing table (new FK and
    index), a new column with a default, a varchar widened into text with a CHECK, a changed
    default, a changed enum, a property removed with the migration that drops it, and a
    migration that tightens a column."""

    def account(d: dict[str, Any]) -> None:
        d["properties"]["name"]["maxLength"] = 1000
        d["properties"]["credit_limit"]["default"] = 750
        d["properties"]["tier"] = {"type": "integer", "minimum": 0, "default": 1}
        del d["properties"]["phone"]

    def contact(d: dict[str, Any]) -> None:
        d["properties"]["tag_id"] = {
            "type": "string",
            "format": "uuid",
            "x-monk-reference": {"schema": "tag", "on_delete": "set null"},
        }

    def note(d: dict[str, Any]) -> None:
        d["properties"]["kind"]["enum"] = ["call", "mail", "visit"]

    edit_schema(path, "account", account)
    edit_schema(path, "contact", contact)
    edit_schema(path, "note", note)
    records = read_json(path / "data/account.json")
    write_json(path / "data/account.json", [without(r, "phone") for r in records])
    write_json(
        path / "schemas" / "tag.json",
        {
            "type": "object",
            "properties": {
                "label": {"type": "string", "maxLength": 40},
                "owner_id": {
                    "type": "string",
                    "format": "uuid",
                    "x-monk-reference": {"schema": "account", "on_delete": "set null"},
                },
            },
        },
    )
    add_migration(
        path,
        "0002_tighten.sql",
        "ALTER TABLE account DROP COLUMN IF EXISTS phone;\n"
        "UPDATE note SET body = '' WHERE body IS NULL;\n"
        "ALTER TABLE note ALTER COLUMN body SET NOT NULL;\n"
        "CREATE INDEX contact_note ON contact (note);\n",
    )


def without(record: dict[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != name}


def add_tenant_data(db: Conn) -> None:
    """Rows the steps must carry along (defaults filled, checks validated over them)."""
    db.execute(
        "INSERT INTO account (name, email, phone) VALUES ('Tenant Ltd', 'x@tenant.example',"
        " '+1 555 0199')"
    )
    db.execute(
        "INSERT INTO contact (account_id, first_name, last_name, job_title)"
        " SELECT id, 'Ann', 'Lee', 'Chief' FROM account WHERE name = 'Tenant Ltd'"
    )


def steps_between(
    installed: ServerTarget, settings: Settings, key: str, a: str, b: str
) -> list[upgrades.UpgradeStep]:
    with connect(installed, settings.system_db_name, autocommit=True) as reg:
        found = upgrades.path(reg, installed.name, key, a, b)
    assert found is not None
    return found


def test_a_database_upgraded_a_to_c_through_b_equals_a_fresh_clone_of_c(
    installed: ServerTarget,
    settings: Settings,
    templates: TemplateService,
    key: str,
    admin_url: str,
    tmp_path: Path,
) -> None:
    path = copy_builtin(tmp_path, "basic", key)
    a = templates.build(key, source_dir=path).build
    to_b(path)
    b = templates.build(key, source_dir=path).build
    to_c(path)
    c = templates.build(key, source_dir=path).build
    assert (b.migration_level, c.migration_level) == (1, 2)
    a_to_c = steps_between(installed, settings, key, a.version, c.version)
    assert [(s.from_version, s.to_version) for s in a_to_c] == [
        (a.version, b.version),
        (b.version, c.version),
    ]
    # Retired builds are templates too: tenants of them are their clones.
    a_db, b_db = (f"monk_retired_{key}_{v}" for v in (a.version, b.version))
    with scratch_clone(admin_url, c.database) as fresh:
        want = catalog(fresh)
        assert template_db.read_build_record(fresh) == (key, c.version, 2)
    for start, steps in ((a_db, a_to_c), (b_db, a_to_c[1:])):
        with tenant_clone(admin_url, start) as tenant:
            add_tenant_data(tenant)
            apply_steps(tenant, steps)
            assert differences(catalog(tenant), want) == []
            assert template_db.read_build_record(tenant) == (key, c.version, 2)
            rows = tenant.execute(
                "SELECT score, website, note, tier FROM contact JOIN account a"
                " ON a.id = account_id WHERE first_name = 'Ann'"
            ).fetchall()
            assert rows == [(0, None, None, 1)]
    # The steps are what the design says: diff, the new migration files, the metadata sync.
    step_c = a_to_c[1]
    assert step_c.script[0].startswith(f"-- monk: schema change {b.version} -> {c.version}")
    assert step_c.script[1] == (path / "migrations/0002_tighten.sql").read_text()
    assert step_c.script[2] == template_db.SYNC_COLUMNS
    diff = step_c.script[0]
    added = diff.index('ADD CONSTRAINT "contact_tag_id_fkey" FOREIGN KEY')
    assert diff.index("NOT VALID;", added) < diff.index(
        'ALTER TABLE "contact" VALIDATE CONSTRAINT "contact_tag_id_fkey";', added
    )
    assert 'CREATE INDEX "contact_tag_id_idx" ON "contact" ("tag_id")' in diff
    assert 'ALTER TABLE "account" ALTER COLUMN "name" TYPE text' in diff


def test_a_migration_adding_a_column_needs_no_columns_row(
    installed: ServerTarget,
    settings: Settings,
    templates: TemplateService,
    key: str,
    admin_url: str,
    tmp_path: Path,
) -> None:
    """The issue's example: on main this build failed with "column contact.note is not
    registered in columns"."""
    path = copy_builtin(tmp_path, "basic", key)
    write_json(path / "schemas/scratch.json", {"type": "object", "properties": {}})
    add_migration(
        path,
        "0001_note.sql",
        "ALTER TABLE contact ADD COLUMN note varchar(80) NOT NULL DEFAULT '',"
        " ADD COLUMN labels text[];\n"
        "COMMENT ON COLUMN contact.note IS 'free text';\n"
        "ALTER TABLE contact DROP COLUMN birthday;\n"
        "UPDATE contact SET email = 'none@example.org' WHERE email IS NULL;\n"
        "ALTER TABLE contact ALTER COLUMN job_title TYPE text, ALTER COLUMN email SET NOT NULL;\n"
        "DROP TABLE scratch;\n",
    )
    built = templates.build(key, source_dir=path).build
    assert built.status == "ready"
    with scratch_clone(admin_url, built.database) as db:
        schemas = db.execute("SELECT name FROM schemas ORDER BY 1").fetchall()
        assert schemas == [("account",), ("contact",)]
        rows = db.execute(
            "SELECT column_name, pg_type, is_required, is_array, description, default_value,"
            " max_length FROM columns WHERE schema_name = 'contact'"
            " AND column_name IN ('note', 'labels', 'birthday', 'job_title', 'email')"
            " ORDER BY column_name"
        ).fetchall()
    assert rows == [
        ("email", "text", True, False, None, None, None),
        ("job_title", "text", False, False, None, None, 100),
        ("labels", "text[]", False, True, None, None, None),
        ("note", "character varying(80)", True, False, "free text", None, None),
    ]


def test_a_tenant_provisioned_with_pending_migrations_gets_its_columns_rows(
    installed: ServerTarget,
    settings: Settings,
    templates: TemplateService,
    key: str,
    admin_url: str,
    tmp_path: Path,
) -> None:
    """A migration added to the source after the build runs at provision (the build is behind
    its source); the columns rows follow there too."""
    path = copy_builtin(tmp_path, "basic", key)
    templates.build(key, source_dir=path)
    add_migration(path, "0001_note.sql", "ALTER TABLE contact ADD COLUMN note text;")
    with TenantService(settings, installed) as tenants:
        made = tenants.provision(f"Pending {key}", template=key).as_dict()
        try:
            with psycopg.connect(made["connection_url"]) as db:
                row = db.execute(
                    "SELECT pg_type, is_required FROM columns"
                    " WHERE schema_name = 'contact' AND column_name = 'note'"
                ).fetchone()
            assert row == ("text", False)
        finally:
            drop_databases(admin_url, [made["database"]])
            with psycopg.connect(admin_url, autocommit=True) as adm:
                adm.execute(
                    sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(made["database"]))
                )


def test_an_unsafe_schema_edit_fails_the_build_and_changes_nothing(
    installed: ServerTarget,
    settings: Settings,
    templates: TemplateService,
    key: str,
    admin_url: str,
    tmp_path: Path,
) -> None:
    path = copy_builtin(tmp_path, "basic", key)
    a = templates.build(key, source_dir=path).build
    databases = key_databases(admin_url, key)

    def drop_phone(d: dict[str, Any]) -> None:
        del d["properties"]["phone"]

    edit_schema(path, "contact", drop_phone)
    records = read_json(path / "data/contact.json")
    write_json(path / "data/contact.json", [without(r, "phone") for r in records])
    with pytest.raises(InvalidTemplateSource) as caught:
        templates.build(key, source_dir=path)
    message = str(caught.value)
    assert "schemas/contact.json: property 'phone': removed from the schema" in message
    assert 'ALTER TABLE "contact" DROP COLUMN IF EXISTS "phone";' in message
    assert caught.value.details["schema"] == "contact"
    assert_unchanged(installed, settings, key, a, admin_url, databases)
    # With the migration that drops it, the same edit builds.
    add_migration(
        path, "0001_drop_phone.sql", 'ALTER TABLE "contact" DROP COLUMN IF EXISTS "phone";'
    )
    b = templates.build(key, source_dir=path).build
    assert b.version != a.version


def test_a_property_an_earlier_migration_dropped_may_leave_the_schema(
    installed: ServerTarget,
    settings: Settings,
    templates: TemplateService,
    key: str,
    admin_url: str,
    tmp_path: Path,
) -> None:
    path = copy_builtin(tmp_path, "basic", key)
    add_migration(path, "0001_drop_phone.sql", "ALTER TABLE contact DROP COLUMN IF EXISTS phone;")
    a = templates.build(key, source_dir=path).build

    def drop_phone(d: dict[str, Any]) -> None:
        del d["properties"]["phone"]

    edit_schema(path, "contact", drop_phone)
    records = read_json(path / "data/contact.json")
    write_json(path / "data/contact.json", [without(r, "phone") for r in records])
    b = templates.build(key, source_dir=path).build
    with scratch_clone(admin_url, b.database) as fresh:
        want = catalog(fresh)
    with tenant_clone(admin_url, f"monk_retired_{key}_{a.version}") as tenant:
        apply_steps(tenant, steps_between(installed, settings, key, a.version, b.version))
        assert differences(catalog(tenant), want) == []


def test_a_changed_applied_migration_fails_the_build(
    installed: ServerTarget,
    settings: Settings,
    templates: TemplateService,
    key: str,
    admin_url: str,
    tmp_path: Path,
) -> None:
    path = copy_builtin(tmp_path, "basic", key)
    add_migration(path, "0001_note.sql", "ALTER TABLE contact ADD COLUMN note text;")
    a = templates.build(key, source_dir=path).build
    databases = key_databases(admin_url, key)
    add_migration(path, "0001_note.sql", "ALTER TABLE contact ADD COLUMN note varchar(10);")
    with pytest.raises(InvalidTemplateSource) as caught:
        templates.build(key, source_dir=path)
    assert str(caught.value).endswith(
        f"migrations/0001_note.sql changed since build {a.version} applied it, and the tenants "
        "of that build ran the old text: restore the file as it was and add a new migration "
        "file (0002_….sql) with the change instead"
    )
    assert_unchanged(installed, settings, key, a, admin_url, databases)
    with connect(installed, settings.system_db_name, autocommit=True) as reg:
        recorded = builds.recorded_plan(reg, a.id)
    assert recorded is not None
    assert sorted(recorded.compiled_schemas) == ["account", "contact"]
    applied = b"ALTER TABLE contact ADD COLUMN note text;"
    assert recorded.migration_manifest == [
        {"number": 1, "name": "note", "sha256": hashlib.sha256(applied).hexdigest()}
    ]


def test_the_cli_names_an_unsafe_edit_in_one_line_and_builds_nothing(
    monk: RunMonk, admin_url: str, key: str, tmp_path: Path
) -> None:
    path = copy_builtin(tmp_path, "basic", key)
    first = monk("template", "build", key, "--source", str(path), "--json")
    assert first.returncode == 0, first.stderr
    databases = key_databases(admin_url, key)
    edit_schema(path, "account", prop_max_length("name", 50))
    result = monk("template", "build", key, "--source", str(path))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert (
        "schemas/account.json: property 'name': type narrowed from character varying(100) to "
        "character varying(50), which values already stored may not fit: keep the old type in "
        'the schema and add a migration file with ALTER TABLE "account" ALTER COLUMN "name" '
        "TYPE character varying(50) USING …;"
    ) in result.stderr
    assert key_databases(admin_url, key) == databases
    shown = json.loads(monk("template", "show", key, "--json").stdout)
    assert shown["version"] == json.loads(first.stdout)["version"]


def prop_max_length(name: str, length: int) -> Any:
    def change(d: dict[str, Any]) -> None:
        d["properties"][name]["maxLength"] = length

    return change


def assert_unchanged(
    installed: ServerTarget,
    settings: Settings,
    key: str,
    current: TemplateBuild,
    admin_url: str,
    databases: list[str],
) -> None:
    """A refused build made nothing: same current build, no new row, no new database."""
    with connect(installed, settings.system_db_name, autocommit=True) as reg:
        assert builds.current_build(reg, key, installed.name) == current
        assert [b.id for b in builds.list_builds(reg, installed.name, key, everything=True)] == [
            current.id
        ]
    assert key_databases(admin_url, key) == databases
