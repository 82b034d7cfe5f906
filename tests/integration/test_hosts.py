"""Hosts of the fleet (issue 13, item 1): ``monk host …`` and /api/root/host against real
PostgreSQL servers started by the test setup (tests/fleet.py): the session's own (the local
host), a second embedded 18, and a third (Debian's 15 where installed, as in CI)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from fastapi.testclient import TestClient

from monk.adapters import registry
from monk.api.app import create_app
from monk.api.auth import issue_root_token
from monk.core.tenant_names import normalize
from monk.service.tenants import TenantService
from monk.settings import Settings
from tests.conftest import MONK_BIN, RunMonk, free_port, settings_env
from tests.fleet import Fleet, FleetServer, server_major


def hosts_json(monk: RunMonk) -> list[dict[str, object]]:
    done = monk("host", "list", "--json")
    assert done.returncode == 0, done.stderr
    found: list[dict[str, object]] = json.loads(done.stdout)
    return found


def names(monk: RunMonk) -> list[str]:
    return [str(h["name"]) for h in hosts_json(monk)]


def secret_files(settings: Settings) -> list[Path]:
    folder = settings.data_dir / "hosts"
    return sorted(folder.glob("*.json")) if folder.exists() else []


def system_conn(settings: Settings) -> psycopg.Connection[tuple[object, ...]]:
    assert settings.database_url is not None
    return psycopg.connect(
        settings.database_url.get_secret_value(), dbname=settings.system_db_name, autocommit=True
    )


# ---------------------------------------------------------------- the test ground


def test_fleet_gives_more_real_servers(fleet: Fleet, admin_url: str) -> None:
    second, third = fleet.second, fleet.third
    idents = set()
    for url in (admin_url, second.url, third.url):
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()
            assert row is not None
            idents.add(row[0])
    assert len(idents) == 3, "three distinct clusters"
    assert server_major(second) == 18
    if Path("/usr/lib/postgresql/15/bin/initdb").exists():
        assert server_major(third) == 15
    # Session-scoped: asking again gives the same running server.
    assert fleet.second is second


# ---------------------------------------------------------------- the lifecycle (CLI)


def test_local_host_is_listed_without_being_added(monk: RunMonk, settings: Settings) -> None:
    found = hosts_json(monk)
    assert [h["name"] for h in found] == [settings.host_name]
    local = found[0]
    assert local["local"] is True
    assert local["state"] == "active"
    assert str(local["server_version"])[:2].isdigit()
    assert "@" in str(local["url"])
    assert ":********" not in str(local["url"])
    # It keeps the system database: not removable, and not addable again under any name.
    gone = monk("host", "remove", settings.host_name)
    assert gone.returncode == 2, gone.stderr
    assert "keeps the system database" in gone.stderr
    again = monk("host", "add", settings.host_name, "--url", "postgresql://x@127.0.0.1:1/postgres")
    assert again.returncode == 4, again.stderr
    assert settings.database_url is not None
    itself = monk("host", "add", "itself", "--url", settings.database_url.get_secret_value())
    assert itself.returncode == 4, itself.stderr
    assert "reaches the local server" in itself.stderr
    assert names(monk) == [settings.host_name]
    assert secret_files(settings) == []
    checked = monk("host", "check", settings.host_name, "--json")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert json.loads(checked.stdout)["reachable"] is True
    assert hosts_json(monk)[0]["last_check"]["ok"] is True


def test_a_role_with_createdb_and_createrole_is_enough(
    monk: RunMonk, settings: Settings, fleet: Fleet
) -> None:
    third = fleet.third
    role, pw = third.make_role("CREATEDB", "CREATEROLE")
    added = monk("host", "add", "pg-3", "--url", third.url_as(role, pw), "--json")
    assert added.returncode == 0, added.stderr
    checked = monk("host", "check", "pg-3", "--json")
    assert checked.returncode == 0, checked.stdout
    assert json.loads(checked.stdout)["problems"] == []
    # Its privileges taken away later: check says so (exit 1), the host stays registered.
    with third.connect() as conn:
        conn.execute(
            psycopg.sql.SQL("ALTER ROLE {} NOCREATEROLE").format(psycopg.sql.Identifier(role))
        )
    weakened = monk("host", "check", "pg-3", "--json")
    assert weakened.returncode == 1
    assert json.loads(weakened.stdout)["problems"] == [f"role '{role}' lacks CREATEROLE"]
    assert names(monk) == [settings.host_name, "pg-3"]


def test_add_list_show_check_drain_undrain_remove(
    monk: RunMonk, settings: Settings, fleet: Fleet
) -> None:
    second = fleet.second
    added = monk(
        "host", "add", "pg-2", "--url", second.url, "--capacity", "3",
        "--label", "zone=eu-1", "--label", "tier=gold", "--json",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    view = json.loads(added.stdout)
    assert view["name"] == "pg-2"
    assert view["state"] == "active"
    assert view["capacity"] == 3
    assert view["free"] == 3
    assert view["labels"] == {"zone": "eu-1", "tier": "gold"}
    assert view["server_version"].startswith("18")
    assert view["url"] == f"postgresql://monk@127.0.0.1:{second.port}/postgres"
    assert len(secret_files(settings)) == 1
    assert oct(secret_files(settings)[0].stat().st_mode & 0o777) == "0o600"

    assert names(monk) == [settings.host_name, "pg-2"]
    shown = monk("host", "show", "pg-2", "--json")
    assert json.loads(shown.stdout)["labels"] == {"zone": "eu-1", "tier": "gold"}

    checked = monk("host", "check", "pg-2", "--json")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    report = json.loads(checked.stdout)
    assert report["reachable"] is True
    assert report["server_version"].startswith("18")
    assert report["latency_ms"] >= 0
    assert report["connect_ms"] >= 0
    assert (report["tenants"], report["capacity"], report["free"]) == (0, 3, 3)
    last = json.loads(monk("host", "show", "pg-2", "--json").stdout)["last_check"]
    assert last["ok"] is True
    assert last["at"] is not None

    drained = monk("host", "drain", "pg-2", "--json")
    assert json.loads(drained.stdout)["state"] == "draining"
    undrained = monk("host", "undrain", "pg-2", "--json")
    assert json.loads(undrained.stdout)["state"] == "active"
    # The local host can be drained too (placement will skip it).
    local = monk("host", "drain", settings.host_name, "--json")
    assert json.loads(local.stdout)["state"] == "draining"
    assert hosts_json(monk)[0]["state"] == "draining"

    changed = monk("host", "set", "pg-2", "--capacity", "5", "--label", "zone=eu-2", "--json")
    assert changed.returncode == 0, changed.stderr
    assert (json.loads(changed.stdout)["capacity"], json.loads(changed.stdout)["labels"]) == (
        5,
        {"zone": "eu-2"},
    )
    cleared = json.loads(monk("host", "set", "pg-2", "--unlimited", "--no-labels", "--json").stdout)
    assert (cleared["capacity"], cleared["labels"]) == (None, {})
    local_cap = monk("host", "set", settings.host_name, "--capacity", "100", "--json")
    assert json.loads(local_cap.stdout)["capacity"] == 100
    assert monk("host", "set", "pg-9", "--capacity", "1").returncode == 3

    removed = monk("host", "remove", "pg-2")
    assert removed.returncode == 0, removed.stderr
    assert names(monk) == [settings.host_name]
    assert secret_files(settings) == []
    missing = monk("host", "show", "pg-2")
    assert missing.returncode == 3
    assert "HOST_NOT_FOUND" in missing.stderr


def test_add_refuses_an_unreachable_server(monk: RunMonk, settings: Settings) -> None:
    url = f"postgresql://monk:whatever@127.0.0.1:{free_port()}/postgres"
    done = monk("host", "add", "nowhere", "--url", url)
    assert done.returncode == 5, done.stderr
    assert "HOST_UNAVAILABLE" in done.stderr
    assert "cannot reach the server" in done.stderr
    assert "Traceback" not in done.stderr
    assert names(monk) == [settings.host_name]
    assert secret_files(settings) == []


def test_add_refuses_a_role_without_createdb_and_createrole(
    monk: RunMonk, settings: Settings, fleet: Fleet
) -> None:
    second = fleet.second
    weak, weak_pw = second.make_role()
    half, half_pw = second.make_role("CREATEDB")
    done = monk("host", "add", "weak", "--url", second.url_as(weak, weak_pw))
    assert done.returncode == 2, done.stderr
    assert "HOST_UNSUITABLE" in done.stderr
    assert f"role '{weak}' lacks CREATEDB and CREATEROLE" in done.stderr
    done = monk("host", "add", "half", "--url", second.url_as(half, half_pw))
    assert done.returncode == 2, done.stderr
    assert f"role '{half}' lacks CREATEROLE;" in done.stderr
    wrong = monk("host", "add", "wrong", "--url", second.url_as("monk", "not-the-password"))
    assert wrong.returncode == 2, wrong.stderr
    assert "refused the connection" in wrong.stderr
    assert "password authentication failed" in wrong.stderr
    no_pw = monk(
        "host", "add", "nopw", "--url", f"postgresql://monk@127.0.0.1:{second.port}/postgres"
    )
    assert no_pw.returncode == 2, no_pw.stderr
    assert "no password supplied" in no_pw.stderr
    assert names(monk) == [settings.host_name]
    assert secret_files(settings) == []


def test_add_refuses_a_duplicate_name_url_or_server(
    monk: RunMonk, settings: Settings, fleet: Fleet
) -> None:
    second, third = fleet.second, fleet.third
    assert monk("host", "add", "pg-2", "--url", second.url).returncode == 0
    same_name = monk("host", "add", "pg-2", "--url", third.url)
    assert same_name.returncode == 4
    assert "host 'pg-2' is registered already" in same_name.stderr
    same_url = monk("host", "add", "pg-x", "--url", second.url)
    assert same_url.returncode == 4
    assert "that URL is registered already as host 'pg-2'" in same_url.stderr
    # The same cluster by another URL (another role): one server, one host.
    role, pw = second.make_role("CREATEDB", "CREATEROLE")
    other_url = second.url_as(role, pw)
    same_server = monk("host", "add", "pg-y", "--url", other_url)
    assert same_server.returncode == 4, same_server.stderr
    assert "same cluster" in same_server.stderr
    assert names(monk) == [settings.host_name, "pg-2"]
    assert len(secret_files(settings)) == 1


def test_add_rejects_bad_input_changing_nothing(monk: RunMonk, settings: Settings) -> None:
    for args, text in [
        (["Bad_Name", "--url", "postgresql://h/postgres"], "host name 'Bad_Name'"),
        (["ok", "--url", "postgresql://h/postgres", "--label", "novalue"], "not key=value"),
        (["ok", "--url", "host=h port=notaport password=s3cret"], "port must be a number"),
        (["ok", "--url", "postgresql://u:s3cret@h:5432/db?nosuch=1"], "not a valid PostgreSQL"),
    ]:
        done = monk("host", "add", *args)
        assert done.returncode == 2, (args, done.stderr)
        assert text in done.stderr
        assert "s3cret" not in done.stderr
    assert names(monk) == [settings.host_name]


def test_remove_refuses_a_host_with_live_tenants(
    monk: RunMonk, settings: Settings, fleet: Fleet
) -> None:
    assert monk("host", "add", "pg-2", "--url", fleet.second.url).returncode == 0
    # What a placement will record: a live tenant whose registry row names the host.
    name = normalize("Placed Elsewhere")
    with system_conn(settings) as reg:
        row = reg.execute(
            "INSERT INTO tenants (name, database, host, template_key, template_version)"
            " VALUES (%s, %s, 'pg-2', 'basic', 'v1') RETURNING id",
            (name.display, name.database),
        ).fetchone()
        assert row is not None
    refused = monk("host", "remove", "pg-2")
    assert refused.returncode == 4, refused.stderr
    assert "HOST_IN_USE" in refused.stderr
    assert "1 live tenant(s)" in refused.stderr
    listed = {h["name"]: h for h in hosts_json(monk)}
    assert listed["pg-2"]["tenants"] == 1
    with system_conn(settings) as reg:
        registry.delete_row(reg, row[0])
    assert monk("host", "remove", "pg-2").returncode == 0


def test_remove_works_with_a_damaged_password_file(
    monk: RunMonk, settings: Settings, fleet: Fleet
) -> None:
    """Reading the host's password fails, saying to remove the host: removing it works."""
    assert monk("host", "add", "pg-2", "--url", fleet.second.url).returncode == 0
    (secret,) = secret_files(settings)
    secret.write_text("not json", encoding="utf-8")
    broken = monk("host", "check", "pg-2")
    assert "is damaged" in broken.stderr + broken.stdout
    removed = monk("host", "remove", "pg-2")
    assert removed.returncode == 0, removed.stderr
    assert names(monk) == [settings.host_name]
    assert secret_files(settings) == []


