"""A cold provision on a host of the fleet commits its reservation (registry) without waiting
for the disk, and its configure (host) waiting for it (docs/architecture.md, "Commits of a
provision, and which wait for the disk"). These tests make the crashes for real (a host stopped
as ``pg_ctl stop -m immediate`` does, a provision killed -9): what the lazy reservation can
lose, the doctor finds and repairs; a host crash loses nothing of an answered provision."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from monk.adapters.embedded import SUPERUSER
from monk.adapters.postgres.connection import ServerTarget
from monk.service import templates as template_service
from monk.service.pipeline import TenantView
from monk.service.tenants import TenantService
from monk.settings import Settings
from tests.conftest import RunMonk, settings_env
from tests.fleet import FleetServer

BASIC = str(template_service.builtin_source_dir("basic"))
HOST = "pg-lazy"

# A cold provision on a host by a process with one spare role there, paused where the test says.
CLAIMER = """
import sys
from monk.adapters.embedded import SUPERUSER
from monk.adapters.postgres.connection import ServerTarget
from monk.service import role_pool
from monk.service.tenants import TenantService
from monk.settings import Settings

s = Settings()
target = ServerTarget.from_url(s.database_url.get_secret_value(), name="localhost")
with TenantService(s, target) as svc:
    role_pool.fill(svc, 1, host=sys.argv[2])
    svc.provision(sys.argv[1], template=sys.argv[3], host=sys.argv[2])
