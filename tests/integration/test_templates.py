"""Template builds on a real server: content, rebuild and swap, lifecycle, concurrency, health."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from psycopg import sql

from monk.adapters.postgres import admin
from monk.adapters.postgres.connection import ServerTarget, connect
from monk.core.schema_compiler import compile_template, core_tables_ddl
from monk.core.template_names import retired_db_name, template_db_name
from monk.errors import InvalidTemplateSource, TemplateInUse, TemplateNotFound
from monk.service import templates as ts
from monk.service.server import Server
from monk.service.templates import TemplateService
from monk.service.templates.health import inspect
from monk.service.tenants import TenantService
from monk.settings import Settings
from monk.templates.source import content_hash, load_source, resolve_parents
from tests.integration.template_support import (
    assert_closed_template,
    copy_builtin,
    drop_databases,
    drop_key,
    new_key,
    read_json,
    scratch_clone,
    staging_databases,
    write_json,
)
from tests.strategies import template_schemas


@pytest.fixture
def installed(settings: Settings) -> ServerTarget:
    """The per-test system database, initialised; the admin target."""
    target, _ = Server.from_settings(settings).init()
    return target


@pytest.fixture
def key(admin_url: str) -> Iterator[str]:
    k = new_key()
    yield k
    drop_key(admin_url, k)


@pytest.fixture
def templates(settings: Settings, installed: ServerTarget) -> Iterator[TemplateService]:
    with TemplateService.open(settings, installed) as service:
        yield service


def _system(target: ServerTarget, s: Settings) -> Any:
    return connect(target, s.system_db_name, autocommit=True)


def _add_tenant_row(target: ServerTarget, s: Settings, key: str, version: str) -> None:
    with _system(target, s) as reg:
        reg.execute(
            "INSERT INTO tenants (name, database, template_key, template_version)"
            " VALUES (%s, %s, %s, %s)",
            (f"n{uuid.uuid4().hex[:8]}", f"tenant_{uuid.uuid4().hex[:16]}", key, version),
        )


def test_built_template_matches_its_source(
    installed: ServerTarget,
    settings: Settings,
    key: str,
    admin_url: str,
    tmp_path: Path,
    templates: TemplateService,
) -> None:
    path = copy_builtin(tmp_path, "crm", key)
    write_json(
        path / "template.json",
        read_json(path / "template.json") | {"database_settings": {"work_mem": "8MB"}},
    )
    build = templates.build(key, source_dir=path).build
    source = resolve_parents(load_source(path, key), lambda k: ts.source_folders(settings)[0] / k)
    assert build.status == "ready"
    assert build.is_current
    assert build.database == template_db_name(key)
    assert build.host == installed.name
    assert build.version == content_hash(source)
    assert build.parent_key == "basic"
    assert build.migration_level == 1
    assert build.database_settings == {"work_mem": "8MB"}
    assert build.table_count == 7
    assert (build.size_bytes or 0) > 0
    assert build.server_version
    assert_closed_template(admin_url, build.database)
    compiled = compile_template(source.schemas)
    with scratch_clone(admin_url, build.database) as db:
        assert ts.clone_marker(db) == (key, build.version)
        for table in compiled.tables:
            checks = {
                str(r[0])
                for r in db.execute(
                    "SELECT conname FROM pg_constraint WHERE conrelid = %s::regclass"
                    " AND contype = 'c'",
                    (table.name,),
                )
            }
            assert checks == {c.name for col in table.columns for c in col.checks}
            count = db.execute(
                sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table.name))
            )
            assert count.fetchone() == (len(source.data.get(table.name, ())),)
            columns = db.execute(
                "SELECT column_name FROM columns WHERE schema_name = %s ORDER BY column_name",
                (table.name,),
            ).fetchall()
            assert [r[0] for r in columns] == sorted(source.schemas[table.name]["properties"])
        schemas = db.execute("SELECT name, checksum FROM schemas ORDER BY name").fetchall()
        assert schemas == sorted((t.name, t.checksum) for t in compiled.tables)
        ids = {str(r[0]) for r in db.execute("SELECT id FROM account")}
        assert ids == {r["id"] for r in source.data["account"]}
        assert db.execute("SELECT count(*) FROM open_deal").fetchone() is not None  # migration
        not_owned = db.execute(
            "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace"
            " AND relowner <> %s::regrole",
            (ts.OWNER_ROLE,),
        ).fetchall()
        assert not_owned == []
        # A foreign key really refuses a dangling reference.
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            db.execute(
                "INSERT INTO contact (account_id, first_name, last_name) VALUES (%s, 'a', 'b')",
                (str(uuid.uuid4()),),
            )
    report = templates.check(key)
    assert report.ok, report.problems
    assert_closed_template(admin_url, build.database)


def test_rebuild_retires_the_old_build_and_spares_its_clones(
    installed: ServerTarget,
    settings: Settings,
    key: str,
    admin_url: str,
    tmp_path: Path,
    templates: TemplateService,
) -> None:
    path = copy_builtin(tmp_path, "basic", key)
    v1 = templates.build(key, source_dir=path).build
    assert templates.build(key, source_dir=path).built is False
    tenant_db = f"tenant_{uuid.uuid4().hex[:16]}"
    with connect(installed, autocommit=True) as adm:
        admin.create_database(adm, tenant_db, template=v1.database)
    try:
        schema = read_json(path / "schemas/account.json")
        schema["properties"]["nickname"] = {"type": "string", "maxLength": 40}
        write_json(path / "schemas/account.json", schema)
        v2 = templates.build(key, source_dir=path).build
        assert v2.version != v1.version
        assert v2.database == template_db_name(key)
        old = templates.show(key, v1.version)
        assert old.status == "retired"
        assert not old.is_current
        assert old.database == retired_db_name(key, v1.version)
        assert_closed_template(admin_url, old.database)
        assert_closed_template(admin_url, v2.database)
        with scratch_clone(admin_url, v2.database) as db:
            assert ts.clone_marker(db) == (key, v2.version)
            assert db.execute("SELECT to_regclass('account')").fetchone() == ("account",)
            assert db.execute(
                "SELECT 1 FROM columns WHERE column_name = 'nickname'"
            ).fetchone() == (1,)
        with psycopg.connect(admin_url, dbname=tenant_db) as db:
            assert db.execute("SELECT count(*) FROM account").fetchone() == (5,)
            assert (
                db.execute("SELECT 1 FROM columns WHERE column_name = 'nickname'").fetchone()
                is None
            )
    finally:
        drop_databases(admin_url, [tenant_db])

    # drop and prune: the current build and builds tenants need are kept unless forced
    with pytest.raises(TemplateInUse):
        templates.drop(key)
    _add_tenant_row(installed, settings, key, v1.version)
    assert templates.prune(key) == []
    with pytest.raises(TemplateInUse):
        templates.drop(key, v1.version)
    dropped = templates.drop(key, v1.version, force=True)
    assert dropped.status == "dropped"
    assert dropped.database == retired_db_name(key, v1.version)
    with connect(installed, autocommit=True) as adm:
        assert not admin.database_exists(adm, retired_db_name(key, v1.version))
    assert [b.version for b in templates.list_builds(key)] == [v2.version]
    assert len(templates.list_builds(key, everything=True)) == 2

    # a forced rebuild of the same version retires the current one; prune then drops it
    again = templates.build(key, source_dir=path, force=True).build
    assert again.version == v2.version
    assert again.id != v2.id
    pruned = templates.prune(key)
    assert [b.id for b in pruned] == [v2.id]
    assert templates.check(key).ok


def test_rebuild_while_cloning_loses_no_clone(
    key: str,
    admin_url: str,
    tmp_path: Path,
    templates: TemplateService,
) -> None:
    path = copy_builtin(tmp_path, "basic", key)
    templates.build(key, source_dir=path)
    template = template_db_name(key)
    stop = threading.Event()
    made: list[str] = []
    errors: list[BaseException] = []
    retries = [0]

    def clone_loop() -> None:
        try:
            with psycopg.connect(admin_url, autocommit=True) as conn:
                while not stop.is_set():
                    name = f"clone_{uuid.uuid4().hex[:12]}"
                    while True:
                        try:
                            conn.execute(
                                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                                    sql.Identifier(name), sql.Identifier(template)
                                )
                            )
                            break
                        except psycopg.errors.InvalidCatalogName:
                            retries[0] += 1  # the swap window: retry
                    made.append(name)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=clone_loop) for _ in range(2)]
    for thread in threads:
        thread.start()
    versions = set()
    try:
        for round_ in range(3):
            data = read_json(path / "data/account.json")
            data[0]["name"] = f"Acme round {round_}"
            write_json(path / "data/account.json", data)
            versions.add(templates.build(key, source_dir=path).build.version)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    try:
        assert errors == []
        assert len(made) > 3
        with psycopg.connect(admin_url, autocommit=True) as conn:
            existing = {
                str(r[0])
                for r in conn.execute(
                    "SELECT datname FROM pg_database WHERE datname = ANY(%s)", (made,)
                )
            }
        assert existing == set(made)
        for name in made[:: max(1, len(made) // 5)]:
            with psycopg.connect(admin_url, dbname=name) as db:
                assert db.execute("SELECT count(*) FROM account").fetchone() == (5,)
                marker = ts.clone_marker(db)
                assert marker is not None
    finally:
        drop_databases(admin_url, made)
    assert len(versions) == 3
    assert staging_databases(admin_url, key) == []


def test_concurrent_ensure_built_builds_once(
    installed: ServerTarget, settings: Settings, key: str, tmp_path: Path
) -> None:
    folder = tmp_path / "sources"
    copy_builtin(folder, "basic", key)
    s = settings.model_copy(update={"template_path": [folder]})
    results: list[ts.TemplateBuild] = []

    def ensure() -> None:
        # A service (and pools) per thread: as three monk processes would.
        with ts.TemplateService.open(s, installed) as own:
            results.append(own.ensure_built(key))

    threads = [threading.Thread(target=ensure) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 3
    assert len({b.id for b in results}) == 1
    with ts.TemplateService.open(s, installed) as templates:
        assert len(templates.list_builds(key, everything=True)) == 1
        assert templates.pending_migrations(results[0]) == []
        with pytest.raises(TemplateNotFound):
            templates.ensure_built(new_key("missing"))


def test_failing_step_keeps_the_previous_build(
    installed: ServerTarget,
    settings: Settings,
    key: str,
    admin_url: str,
    tmp_path: Path,
    templates: TemplateService,
) -> None:
    path = copy_builtin(tmp_path, "basic", key)
    good = templates.build(key, source_dir=path).build
    (path / "migrations").mkdir()
    (path / "migrations/0001_boom.sql").write_text("SELECT 1 / 0;\n")
    with pytest.raises(InvalidTemplateSource, match=r"migrations/0001_boom\.sql.*division by zero"):
        templates.build(key, source_dir=path)
    assert staging_databases(admin_url, key) == []
    assert templates.show(key).id == good.id
    failed = [b for b in templates.list_builds(key) if b.status == "failed"]
    assert len(failed) == 1
    assert "division by zero" in (failed[0].error or "")
    with _system(installed, settings) as reg:
        state = reg.execute(
            "SELECT state FROM operations WHERE kind = 'template_build' ORDER BY created_at DESC"
        ).fetchone()
    assert state == ("undone",)
    assert_closed_template(admin_url, good.database)


def test_leftovers_of_a_dead_build_are_found_and_cleaned(
    installed: ServerTarget,
    settings: Settings,
    key: str,
    admin_url: str,
    templates: TemplateService,
) -> None:
    """A 'building' row and its staging database, as a kill -9 leaves them."""
    version = "0123456789abcdef"
    staging = f"monk_staging_{key}_{version}"
    with _system(installed, settings) as reg:
        reg.execute(
            "INSERT INTO template_builds (key, version, database, host) VALUES (%s, %s, %s, %s)",
            (key, version, staging, installed.name),
        )
    with connect(installed, autocommit=True) as adm:
        admin.create_database(adm, staging)
    assert templates.find_leftovers() == [staging]
    assert templates.cleanup_leftovers() == [staging]
    assert templates.find_leftovers() == []
    assert staging_databases(admin_url, key) == []
    rows = templates.list_builds(key)
    assert [(b.status, b.error) for b in rows] == [
        ("failed", "interrupted: the building process died")
    ]


@pytest.fixture(scope="module")
def ddl_db(admin_url: str) -> Iterator[str]:
    name = f"scratch_ddl_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield name
    drop_databases(admin_url, [name])


@hsettings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(schemas=template_schemas())
def test_generated_schemas_compile_to_ddl_that_runs(
    admin_url: str, ddl_db: str, schemas: dict[str, Any]
) -> None:
    """What the compiler emits runs on PostgreSQL and passes the build's own health checks
    (in a transaction that is rolled back: DDL is transactional)."""
    compiled = compile_template(schemas)
    with psycopg.connect(admin_url, dbname=ddl_db) as db:
        try:
            db.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(ts.OWNER_ROLE)))
            for statement in [*core_tables_ddl(), *compiled.ddl()]:
                db.execute(statement)
            for query, params in compiled.registry_inserts():
                db.execute(query, params)
            for table in compiled.tables:  # every default satisfies every CHECK
                if all(c.has_default or not c.not_null for c in table.columns):
                    db.execute(
                        sql.SQL("INSERT INTO {} DEFAULT VALUES").format(sql.Identifier(table.name))
                    )
            db.execute("RESET ROLE")
            report = inspect(db, ddl_db, None)
            assert report.problems == ()
        finally:
            db.rollback()


def test_prune_forgets_failed_builds_but_the_latest(
    installed: ServerTarget,
    settings: Settings,
    key: str,
    tmp_path: Path,
    templates: TemplateService,
) -> None:
    path = copy_builtin(tmp_path, "empty", key)
    (path / "migrations").mkdir(exist_ok=True)
    for attempt in range(3):
        # a new version each time (the content hash changes), failing at its migration
        (path / "migrations" / "0001_boom.sql").write_text(f"SELECT {attempt} / 0;\n")
        with pytest.raises(InvalidTemplateSource, match="0001_boom"):
            templates.build(key, source_dir=path)
    with _system(installed, settings) as reg:
        failed = reg.execute(
            "SELECT id FROM template_builds WHERE key = %s AND status = 'failed'"
            " ORDER BY created_at",
            (key,),
        ).fetchall()
    assert len(failed) == 3
    forgotten = templates.prune(key)
    assert sorted(str(b.id) for b in forgotten) == sorted(str(r[0]) for r in failed[:2])
    assert {b.status for b in forgotten} == {"failed"}
    with _system(installed, settings) as reg:
        left = reg.execute("SELECT id FROM template_builds WHERE key = %s", (key,)).fetchall()
    assert left == [failed[2]]
    assert templates.prune(key) == []


def test_extensions_are_created_at_build_and_copied_into_clones(
    installed: ServerTarget,
    settings: Settings,
    key: str,
    admin_url: str,
    tmp_path: Path,
    templates: TemplateService,
) -> None:
    path = copy_builtin(tmp_path, "basic", key)
    manifest = read_json(path / "template.json")
    write_json(path / "template.json", manifest | {"extensions": ["citext", "pg_trgm"]})
    (path / "migrations").mkdir()
    (path / "migrations/0001_search.sql").write_text(
        "CREATE UNIQUE INDEX account_email_ci ON account ((email::citext));\n"
        "CREATE INDEX account_name_trgm ON account USING gin (name gin_trgm_ops);\n"
    )
    build = templates.build(key, source_dir=path).build
    with scratch_clone(admin_url, build.database) as clone:
        names = {r[0] for r in clone.execute("SELECT extname FROM pg_extension").fetchall()}
        assert {"citext", "pg_trgm"} <= names
        assert clone.execute("SELECT 'Acme'::citext = 'ACME'::citext").fetchone() == (True,)
        assert clone.execute("SELECT similarity('acme corp', 'acme corps') > 0.5").fetchone() == (
            True,
        )
    # A tenant's own role uses them in its database.
    with TenantService(settings, installed) as service:
        made = service.provision(f"Ext {uuid.uuid4().hex[:8]}", template=key).as_dict()
    try:
        with psycopg.connect(made["connection_url"], autocommit=True) as conn:
            conn.execute("CREATE TABLE handles (h citext PRIMARY KEY)")
            conn.execute("INSERT INTO handles VALUES ('Acme')")
            with pytest.raises(psycopg.errors.UniqueViolation):
                conn.execute("INSERT INTO handles VALUES ('ACME')")
    finally:
        drop_databases(admin_url, [made["database"]])


def test_an_extension_the_server_lacks_fails_the_build_by_name(
    installed: ServerTarget,
    key: str,
    admin_url: str,
    tmp_path: Path,
    templates: TemplateService,
) -> None:
    path = copy_builtin(tmp_path, "basic", key)
    manifest = read_json(path / "template.json")
    write_json(path / "template.json", manifest | {"extensions": ["citext", "monk_no_such_ext"]})
    with pytest.raises(InvalidTemplateSource) as caught:
        templates.build(key, source_dir=path)
    message = str(caught.value)
    assert "'monk_no_such_ext'" in message
    assert "citext" not in message.split("extension", 1)[1]
    assert installed.name in message
    assert staging_databases(admin_url, key) == []
    assert templates.list_builds(key) == []