def test_a_host_without_the_template_gets_no_tenant(
    monk: RunMonk, settings: Settings, fleet: Fleet
) -> None:
    """Placement (tests/integration/test_host_templates.py) skips a host that has no ready
    build of the template; pinned there, the provision is refused with the reason."""
    assert monk("host", "add", "pg-2", "--url", fleet.second.url, "--no-templates").returncode == 0
    done = monk("tenant", "create", "Not There", "--host", "pg-2")
    assert done.returncode == 5, done.stderr
    assert "pg-2 has no ready build of the template" in done.stderr


def test_hosts_resolve_registered_servers_with_lazy_pools(
    monk: RunMonk, settings: Settings, fleet: Fleet
) -> None:
    """What placement will use: a registered host's target (with its stored password) and
    pools whose admin side is that server and whose registry side is the local one."""
    second = fleet.second
    assert monk("host", "add", "pg-2", "--url", second.url).returncode == 0
    assert settings.database_url is not None
    from monk.adapters.postgres.connection import ServerTarget

    local = ServerTarget.from_url(settings.database_url.get_secret_value(), name="localhost")
    with TenantService(settings, local) as svc:
        target = svc.hosts.target("pg-2")
        assert (target.name, target.public_port) == ("pg-2", second.port)
        # Lazily: no session of monk's on that server until something needs one.
        assert monk_sessions(second) == 0
        pools = svc.hosts.pools("pg-2")
        assert monk_sessions(second) == 0
        with pools.admin() as adm:
            there = adm.execute("SELECT system_identifier FROM pg_control_system()").fetchone()
        with second.connect() as conn:
            assert (
                there
                == conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()
            )
        with pools.system() as reg:
            assert reg.execute("SELECT current_database()").fetchone() == (settings.system_db_name,)
        assert svc.hosts.pools("pg-2") is pools
        with pytest.raises(Exception, match="not registered"):
            svc.hosts.target("pg-9")
        # Another process removes it and adds the name again for another server: this one
        # sees it once its look at the row is older than the recheck interval.
        assert monk("host", "remove", "pg-2").returncode == 0
        assert monk("host", "add", "pg-2", "--url", fleet.third.url).returncode == 0
        time.sleep(5.2)
        with svc.hosts.pools("pg-2").admin() as adm:
            now_there = adm.execute("SELECT system_identifier FROM pg_control_system()").fetchone()
        with fleet.third.connect() as conn:
            assert (
                now_there
                == conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()
            )


