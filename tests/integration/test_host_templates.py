"""Templates on every host (issue 13, item 2) and placement over the fleet (item 3), against
real servers: the session's own (the local host), and the fleet's (tests/fleet.py).

Every test uses template keys and tenant names of its own: the fleet's servers are shared by
the whole session, and database names are cluster-wide."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from monk.adapters.postgres.connection import ServerTarget
from monk.adapters.registry import tenants as tenant_registry
from monk.api.app import create_app
from monk.api.auth import issue_root_token
from monk.core.tenant_names import normalize
from monk.errors import NoHostAvailable
from monk.service import templates as template_service
from monk.service.tenants import TenantService
from monk.settings import Settings
from tests.conftest import MONK_BIN, RunMonk, settings_env
from tests.fleet import Fleet, FleetServer

BASIC = str(template_service.builtin_source_dir("basic"))


def new_key() -> str:
    return f"ht_{uuid.uuid4().hex[:8]}"


def add_host(monk: RunMonk, name: str, fs: FleetServer, *extra: str) -> dict[str, Any]:
    done = monk("host", "add", name, "--url", fs.url, "--json", *extra)
    assert done.returncode == 0, done.stderr
    added: dict[str, Any] = json.loads(done.stdout)
    return added


def build(monk: RunMonk, key: str, *extra: str) -> tuple[int, dict[str, Any], str]:
    done = monk("template", "build", key, "--source", BASIC, "--json", *extra)
    out: dict[str, Any] = json.loads(done.stdout) if done.stdout.strip() else {}
    return done.returncode, out, done.stderr


def template_on(fs: FleetServer, key: str) -> tuple[str | None, bool] | None:
    """(the version written inside monk_template_<key>, datistemplate) on a fleet server."""
    with fs.connect() as conn:
        row = conn.execute(
            "SELECT datistemplate FROM pg_database WHERE datname = %s", (f"monk_template_{key}",)
        ).fetchone()
        if row is None:
            return None
        conn.execute(f"ALTER DATABASE monk_template_{key} ALLOW_CONNECTIONS true")
    try:
        with fs.connect(f"monk_template_{key}") as db:
            mark = db.execute("SELECT obj_description('public'::regnamespace)").fetchone()
    finally:
        with fs.connect() as conn:
            conn.execute(f"ALTER DATABASE monk_template_{key} ALLOW_CONNECTIONS false")
    assert mark is not None
    return (str(mark[0]) if mark[0] is not None else None), bool(row[0])


def builds_on(monk: RunMonk, key: str, host: str | None = None) -> list[dict[str, Any]]:
    args = ["template", "list", key, "--all", "--json"] + (["--host", host] if host else [])
    done = monk(*args)
    assert done.returncode == 0, done.stderr
    rows: list[dict[str, Any]] = json.loads(done.stdout)
    return rows


def test_a_build_and_a_rebuild_reach_every_host(
    monk: RunMonk, settings: Settings, fleet: Fleet
) -> None:
    add_host(monk, "pg-2", fleet.second)
    add_host(monk, "pg-3", fleet.third)
    key = new_key()
    code, out, err = build(monk, key)
    assert code == 0, err
    hosts = {h["host"]: h for h in out["hosts"]}
    assert set(hosts) == {settings.host_name, "pg-2", "pg-3"}
    versions = {h["version"] for h in hosts.values()}
    assert len(versions) == 1
    assert all(h["built"] for h in hosts.values())
    (version,) = versions
    for fs in (fleet.second, fleet.third):
        found = template_on(fs, key)
        assert found is not None
        assert found[1], "a closed template database on the host"
        assert version in str(found[0])
    for host in ("pg-2", "pg-3"):
        (row,) = builds_on(monk, key, host)
        assert (row["host"], row["status"], row["is_current"]) == (host, "ready", True)
        assert row["database"] == f"monk_template_{key}"

    # A forced rebuild: a new current build on every host, the old one retired on each.
    code, out, err = build(monk, key, "--force")
    assert code == 0, err
    assert {h["host"] for h in out["hosts"] if h["built"]} == {settings.host_name, "pg-2", "pg-3"}
    for host in (None, "pg-2", "pg-3"):
        rows = builds_on(monk, key, host)
        assert sorted(r["status"] for r in rows) == ["ready", "retired"], rows
    # Per-host health check and drop of the retired build.
    done = monk("template", "check", key, "--host", "pg-3", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["ok"] is True
    done = monk("template", "prune", key, "--json")
    assert done.returncode == 0, done.stderr
    pruned = json.loads(done.stdout)
    assert sorted(b["host"] for b in pruned) == sorted([settings.host_name, "pg-2", "pg-3"])
    for fs in (fleet.second, fleet.third):
        with fs.connect() as conn:
            left = conn.execute(
                "SELECT count(*) FROM pg_database WHERE datname LIKE %s", (f"monk_retired_{key}%",)
            ).fetchone()
        assert left == (0,)
    # Tidy the shared servers: this test's templates dropped there.
    for host in ("pg-2", "pg-3"):
        assert monk("template", "drop", key, "--host", host, "--force").returncode == 0


def test_a_host_that_is_down_fails_its_builds_without_blocking_the_others(
    monk: RunMonk, settings: Settings, fleet: Fleet, fleet_server: FleetServer
) -> None:
    add_host(monk, "pg-2", fleet.second)
    add_host(monk, "pg-down", fleet_server)
    fleet_server.stop()
    key = new_key()
    started = time.monotonic()
    code, out, err = build(monk, key)
    elapsed = time.monotonic() - started
    assert code != 0
    assert elapsed < 30
    hosts = {h["host"]: h for h in out["hosts"]}
    assert hosts[settings.host_name]["built"]
    assert hosts["pg-2"]["built"]
    assert hosts["pg-down"]["error"]["code"] in ("DATABASE_UNAVAILABLE", "HOST_UNAVAILABLE")
    assert "pg-down" in err
    (row,) = builds_on(monk, key, "pg-down")
    assert row["status"] == "failed"
    assert row["error"]
    assert fleet_server.password not in err + json.dumps(out)
    # Back up: the next build gives it the build, the others are up to date.
    fleet_server.start()
    code, out, err = build(monk, key)
    assert code == 0, err
    built = {h["host"]: h["built"] for h in out["hosts"]}
    assert built == {settings.host_name: False, "pg-2": False, "pg-down": True}
    assert monk("template", "drop", key, "--host", "pg-2", "--force").returncode == 0


def test_a_host_added_later_receives_the_current_builds(
    monk: RunMonk, settings: Settings, fleet_server: FleetServer
) -> None:
    key = new_key()
    code, out, err = build(monk, key)
    assert code == 0, err
    version = out["version"]
    added = add_host(monk, "pg-late", fleet_server)
    received = {t["key"]: t for t in added["templates"]}
    assert received[key]["built"] is True
    assert received[key]["version"] == version
    found = template_on(fleet_server, key)
    assert found is not None
    assert version in str(found[0])
    (row,) = builds_on(monk, key, "pg-late")
    assert (row["status"], row["is_current"]) == ("ready", True)


def test_a_draining_host_gets_no_new_builds(
    monk: RunMonk, settings: Settings, fleet_server: FleetServer
) -> None:
    add_host(monk, "pg-d", fleet_server, "--no-templates")
    assert monk("host", "drain", "pg-d").returncode == 0
    key = new_key()
    code, out, err = build(monk, key)
    assert code == 0, err
    assert "hosts" not in out  # the local host alone
    assert builds_on(monk, key, "pg-d") == []


# ---------------------------------------------------------------- placement over the fleet


def tenant_service(settings: Settings) -> TenantService:
    assert settings.database_url is not None
    local = ServerTarget.from_url(settings.database_url.get_secret_value(), name="localhost")
    return TenantService(settings.model_copy(update={"pool_spares": {}, "pool_roles": 0}), local)


def database_on(fs: FleetServer, database: str) -> bool:
    with fs.connect() as conn:
        row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
    return row is not None


def test_placement_spreads_30_provisions_by_capacity(
    monk: RunMonk, settings: Settings, fleet: Fleet
) -> None:
    add_host(monk, "pg-2", fleet.second, "--capacity", "10")
    add_host(monk, "pg-3", fleet.third, "--capacity", "20")
    assert monk("host", "set", settings.host_name, "--capacity", "5").returncode == 0
    key = new_key()
    code, _out, err = build(monk, key)
    assert code == 0, err
    run = uuid.uuid4().hex[:6]
    placed: Counter[str] = Counter()
    urls: dict[str, str] = {}
    with tenant_service(settings) as svc:
        for i in range(30):
            out = svc.provision(f"spread {run} {i}", template=key).as_dict()
            placed[out["host"]] += 1
            urls[out["host"]] = out["connection_url"]
        # Most free capacity first: each host ends with the same room left (1, 2 and 2).
        assert placed == {settings.host_name: 4, "pg-2": 8, "pg-3": 18}
        # Each tenant's connection_url names its own host and works there.
        for host, fs in (("pg-2", fleet.second), ("pg-3", fleet.third)):
            assert f"127.0.0.1:{fs.port}/" in urls[host]
            with psycopg.connect(urls[host], connect_timeout=5) as conn:
                row = conn.execute("SELECT current_user, count(*) FROM users").fetchone()
            assert row is not None
            assert str(row[0]).startswith("tenant_")
        listed = {
            h["name"]: h["tenants"] for h in json.loads(monk("host", "list", "--json").stdout)
        }
        assert listed == {settings.host_name: 4, "pg-2": 8, "pg-3": 18}
        # All full now but 5 places: the 6th beyond them has nowhere to go.
        for i in range(5):
            svc.provision(f"spread {run} more {i}", template=key)
        with pytest.raises(NoHostAvailable, match="full"):
            svc.provision(f"spread {run} none", template=key)


def test_a_pinned_provision_lands_there_and_its_url_works(
    monk: RunMonk, settings: Settings, fleet: Fleet
) -> None:
    add_host(monk, "pg-3", fleet.third)
    key = new_key()
    code, _out, err = build(monk, key)
    assert code == 0, err
    name = f"pinned {uuid.uuid4().hex[:6]}"
    done = monk("tenant", "create", name, "--template", key, "--host", "pg-3", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["host"] == "pg-3"
    assert database_on(fleet.third, out["database"])
    with psycopg.connect(out["connection_url"], connect_timeout=5) as conn:
        conn.execute("CREATE TABLE mine (x int)")  # it owns its database there
        version = conn.execute("SHOW server_version_num").fetchone()
    with fleet.third.connect() as conn:
        assert version == conn.execute("SHOW server_version_num").fetchone()
    # Pinned to a host that is not registered: 422; to a draining one: 503 with the reason.
    unknown = monk("tenant", "create", f"x {uuid.uuid4().hex[:6]}", "--host", "pg-9")
    assert unknown.returncode == 2, unknown.stderr
    assert "host 'pg-9' is not registered" in unknown.stderr
    assert monk("host", "drain", "pg-3", "--no-move").returncode == 0
    drained = monk("tenant", "create", f"x {uuid.uuid4().hex[:6]}", "-t", key, "--host", "pg-3")
    assert drained.returncode == 5
    assert "NO_HOST_AVAILABLE" in drained.stderr
    assert "pg-3 is draining" in drained.stderr
    # The tenant's own operations go to its host: disable closes its database there.
    assert monk("tenant", "disable", name).returncode == 0
    with fleet.third.connect() as conn:
        allowed = conn.execute(
            "SELECT datallowconn FROM pg_database WHERE datname = %s", (out["database"],)
        ).fetchone()
    assert allowed == (False,)


def test_a_label_restricts_and_none_eligible_is_503(
    api: tuple[TestClient, dict[str, str]], monk: RunMonk, settings: Settings, fleet: Fleet
) -> None:
    client, auth = api
    add_host(monk, "pg-2", fleet.second, "--label", "zone=a")
    add_host(monk, "pg-3", fleet.third, "--label", "zone=b", "--capacity", "1")
    key = new_key()
    code, _out, err = build(monk, key)
    assert code == 0, err
    run = uuid.uuid4().hex[:6]
    for i in range(3):
        r = client.post(
            "/api/root/tenant",
            json={"name": f"zone {run} {i}", "template": key, "placement": {"zone": "a"}},
            headers=auth,
        )
        assert r.status_code == 201, r.text
        assert r.json()["data"]["host"] == "pg-2"
    r = client.post(
        "/api/root/tenant",
        json={"name": f"zone {run} b", "template": key, "placement": {"zone": "b"}},
        headers=auth,
    )
    assert r.status_code == 201, r.text
    assert r.json()["data"]["host"] == "pg-3"
    # zone=b is full (capacity 1), zone=c exists nowhere: 503 NO_HOST_AVAILABLE, Retry-After.
    for zone, why in (("b", "pg-3 is full (1/1)"), ("c", "lacks label zone=c")):
        r = client.post(
            "/api/root/tenant",
            json={"name": f"zone {run} {zone}2", "template": key, "placement": {"zone": zone}},
            headers=auth,
        )
        assert r.status_code == 503, r.text
        assert r.json()["error_code"] == "NO_HOST_AVAILABLE"
        assert why in r.json()["error"]
        assert int(r.headers["Retry-After"]) > 0
    # Nothing half-made: no intent row is left for the refused names.
    listed = client.get("/api/root/tenant", headers=auth).json()["data"]
    assert sorted(t["host"] for t in listed) == ["pg-2", "pg-2", "pg-2", "pg-3"]


@pytest.fixture
def api(settings: Settings) -> Iterator[tuple[TestClient, dict[str, str]]]:
    auth = {"Authorization": f"Bearer {issue_root_token(settings, ttl_seconds=600)}"}
    quiet = settings.model_copy(update={"pool_spares": {}, "pool_roles": 0})
    with TestClient(create_app(quiet)) as client:
        yield client, auth


def test_host_remove_waits_for_a_provision_placing_onto_it(
    monk: RunMonk, settings: Settings, fleet: Fleet
) -> None:
    """The intent statement holds the host's row FOR KEY SHARE until it commits; ``host
    remove`` waits for it, then counts the new tenant and refuses."""
    add_host(monk, "pg-2", fleet.second, "--no-templates")
    assert settings.database_url is not None
    with psycopg.connect(
        settings.database_url.get_secret_value(), dbname=settings.system_db_name
    ) as reg:
        gate = tenant_registry.reserve(
            reg,
            normalize(f"placing {uuid.uuid4().hex[:6]}"),
            tenant_id=uuid.uuid4(),
            op_id=uuid.uuid4(),
            host="pg-2",
            template_key="basic",
            template_version="v1",
            template_database="monk_template_basic",
            idempotency_key=None,
            spare_role=None,
            keyholder=uuid.uuid4(),
            async_commit=False,
            remote=True,
        )
        assert gate.tenant is not None  # written, not committed yet
        remove = subprocess.Popen(
            [MONK_BIN, "host", "remove", "pg-2"],
            env=settings_env(settings),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(2.0)
        assert remove.poll() is None, "remove waits for the provision's commit"
        reg.commit()
    _out, err = remove.communicate(timeout=60)
    assert remove.returncode == 4, err
    assert "HOST_IN_USE" in err
