"""Everything host-aware (issue 13, item 4): each operation on a tenant that lives on another
host of the fleet reaches that host, against real servers (tests/fleet.py): the session's own
(the local host), a second embedded 18 and a third (Debian's 15 where installed).

Every test uses template keys and tenant names of its own: the fleet's servers are shared by
the whole session, and database and role names are cluster-wide."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from monk.api.app import create_app
from monk.api.auth import issue_root_token
from monk.service import templates as template_service
from monk.settings import Settings
from tests.conftest import RunMonk
from tests.fleet import Fleet, FleetServer
from tests.integration.template_support import copy_builtin

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


def doctor(monk: RunMonk, *extra: str) -> tuple[int, dict[str, Any]]:
    done = monk("doctor", "--json", *extra)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, json.loads(done.stdout)


def test_doctor_checks_every_host_and_repairs_there(
    monk: RunMonk, settings: Settings, fleet: Fleet, fleet_server: FleetServer
) -> None:
    second = fleet.second
    add_host(monk, "pg-2", second)
    add_host(monk, "pg-4", fleet_server, "--no-templates")
    key = new_key()
    build(monk, key)
    assert doctor(monk)[0] == 0
    _, kept = create_on(monk, "pg-2", key)
    missing_name, missing = create_on(monk, "pg-2", key)
    _, broken = create_on(monk, "pg-2", key)
    orphan = f"tenant_{uuid.uuid4().hex[:16]}"
    with second.connect() as conn:
        conn.execute(f"DROP DATABASE {missing['database']} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {orphan}")
        # What an interrupted DROP DATABASE leaves: an invalid database.
        conn.execute(
            "UPDATE pg_database SET datconnlimit = -2 WHERE datname = %s", (broken["database"],)
        )
    # A build on pg-2 killed mid-way: its 'building' row and its staging database there.
    staging = f"monk_staging_{key}_0123456789abcdef"
    assert settings.database_url is not None
    with psycopg.connect(
        settings.database_url.get_secret_value(), dbname=settings.system_db_name, autocommit=True
    ) as reg:
        reg.execute(
            "INSERT INTO template_builds (key, version, database, host) VALUES (%s, %s, %s, %s)",
            (key, "0123456789abcdef", staging, "pg-2"),
        )
    with second.connect() as conn:
        conn.execute(f"CREATE DATABASE {staging}")
    fleet_server.stop()

    code, found = doctor(monk)
    assert code == 1
    seen = {(p["kind"], p["subject"], p["host"]) for p in found["problems"]}
    assert ("template_leftover", staging, "pg-2") in seen
    assert ("missing_database", missing["database"], "pg-2") in seen
    assert ("orphan_database", orphan, "pg-2") in seen
    assert ("invalid_database", broken["database"], "pg-2") in seen
    down = [p for p in found["problems"] if p["kind"] == "host_unavailable"]
    assert [(p["subject"], p["host"]) for p in down] == [("pg-4", "pg-4")]
    assert not any(p["host"] == settings.host_name for p in found["problems"])

    code, fixed = doctor(monk, "--repair")
    assert code == 1  # pg-4 is still down: reported, not repairable
    assert any(line.endswith("(on pg-2)") for line in fixed["repaired"])
    # The missing database's role is left by the first round (as on one server): a second.
    assert {p["kind"] for p in fixed["remaining"]} <= {"host_unavailable", "stray_role"}
    code, fixed = doctor(monk, "--repair")
    assert [p["kind"] for p in fixed["remaining"]] == ["host_unavailable"]
    assert role_login(second, missing["role"]) is None
    assert db_state(second, orphan) is None
    assert db_state(second, staging) is None
    assert db_state(second, broken["database"]) is None
    assert db_state(second, kept["database"]) == (True, True)
    gone = ok(monk, "tenant", "show", missing_name, "--include-deleted")
    assert gone["status"] == "deleted"

    fleet_server.start()
    assert doctor(monk)[0] == 0


@pytest.fixture
def api(settings: Settings) -> Iterator[tuple[TestClient, dict[str, str]]]:
    auth = {"Authorization": f"Bearer {issue_root_token(settings, ttl_seconds=600)}"}
    quiet = settings.model_copy(update={"pool_spares": {}, "pool_roles": 0})
    with TestClient(create_app(quiet)) as client:
        yield client, auth


def ready_builds(monk: RunMonk, key: str, host: str) -> list[str]:
    done = monk("template", "list", key, "--host", host, "--json")
    assert done.returncode == 0, done.stderr
    return [b["version"] for b in json.loads(done.stdout) if b["status"] == "ready"]


def test_api_host_add_builds_the_current_templates_there_as_the_cli_does(
    api: tuple[TestClient, dict[str, str]], monk: RunMonk, fleet: Fleet
) -> None:
    client, auth = api
    key = new_key()
    build(monk, key)  # the local host only: the fleet is empty
    made = client.post(
        "/api/root/host", json={"name": "pg-2", "url": fleet.second.url}, headers=auth
    )
    assert made.status_code == 201, made.text
    answers = {a["key"]: a for a in made.json()["data"]["templates"]}
    assert answers[key]["host"] == "pg-2"
    assert answers[key]["built"] is True
    assert ready_builds(monk, key, "pg-2") == [answers[key]["version"]]
    assert fleet.second.password not in made.text
    # templates: false, as --no-templates.
    bare = client.post(
        "/api/root/host",
        json={"name": "pg-3", "url": fleet.third.url, "templates": False},
        headers=auth,
    )
    assert bare.status_code == 201, bare.text
    assert bare.json()["data"]["templates"] == []
    assert ready_builds(monk, key, "pg-3") == []


def in_db(fs: FleetServer, database: str, query: str) -> Any:
    """One value read in ``database`` on a fleet server, opened for the read if closed."""
    with fs.connect() as conn:
        closed = conn.execute(
            "SELECT NOT datallowconn FROM pg_database WHERE datname = %s", (database,)
        ).fetchone() == (True,)
        if closed:
            conn.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        try:
            with fs.connect(database) as db:
                row = db.execute(query).fetchone()
        finally:
            if closed:
                conn.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
    return row[0] if row else None


def test_template_upgrade_and_drift_reach_tenants_on_every_host(
    monk: RunMonk, settings: Settings, fleet: Fleet, admin_url: str, tmp_path: Path
) -> None:
    second, third = fleet.second, fleet.third
    add_host(monk, "pg-2", second)
    add_host(monk, "pg-3", third)
    key = new_key()
    source = copy_builtin(tmp_path, "basic", key)
    (source / "migrations").mkdir(exist_ok=True)
    (source / "migrations" / "0001_item.sql").write_text("CREATE TABLE item (code text);")
    built = ok(monk, "template", "build", key, "--source", str(source))
    assert {h["host"] for h in built["hosts"]} == {settings.host_name, "pg-2", "pg-3"}
    tenants = {host: create_on(monk, host, key)[1] for host in (settings.host_name, "pg-2", "pg-3")}
    servers = {"pg-2": second, "pg-3": third}
    ok(monk, "tenant", "disable", tenants["pg-3"]["name"])

    (source / "migrations" / "0002_more.sql").write_text("CREATE TABLE more (n int);")
    rebuilt = ok(monk, "template", "build", key, "--source", str(source))
    assert all(h["built"] for h in rebuilt["hosts"]), rebuilt["hosts"]
    status = ok(monk, "template", "status", key)
    assert (status["total"], status["behind"]["count"]) == (3, 3), status
    assert {h["host"]: (h["tenants"], h["behind"]) for h in status["hosts"]} == {
        settings.host_name: (1, 1),
        "pg-2": (1, 1),
        "pg-3": (1, 1),
    }
    upgraded = ok(monk, "template", "upgrade", key)
    assert ok(monk, "template", "status", key)["behind"]["count"] == 0
    by_name = {t["name"]: t for t in upgraded["tenants"]}
    assert {by_name[t["name"]]["state"] for t in tenants.values()} == {"done"}, upgraded
    assert upgraded["to_version"] == rebuilt["version"]
    for host, fs in servers.items():
        db = tenants[host]["database"]
        assert in_db(fs, db, "SELECT to_regclass('public.more') IS NOT NULL") is True
        assert in_db(fs, db, "SELECT version FROM monk.build") == rebuilt["version"]
    assert db_state(third, tenants["pg-3"]["database"]) == (False, True)  # closed again
    with psycopg.connect(admin_url, dbname=tenants[settings.host_name]["database"]) as conn:
        assert conn.execute("SELECT to_regclass('public.more') IS NOT NULL").fetchone() == (True,)

    # Drift: every host's tenants, each against its own host's build (pg-3 may be another major).
    clean = monk("template", "drift", key, "--json")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert {r["name"]: r["drifted"] for r in json.loads(clean.stdout)} == {
        t["name"]: False for t in tenants.values()
    }
    with second.connect(tenants["pg-2"]["database"]) as db:
        db.execute("ALTER TABLE more ADD COLUMN note text")
    drifted = monk("template", "drift", key, "--json")
    assert drifted.returncode == 1
    found = {r["name"]: r for r in json.loads(drifted.stdout)}
    assert found[tenants["pg-2"]["name"]]["drifted"] is True
    assert [d["text"] for d in found[tenants["pg-2"]["name"]]["differences"]] == [
        "column more.note: added (text)"
    ]
    # The doctor names it, on its host.
    _, report = doctor(monk)
    mentions = [p for p in report["problems"] + report["warnings"] if p["kind"] == "drifted"]
    assert [p["host"] for p in mentions] == ["pg-2"], report


def test_metrics_are_labelled_by_host(
    api: tuple[TestClient, dict[str, str]], monk: RunMonk, settings: Settings, fleet: Fleet
) -> None:
    client, auth = api
    add_host(monk, "pg-2", fleet.second)
    key = new_key()
    build(monk, key)
    made = []
    for host in ("pg-2", "pg-2", settings.host_name):
        r = client.post(
            "/api/root/tenant",
            json={"name": f"m {uuid.uuid4().hex[:8]}", "template": key, "host": host},
            headers=auth,
        )
        assert r.status_code == 201, r.text
        made.append(r.json()["data"]["name"])
    refused = client.post(
        "/api/root/tenant",
        json={"name": "m nowhere", "template": key, "host": "pg-9"},
        headers=auth,
    )
    assert refused.status_code == 422
    assert client.patch(
        f"/api/root/tenant/{made[0]}", json={"is_active": False}, headers=auth
    ).is_success
    text = client.get("/metrics").text
    lines = set(text.splitlines())
    assert 'monk_provisions_total{host="pg-2",result="ok"} 2.0' in lines, text
    assert f'monk_provisions_total{{host="{settings.host_name}",result="ok"}} 1.0' in lines
    assert 'monk_provisions_total{host="pg-9",result="INVALID_REQUEST"} 1.0' in lines
    assert 'monk_provision_seconds_count{host="pg-2"} 2.0' in lines
    assert 'monk_tenants{host="pg-2",status="active"} 1.0' in lines
    assert 'monk_tenants{host="pg-2",status="disabled"} 1.0' in lines
    assert f'monk_tenants{{host="{settings.host_name}",status="active"}} 1.0' in lines


def test_every_operation_works_on_a_host_whose_admin_is_not_a_superuser(
    monk: RunMonk, settings: Settings, fleet: Fleet, tmp_path: Path
) -> None:
    """A managed server's admin: CREATEDB and CREATEROLE, no superuser (docs/hosts.md says
    what degrades: none of these operations)."""
    third = fleet.third
    role, pw = third.make_role("CREATEDB", "CREATEROLE")
    done = monk("host", "add", "pg-m", "--url", third.url_as(role, pw), "--json")
    assert done.returncode == 0, done.stderr
    key = new_key()
    source = copy_builtin(tmp_path, "basic", key)
    ok(monk, "template", "build", key, "--source", str(source))
    name, out = create_on(monk, "pg-m", key)
    db = out["database"]
    with psycopg.connect(out["connection_url"], connect_timeout=5) as conn:
        conn.execute("CREATE TABLE keep (x int)")
        conn.execute("INSERT INTO keep VALUES (7)")
    # A session of the tenant's own, open while it is disabled: ended.
    session = psycopg.connect(out["connection_url"], connect_timeout=5, autocommit=True)
    ok(monk, "tenant", "disable", name)
    assert db_state(third, db) == (False, True)
    with pytest.raises(psycopg.OperationalError):
        session.execute("SELECT 1")
    session.close()
    ok(monk, "tenant", "enable", name)
    rotated = ok(monk, "tenant", "credentials", name, "--rotate")
    assert ok(monk, "tenant", "health", name)["status"] == "healthy"

    (source / "migrations").mkdir(exist_ok=True)
    (source / "migrations" / "0001_more.sql").write_text("CREATE TABLE more (n int);")
    ok(monk, "template", "build", key, "--source", str(source))
    upgraded = ok(monk, "template", "upgrade", key)
    assert [t["state"] for t in upgraded["tenants"]] == ["done"], upgraded
    drift = monk("tenant", "drift", name, "--json")
    assert drift.returncode == 1  # the hand-made table, and only it
    assert [d["text"].split(":")[0] for d in json.loads(drift.stdout)["differences"]] == [
        "table keep"
    ], drift.stdout

    assert monk("tenant", "delete", name, "--purge", "--json").returncode == 0
    assert db_state(third, db) is None
    back = ok(monk, "tenant", "restore", name, "--host", "pg-m")
    with psycopg.connect(back["connection_url"], connect_timeout=5) as conn:
        assert conn.execute("SELECT x FROM keep").fetchone() == (7,)
        assert conn.execute("SELECT to_regclass('public.more') IS NOT NULL").fetchone() == (True,)
    assert rotated["connection_url"] != back["connection_url"]
    _, report = doctor(monk)
    # Only the hand-made table, from the last drift check; nothing the lifecycle left.
    assert [(p["kind"], p["host"]) for p in report["problems"]] == [("drifted", "pg-m")], report
