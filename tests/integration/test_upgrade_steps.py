"""The upgrade step each build records from its predecessor, and the build record inside every
template (the ground the fleet upgrade stands on)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from monk.adapters.postgres import template_db
from monk.adapters.postgres.connection import ServerTarget, connect
from monk.adapters.registry import upgrades
from monk.core.template_names import retired_db_name
from monk.service.server import Server
from monk.service.templates import TemplateService
from monk.settings import Settings
from tests.integration.schema_change_support import apply_steps, tenant_clone
from tests.integration.template_support import copy_builtin, drop_key, new_key, scratch_clone


@pytest.fixture
def installed(settings: Settings) -> ServerTarget:
    target, _ = Server.from_settings(settings).init()
    return target


@pytest.fixture
def key(admin_url: str) -> Iterator[str]:
    k = new_key("u")
    yield k
    drop_key(admin_url, k)


def test_each_build_records_the_step_from_its_predecessor(
    installed: ServerTarget, settings: Settings, key: str, admin_url: str, tmp_path: Path
) -> None:
    path = copy_builtin(tmp_path, "basic", key)
    with TemplateService.open(settings, installed) as templates:
        a = templates.build(key, source_dir=path).build
        (path / "migrations").mkdir()
        (path / "migrations/0001_note.sql").write_text("CREATE TABLE note (body text);")
        b = templates.build(key, source_dir=path).build
        (path / "migrations/0002_idx.sql").write_text("CREATE INDEX note_body ON note (body);")
        c = templates.build(key, source_dir=path).build
    assert len({a.version, b.version, c.version}) == 3
    with connect(installed, settings.system_db_name, autocommit=True) as reg:
        assert upgrades.path(reg, installed.name, key, c.version, c.version) == []
        assert upgrades.path(reg, installed.name, key, c.version, a.version) is None
        steps = upgrades.path(reg, installed.name, key, a.version, c.version)
        assert steps is not None
        assert [(s.from_version, s.to_version, s.level) for s in steps] == [
            (a.version, b.version, 1),
            (b.version, c.version, 2),
        ]
        # No schema edit: the new migration file, then the metadata sync.
        sync = template_db.SYNC_COLUMNS
        assert steps[0].script == ("CREATE TABLE note (body text);", sync)
        assert steps[1].script == ("CREATE INDEX note_body ON note (body);", sync)
        direct = upgrades.path(reg, installed.name, key, b.version, c.version)
        assert direct == steps[1:]
    with scratch_clone(admin_url, c.database) as db:
        assert template_db.read_build_record(db) == (key, c.version, 2)
        owner = db.execute(
            "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'monk'"
        )
        assert owner.fetchone() == ("pg_database_owner",)


def test_a_step_from_an_older_compilers_build_brings_monks_own_tables_along(
    installed: ServerTarget, settings: Settings, key: str, admin_url: str, tmp_path: Path
) -> None:
    """A tenant of a build made by compiler 2 (no users.password_hash) gets the column from
    the step to a build of today's compiler, so its users can log in after the upgrade."""
    path = copy_builtin(tmp_path, "basic", key)
    with TemplateService.open(settings, installed) as templates:
        a = templates.build(key, source_dir=path).build
        with connect(installed, settings.system_db_name, autocommit=True) as reg:
            reg.execute("UPDATE template_builds SET compiler_version = '2' WHERE id = %s", (a.id,))
        (path / "migrations").mkdir()
        (path / "migrations/0001_note.sql").write_text("CREATE TABLE note (body text);")
        b = templates.build(key, source_dir=path).build
    with connect(installed, settings.system_db_name, autocommit=True) as reg:
        steps = upgrades.path(reg, installed.name, key, a.version, b.version)
    assert steps is not None
    assert steps[0].script[0] == "ALTER TABLE users ADD COLUMN IF NOT EXISTS password_hash text;"
    with tenant_clone(admin_url, retired_db_name(key, a.version)) as db:
        with db.transaction():
            db.execute("SET LOCAL ROLE pg_database_owner")
            db.execute("ALTER TABLE users DROP COLUMN password_hash")  # as compiler 2 made it
        apply_steps(db, steps)
        found = db.execute(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
            " WHERE attrelid = 'users'::regclass AND attname = 'password_hash'"
        ).fetchall()
        assert found == [("text",)]
