"""monk init and the system database, on the suite's server (embedded or external)."""

from __future__ import annotations

import concurrent.futures
import shutil
import uuid
from urllib.parse import urlsplit

import psycopg
import pytest
from psycopg import sql

from monk.adapters.postgres.connection import ServerTarget
from monk.settings import Settings
from monk.system.migrator import MIGRATION_LOCK_KEY, bundled_migrations, ensure_system_database
from tests.conftest import RunMonk

SPEC_INSERT = """
INSERT INTO monk_main.tenants (
  name, database, host, is_active, tenant_type, access_read, access_edit, access_full, access_deny
) VALUES (%s, %s, 'localhost', true, 'normal', '{}', '{}', '{}', '{}')
"""


def _db_exists(target: ServerTarget, name: str) -> bool:
    with psycopg.connect(target.conninfo, dbname="postgres") as conn:
        return (
            conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            is not None
        )


def test_init_creates_system_database_once(
    monk: RunMonk, settings: Settings, target: ServerTarget
) -> None:
    first = monk("init", "--json")
    assert first.returncode == 0, first.stderr
    assert '"created_database": true' in first.stdout
    assert "0001_tenants" in first.stdout
    second = monk("init", "--json")
    assert second.returncode == 0, second.stderr
    assert '"created_database": false' in second.stdout
    assert '"applied_migrations": []' in second.stdout
    with psycopg.connect(target.conninfo, dbname=settings.system_db_name) as conn:
        rows = conn.execute("SELECT number FROM schema_migrations ORDER BY number").fetchall()
    assert [r[0] for r in rows] == [m.number for m in bundled_migrations()]


def test_spec_insert_works_as_written(settings: Settings, target: ServerTarget) -> None:
    """The spec's INSERT INTO monk_main.tenants … runs unchanged against the default name."""
    s = settings.model_copy(update={"system_db_name": "monk_main"})
    ensure_system_database(target, s.system_db_name)
    name = f"acme_{uuid.uuid4().hex[:8]}"
    database = f"tenant_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(target.conninfo, dbname="monk_main") as conn:
        conn.execute(SPEC_INSERT, (name, database))
        row = conn.execute(
            "SELECT name_key, status, is_active, created_at IS NOT NULL FROM tenants"
            " WHERE database = %s",
            (database,),
        ).fetchone()
        assert row == (name, "active", True, True)
        conn.execute("DELETE FROM tenants WHERE database = %s", (database,))


def test_registry_constraints(settings: Settings, target: ServerTarget) -> None:
    ensure_system_database(target, settings.system_db_name)
    with psycopg.connect(target.conninfo, dbname=settings.system_db_name, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO tenants (name, database) VALUES ('Acme', 'tenant_aaaaaaaaaaaaaaaa')"
        )
        with pytest.raises(psycopg.errors.UniqueViolation):  # database is unique
            conn.execute(
                "INSERT INTO tenants (name, database) VALUES ('Other', 'tenant_aaaaaaaaaaaaaaaa')"
            )
        with pytest.raises(psycopg.errors.UniqueViolation):  # name unique among live tenants
            conn.execute(
                "INSERT INTO tenants (name, database) VALUES ('acme', 'tenant_bbbbbbbbbbbbbbbb')"
            )
        with pytest.raises(psycopg.errors.CheckViolation):  # database names are identifiers
            conn.execute("""INSERT INTO tenants (name, database) VALUES ('x', 'bad"name')""")
        conn.execute("UPDATE tenants SET deleted_at = now(), is_active = false, status = 'deleted'")
        # a deleted tenant's name can be used again
        conn.execute(
            "INSERT INTO tenants (name, database) VALUES ('ACME', 'tenant_cccccccccccccccc')"
        )


def test_concurrent_init_applies_each_migration_once(
    settings: Settings, target: ServerTarget
) -> None:
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(
            pool.map(lambda _: ensure_system_database(target, settings.system_db_name), range(4))
        )
    assert sum(r.created_database for r in results) == 1
    applied = [name for r in results for name in r.applied]
    assert sorted(applied) == sorted(f"{m.number:04d}_{m.name}" for m in bundled_migrations())