def monk_sessions(fs: FleetServer) -> int:
    with fs.connect() as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'monk:%'"
        ).fetchone()
    assert row is not None
    return int(str(row[0]))


# ---------------------------------------------------------------- the HTTP API


@pytest.fixture
def api(settings: Settings) -> Iterator[tuple[TestClient, dict[str, str]]]:
    auth = {"Authorization": f"Bearer {issue_root_token(settings, ttl_seconds=600)}"}
    quiet = settings.model_copy(update={"pool_spares": {}, "pool_roles": 0})
    with TestClient(create_app(quiet)) as client:
        yield client, auth


def test_api_host_routes(
    api: tuple[TestClient, dict[str, str]], settings: Settings, fleet: Fleet
) -> None:
    client, auth = api
    base = "/api/root/host"
    assert client.get(base).status_code == 401
    r = client.get(base, headers=auth)
    assert r.status_code == 200
    assert [h["name"] for h in r.json()["data"]] == [settings.host_name]

    body = {"name": "pg-3", "url": fleet.third.url, "capacity": 10, "labels": {"zone": "b"}}
    made = client.post(base, json=body, headers=auth)
    assert made.status_code == 201, made.text
    assert made.json()["data"]["labels"] == {"zone": "b"}
    dup = client.post(base, json=body, headers=auth)
    assert dup.status_code == 409
    assert dup.json()["error_code"] == "HOST_EXISTS"

    one = client.get(f"{base}/pg-3", headers=auth)
    assert one.status_code == 200
    assert one.json()["data"]["capacity"] == 10
    checked = client.post(f"{base}/pg-3/check", headers=auth)
    assert checked.status_code == 200
    assert checked.json()["data"]["reachable"] is True
    patched = client.patch(f"{base}/pg-3", json={"labels": {"zone": "c"}}, headers=auth)
    assert (patched.json()["data"]["capacity"], patched.json()["data"]["labels"]) == (
        10,
        {"zone": "c"},
    )
    unlimited = client.patch(f"{base}/pg-3", json={"capacity": None}, headers=auth)
    assert unlimited.json()["data"]["capacity"] is None
    assert client.patch(f"{base}/pg-3", json={"capacity": -1}, headers=auth).status_code == 422
    assert client.post(f"{base}/pg-3/drain", headers=auth).json()["data"]["state"] == "draining"
    assert client.post(f"{base}/pg-3/undrain", headers=auth).json()["data"]["state"] == "active"
    assert client.get(f"{base}/pg-9", headers=auth).status_code == 404
    assert client.delete(f"{base}/pg-3", headers=auth).status_code == 200
    assert client.get(f"{base}/pg-3", headers=auth).status_code == 404

    weak, pw = fleet.third.make_role()
    refused = client.post(
        base, json={"name": "weak", "url": fleet.third.url_as(weak, pw)}, headers=auth
    )
    assert refused.status_code == 422
    assert refused.json()["error_code"] == "HOST_UNSUITABLE"
    down = client.post(
        base,
        json={"name": "down", "url": f"postgresql://u:p@127.0.0.1:{free_port()}/postgres"},
        headers=auth,
    )
    assert down.status_code == 503
    assert down.json()["error_code"] == "HOST_UNAVAILABLE"
    assert "Retry-After" in down.headers
    assert [h["name"] for h in client.get(base, headers=auth).json()["data"]] == [
        settings.host_name
    ]


