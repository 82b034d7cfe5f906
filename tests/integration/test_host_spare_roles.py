"""Spare roles on every host (issue 13, item 3), against real servers: the session's own (the
local host), the fleet's second (``fleet.second``, shared by the session: every name here is
this test's own) and, for a host that goes down, a server of the test alone."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from monk.adapters.postgres.connection import ServerTarget
from monk.errors import MonkError
from monk.service import pool, role_pool
from monk.service import templates as template_service
from monk.service.pipeline import TenantView
from monk.service.tenants import TenantService
from monk.settings import Settings
from tests.conftest import MONK_BIN, RunMonk, free_port, settings_env
from tests.fleet import Fleet, FleetServer, own_fleet_server

BASIC = str(template_service.builtin_source_dir("basic"))
LOCAL = "localhost"

# A process with spare roles on a host (only the process that set a spare role's password
# claims it: the CLI has none), then a cold provision there, paused where the test says.
CLAIMER = """
import sys
from monk.adapters.postgres.connection import ServerTarget
from monk.service import pool, role_pool
from monk.service.tenants import TenantService
from monk.settings import Settings

s = Settings()
target = ServerTarget.from_url(s.database_url.get_secret_value(), name="localhost")
with TenantService(s, target) as svc:
    role_pool.fill(svc, int(sys.argv[3]), host=sys.argv[2])
    view = svc.provision(sys.argv[1], template=sys.argv[4], host=sys.argv[2])
    print(view.provisioned_from, flush=True)
"""


def unique(prefix: str) -> str:
    return f"{prefix} {uuid.uuid4().hex[:8]}"


def local_target(s: Settings) -> ServerTarget:
    assert s.database_url is not None
    return ServerTarget.from_url(s.database_url.get_secret_value(), name=LOCAL)


@pytest.fixture
def key(monk: RunMonk, fleet: Fleet) -> str:
    done = monk("host", "add", "pg-2", "--url", fleet.second.url, "--no-templates")
    assert done.returncode == 0, done.stderr
    k = f"hr_{uuid.uuid4().hex[:8]}"
    done = monk("template", "build", k, "--source", BASIC)  # on every host
    assert done.returncode == 0, done.stderr
    return k


@pytest.fixture
def cold(settings: Settings) -> Settings:
    return settings.model_copy(update={"pool_spares": {}, "pool_roles": 2})


@pytest.fixture
def svc(cold: Settings) -> Iterator[TenantService]:
    with TenantService(cold, local_target(cold)) as service:
        yield service
        # The fleet's servers are shared by the session: this test's roles go with it.
        with contextlib.suppress(MonkError):
            role_pool.drain_all(service)


def registry(s: Settings) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(local_target(s).conninfo, dbname=s.system_db_name, autocommit=True)


def rows_by_host(s: Settings) -> dict[str | None, int]:
    """Unclaimed spare role rows per host (None: the local one)."""
    with registry(s) as reg:
        found = reg.execute(
            "SELECT host, count(*) FROM spare_roles WHERE tenant_id IS NULL GROUP BY host"
        ).fetchall()
    return {None if h is None else str(h): int(str(n)) for h, n in found}


def spare_roles_on(fs: FleetServer, s: Settings) -> set[str]:
    """The spare roles on ``fs`` of this test's installation (its ownership mark)."""
    with fs.connect() as conn:
        found = conn.execute(
            "SELECT rolname FROM pg_roles WHERE rolname LIKE 'monk\\_role\\_%%'"
            " AND shobj_description(oid, 'pg_authid') = %s",
            (f"monk:{s.system_db_name}",),
        ).fetchall()
    return {str(r[0]) for r in found}


def role_exists(fs: FleetServer, role: str) -> bool:
    with fs.connect() as conn:
        return (
            conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
            is not None
        )


def log_in(view: TenantView) -> None:
    """The tenant's credentials open its database, on its host."""
    assert view.credentials is not None
    with psycopg.connect(
        host=view.host,
        port=view.port,
        dbname=view.tenant.database,
        user=view.credentials.role,
        password=view.credentials.password,
    ) as conn:
        assert conn.execute("SELECT count(*) FROM users").fetchone() is not None


