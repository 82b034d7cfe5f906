"""Template source folders: loading, parents, content hash, and the built-in sources."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from monk.core.schema_compiler import CORE_TABLES, compile_template, seed_statements
from monk.errors import InvalidName, InvalidTemplateSource
from monk.templates import source as source_module
from monk.templates.source import (
    TemplateSource,
    builtin_sources_dir,
    content_hash,
    find_source,
    load_source,
    resolve_parents,
)

OBJECT = {"type": "object", "properties": {"name": {"type": "string"}}}
Lookup = Callable[[str], Path | None]


def write(folder: Path, files: dict[str, Any]) -> Path:
    """Create a source folder; dict and list values are written as JSON, str as text."""
    for relative, content in files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        text = content if isinstance(content, str) else json.dumps(content)
        path.write_text(text, encoding="utf-8")
    return folder


def manifest(**fields: Any) -> dict[str, Any]:
    return {"description": "test template", **fields}


def in_folders(*folders: Path) -> Lookup:
    return lambda key: find_source(key, list(folders))


def refused(path: Path, key: str | None = None) -> str:
    with pytest.raises(InvalidTemplateSource) as caught:
        load_source(path, key)
    return str(caught.value)


@pytest.fixture
def basic_like(tmp_path: Path) -> Path:
    return write(
        tmp_path / "base",
        {
            "template.json": manifest(version="7"),
            "schemas/thing.json": OBJECT,
            "data/thing.json": [{"name": "one"}],
            "migrations/0001_first.sql": "SELECT 1;",
            "README.md": "not part of the source",
            "schemas/.thing.json.swp": "editor junk",
        },
    )


# --- loading -------------------------------------------------------------------------------------


def test_load_source(basic_like: Path) -> None:
    source = load_source(basic_like)
    assert (source.key, source.description, source.version_label) == ("base", "test template", "7")
    assert source.extends is None
    assert source.lineage == ("base",)
    assert dict(source.schemas) == {"thing": OBJECT}
    assert dict(source.data) == {"thing": ({"name": "one"},)}
    [migration] = source.migrations
    assert (migration.number, migration.name, migration.template) == (1, "first", "base")
    assert (migration.path, migration.sql) == ("migrations/0001_first.sql", "SELECT 1;")
    assert sorted(source.files) == [
        "base/data/thing.json",
        "base/migrations/0001_first.sql",
        "base/schemas/thing.json",
        "base/template.json",
    ]


def test_an_explicit_key_overrides_the_folder_name(basic_like: Path) -> None:
    assert load_source(basic_like, "other").key == "other"
    with pytest.raises(InvalidName):
        load_source(basic_like, "Not-A-Key")


@pytest.mark.parametrize(
    ("files", "bad_file", "problem"),
    [
        ({}, "template.json", "missing"),
        ({"template.json": "{nope"}, "template.json", "invalid JSON"),
        ({"template.json": {"version": "1"}}, "template.json", "'description' is a required"),
        ({"template.json": manifest(color="red")}, "template.json", "color"),
        ({"template.json": manifest(extends="Bad Key")}, "template.json", "extends"),
        ({"schemas/thing.json": "[1, 2"}, "schemas/thing.json", "invalid JSON"),
        ({"schemas/thing.json": '{"maximum": NaN}'}, "schemas/thing.json", "NaN"),
        ({"schemas/notes.txt": "hello"}, "schemas/notes.txt", "<name>.json"),
        ({"data/thing.json": {"name": "one"}}, "data/thing.json", "JSON array"),
        ({"migrations/1_first.sql": "SELECT 1;"}, "migrations/1_first.sql", "NNNN_<name>.sql"),
        (
            {"migrations/0001_First.sql": "SELECT 1;"},
            "migrations/0001_First.sql",
            "NNNN_<name>.sql",
        ),
        (
            {"migrations/0002_late.sql": "SELECT 1;"},
            "migrations",
            "0002_late.sql should be number 0001",
        ),
    ],
)
def test_bad_sources_name_the_file(
    tmp_path: Path, files: dict[str, Any], bad_file: str, problem: str
) -> None:
    defaults: dict[str, Any] = {} if not files else {"template.json": manifest()}
    folder = write(tmp_path / "src", defaults | files)
    message = refused(folder)
    assert message.startswith(str(folder / bad_file))
    assert problem in message


def test_migration_gaps_and_duplicates_are_refused(tmp_path: Path) -> None:
    gap = write(
        tmp_path / "gap",
        {"template.json": manifest(), "migrations/0001_a.sql": "", "migrations/0003_c.sql": ""},
    )
    assert "0003_c.sql should be number 0002" in refused(gap)
    twice = write(
        tmp_path / "twice",
        {"template.json": manifest(), "migrations/0001_a.sql": "", "migrations/0001_b.sql": ""},
    )
    assert "0001_a.sql and migrations/0001_b.sql have the same number" in refused(twice)


def test_migrations_must_be_utf8(tmp_path: Path) -> None:
    folder = write(tmp_path / "src", {"template.json": manifest()})
    (folder / "migrations").mkdir()
    (folder / "migrations" / "0001_latin.sql").write_bytes(b"SELECT '\xe9';")
    assert "not UTF-8" in refused(folder)


# --- parents -------------------------------------------------------------------------------------


def test_a_child_merges_over_its_parent(tmp_path: Path, basic_like: Path) -> None:
    override = {"type": "object", "properties": {"title": {"type": "string"}}}
    write(
        tmp_path / "child",
        {
            "template.json": manifest(extends="base", version="2"),
            "schemas/thing.json": override,
            "schemas/extra.json": OBJECT,
            "migrations/0002_second.sql": "SELECT 2;",
        },
    )
    merged = resolve_parents(load_source(tmp_path / "child"), in_folders(tmp_path))
    assert (merged.key, merged.version_label, merged.lineage) == ("child", "2", ("child", "base"))
    assert dict(merged.schemas) == {"thing": override, "extra": OBJECT}
    assert dict(merged.data) == {"thing": ({"name": "one"},)}
    assert [(m.number, m.template) for m in merged.migrations] == [(1, "base"), (2, "child")]
    assert "base/schemas/thing.json" in merged.files
    assert "child/schemas/thing.json" in merged.files


def test_a_child_migration_replaces_the_parents_of_the_same_number(
    tmp_path: Path, basic_like: Path
) -> None:
    write(
        tmp_path / "child",
        {"template.json": manifest(extends="base"), "migrations/0001_mine.sql": "SELECT 'c';"},
    )
    merged = resolve_parents(load_source(tmp_path / "child"), in_folders(tmp_path))
    assert [(m.name, m.template) for m in merged.migrations] == [("mine", "child")]


def test_merged_migrations_must_not_leave_a_gap(tmp_path: Path, basic_like: Path) -> None:
    write(
        tmp_path / "child",
        {"template.json": manifest(extends="base"), "migrations/0003_late.sql": ""},
    )
    with pytest.raises(InvalidTemplateSource, match=r"0003_late\.sql should be number 0002"):
        resolve_parents(load_source(tmp_path / "child"), in_folders(tmp_path))


def test_a_child_may_continue_its_parents_numbering_but_not_repeat_a_number(
    tmp_path: Path,
) -> None:
    child = {"template.json": manifest(extends="base"), "migrations/0002_b.sql": ""}
    assert len(load_source(write(tmp_path / "child", child)).migrations) == 1
    twice = write(tmp_path / "twice", child | {"migrations/0002_c.sql": ""})
    assert "have the same number" in refused(twice)


def test_a_missing_parent_is_refused(tmp_path: Path) -> None:
    folder = write(tmp_path / "child", {"template.json": manifest(extends="nowhere")})
    with pytest.raises(InvalidTemplateSource) as caught:
        resolve_parents(load_source(folder), in_folders(tmp_path))
    assert str(caught.value).startswith(str(folder / "template.json"))
    assert "'nowhere', which is not a known template" in str(caught.value)


def test_a_parent_cycle_is_refused(tmp_path: Path) -> None:
    write(tmp_path / "a", {"template.json": manifest(extends="b")})
    write(tmp_path / "b", {"template.json": manifest(extends="a")})
    with pytest.raises(InvalidTemplateSource, match="cycle a -> b -> a"):
        resolve_parents(load_source(tmp_path / "a"), in_folders(tmp_path))


def test_a_source_extending_itself_is_a_cycle(tmp_path: Path) -> None:
    write(tmp_path / "a", {"template.json": manifest(extends="a")})
    with pytest.raises(InvalidTemplateSource, match="cycle a -> a"):
        resolve_parents(load_source(tmp_path / "a"), in_folders(tmp_path))


def test_find_source(tmp_path: Path, basic_like: Path) -> None:
    empty_folder = tmp_path / "nothing"
    empty_folder.mkdir()
    assert find_source("base", [empty_folder, tmp_path]) == basic_like
    assert find_source("nothing", [tmp_path]) is None  # a folder without template.json
    assert find_source("ghost", [tmp_path]) is None


# --- content hash --------------------------------------------------------------------------------


def test_content_hash_is_16_hex_and_stable(basic_like: Path) -> None:
    version = content_hash(load_source(basic_like))
    assert re.fullmatch(r"[0-9a-f]{16}", version)
    assert content_hash(load_source(basic_like)) == version


@pytest.mark.parametrize(
    "change",
    [
        lambda folder: (folder / "data/thing.json").write_text('[{"name": "two"}]'),
        lambda folder: (folder / "migrations/0001_first.sql").write_text("SELECT 2;"),
        lambda folder: (folder / "schemas/more.json").write_text(json.dumps(OBJECT)),
        lambda folder: (folder / "data/thing.json").unlink(),
        lambda folder: (folder / "template.json").write_text(json.dumps(manifest(version="8"))),
    ],
)
def test_content_hash_changes_with_any_file(
    basic_like: Path, change: Callable[[Path], Any]
) -> None:
    before = content_hash(load_source(basic_like))
    change(basic_like)
    assert content_hash(load_source(basic_like)) != before


def test_content_hash_ignores_files_outside_the_source(basic_like: Path) -> None:
    before = content_hash(load_source(basic_like))
    (basic_like / "README.md").write_text("changed")
    (basic_like / "schemas" / ".DS_Store").write_text("junk")
    assert content_hash(load_source(basic_like)) == before


def test_content_hash_changes_with_the_compiler_version(
    basic_like: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = load_source(basic_like)
    before = content_hash(source)
    monkeypatch.setattr(source_module, "COMPILER_VERSION", "next")
    assert content_hash(source) != before


def test_content_hash_of_a_child_covers_its_parent(tmp_path: Path, basic_like: Path) -> None:
    write(tmp_path / "child", {"template.json": manifest(extends="base")})

    def version() -> str:
        return content_hash(resolve_parents(load_source(tmp_path / "child"), in_folders(tmp_path)))

    before = version()
    (basic_like / "schemas/thing.json").write_text(json.dumps({**OBJECT, "title": "Thing"}))
    assert version() != before


# --- built-in sources ----------------------------------------------------------------------------


def builtin(key: str) -> TemplateSource:
    folder = builtin_sources_dir()
    return resolve_parents(load_source(folder / key), in_folders(folder))


@pytest.mark.parametrize("key", ["empty", "basic", "crm", "saas"])
def test_builtin_sources_load_compile_and_seed(key: str) -> None:
    source = builtin(key)
    compiled = compile_template(source.schemas)
    statements = seed_statements(compiled, source.data)
    assert len(statements) == sum(len(records) for records in source.data.values())
    assert source.description


def test_builtin_empty_has_core_tables_only() -> None:
    source = builtin("empty")
    assert (dict(source.schemas), dict(source.data), source.migrations) == ({}, {}, ())


def test_builtin_basic() -> None:
    source = builtin("basic")
    assert sorted(source.schemas) == ["account", "contact"]
    assert (len(source.data["account"]), len(source.data["contact"])) == (5, 6)
    account = source.schemas["account"]
    assert account["additionalProperties"] is False
    formats = {prop.get("format") for prop in account["properties"].values()}
    assert {"email", "date-time"} <= formats
    keywords = {keyword for prop in account["properties"].values() for keyword in prop}
    assert {"pattern", "enum", "minimum", "maximum", "default"} <= keywords
    default_types = {
        type(prop["default"]) for prop in account["properties"].values() if "default" in prop
    }
    assert {str, int, bool} <= default_types or {str, float, bool} <= default_types
    assert any(prop.get("type") == "object" for prop in account["properties"].values())


def test_builtin_crm_extends_basic_with_references_and_a_migration() -> None:
    source = builtin("crm")
    assert source.lineage == ("crm", "basic")
    compiled = compile_template(source.schemas)
    order = [table.name for table in compiled.tables]
    assert order.index("account") < order.index("deal") < order.index("activity")
    references = {
        (table.name, column.reference.schema)
        for table in compiled.tables
        for column in table.columns
        if column.reference
    }
    assert {("deal", "account"), ("deal", "contact"), ("activity", "deal")} <= references
    assert [migration.path for migration in source.migrations] == [
        "migrations/0001_open_pipeline.sql"
    ]


def test_builtin_saas_is_sized_like_a_real_product() -> None:
    """About 30 tables, 90 indexes and 1,000 rows: the size ``monk bench`` measures by default."""
    source = builtin("saas")
    assert source.lineage == ("saas",)
    compiled = compile_template(source.schemas)
    tables = [table.name for table in compiled.tables]
    assert 25 <= len(tables) + len(CORE_TABLES) <= 35
    assert {"organization", "member", "task", "invoice", "audit_event"} <= set(tables)
    assert tables.index("organization") < tables.index("workspace") < tables.index("task")
    foreign_key_indexes = sum(len(table.indexes) for table in compiled.tables)
    unique_indexes = sum(m.sql.count("CREATE UNIQUE INDEX") for m in source.migrations)
    core_unique_keys = 4  # users.auth, schemas.name, schemas.table_name, columns (schema, column)
    indexes = len(tables) + len(CORE_TABLES) + core_unique_keys + foreign_key_indexes
    assert 80 <= indexes + unique_indexes <= 100
    assert 900 <= sum(len(records) for records in source.data.values()) <= 1200
    formats = {
        prop.get("format")
        for schema in source.schemas.values()
        for prop in schema["properties"].values()
    }
    assert {"email", "date-time", "date", "uuid", "uri"} <= formats


def test_extensions_are_read_merged_and_hashed(tmp_path: Path, basic_like: Path) -> None:
    parent = write(tmp_path / "p", {"template.json": manifest(extensions=["citext", "hstore"])})
    child = write(
        tmp_path / "c",
        {"template.json": manifest(extends="p", extensions=["pg_trgm", "citext", "uuid-ossp"])},
    )
    assert load_source(parent).extensions == ("citext", "hstore")
    merged = resolve_parents(load_source(child), in_folders(tmp_path))
    assert merged.extensions == ("citext", "hstore", "pg_trgm", "uuid-ossp")
    assert load_source(basic_like).extensions == ()
    before = content_hash(load_source(parent))
    write(parent, {"template.json": manifest(extensions=["citext"])})
    assert content_hash(load_source(parent)) != before


@pytest.mark.parametrize(
    "extensions",
    [["citext", "citext"], ["Citext"], ["pg trgm"], ['x"; DROP'], "citext", [1], [""]],
)
def test_bad_extension_lists_are_refused_without_a_database(
    tmp_path: Path, extensions: Any
) -> None:
    folder = write(tmp_path / "t", {"template.json": manifest(extensions=extensions)})
    assert "template.json" in refused(folder)
