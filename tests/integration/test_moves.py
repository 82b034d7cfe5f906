"""Tenant moves between hosts and host drains (issue 13, item 5), against real servers: the
session's own (the local host) and the fleet's (tests/fleet.py: a second embedded 18, a third
on Debian's 15 where installed). Every test uses template keys and tenant names of its own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg.conninfo import conninfo_to_dict

from monk.api.app import create_app
from monk.api.auth import issue_root_token
from monk.settings import Settings
from tests.conftest import MONK_BIN, RunMonk, settings_env
from tests.fleet import Fleet, FleetServer
from tests.integration.test_host_templates import add_host, build, database_on, new_key


def system(settings: Settings) -> psycopg.Connection[tuple[Any, ...]]:
    assert settings.database_url is not None
    return psycopg.connect(
        settings.database_url.get_secret_value(), dbname=settings.system_db_name, autocommit=True
    )


def make_tenant(monk: RunMonk, key: str, host: str, rows: int = 1000) -> dict[str, Any]:
    name = f"mv {uuid.uuid4().hex[:8]}"
    done = monk("tenant", "create", name, "--template", key, "--host", host, "--json")
    assert done.returncode == 0, done.stderr
    out: dict[str, Any] = json.loads(done.stdout)
    with psycopg.connect(out["connection_url"], connect_timeout=5, autocommit=True) as conn:
        conn.execute("CREATE TABLE things (id int PRIMARY KEY, body text)")
        conn.execute(
            "INSERT INTO things SELECT g, md5(g::text) FROM generate_series(1, %s) g", (rows,)
        )
    return out


def data_of(url: str) -> tuple[int, str]:
    with psycopg.connect(url, connect_timeout=5) as conn:
        row = conn.execute("SELECT count(*), md5(string_agg(body, ',' ORDER BY id)) FROM things")
        got = row.fetchone()
    assert got is not None
    return int(got[0]), str(got[1])


def host_of(settings: Settings, database: str) -> str:
    with system(settings) as conn:
        row = conn.execute(
            "SELECT host FROM tenants WHERE database = %s AND deleted_at IS NULL", (database,)
        ).fetchone()
    assert row is not None
    return str(row[0])


def at_port(url: str, port: int) -> str:
    """The tenant's URL (its role and password) pointed at another server."""
    return url.replace(url.split("@")[1].split("/")[0], f"127.0.0.1:{port}")