"""


def local_target(s: Settings) -> ServerTarget:
    assert s.database_url is not None
    return ServerTarget.from_url(s.database_url.get_secret_value(), name="localhost")


@pytest.fixture
def cold(settings: Settings) -> Settings:
    return settings.model_copy(update={"pool_spares": {}, "pool_roles": 0})


@pytest.fixture
def key(monk: RunMonk, fleet_server: FleetServer) -> str:
    # The test servers run with synchronous_commit off (tests/fleet.py): this host commits as
    # a production server does, so that only the commits monk makes lazily can be lost.
    with fleet_server.connect() as conn:
        conn.execute("ALTER SYSTEM SET synchronous_commit = on")
        # The WAL writer flushes a lazy commit within wal_writer_delay: long, so that a
        # crash right after the provision comes first.
        conn.execute("ALTER SYSTEM SET wal_writer_delay = '10s'")
        conn.execute("SELECT pg_reload_conf()")
    done = monk("host", "add", HOST, "--url", fleet_server.url, "--no-templates")
    assert done.returncode == 0, done.stderr
    k = f"lz_{uuid.uuid4().hex[:8]}"
    done = monk("template", "build", k, "--source", BASIC)  # on every host
    assert done.returncode == 0, done.stderr
    return k


@pytest.fixture
def svc(cold: Settings) -> Iterator[TenantService]:
    with TenantService(cold, local_target(cold)) as service:
        yield service


def crash(fs: FleetServer) -> None:
    """Stop the server as ``pg_ctl stop -m immediate`` does (SIGQUIT to the postmaster: no
    shutdown checkpoint, the WAL not yet written is lost), then start it (crash recovery)."""
    pid = fs.server.status().pid
    assert pid is not None
    os.kill(pid, signal.SIGQUIT)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                break
        time.sleep(0.02)
    fs.start()


def log_in(view: TenantView) -> None:
    assert view.credentials is not None
    with psycopg.connect(
        host=view.host,
        port=view.port,
        dbname=view.tenant.database,
        user=view.credentials.role,
        password=view.credentials.password,
        connect_timeout=10,
    ) as conn:
        assert conn.execute("SELECT count(*) FROM users").fetchone() is not None


def problems(monk: RunMonk) -> list[dict[str, str]]:
    found = monk("doctor", "--json")
    listed: list[dict[str, str]] = json.loads(found.stdout)["problems"]
    return listed


def test_a_host_crash_right_after_a_provision_loses_nothing_of_it(
    monk: RunMonk, svc: TenantService, key: str, fleet_server: FleetServer
) -> None:
    """The configure on the host waits for its disk: a host crash right after the answer (its
    WAL writer asleep for 10 s) leaves the tenant's database its own, and its login works.
    Then a configure undone by hand (what a lazy one would lose: owner, mark) is what the
    doctor's ``access_drift`` finds, and ``--repair`` runs it again."""
    view = svc.provision(f"Durable {uuid.uuid4().hex[:6]}", template=key, host=HOST)
    assert view.tenant.host == HOST
    assert view.tenant.status == "active"
    crash(fleet_server)
    assert not [p for p in problems(monk) if p["subject"] == view.tenant.database]
    log_in(view)

    with fleet_server.connect() as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
                sql.Identifier(view.tenant.database), sql.Identifier(SUPERUSER)
            )
        )
        conn.execute(
            sql.SQL("COMMENT ON DATABASE {} IS NULL").format(sql.Identifier(view.tenant.database))
        )
    drift = [
        p
        for p in problems(monk)
        if p["kind"] == "access_drift" and p["subject"] == view.tenant.database
    ]
    (found,) = drift
    assert found["host"] == HOST
    assert "lacks monk's mark" in found["detail"]
    assert f"database owned by {SUPERUSER}," in found["detail"]

    repaired = monk("doctor", "--repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert view.tenant.database in repaired.stdout
    assert not [p for p in problems(monk) if p["subject"] == view.tenant.database]
    log_in(view)
    with fleet_server.connect() as conn:
        owner = conn.execute(
            "SELECT pg_get_userbyid(datdba), shobj_description(oid, 'pg_database'),"
            " (SELECT rolconnlimit FROM pg_roles WHERE rolname = %s)"
            " FROM pg_database WHERE datname = %s",
            (view.tenant.role_name, view.tenant.database),
        ).fetchone()
    assert owner == (
        view.tenant.role_name,
        svc.ownership_mark(),
        svc.settings.tenant_connection_limit,
    )


def test_a_clone_whose_reservation_a_registry_crash_lost_is_an_orphan_on_its_host(
    monk: RunMonk, cold: Settings, key: str, fleet_server: FleetServer
) -> None:
    """The reservation commits lazily: a registry crash before the activation's commit can
    lose it after the clone (and the spare role's rename) committed on the host. What is left
    there, a clone without its mark and the tenant's role, with no registry row, is the
    doctor's to drop; the spare role's row, no longer claimed, is the lost spare role's."""
    name = f"Lost {uuid.uuid4().hex[:6]}"
    proc = subprocess.Popen(
        [sys.executable, "-c", CLAIMER, name, HOST, key],
        env=settings_env(cold) | {"MONK_FAULT_PAUSE_AT": "cloned"},
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        cwd=cold.data_dir.parent,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    while line and "paused at" not in line:
        line = proc.stderr.readline()
    assert "paused at cloned" in line, line
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # What the registry's server comes back with when its crash lost the reservation's
    # commit: neither the intent, nor its journal entry, nor the spare role's claim.
    with psycopg.connect(
        local_target(cold).conninfo, dbname=cold.system_db_name, autocommit=True
    ) as reg:
        row = reg.execute(
            "SELECT id, database, role_name FROM tenants WHERE name = %s", (name,)
        ).fetchone()
        assert row is not None
        tenant_id, database, role = row[0], str(row[1]), str(row[2])
        with reg.transaction():
            reg.execute(
                "UPDATE spare_roles SET tenant_id = NULL WHERE tenant_id = %s", (tenant_id,)
            )
            reg.execute("DELETE FROM operations WHERE database = %s", (database,))
            reg.execute("DELETE FROM tenants WHERE id = %s", (tenant_id,))
    with fleet_server.connect() as conn:
        there = conn.execute(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s",
            (database,),
        ).fetchall()
        assert there == [(None,)]  # the clone, unmarked

    found = {(p["kind"], p["subject"], p["host"]) for p in problems(monk)}
    assert ("orphan_database", database, HOST) in found
    assert ("stray_role", role, HOST) in found
    assert any(kind == "lost_spare_role" and host == HOST for kind, _, host in found), found
    repaired = monk("doctor", "--repair")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert problems(monk) == []
    with fleet_server.connect() as conn:
        assert (
            conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
            is None
        )
        assert conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is None
    # The name is free: a provision there succeeds.
    with TenantService(cold, local_target(cold)) as svc:
        view = svc.provision(name, template=key, host=HOST)
        log_in(view)