def test_config_masks_secrets(monk: RunMonk) -> None:
    done = monk("config", "--json", env={"MONK_JWT_SECRET": "topsecret"})
    assert done.returncode == 0, done.stderr
    assert "topsecret" not in done.stdout
    assert '"MONK_SYSTEM_DB_NAME"' in done.stdout
    # the admin password of the URL is masked too
    assert "********" in done.stdout


@pytest.mark.parametrize(
    ("value", "needle"),
    [("bad-name", "letters, digits"), ("x" * 64, "63"), ("", "empty")],
)
def test_bad_system_db_name_is_one_clear_error(
    monk: RunMonk, target: ServerTarget, value: str, needle: str
) -> None:
    done = monk("init", env={"MONK_SYSTEM_DB_NAME": value})
    assert done.returncode == 6
    assert "MONK_SYSTEM_DB_NAME" in done.stderr
    assert needle in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    if value:
        assert not _db_exists(target, value[:63])


def test_unreachable_url_names_the_setting(monk: RunMonk) -> None:
    done = monk("init", env={"MONK_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/postgres"})
    assert done.returncode == 5
    assert "MONK_DATABASE_URL" in done.stderr
    assert "Traceback" not in done.stderr


def test_role_without_createdb_is_refused(
    monk: RunMonk, settings: Settings, target: ServerTarget, admin_url: str
) -> None:
    role = f"monk_weak_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'weakpw'").format(sql.Identifier(role)))
    try:
        url = psycopg.conninfo.make_conninfo(
            target.conninfo, user=role, password="weakpw", dbname="postgres"
        )
        done = monk("init", env={"MONK_DATABASE_URL": url})
        assert done.returncode == 6, done.stderr
        assert "CREATEDB" in done.stderr
        assert role in done.stderr
        assert not _db_exists(target, settings.system_db_name)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@pytest.mark.skipif(shutil.which("psql") is None, reason="no psql on PATH (monk runs it)")
def test_db_psql_passes_its_arguments_to_psql(monk: RunMonk, settings: Settings) -> None:
    """`monk db psql -c …` (and any psql option) runs psql with them, on the system database,
    without the password on psql's command line."""
    done = monk("db", "psql", "-At", "-c", "SELECT current_database()")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == settings.system_db_name
    done = monk("db", "psql", "-At", "-v", "ON_ERROR_STOP=1", "-c", "SELECT nope")
    assert done.returncode != 0
    assert 'column "nope" does not exist' in done.stderr
    # psql's own command line (its shell's parent) does not hold the password
    assert settings.database_url is not None
    password = urlsplit(settings.database_url.get_secret_value()).password
    done = monk("db", "psql", "-c", r"\! tr '\0' ' ' < /proc/$PPID/cmdline")
    assert done.returncode == 0, done.stderr
    assert "--dbname=" in done.stdout
    assert password
    assert password not in done.stdout


def test_a_first_command_creates_the_system_database_and_a_later_one_only_reads_it(
    monk: RunMonk, settings: Settings, target: ServerTarget
) -> None:
    """Any command brings a missing or outdated system database up to date (the whole of
    `monk init`); once it is current, a command reads `schema_migrations` and goes on (no
    migration lock: it answers while another session holds it). No warning either way: a
    missing system database is not a server down."""
    assert not _db_exists(target, settings.system_db_name)
    first = monk("tenant", "list", "--json")
    assert first.returncode == 0, first.stderr
    assert first.stderr == ""
    with psycopg.connect(target.conninfo, dbname=settings.system_db_name) as conn:
        applied = conn.execute(
            sql.SQL("SELECT count(*) FROM {}.schema_migrations").format(
                sql.Identifier(settings.system_db_name)
            )
        ).fetchone()
    assert applied == (len(bundled_migrations()),)
    with psycopg.connect(
        target.conninfo, dbname=settings.system_db_name, autocommit=True
    ) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        again = monk("tenant", "list", "--json", timeout=30)
    assert again.returncode == 0, again.stderr
    assert again.stderr == ""