def test_a_cold_provision_takes_a_spare_role_of_its_own_host(
    cold: Settings, svc: TenantService, key: str, fleet: Fleet
) -> None:
    second = fleet.second
    role_pool.refill(svc, 2)
    assert rows_by_host(cold) == {None: 2, "pg-2": 2}
    on_host = spare_roles_on(second, cold)
    assert len(on_host) == 2
    assert svc.role_secrets.count("pg-2") == 2

    there = svc.provision(unique("Cold There"), template=key, host="pg-2")
    assert there.provisioned_from == "clone"
    assert there.tenant.host == "pg-2"
    # One of pg-2's spare roles became the tenant's role there (renamed: gone as a spare); the
    # local ones are untouched, and its row went with the activation.
    assert len(spare_roles_on(second, cold)) == 1
    assert svc.role_secrets.count("pg-2") == 1
    assert rows_by_host(cold) == {None: 2, "pg-2": 1}
    with registry(cold) as reg:
        assert reg.execute("SELECT count(*) FROM spare_roles").fetchone() == (3,)
    log_in(there)
    with second.connect() as conn:
        row = conn.execute(
            "SELECT rolconnlimit, rolcanlogin FROM pg_roles WHERE rolname = %s",
            (there.tenant.role_name,),
        ).fetchone()
    assert row == (cold.tenant_connection_limit, True)

    here = svc.provision(unique("Cold Here"), template=key, host=LOCAL)
    assert here.provisioned_from == "clone"
    assert here.tenant.host == LOCAL
    assert rows_by_host(cold) == {None: 1, "pg-2": 1}
    assert svc.role_secrets.count(LOCAL) == 1
    log_in(here)

    # The refiller tops each host up again.
    role_pool.refill(svc, 2)
    assert rows_by_host(cold) == {None: 2, "pg-2": 2}


def test_a_draining_host_loses_its_spare_roles_and_stop_drops_them_everywhere(
    monk: RunMonk, cold: Settings, svc: TenantService, key: str, fleet: Fleet
) -> None:
    role_pool.refill(svc, 2)
    assert len(spare_roles_on(fleet.second, cold)) == 2
    assert monk("host", "drain", "pg-2", "--no-move").returncode == 0
    role_pool.refill(svc, 2)
    assert rows_by_host(cold) == {None: 2}
    assert spare_roles_on(fleet.second, cold) == set()
    assert monk("host", "undrain", "pg-2").returncode == 0
    role_pool.refill(svc, 2)
    assert rows_by_host(cold) == {None: 2, "pg-2": 2}
    shown = monk("pool", "status", "--json")
    ready = {r["host"]: r["ready"] for r in json.loads(shown.stdout)["spare_roles"]}
    assert ready == {LOCAL: 2, "pg-2": 2}, shown.stdout
    # A server's stop (drop_own) reaches every host.
    assert role_pool.drop_own(svc) == 4
    assert rows_by_host(cold) == {}
    assert len(svc.role_secrets) == 0
    assert spare_roles_on(fleet.second, cold) == set()


