"""Large templates (issue 16, item 3): seed/<table>.csv and .jsonl loaded with COPY in
bounded memory, with progress; bad files refused naming the file."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

from monk.adapters.postgres.connection import ServerTarget
from monk.errors import InvalidTemplateSource
from monk.settings import Settings
from monk.templates.source import load_source
from tests.integration import template_support

MB = 1024 * 1024


def _source(tmp_path: Path, key: str) -> Path:
    src = tmp_path / key
    template_support.write_json(src / "template.json", {"description": "bulk seeded"})
    template_support.write_json(
        src / "schemas" / "item.json",
        {
            "type": "object",
            "required": ["sku"],
            "properties": {
                "sku": {"type": "string", "maxLength": 40},
                "qty": {"type": "integer"},
                "note": {"type": "string"},
            },
        },
    )
    return src


def _target(settings: Settings) -> ServerTarget:
    assert settings.database_url is not None
    return ServerTarget.from_url(settings.database_url.get_secret_value(), name="localhost")


def test_a_csv_and_a_jsonl_seed_are_loaded_with_copy_and_change_the_version(
    settings: Settings, tmp_path: Path
) -> None:
    key = template_support.new_key("bulk")
    src = _source(tmp_path, key)
    (src / "seed").mkdir()
    # 20 MB of CSV: more than the chunks, so memory must stay bounded while it streams.
    with (src / "seed" / "item.csv").open("w") as f:
        f.write("sku,qty,note\n")
        n = 0
        while f.tell() < 20 * MB:
            f.write(f'sku-{n},{n % 97},"a note, with a comma, ""quotes"" and {"x" * 100}"\n')
            n += 1
    before = load_source(src)
    target = _target(settings)
    steps: list[str] = []
    from monk.system.migrator import ensure_system_database

    ensure_system_database(target, settings.system_db_name)
    tracemalloc.start()
    try:
        build = template_support.build(target, settings, key, source_dir=src, progress=steps.append)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    try:
        assert peak < 8 * MB, f"peak Python memory {peak / MB:.1f} MB for a 20 MB seed"
        assert "bulk_seed" in steps
        shown = [s for s in steps if s.startswith("bulk seed seed/item.csv")]
        assert len(shown) >= 5, steps  # progress as it goes, not only at the end
        assert build.record_count is not None
        assert build.record_count >= n
        with template_support.scratch_clone(target.url("postgres"), build.database) as db:
            row = db.execute("SELECT count(*), min(note), sum(qty) FROM item").fetchone()
            assert row is not None
            assert row[0] == n
            assert str(row[1]).startswith('a note, with a comma, "quotes" and x')
        # JSON Lines: one object per line; a changed seed is a new version.
        (src / "seed" / "item.csv").unlink()
        with (src / "seed" / "item.jsonl").open("w") as f:
            for i in range(1000):
                f.write(json.dumps({"sku": f"j{i}", "qty": i, "note": 'tab\there \\ "q"'}) + "\n")
        assert load_source(src).files != before.files
        again = template_support.build(target, settings, key, source_dir=src)
        assert again.version != build.version
        with template_support.scratch_clone(target.url("postgres"), again.database) as db:
            row = db.execute("SELECT count(*), max(qty), min(note) FROM item").fetchone()
            assert row == (1000, 999, 'tab\there \\ "q"')
            # The table's own defaults fill what the lines leave out (monk's system columns).
            nulls = db.execute("SELECT count(*) FROM item WHERE id IS NULL").fetchone()
            assert nulls == (0,)
    finally:
        template_support.drop_key(target.url("postgres"), key)


def test_bad_seed_files_are_refused_naming_the_file(settings: Settings, tmp_path: Path) -> None:
    key = template_support.new_key("bulk")
    src = _source(tmp_path, key)
    (src / "seed").mkdir()
    (src / "seed" / "item.txt").write_text("x")
    with pytest.raises(InvalidTemplateSource, match=r"seed/ may only contain <table>.csv"):
        load_source(src)
    (src / "seed" / "item.txt").unlink()
    (src / "seed" / "nothing.csv").write_text("a,b\n1,2\n")
    target = _target(settings)
    from monk.system.migrator import ensure_system_database

    ensure_system_database(target, settings.system_db_name)
    try:
        with pytest.raises(InvalidTemplateSource, match=r"seed/nothing.csv: there is no schema"):
            template_support.build(target, settings, key, source_dir=src)
        (src / "seed" / "nothing.csv").unlink()
        (src / "seed" / "item.csv").write_text("sku,qty\nok,1\nbad,not-a-number\n")
        with pytest.raises(InvalidTemplateSource, match=r"seed/item.csv: PostgreSQL refused it"):
            template_support.build(target, settings, key, source_dir=src)
        assert template_support.staging_databases(target.url("postgres"), key) == []
    finally:
        template_support.drop_key(target.url("postgres"), key)
