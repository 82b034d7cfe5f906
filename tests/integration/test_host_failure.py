"""Host failure (issue 13, item 6) against real servers: a host of the fleet stopped for real
(``fleet_server``, this test's own) while another (``fleet.second``) and the local one go on.

Its tenants' operations fail fast with 503 HOST_UNAVAILABLE naming it (the connect timeout,
then at once while its breaker is open), the other hosts' tenants are provisioned and served,
placement skips it, /health lists each host's state, and once it is started again work resumes
in the same process. A refusal by a server that is up (a missing database) never opens the
breaker."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from monk.adapters.postgres.connection import ServerTarget, breaker
from monk.api.app import create_app
from monk.api.auth import issue_root_token
from monk.errors import DatabaseMissing
from monk.service import templates as template_service
from monk.service.tenants import TenantService
from monk.settings import Settings
from tests.conftest import RunMonk
from tests.fleet import Fleet, FleetServer

BASIC = str(template_service.builtin_source_dir("basic"))
TIMEOUT = 2  # MONK_CONNECT_TIMEOUT of these tests


def unique(prefix: str) -> str:
    return f"{prefix} {uuid.uuid4().hex[:8]}"


def add_host(monk: RunMonk, name: str, fs: FleetServer) -> None:
    done = monk("host", "add", name, "--url", fs.url, "--no-templates")
    assert done.returncode == 0, done.stderr


def build(monk: RunMonk) -> str:
    key = f"hf_{uuid.uuid4().hex[:8]}"
    done = monk("template", "build", key, "--source", BASIC)
    assert done.returncode == 0, done.stderr
    return key


@pytest.fixture
def quiet(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"pool_spares": {}, "pool_roles": 0, "connect_timeout": TIMEOUT}
    )


@pytest.fixture
def api(quiet: Settings) -> Iterator[tuple[TestClient, dict[str, str]]]:
    auth = {"Authorization": f"Bearer {issue_root_token(quiet, ttl_seconds=600)}"}
    with TestClient(create_app(quiet)) as client:
        yield client, auth


def provision(
    client: TestClient, auth: dict[str, str], name: str, key: str, host: str | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"name": name, "template": key}
    if host is not None:
        body["host"] = host
    r = client.post("/api/root/tenant", json=body, headers=auth)
    assert r.status_code == 201, r.text
    data: dict[str, Any] = r.json()["data"]
    return data


def hosts_of_health(client: TestClient) -> dict[str, dict[str, Any]]:
    r = client.get("/health")
    assert r.status_code == 200, r.text  # a host down is not monk down
    return {h["name"]: h for h in r.json()["data"]["hosts"]}


def test_a_stopped_host_fails_fast_for_its_tenants_while_the_others_are_served(
    monk: RunMonk,
    fleet: Fleet,
    fleet_server: FleetServer,
    api: tuple[TestClient, dict[str, str]],
) -> None:
    client, auth = api
    add_host(monk, "own", fleet_server)
    add_host(monk, "pg-2", fleet.second)
    key = build(monk)  # on every host
    # The local host takes no new tenant here: "own" (fewest tenants, then its name) is then
    # placement's first choice while it is up.
    assert monk("host", "drain", "localhost").returncode == 0
    a = provision(client, auth, unique("On Own"), key)
    assert a["host"] == "own"
    b = provision(client, auth, unique("On Two"), key, host="pg-2")
    health = hosts_of_health(client)
    assert health["own"]["reachable"]
    assert health["pg-2"]["reachable"]

    fleet_server.stop()
    started = time.monotonic()
    r = client.post(f"/api/root/tenant/{a['name']}/credentials", headers=auth)
    took = time.monotonic() - started
    assert r.status_code == 503, r.text
    assert r.json()["error_code"] == "HOST_UNAVAILABLE"
    assert "'own'" in r.json()["error"]
    assert r.headers["Retry-After"] == "1"
    assert took < TIMEOUT + 1.5, took
    # Its breaker is open now: the next operations on its tenants fail at once.
    for path in (f"/api/root/tenant/{a['name']}/health", f"/api/root/tenant/{a['name']}"):
        started = time.monotonic()
        r = (
            client.get(path, headers=auth)
            if path.endswith("health")
            else client.patch(path, json={"is_active": False}, headers=auth)
        )
        assert r.status_code == 503, (path, r.text)
        assert r.json()["error_code"] == "HOST_UNAVAILABLE", (path, r.text)
        assert time.monotonic() - started < 1.0, path
    # The CLI too: exit 5, one line naming the host, within the connect timeout.
    started = time.monotonic()
    done = monk("tenant", "disable", a["name"], env={"MONK_CONNECT_TIMEOUT": str(TIMEOUT)})
    assert done.returncode == 5, done.stderr
    assert "HOST_UNAVAILABLE" in done.stderr
    assert "'own'" in done.stderr
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < TIMEOUT + 5

    # Another host's tenants are served as usual, and a new tenant goes elsewhere.
    r = client.get(f"/api/root/tenant/{b['name']}/health", headers=auth)
    assert r.status_code == 200, r.text
    assert r.json()["data"]["status"] == "healthy", r.text
    r = client.post(f"/api/root/tenant/{b['name']}/credentials", headers=auth)
    assert r.status_code == 200, r.text
    c = provision(client, auth, unique("Placed Around"), key)
    assert c["host"] == "pg-2"
    # Pinned to the stopped host: refused with its name, nothing made.
    r = client.post(
        "/api/root/tenant",
        json={"name": unique("Pinned"), "template": key, "host": "own"},
        headers=auth,
    )
    assert r.status_code == 503, r.text
    assert r.json()["error_code"] == "HOST_UNAVAILABLE", r.text

    health = hosts_of_health(client)
    assert health["own"]["reachable"] is False
    assert health["own"]["error_code"] == "HOST_UNAVAILABLE"
    assert health["pg-2"]["reachable"] is True
    assert health["localhost"]["reachable"] is True

    # Back: work resumes in the same process, without a restart of monk.
    fleet_server.start()
    deadline = time.monotonic() + 10
    while True:
        r = client.post(f"/api/root/tenant/{a['name']}/credentials", headers=auth)
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.status_code == 200, r.text
    # /health's answer is shared for half a second: within a second it says so too.
    deadline = time.monotonic() + 2
    while not (back := hosts_of_health(client)["own"])["reachable"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert back["reachable"] is True, back
    d = provision(client, auth, unique("Back On Own"), key)
    assert d["host"] == "own"


def test_a_missing_database_does_not_open_the_hosts_breaker(
    monk: RunMonk, quiet: Settings, fleet: Fleet
) -> None:
    """The server answered (FATAL: database does not exist): it is up. The error is
    DATABASE_NOT_FOUND, not a retry, and the host's other tenants connect at once."""
    add_host(monk, "pg-2", fleet.second)
    key = build(monk)
    assert quiet.database_url is not None
    local = ServerTarget.from_url(quiet.database_url.get_secret_value(), name="localhost")
    with TenantService(quiet, local) as svc:
        gone = svc.provision(unique("Gone"), template=key, host="pg-2").tenant
        kept = svc.provision(unique("Kept"), template=key, host="pg-2").tenant
        with fleet.second.connect() as conn:
            conn.execute(f'DROP DATABASE "{gone.database}" WITH (FORCE)')
        budget = svc.hosts.budget("pg-2")
        target = svc.hosts.target("pg-2")
        for _ in range(3):
            with (
                pytest.raises(DatabaseMissing, match="does not exist"),
                budget.connection(gone.database),
            ):
                pass
        assert breaker(target.conninfo).refusal(probe=False) is None
        started = time.monotonic()
        with budget.connection(kept.database) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert time.monotonic() - started < 1.0