# ---------------------------------------------------------------- the password


def test_no_output_shows_a_hosts_password(
    monk: RunMonk,
    settings: Settings,
    fleet: Fleet,
    fleet_server: FleetServer,
    api: tuple[TestClient, dict[str, str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every CLI answer (stdout and stderr, with -v logging), every API answer and the log,
    for every host command, its errors included, and a host that went down."""
    second = fleet.second
    password = f"p@ss:w/rd {uuid.uuid4().hex}"
    role, _ = second.make_role("CREATEDB", "CREATEROLE")
    with second.connect() as conn:
        conn.execute(
            psycopg.sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                psycopg.sql.Identifier(role), psycopg.sql.Literal(password)
            )
        )
    url = second.url_as(role, password)
    own_pw = fleet_server.password
    forms = {password, quote(password, safe=""), quote(password), own_pw}
    outputs: list[str] = []

    def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [MONK_BIN, "-v", *args],
            env=settings_env(settings),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        outputs.append(done.stdout + done.stderr)
        return done

    assert cli("host", "add", "pg-2", "--url", url, "--json").returncode == 0
    assert cli("host", "add", "pg-2", "--url", url).returncode == 4  # the name
    assert cli("host", "add", "pg-7", "--url", url).returncode == 4  # the URL
    assert (
        cli("host", "add", "pg-8", "--url", url.replace("127.0.0.1", "localhost")).returncode == 4
    )
    bad_pw = second.url_as("monk", password + "x")
    assert cli("host", "add", "pg-9", "--url", bad_pw).returncode == 2
    forms |= {password + "x", quote(password + "x", safe="")}
    own = fleet_server.url_as("monk", "", "postgres").replace("monk:@", "monk@")
    assert (
        cli("host", "add", "own", "--url", own, "--password-stdin", stdin=own_pw + "\n").returncode
        == 0
    )
    for args in (["list"], ["list", "--json"], ["show", "pg-2"], ["show", "pg-2", "--json"]):
        assert cli("host", *args).returncode == 0
    assert cli("host", "check", "pg-2", "--json").returncode == 0
    fleet_server.stop()
    assert cli("host", "check", "own").returncode == 1
    assert cli("host", "check", "own", "--json").returncode == 1
    assert cli("host", "list").returncode == 0
    assert cli("config").returncode == 0
    assert cli("host", "drain", "pg-2").returncode == 0

    client, auth = api
    caplog.set_level("DEBUG")
    base = "/api/root/host"
    answers = [
        client.get(base, headers=auth),
        client.get(f"{base}/pg-2", headers=auth),
        client.post(f"{base}/pg-2/check", headers=auth),
        client.post(f"{base}/own/check", headers=auth),
        client.post(f"{base}/pg-2/undrain", headers=auth),
        client.post(base, json={"name": "pg-7", "url": url}, headers=auth),
        client.post(base, json={"name": "pg-9", "url": bad_pw}, headers=auth),
        client.post(
            base, json={"name": "pg-6", "url": url.split("@")[0] + "@127.0.0.1:1/x"}, headers=auth
        ),
        client.delete(f"{base}/own", headers=auth),
        client.delete(f"{base}/pg-2", headers=auth),
    ]
    outputs += [a.text for a in answers]
    assert cli("host", "list", "--json").returncode == 0
    outputs.append(caplog.text)
    pg_log = second.server.log_file.read_text(errors="replace")
    for out in [*outputs, pg_log]:
        for form in forms:
            assert form not in out
    assert any("HOST_EXISTS" in o for o in outputs)
    assert any("HOST_UNSUITABLE" in o for o in outputs)
    # The password is kept (in one private file per host), the registry never has it.
    with system_conn(settings) as reg:
        dump = str(reg.execute("SELECT * FROM hosts").fetchall())
    assert password not in dump


# ---------------------------------------------------------------- faults


def test_a_stopped_host_is_reported_by_check_and_list_then_recovers(
    monk: RunMonk, settings: Settings, fleet_server: FleetServer
) -> None:
    assert monk("host", "add", "own", "--url", fleet_server.url).returncode == 0
    fleet_server.stop()
    started = time.monotonic()
    done = monk("host", "check", "own", "--json")
    assert time.monotonic() - started < 10
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert report["reachable"] is False
    assert "cannot reach the server" in report["error"]
    listed = {h["name"]: h for h in hosts_json(monk)}
    assert listed["own"]["last_check"]["ok"] is False
    assert "cannot reach" in listed["own"]["last_check"]["error"]
    fleet_server.start()
    back = monk("host", "check", "own", "--json")
    assert back.returncode == 0, back.stdout
    assert hosts_json(monk)[1]["last_check"]["ok"] is True


def test_check_of_a_hung_host_returns_within_the_connect_timeout(
    monk: RunMonk, fleet_server: FleetServer
) -> None:
    assert monk("host", "add", "own", "--url", fleet_server.url).returncode == 0
    fleet_server.stop()
    # A server that accepts TCP connections and never answers (a hung host, a black hole).
    with socket.socket() as silent:
        silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        silent.bind(("127.0.0.1", fleet_server.port))
        silent.listen(16)
        started = time.monotonic()
        done = monk("host", "check", "own", "--json", env={"MONK_CONNECT_TIMEOUT": "2"})
        took = time.monotonic() - started
    assert done.returncode == 1, done.stderr
    assert json.loads(done.stdout)["reachable"] is False
    assert 2 <= took < 8, took


def paused(settings: Settings, step: str, *args: str) -> subprocess.Popen[str]:
    """``monk args`` started and waited for until it reports reaching ``step``."""
    proc = subprocess.Popen(
        [MONK_BIN, *args],
        env=os.environ | settings_env(settings) | {"MONK_FAULT_PAUSE_AT": step},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert f"paused at {step}" in line, line + proc.stderr.read()
    return proc


def test_add_of_a_host_that_stops_mid_check_leaves_nothing(
    monk: RunMonk, settings: Settings, fleet_server: FleetServer
) -> None:
    proc = paused(settings, "host-add.checked", "host", "add", "own", "--url", fleet_server.url)
    fleet_server.stop()
    proc.send_signal(signal.SIGUSR1)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 5, err
    assert "HOST_UNAVAILABLE" in err
    assert names(monk) == [settings.host_name]
    assert secret_files(settings) == []


@pytest.mark.slow
def test_add_killed_after_storing_the_password_leaves_nothing(
    monk: RunMonk, settings: Settings, fleet: Fleet
) -> None:
    proc = paused(settings, "host-add.stored", "host", "add", "pg-2", "--url", fleet.second.url)
    # In flight: its file is there, and no reader takes it for a leftover.
    assert len(secret_files(settings)) == 1
    assert names(monk) == [settings.host_name]
    assert len(secret_files(settings)) == 1
    proc.kill()
    proc.wait()
    # Killed before its commit: no row, and the next read removes the file.
    assert names(monk) == [settings.host_name]
    assert secret_files(settings) == []
    assert monk("host", "add", "pg-2", "--url", fleet.second.url).returncode == 0


@pytest.mark.slow
def test_two_adds_of_one_name_at_once_one_wins(
    monk: RunMonk, settings: Settings, fleet: Fleet
) -> None:
    first = paused(settings, "host-add.checked", "host", "add", "pg-2", "--url", fleet.second.url)
    second = paused(settings, "host-add.checked", "host", "add", "pg-2", "--url", fleet.third.url)
    # Both passed every check; now both insert.
    first.send_signal(signal.SIGUSR1)
    second.send_signal(signal.SIGUSR1)
    results = [p.communicate(timeout=60) for p in (first, second)]
    codes = sorted(p.returncode for p in (first, second))
    assert codes == [0, 4], results
    loser = results[[first.returncode, second.returncode].index(4)][1]
    assert "HOST_EXISTS" in loser
    assert "pg-2" in loser
    assert names(monk) == [settings.host_name, "pg-2"]
    assert len(secret_files(settings)) == 1