def test_a_host_that_is_down_does_not_keep_the_others_from_their_spare_roles(
    monk: RunMonk, cold: Settings, svc: TenantService, key: str, fleet: Fleet, tmp_path: Path
) -> None:
    with own_fleet_server(tmp_path / "pg-1") as down:
        # Named to come before pg-2: the pass reaches it first.
        done = monk("host", "add", "pg-1", "--url", down.url, "--no-templates")
        assert done.returncode == 0, done.stderr
        role_pool.refill(svc, 2)
        assert rows_by_host(cold) == {None: 2, "pg-1": 2, "pg-2": 2}
        # The local host's and pg-2's spare roles used up, pg-1's forgotten by this process
        # (as if claimed): the next pass has to make some on each, and pg-1 is down.
        role_pool.drain(svc)
        role_pool.drain(svc, host="pg-2")
        svc.role_secrets.keep_only(set(), "pg-1")
        down.stop()
        with pytest.raises(MonkError) as failed:
            role_pool.refill(svc, 2)
        assert failed.value.code == "HOST_UNAVAILABLE"
        assert "pg-1" in failed.value.message
        # The others were filled; pg-1 kept its rows (no new one: the failed make removed it).
        assert rows_by_host(cold) == {None: 2, "pg-1": 2, "pg-2": 2}
        # Its breaker open, the next pass leaves it out without an error.
        role_pool.refill(svc, 2)
        down.start()
        # Back: once its breaker's probe connects, its spare roles are reached again.
        deadline = time.monotonic() + 10
        while True:
            try:
                assert role_pool.drain(svc, host="pg-1") == 2
                break
            except MonkError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert rows_by_host(cold) == {None: 2, "pg-2": 2}


