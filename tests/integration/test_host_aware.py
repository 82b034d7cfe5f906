"""Everything host-aware (issue 13, item 4): each operation on a tenant that lives on another
host of the fleet reaches that host, against real servers (tests/fleet.py): the session's own
(the local host), a second embedded 18 and a third (Debian's 15 where installed).

Every test uses template keys and tenant names of its own: the fleet's servers are shared by
the whole session, and database and role names are cluster-wide."""

from __future__ import annotations

import json
import uuid
from typing import Any

import psycopg
import pytest

from monk.service import templates as template_service
from monk.settings import Settings
from tests.conftest import RunMonk
from tests.fleet import Fleet, FleetServer

BASIC = str(template_service.builtin_source_dir("basic"))


def new_key() -> str:
    return f"ha_{uuid.uuid4().hex[:8]}"


def add_host(monk: RunMonk, name: str, fs: FleetServer, *extra: str) -> None:
    done = monk("host", "add", name, "--url", fs.url, "--json", *extra)
    assert done.returncode == 0, done.stderr


def build(monk: RunMonk, key: str) -> None:
    done = monk("template", "build", key, "--source", BASIC, "--json")
    assert done.returncode == 0, done.stderr


def ok(monk: RunMonk, *args: str) -> dict[str, Any]:
    done = monk(*args, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    out: dict[str, Any] = json.loads(done.stdout)
    return out


def create_on(monk: RunMonk, host: str, key: str) -> tuple[str, dict[str, Any]]:
    name = f"ha {uuid.uuid4().hex[:8]}"
    out = ok(monk, "tenant", "create", name, "--template", key, "--host", host)
    assert out["host"] == host
    return name, out


def db_state(fs: FleetServer, database: str) -> tuple[bool, bool] | None:
    """(datallowconn, exists-and-valid) of ``database`` on a server, None if absent."""
    with fs.connect() as conn:
        row = conn.execute(
            "SELECT datallowconn, datconnlimit <> -2 FROM pg_database WHERE datname = %s",
            (database,),
        ).fetchone()
    return None if row is None else (bool(row[0]), bool(row[1]))


def role_login(fs: FleetServer, role: str) -> bool | None:
    with fs.connect() as conn:
        row = conn.execute(
            "SELECT rolcanlogin FROM pg_roles WHERE rolname = %s", (role,)
        ).fetchone()
    return None if row is None else bool(row[0])


def local_has(settings: Settings, database: str) -> bool:
    assert settings.database_url is not None
    with psycopg.connect(settings.database_url.get_secret_value(), autocommit=True) as conn:
        return (
            conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
            is not None
        )


def test_disable_enable_credentials_health_and_show_on_a_remote_host(
    monk: RunMonk, settings: Settings, fleet: Fleet
) -> None:
    second = fleet.second
    add_host(monk, "pg-2", second)
    key = new_key()
    build(monk, key)
    name, out = create_on(monk, "pg-2", key)
    db, role = out["database"], out["role"]
    assert not local_has(settings, db)

    shown = ok(monk, "tenant", "show", name)
    assert shown["host"] == "pg-2"
    assert (shown["address"], shown["port"]) == ("127.0.0.1", second.port)
    health = ok(monk, "tenant", "health", name)
    assert (health["status"], health["host"]) == ("healthy", "pg-2"), health

    ok(monk, "tenant", "disable", name)
    assert db_state(second, db) == (False, True)
    assert role_login(second, role) is False
    ok(monk, "tenant", "enable", name)
    assert db_state(second, db) == (True, True)
    assert role_login(second, role) is True

    rotated = ok(monk, "tenant", "credentials", name, "--rotate")
    new_url = rotated["connection_url"]
    with psycopg.connect(new_url, connect_timeout=5) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (db,)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(out["connection_url"], connect_timeout=5).close()


def test_purge_archives_from_the_tenants_host_and_restore_lands_where_asked(
    monk: RunMonk, settings: Settings, fleet: Fleet
) -> None:
    second, third = fleet.second, fleet.third
    add_host(monk, "pg-2", second)
    add_host(monk, "pg-3", third)
    key = new_key()
    build(monk, key)
    name, out = create_on(monk, "pg-2", key)
    db = out["database"]
    with psycopg.connect(out["connection_url"], connect_timeout=5) as conn:
        conn.execute("CREATE TABLE keep (x int)")
        conn.execute("INSERT INTO keep SELECT generate_series(1, 42)")
    # Trash and restore: its own host, as it was.
    ok(monk, "tenant", "delete", name)
    assert db_state(second, db) == (False, True)
    ok(monk, "tenant", "restore", name)
    assert db_state(second, db) == (True, True)

    purged = monk("tenant", "delete", name, "--purge", "--json")
    assert purged.returncode == 0, purged.stderr
    assert db_state(second, db) is None
    assert role_login(second, out["role"]) is None
    gone = ok(monk, "tenant", "show", name, "--include-deleted")
    assert gone["status"] == "deleted"
    assert gone["archive"]["path"]

    # Restore pinned onto another host, of another major where Debian's 15 is installed.
    back = ok(monk, "tenant", "restore", name, "--host", "pg-3")
    assert back["host"] == "pg-3"
    assert db_state(third, db) == (True, True)
    assert db_state(second, db) is None
    assert not local_has(settings, db)
    with psycopg.connect(back["connection_url"], connect_timeout=5) as conn:
        assert conn.execute("SELECT count(*) FROM keep").fetchone() == (42,)

    # A trashed tenant is restored on its own host only.
    ok(monk, "tenant", "delete", name)
    moved = monk("tenant", "restore", name, "--host", "pg-2")
    assert moved.returncode == 2, moved.stderr
    assert "restored there" in moved.stderr
    ok(monk, "tenant", "restore", name)
    # Purged with the drop left queued (no wait), then the queue worked by another process:
    # the drop runs on pg-3. Restored without a host: placement's choice (the others drained).
    queued = monk("tenant", "delete", name, "--purge", "--no-wait", "--json")
    assert queued.returncode == 0, queued.stderr
    assert db_state(third, db) is not None
    repaired = monk("doctor", "--repair")
    assert repaired.returncode in (0, 1), repaired.stdout + repaired.stderr
    assert db_state(third, db) is None
    for host in (settings.host_name, "pg-3"):
        assert monk("host", "drain", host).returncode == 0
    placed = ok(monk, "tenant", "restore", name)
    assert placed["host"] == "pg-2"
    assert db_state(second, db) == (True, True)