def move(monk: RunMonk, name: str, to: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return monk("tenant", "move", name, "--to", to, "--json", *extra)


def test_a_move_keeps_data_credentials_and_events_and_records_its_downtime(
    monk: RunMonk, settings: Settings, fleet: Fleet
) -> None:
    add_host(monk, "pg-2", fleet.second)
    add_host(monk, "pg-3", fleet.third)
    key = new_key()
    code, _out, err = build(monk, key)
    assert code == 0, err
    out = make_tenant(monk, key, settings.host_name)
    url, database = out["connection_url"], out["database"]
    before = data_of(url)
    with system(settings) as conn:
        events_before = conn.execute(
            "SELECT kind FROM events WHERE tenant_id = %s ORDER BY seq", (out["id"],)
        ).fetchall()
    # local (18) -> pg-2 (18) -> pg-3 (15 where installed): the same password all the way.
    for host, fs in (("pg-2", fleet.second), ("pg-3", fleet.third)):
        done = move(monk, out["name"], host)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert result["to"] == host
        assert result["credentials"] == "kept"
        assert result["rows"] >= 1000
        assert 0 < result["downtime_ms"] <= result["total_ms"]
        assert host_of(settings, database) == host
        assert database_on(fs, database)
        # The old URL with its password, pointed at the new server, logs in and sees the data.
        new_url = at_port(url, fs.port)
        assert data_of(new_url) == before
        with psycopg.connect(new_url, connect_timeout=5, autocommit=True) as conn:
            conn.execute("INSERT INTO things VALUES (-1, 'after the move')")
            conn.execute("DELETE FROM things WHERE id = -1")
    # The copies left behind are dropped: on the local server and pg-2.
    with psycopg.connect(settings.database_url.get_secret_value()) as conn:  # type: ignore[union-attr]
        gone = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
        assert gone.fetchone() is None
    assert not database_on(fleet.second, database)
    with system(settings) as conn:
        kinds = [
            r[0]
            for r in conn.execute(
                "SELECT kind FROM events WHERE tenant_id = %s ORDER BY seq", (out["id"],)
            ).fetchall()
        ]
        ops = conn.execute(
            "SELECT state, result->>'downtime_ms' FROM operations WHERE kind = 'move'"
            " AND subject = %s ORDER BY created_at",
            (out["name_key"] if "name_key" in out else out["name"].lower(),),
        ).fetchall()
    assert kinds[: len(events_before)] == [r[0] for r in events_before]
    assert kinds[len(events_before) :] == ["tenant.moved", "tenant.moved"]
    assert [s for s, _ in ops] == ["done", "done"]
    assert all(float(d) > 0 for _, d in ops)
    # monk's own view: the tenant is on pg-3 and its health check passes there.
    shown = json.loads(monk("tenant", "show", out["name"], "--json").stdout)
    assert shown["host"] == "pg-3"


def test_a_second_move_of_the_tenant_is_refused_and_bad_targets_change_nothing(
    monk: RunMonk, settings: Settings, fleet: Fleet, fleet_server: FleetServer
) -> None:
    add_host(monk, "pg-2", fleet.second)
    add_host(monk, "pg-down", fleet_server)
    key = new_key()
    code, _out, err = build(monk, key)
    assert code == 0, err
    out = make_tenant(monk, key, settings.host_name)
    name, database = out["name"], out["database"]
    # A move paused after its freeze holds the tenant: a second one gets 409 MOVE_RUNNING.
    proc = subprocess.Popen(
        [MONK_BIN, "tenant", "move", name, "--to", "pg-2"],
        env=os.environ | settings_env(settings) | {"MONK_FAULT_PAUSE_AT": "move-frozen"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        assert "paused at move-frozen" in proc.stderr.readline()
        second = move(monk, name, "pg-2")
        assert second.returncode == 4, second.stderr
        assert "MOVE_RUNNING" in second.stderr or "being moved" in second.stderr
    finally:
        proc.kill()
        proc.wait()
    repaired = monk("doctor", "--repair")
    assert repaired.returncode in (0, 1), repaired.stderr
    assert host_of(settings, database) == settings.host_name
    assert data_of(out["connection_url"])[0] == 1000
    # A target that is down: a clear error naming it, nothing made, the tenant still open.
    fleet_server.stop()
    down = move(monk, name, "pg-down")
    assert down.returncode == 5, down.stderr
    assert "HOST_UNAVAILABLE" in down.stderr
    assert "pg-down" in down.stderr
    assert "Traceback" not in down.stderr
    assert host_of(settings, database) == settings.host_name
    assert data_of(out["connection_url"])[0] == 1000
    # Unknown host, same host.
    assert move(monk, name, "pg-nope").returncode == 3
    same = move(monk, name, settings.host_name)
    assert same.returncode == 2
    assert "already" in same.stderr
    with system(settings) as conn:
        states = conn.execute(
            "SELECT state FROM operations WHERE kind = 'move' AND database = %s", (database,)
        ).fetchall()
    assert sorted(s for (s,) in states) == ["undone"]


STEPS = ["move-prepared", "move-frozen", "move-copied", "move-verified", "move-switched"]


@pytest.mark.slow
@pytest.mark.parametrize("step", STEPS)
def test_kill_at_each_step_then_doctor_repair_leaves_it_on_one_host_with_its_data(
    monk: RunMonk, settings: Settings, fleet: Fleet, step: str
) -> None:
    add_host(monk, "pg-2", fleet.second)
    key = new_key()
    code, _out, err = build(monk, key)
    assert code == 0, err
    out = make_tenant(monk, key, settings.host_name)
    name, database, url = out["name"], out["database"], out["connection_url"]
    before = data_of(url)
    proc = subprocess.Popen(
        [MONK_BIN, "tenant", "move", name, "--to", "pg-2"],
        env=os.environ | settings_env(settings) | {"MONK_FAULT_PAUSE_AT": step},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert f"paused at {step}" in line, line + proc.stderr.read()
    proc.kill()
    proc.wait()
    doctor = monk("doctor", "--json")
    assert "unfinished_move" in doctor.stdout, doctor.stdout
    repaired = monk("doctor", "--repair")
    assert repaired.returncode in (0, 1), repaired.stderr
    host = host_of(settings, database)
    switched = step == "move-switched"
    assert host == ("pg-2" if switched else settings.host_name)
    on_local = database_on_local(settings, database)
    on_second = database_on(fleet.second, database)
    assert (on_local, on_second) == ((False, True) if switched else (True, False))
    port = fleet.second.port if switched else None
    login = url if port is None else at_port(url, port)
    assert data_of(login) == before
    with system(settings) as conn:
        left = conn.execute(
            "SELECT count(*) FROM operations WHERE database = %s"
            " AND state IN ('running', 'queued')",
            (database,),
        ).fetchone()
    assert left == (0,)
    # And it moves again, all the way, afterwards.
    again = move(monk, name, settings.host_name if switched else "pg-2")
    assert again.returncode == 0, again.stderr


def database_on_local(settings: Settings, database: str) -> bool:
    assert settings.database_url is not None
    with psycopg.connect(settings.database_url.get_secret_value()) as conn:
        row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
    return row is not None


def test_drain_moves_every_tenant_off_a_host(
    monk: RunMonk, settings: Settings, fleet: Fleet
) -> None:
    add_host(monk, "pg-2", fleet.second)
    add_host(monk, "pg-3", fleet.third)
    key = new_key()
    code, _out, err = build(monk, key)
    assert code == 0, err
    tenants = [make_tenant(monk, key, "pg-2", rows=100) for _ in range(4)]
    # The local host full: placement sends every tenant to pg-3.
    assert monk("host", "set", settings.host_name, "--capacity", "0").returncode == 0
    # A disabled tenant moves too, and stays disabled (closed) on its new host.
    assert monk("tenant", "disable", tenants[0]["name"]).returncode == 0
    done = monk("host", "drain", "pg-2", "--parallel", "2", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert len(result["moved"]) == 4
    assert result["failed"] == []
    listed = {h["name"]: h for h in json.loads(monk("host", "list", "--json").stdout)}
    assert listed["pg-2"]["tenants"] == 0
    assert listed["pg-2"]["state"] == "draining"
    for t in tenants:
        assert host_of(settings, t["database"]) != "pg-2"
        assert not database_on(fleet.second, t["database"])
    first = json.loads(monk("tenant", "show", tenants[0]["name"], "--json").stdout)
    assert first["status"] == "disabled"
    assert first["host"] == "pg-3"
    moved_url = at_port(tenants[0]["connection_url"], fleet.third.port)
    with pytest.raises(psycopg.OperationalError):
        data_of(moved_url)
    assert monk("tenant", "enable", tenants[0]["name"]).returncode == 0
    assert data_of(moved_url)[0] == 100
    assert monk("host", "remove", "pg-2").returncode == 0


@pytest.fixture
def api(settings: Settings) -> Iterator[tuple[TestClient, dict[str, str]]]:
    auth = {"Authorization": f"Bearer {issue_root_token(settings, ttl_seconds=600)}"}
    quiet = settings.model_copy(update={"pool_spares": {}, "pool_roles": 0})
    with TestClient(create_app(quiet)) as client:
        yield client, auth


def test_over_http_from_a_host_whose_admin_is_no_superuser_the_password_is_rotated(
    api: tuple[TestClient, dict[str, str]],
    monk: RunMonk,
    settings: Settings,
    fleet_server: FleetServer,
) -> None:
    client, auth = api
    role, password = fleet_server.make_role("CREATEDB", "CREATEROLE")
    add_host(monk, "pg-own", fleet_server)  # superuser first: the template is built there
    assert monk("host", "remove", "pg-own").returncode == 0
    added = monk("host", "add", "pg-own", "--url", fleet_server.url_as(role, password), "--json")
    assert added.returncode == 0, added.stderr
    key = new_key()
    code, _out, err = build(monk, key)
    assert code == 0, err
    out = make_tenant(monk, key, "pg-own", rows=500)
    before = data_of(out["connection_url"])
    r = client.post(
        f"/api/root/tenant/{out['name']}/move", json={"to": settings.host_name}, headers=auth
    )
    assert r.status_code == 202, r.text
    started = r.json()["data"]
    assert started["credentials"] == "rotated"
    new_url = started["connection_url"]
    assert f":{fleet_server.port}/" not in new_url
    op = started["operation_id"]
    deadline = time.monotonic() + 60
    while True:
        got = client.get(f"/api/root/operations/{op}", headers=auth).json()["data"]
        if got["state"] in ("done", "undone", "failed") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert got["state"] == "done", got
    assert got["result"]["downtime_ms"] > 0
    assert got["result"]["credentials"] == "rotated"
    assert data_of(new_url) == before
    with pytest.raises(psycopg.OperationalError):
        data_of(at_port(out["connection_url"], int(new_url.split("@")[1].split(":")[1][:5])))
    # A second move while none runs, to a host that is not registered: 404, nothing started.
    r = client.post(f"/api/root/tenant/{out['name']}/move", json={"to": "pg-9"}, headers=auth)
    assert r.status_code == 404, r.text
    assert password not in r.text


def test_a_target_lost_during_the_copy_undoes_the_move_and_its_copy_is_dropped_later(
    monk: RunMonk, settings: Settings, fleet_server: FleetServer
) -> None:
    add_host(monk, "pg-lost", fleet_server)
    key = new_key()
    code, _out, err = build(monk, key)
    assert code == 0, err
    out = make_tenant(monk, key, settings.host_name)
    name, database = out["name"], out["database"]
    proc = subprocess.Popen(
        [MONK_BIN, "tenant", "move", name, "--to", "pg-lost"],
        env=os.environ | settings_env(settings) | {"MONK_FAULT_PAUSE_AT": "move-frozen"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    assert "paused at move-frozen" in proc.stderr.readline()
    assert database_on(fleet_server, database)  # prepared there, before the freeze
    fleet_server.stop()
    proc.send_signal(signal.SIGUSR1)
    _stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 5, stderr
    assert "undone" in stderr
    assert "Traceback" not in stderr
    # The source still holds it, open again, with its data.
    assert host_of(settings, database) == settings.host_name
    assert data_of(out["connection_url"])[0] == 1000
    with system(settings) as conn:
        ops = conn.execute(
            "SELECT kind, state FROM operations WHERE database = %s AND kind IN"
            " ('move', 'drop_copy') ORDER BY created_at",
            (database,),
        ).fetchall()
    assert ops == [("move", "undone"), ("drop_copy", "queued")]
    # The host back: the queued drop removes the half-made copy there.
    fleet_server.start()
    assert monk("doctor", "--repair").returncode in (0, 1)
    assert not database_on(fleet_server, database)
    with system(settings) as conn:
        left = conn.execute(
            "SELECT state FROM operations WHERE database = %s AND kind = 'drop_copy'",
            (database,),
        ).fetchall()
    assert left == [("done",)]


def wait_operation(client: TestClient, auth: dict[str, str], op: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while True:
        got: dict[str, Any] = client.get(f"/api/root/operations/{op}", headers=auth).json()["data"]
        if got["state"] in ("done", "undone", "failed") or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def test_a_drain_over_http_moves_every_tenant_off_in_the_background(
    api: tuple[TestClient, dict[str, str]], monk: RunMonk, settings: Settings, fleet: Fleet
) -> None:
    from monk.adapters.registry.locks import advisory_key

    client, auth = api
    add_host(monk, "pg-2", fleet.second)
    add_host(monk, "pg-3", fleet.third)
    key = new_key()
    code, _out, err = build(monk, key)
    assert code == 0, err
    tenants = [make_tenant(monk, key, "pg-2", rows=200) for _ in range(3)]
    before = [data_of(t["connection_url"]) for t in tenants]
    assert monk("host", "set", settings.host_name, "--capacity", "0").returncode == 0

    # Another process drains pg-2 (it holds the drain's lock): 409, pg-2 stays active.
    with system(settings) as other:
        other.execute("SELECT pg_advisory_lock(%s)", (advisory_key("host_drain:pg-2"),))
        r = client.post("/api/root/host/pg-2/drain", json={}, headers=auth)
        assert r.status_code == 409, r.text
        assert r.json()["error_code"] == "DRAIN_RUNNING"
    assert client.get("/api/root/host/pg-2", headers=auth).json()["data"]["state"] == "active"
    # Bad input changes nothing; an unknown host is a 404.
    r = client.post("/api/root/host/pg-2/drain", json={"parallel": 0}, headers=auth)
    assert r.status_code == 422, r.text
    assert client.post("/api/root/host/pg-9/drain", headers=auth).status_code == 404
    assert client.get("/api/root/host/pg-2", headers=auth).json()["data"]["state"] == "active"

    # "move": false only marks it: 200, no operation, its tenants stay.
    r = client.post("/api/root/host/pg-2/drain", json={"move": False}, headers=auth)
    assert r.status_code == 200, r.text
    assert r.json()["data"]["state"] == "draining"
    assert r.json()["data"]["operation_id"] is None
    assert client.post("/api/root/host/pg-2/undrain", headers=auth).status_code == 200
    assert all(host_of(settings, t["database"]) == "pg-2" for t in tenants)

    r = client.post("/api/root/host/pg-2/drain", json={"parallel": 2}, headers=auth)
    assert r.status_code == 202, r.text
    started = r.json()["data"]
    assert started["state"] == "draining"
    assert started["moving"] == 3
    got = wait_operation(client, auth, started["operation_id"])
    assert got["kind"] == "host_drain"
    assert got["state"] == "done", got
    assert got["result"]["total"] == got["result"]["done"] == 3
    assert {m["tenant"] for m in got["result"]["moved"]} == {t["name"] for t in tenants}
    assert all(m["to"] == "pg-3" for m in got["result"]["moved"])
    assert got["result"]["failed"] == []
    assert client.get("/api/root/host/pg-2", headers=auth).json()["data"]["tenants"] == 0
    for t, data in zip(tenants, before, strict=True):
        assert host_of(settings, t["database"]) == "pg-3"
        assert not database_on(fleet.second, t["database"])
        # The same credentials, on the new host.
        assert data_of(at_port(t["connection_url"], fleet.third.port)) == data
    # Its lock was released: a drain of the emptied host is journaled and done at once.
    r = client.post("/api/root/host/pg-2/drain", headers=auth)
    assert r.status_code == 202, r.text
    again = wait_operation(client, auth, r.json()["data"]["operation_id"])
    assert again["state"] == "done"
    assert again["result"]["total"] == 0


@pytest.mark.slow
def test_a_drain_killed_mid_move_is_closed_and_the_next_drain_empties_the_host(
    api: tuple[TestClient, dict[str, str]], monk: RunMonk, settings: Settings, fleet: Fleet
) -> None:
    client, auth = api
    add_host(monk, "pg-2", fleet.second)
    key = new_key()
    code, _out, err = build(monk, key)
    assert code == 0, err
    tenants = [make_tenant(monk, key, "pg-2", rows=100) for _ in range(2)]
    before = [data_of(t["connection_url"]) for t in tenants]
    proc = subprocess.Popen(
        [MONK_BIN, "host", "drain", "pg-2", "--parallel", "1"],
        env=os.environ | settings_env(settings) | {"MONK_FAULT_PAUSE_AT": "move-frozen"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert "paused at move-frozen" in line, line + proc.stderr.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with system(settings) as conn:
        dead = conn.execute(
            "SELECT id FROM operations WHERE kind = 'host_drain' AND state = 'running'"
        ).fetchall()
    assert len(dead) == 1
    r = client.post("/api/root/host/pg-2/drain", headers=auth)
    assert r.status_code == 202, r.text
    assert r.json()["data"]["moving"] == 2
    got = wait_operation(client, auth, r.json()["data"]["operation_id"])
    assert got["state"] == "done", got
    old = client.get(f"/api/root/operations/{dead[0][0]}", headers=auth).json()["data"]
    assert old["state"] == "failed"
    assert "process ended" in old["error"]
    assert settings.database_url is not None
    local = conninfo_to_dict(settings.database_url.get_secret_value())
    for t, data in zip(tenants, before, strict=True):
        assert host_of(settings, t["database"]) == settings.host_name
        assert not database_on(fleet.second, t["database"])
        # Its own credentials, on the local host now.
        assert data_of(at_port(t["connection_url"], int(str(local["port"])))) == data