def claim_and_kill(cold: Settings, name: str, key: str, step: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", CLAIMER, name, "pg-2", "1", key],
        env=settings_env(cold) | {"MONK_FAULT_PAUSE_AT": step},
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        cwd=cold.data_dir.parent,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    while line and "paused at" not in line:
        line = proc.stderr.readline()
    assert f"paused at {step}" in line, line
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("step", ["intent", "role-renamed"])
def test_a_remote_claim_killed_at_each_step_then_doctor_repair_leaves_no_trace(
    monk: RunMonk, cold: Settings, svc: TenantService, key: str, fleet: Fleet, step: str
) -> None:
    second = fleet.second
    name = unique("Killed")
    claim_and_kill(cold, name, key, step)
    with registry(cold) as reg:
        claimed = reg.execute(
            "SELECT s.role, t.role_name FROM spare_roles s JOIN tenants t ON t.id = s.tenant_id"
            " WHERE t.name = %s",
            (name,),
        ).fetchone()
    assert claimed is not None  # the reservation committed the claim
    spare, tenant_role = str(claimed[0]), str(claimed[1])
    # Before the rename the role is still the spare; after it, the tenant's.
    assert role_exists(second, spare) == (step == "intent")
    assert role_exists(second, tenant_role) == (step == "role-renamed")

    found = monk("doctor", "--json")
    problems = json.loads(found.stdout)["problems"]
    assert any(p["host"] == "pg-2" for p in problems), problems
    repaired = monk("doctor", "--repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert not role_exists(second, spare)
    assert not role_exists(second, tenant_role)
    with registry(cold) as reg:
        assert reg.execute("SELECT count(*) FROM spare_roles").fetchone() == (0,)
        live = reg.execute(
            "SELECT count(*) FROM tenants WHERE name = %s AND deleted_at IS NULL", (name,)
        ).fetchone()
    assert live == (0,)
    assert spare_roles_on(second, cold) == set()
    # The name is free: it provisions there again.
    again = svc.provision(name, template=key, host="pg-2")
    assert again.tenant.host == "pg-2"
    log_in(again)


def test_a_spare_role_made_on_a_host_killed_before_its_role_leaves_a_row_the_doctor_removes(
    monk: RunMonk, cold: Settings, svc: TenantService, key: str, fleet: Fleet
) -> None:
    claim_and_kill(cold, unique("Never"), key, "spare-role-row")
    assert rows_by_host(cold) == {"pg-2": 1}  # the row committed first ...
    assert spare_roles_on(fleet.second, cold) == set()  # ... and no role nobody knows
    found = monk("doctor", "--json")
    problems = json.loads(found.stdout)["problems"]
    assert [(p["kind"], p["host"]) for p in problems if "spare_role" in p["kind"]] == [
        ("lost_spare_role", "pg-2")
    ]
    repaired = monk("doctor", "--repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert rows_by_host(cold) == {}


def test_the_doctor_drops_a_spare_role_on_a_host_that_no_row_names(
    monk: RunMonk, cold: Settings, svc: TenantService, key: str, fleet: Fleet
) -> None:
    role_pool.fill(svc, 1, host="pg-2")
    (role,) = spare_roles_on(fleet.second, cold)
    with registry(cold) as reg:
        reg.execute("DELETE FROM spare_roles WHERE role = %s", (role,))
    problems = json.loads(monk("doctor", "--json").stdout)["problems"]
    assert [(p["kind"], p["subject"], p["host"]) for p in problems if "spare" in p["kind"]] == [
        ("orphan_spare_role", role, "pg-2")
    ]
    assert monk("doctor", "--repair").returncode == 0
    assert not role_exists(fleet.second, role)


def test_a_warm_handout_on_a_host_leaves_its_spare_roles_alone(
    cold: Settings, key: str, fleet: Fleet
) -> None:
    """A spare brings its own role: the handout claims no spare role of the host."""
    warm = cold.model_copy(update={"pool_spares": {key: 1}})
    with TenantService(warm, local_target(warm)) as service:
        try:
            role_pool.fill(service, 2, host="pg-2")
            pool.fill(service, key, 1, host="pg-2")
            view = service.provision(unique("Warm There"), template=key, host="pg-2")
            assert view.provisioned_from == "pool"
            log_in(view)
            assert rows_by_host(warm) == {"pg-2": 2}
            assert service.role_secrets.count("pg-2") == 2
            with registry(warm) as reg:
                assert reg.execute(
                    "SELECT count(*) FROM spare_roles WHERE tenant_id IS NOT NULL"
                ).fetchone() == (0,)
        finally:
            with contextlib.suppress(MonkError):
                role_pool.drain_all(service)
            with contextlib.suppress(MonkError):
                pool.drain(service, key=key, host="pg-2")


def test_a_restore_onto_a_host_takes_a_spare_role_there_and_leaves_no_claim(
    monk: RunMonk, cold: Settings, svc: TenantService, key: str, fleet: Fleet
) -> None:
    name = unique("Restored")
    made = monk("tenant", "create", name, "--template", key, "--host", "pg-2")
    assert made.returncode == 0, made.stderr
    purged = monk("tenant", "delete", name, "--purge")
    assert purged.returncode == 0, purged.stdout + purged.stderr
    role_pool.fill(svc, 2, host="pg-2")
    back = svc.restore(name, host="pg-2")
    assert back.tenant.host == "pg-2"
    assert rows_by_host(cold) == {"pg-2": 1}  # one was renamed into the restored role
    assert len(spare_roles_on(fleet.second, cold)) == 1
    with registry(cold) as reg:
        claims = reg.execute("SELECT count(*) FROM spare_roles WHERE tenant_id IS NOT NULL")
        assert claims.fetchone() == (0,)  # the claim went with the intent row
    assert back.credentials is not None
    with psycopg.connect(
        host=back.host,
        port=back.port,
        dbname=back.tenant.database,
        user=back.credentials.role,
        password=back.credentials.password,
    ) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_start_drops_the_spare_roles_a_gone_process_left_on_every_host(
    cold: Settings, svc: TenantService, key: str, fleet: Fleet
) -> None:
    with TenantService(cold, local_target(cold)) as gone:
        role_pool.fill(gone, 2)
        role_pool.fill(gone, 2, host="pg-2")
    role_pool.fill(svc, 1, host="pg-2")  # a live keyholder's: kept
    assert rows_by_host(cold) == {None: 2, "pg-2": 3}
    assert role_pool.drop_others(svc) == 4
    assert rows_by_host(cold) == {"pg-2": 1}
    assert len(spare_roles_on(fleet.second, cold)) == 1


def test_pool_status_and_the_console_show_spare_roles_per_host(
    monk: RunMonk, cold: Settings, svc: TenantService, key: str, fleet: Fleet
) -> None:
    from argon2 import PasswordHasher
    from fastapi.testclient import TestClient

    from monk.api.app import create_app
    from monk.api.auth import issue_root_token

    role_pool.fill(svc, 2)
    role_pool.fill(svc, 1, host="pg-2")
    assert rows_by_host(cold) == {None: 2, "pg-2": 1}
    roles = {"MONK_POOL_ROLES": "2"}

    shown = monk("pool", "status", "--json", env=roles)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["spare_roles"] == [
        {"host": LOCAL, "ready": 2, "target": 2},
        {"host": "pg-2", "ready": 1, "target": 2},
    ]
    table = monk("pool", "status", env=roles | {"COLUMNS": "120"})
    assert table.returncode == 0, table.stderr
    cells = [[c.strip() for c in ln.split("│")[1:-1]] for ln in table.stdout.splitlines()]
    assert [LOCAL, "2", "2"] in cells, table.stdout
    assert ["pg-2", "1", "2"] in cells, table.stdout

    # A draining host takes no new tenants: its target is 0, its spare roles still counted.
    assert monk("host", "drain", "pg-2", "--no-move").returncode == 0
    shown = monk("pool", "status", "--json", env=roles)
    assert json.loads(shown.stdout)["spare_roles"][1] == {"host": "pg-2", "ready": 1, "target": 0}
    assert monk("host", "undrain", "pg-2").returncode == 0

    # The console's pool panel, through the real app: a row per host. (No spare roles of its
    # own: MONK_POOL_ROLES 0, so the counts stay this test's.)
    hashed = PasswordHasher().hash("pw")
    app_settings = cold.model_copy(update={"pool_roles": 0, "console_users": {"op": hashed}})
    with TestClient(create_app(app_settings), follow_redirects=False) as client:
        signed = client.post("/console/login", data={"token": issue_root_token(app_settings)})
        assert signed.status_code == 303, signed.text
        panel = client.get("/console/fragment/overview")
        assert panel.status_code == 200, panel.text
    found = {
        host: int(n)
        for host, n in re.findall(r'<td class="num" data-host="([^"]+)">(\d+)</td>', panel.text)
    }
    assert found == {LOCAL: 2, "pg-2": 1}, panel.text


def spare_role_gauges(text: str) -> dict[str, float]:
    """monk_pool_spare_roles{host=…,status="ready"} of a /metrics answer, by host."""
    found = re.findall(
        r'^monk_pool_spare_roles\{host="([^"]+)",status="ready"\} (\S+)$', text, re.MULTILINE
    )
    return {host: float(n) for host, n in found}


def test_metrics_count_the_spare_roles_per_host_and_a_cold_provision_takes_one(
    cold: Settings, svc: TenantService, key: str, fleet: Fleet
) -> None:
    from fastapi.testclient import TestClient

    from monk.api.app import create_app

    role_pool.fill(svc, 2)
    role_pool.fill(svc, 2, host="pg-2")
    real = {LOCAL: len(local_spare_roles(cold)), "pg-2": len(spare_roles_on(fleet.second, cold))}
    assert real == {LOCAL: 2, "pg-2": 2}
    # The app makes no spare roles of its own (MONK_POOL_ROLES 0): the counts stay this test's.
    with TestClient(create_app(cold.model_copy(update={"pool_roles": 0}))) as client:
        metrics = client.get("/metrics")
        assert metrics.status_code == 200, metrics.text
        assert "# TYPE monk_pool_spare_roles gauge" in metrics.text
        assert spare_role_gauges(metrics.text) == {LOCAL: 2.0, "pg-2": 2.0}, metrics.text

        # A cold provision on pg-2 takes one of that host's spare roles.
        view = svc.provision(unique("Gauge"), template=key, host="pg-2")
        assert (view.provisioned_from, view.tenant.host) == ("clone", "pg-2")
        assert len(spare_roles_on(fleet.second, cold)) == 1
        deadline = time.monotonic() + 10  # /metrics reads the registry at most once a second
        while True:
            gauges = spare_role_gauges(client.get("/metrics").text)
            if gauges.get("pg-2") != 2.0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert gauges == {LOCAL: 2.0, "pg-2": 1.0}
    log_in(view)


def rows_by_keyholder(s: Settings) -> dict[str, set[tuple[str | None, str]]]:
    """Unclaimed spare role rows, (host, role), by keyholder."""
    with registry(s) as reg:
        found = reg.execute(
            "SELECT keyholder, host, role FROM spare_roles WHERE tenant_id IS NULL"
        ).fetchall()
    out: dict[str, set[tuple[str | None, str]]] = {}
    for k, h, r in found:
        out.setdefault(str(k), set()).add((None if h is None else str(h), str(r)))
    return out


def local_spare_roles(s: Settings) -> set[str]:
    with registry(s) as reg:
        found = reg.execute(
            "SELECT rolname FROM pg_roles WHERE rolname LIKE 'monk\\_role\\_%%'"
            " AND shobj_description(oid, 'pg_authid') = %s",
            (f"monk:{s.system_db_name}",),
        ).fetchall()
    return {str(r[0]) for r in found}


def wait_for(what: str, check: Callable[[], bool], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        time.sleep(0.2)


@pytest.mark.slow
def test_doctor_drops_a_killed_serves_spare_roles_on_every_host_and_leaves_a_live_ones(
    monk: RunMonk, settings: Settings, cold: Settings, svc: TenantService, key: str, fleet: Fleet
) -> None:
    environ = settings_env(settings) | {"MONK_POOL_ROLES": "2", "MONK_POOL_SPARES": "{}"}

    def serve() -> subprocess.Popen[str]:
        return subprocess.Popen(
            [MONK_BIN, "serve", "--port", str(free_port()), "--templates", ""],
            env=environ,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
        )

    def two_on_each_host(keyholder: str) -> bool:
        rows = rows_by_keyholder(cold).get(keyholder, set())
        made = {r for h, r in rows if h is None} & local_spare_roles(cold)
        made |= {r for h, r in rows if h == "pg-2"} & spare_roles_on(fleet.second, cold)
        return len(made) == 4 == len(rows)

    procs: list[subprocess.Popen[str]] = []
    try:
        procs.append(serve())
        wait_for("the live serve's spare roles", lambda: len(rows_by_keyholder(cold)) == 1)
        (live_id,) = rows_by_keyholder(cold)
        wait_for("2 on each host", lambda: two_on_each_host(live_id))
        live = rows_by_keyholder(cold)[live_id]

        dying = serve()
        procs.append(dying)
        wait_for("a second keyholder", lambda: len(rows_by_keyholder(cold)) == 2)
        (dead_id,) = set(rows_by_keyholder(cold)) - {live_id}
        wait_for("2 on each host", lambda: two_on_each_host(dead_id))
        dead = rows_by_keyholder(cold)[dead_id]
        dying.kill()  # -9: its keyholder lock goes with its session, its passwords with it
        dying.wait(timeout=30)

        def reported() -> list[tuple[str, str | None]]:
            done = monk("doctor", "--json")
            problems = json.loads(done.stdout)["problems"]
            return sorted(
                (p["subject"], p["host"]) for p in problems if p["kind"] == "dead_spare_role"
            )

        expected = sorted((r, LOCAL if h is None else h) for h, r in dead)
        wait_for("doctor reports the dead serve's spare roles", lambda: reported() == expected)
        found = monk("doctor", "--json")
        assert found.returncode == 1, found.stdout + found.stderr
        kinds = {p["kind"] for p in json.loads(found.stdout)["problems"]}
        assert kinds == {"dead_spare_role"}, found.stdout

        repaired = monk("doctor", "--repair", "--json")
        assert repaired.returncode == 0, repaired.stdout + repaired.stderr
        assert json.loads(repaired.stdout)["remaining"] == []
        # Nothing of the dead serve on any host, row or role; the live one's untouched.
        assert rows_by_keyholder(cold) == {live_id: live}
        dead_roles = {r for _, r in dead}
        assert not dead_roles & local_spare_roles(cold)
        assert not dead_roles & spare_roles_on(fleet.second, cold)
        assert two_on_each_host(live_id)
        assert monk("doctor").returncode == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
