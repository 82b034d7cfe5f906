"""Warm spares on every host (issue 13, item 3) and monk's functions installed on each host,
against real servers: the session's own (the local host) and the fleet's second
(``fleet.second``, shared by the session: every name here is this test's own)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from monk.adapters.postgres import admin
from monk.adapters.postgres.connection import ServerTarget
from monk.adapters.registry import host_functions
from monk.errors import MonkError
from monk.service import pool, role_pool
from monk.service import templates as template_service
from monk.service.tenants import TenantService
from monk.settings import Settings
from tests.conftest import MONK_BIN, RunMonk, settings_env
from tests.fleet import Fleet, FleetServer

BASIC = str(template_service.builtin_source_dir("basic"))


def unique(prefix: str) -> str:
    return f"{prefix} {uuid.uuid4().hex[:8]}"


def local_target(s: Settings) -> ServerTarget:
    assert s.database_url is not None
    return ServerTarget.from_url(s.database_url.get_secret_value(), name="localhost")


@pytest.fixture
def key(monk: RunMonk, fleet: Fleet) -> str:
    done = monk("host", "add", "pg-2", "--url", fleet.second.url, "--no-templates")
    assert done.returncode == 0, done.stderr
    k = f"hs_{uuid.uuid4().hex[:8]}"
    done = monk("template", "build", k, "--source", BASIC)  # on every host
    assert done.returncode == 0, done.stderr
    return k


@pytest.fixture
def warm(settings: Settings, key: str) -> Settings:
    return settings.model_copy(update={"pool_spares": {key: 2}, "pool_roles": 0})


@pytest.fixture
def svc(warm: Settings) -> Iterator[TenantService]:
    with TenantService(warm, local_target(warm)) as service:
        yield service
        # The session's installation is shared: its spares go with the test (other tests
        # count the spares on the server).
        for host in (None, "pg-2"):
            for k in warm.pool_spares:
                with contextlib.suppress(MonkError):
                    pool.drain(service, key=k, host=host)


def spares_by_host(s: Settings) -> dict[str, int]:
    with psycopg.connect(local_target(s).conninfo, dbname=s.system_db_name, autocommit=True) as reg:
        rows = reg.execute(
            "SELECT host, count(*) FROM spares WHERE status = 'ready' GROUP BY host"
        ).fetchall()
    return {str(h): int(str(n)) for h, n in rows}


def spare_databases(fs: FleetServer, s: Settings) -> set[str]:
    """The spare databases on ``fs`` of this test's installation (its ownership mark)."""
    with fs.connect() as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'monk\\_spare\\_%%'"
            " AND shobj_description(oid, 'pg_database') = %s",
            (f"monk:{s.system_db_name}",),
        ).fetchall()
    return {str(r[0]) for r in rows}


def test_the_refiller_keeps_spares_on_every_host_and_a_placed_provision_takes_one_there(
    monk: RunMonk, warm: Settings, svc: TenantService, key: str, fleet: Fleet
) -> None:
    second = fleet.second
    pool.refill(svc)
    assert spares_by_host(warm) == {"localhost": 2, "pg-2": 2}
    on_host = spare_databases(second, warm)
    assert len(on_host) == 2

    view = svc.provision(unique("Warm There"), template=key, host="pg-2")
    assert view.provisioned_from == "pool"
    assert view.tenant.host == "pg-2"
    assert view.port == second.port
    # The tenant's database is the spare renamed, on that host; its password works there.
    assert spare_databases(second, warm) < on_host
    assert view.credentials is not None
    with psycopg.connect(
        host="127.0.0.1",
        port=second.port,
        dbname=view.tenant.database,
        user=view.credentials.role,
        password=view.credentials.password,
    ) as conn:
        assert conn.execute("SELECT count(*) FROM users").fetchone() is not None
    assert spares_by_host(warm) == {"localhost": 2, "pg-2": 1}

    # A process that does not know the spares' passwords takes one too (with a new password).
    with TenantService(warm, local_target(warm)) as other:
        again = other.provision(unique("Warm Again"), template=key, host="pg-2")
    assert again.provisioned_from == "pool"
    assert again.credentials is not None
    with psycopg.connect(
        host="127.0.0.1",
        port=second.port,
        dbname=again.tenant.database,
        user=again.credentials.role,
        password=again.credentials.password,
    ) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert spares_by_host(warm).get("pg-2", 0) == 0
    # Placement's provision lands on pg-2 when the local host drains, and clones cold there
    # (no spare left) while the refiller tops the pool up again.
    pool.refill(svc)
    assert spares_by_host(warm) == {"localhost": 2, "pg-2": 2}

    # A draining host gets no refills, and its spares are dropped.
    assert monk("host", "drain", "pg-2").returncode == 0
    pool.refill(svc)
    assert spares_by_host(warm) == {"localhost": 2}
    assert spare_databases(second, warm) == set()


def test_remote_provisions_run_monks_functions_installed_on_the_host(
    warm: Settings, svc: TenantService, key: str, fleet: Fleet
) -> None:
    """One definition of each step: the system database's functions, copied onto the host
    (at host add, and again by a process that finds another version there)."""
    second, schema = fleet.second, warm.system_db_name
    with psycopg.connect(
        local_target(warm).conninfo, dbname=warm.system_db_name, autocommit=True
    ) as reg:
        version = host_functions.version(host_functions.definitions(reg, admin.HOST_FUNCTIONS))
    with second.connect(warm.system_db_name) as conn:
        assert admin.installed_functions(conn, schema) == version
        found = conn.execute(
            "SELECT proname FROM pg_proc WHERE pronamespace = to_regnamespace(%s)", (schema,)
        ).fetchall()
        assert {str(r[0]) for r in found} == set(admin.HOST_FUNCTIONS)
        # An older install (a version before a migration): broken on purpose.
        conn.execute(sql.SQL("DROP FUNCTION {}").format(sql.Identifier(schema, "make_tenant_role")))
        conn.execute(
            sql.SQL(
                "CREATE FUNCTION {}(text, text, text, boolean, integer) RETURNS void"
                " LANGUAGE plpgsql AS $$ BEGIN RAISE 'old make_tenant_role'; END $$"
            ).format(sql.Identifier(schema, "make_tenant_role"))
        )
        conn.execute(
            sql.SQL("COMMENT ON SCHEMA {} IS 'monk functions old'").format(sql.Identifier(schema))
        )
    # A process starting now installs the current ones before its first use of the host.
    with TenantService(warm, local_target(warm)) as fresh:
        view = fresh.provision(unique("Cold There"), template=key, host="pg-2")
    assert view.provisioned_from == "clone"
    with second.connect(warm.system_db_name) as conn:
        assert admin.installed_functions(conn, schema) == version
        row = conn.execute(
            "SELECT rolconnlimit, shobj_description(oid, 'pg_authid') FROM pg_roles"
            " WHERE rolname = %s",
            (view.tenant.role_name,),
        ).fetchone()
    assert row == (warm.tenant_connection_limit, f"monk:{warm.system_db_name}")


@pytest.mark.parametrize("step", ["claimed", "renamed"])
def test_a_remote_handout_killed_at_each_step_leaves_no_trace_and_the_name_free(
    warm: Settings, svc: TenantService, key: str, fleet: Fleet, step: str
) -> None:
    pool.refill(svc)
    name = unique("Killed")
    proc = subprocess.Popen(
        [MONK_BIN, "tenant", "create", name, "--template", key, "--host", "pg-2"],
        env=settings_env(warm) | {"MONK_FAULT_PAUSE_AT": step},
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        cwd=warm.data_dir.parent,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert f"paused at {step}" in line, line
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = spare_databases(fleet.second, warm)
    # The same name again: the crashed intent is undone whole (the claimed spare dropped, on
    # the host), then the provision goes on, warm.
    view = svc.provision(name, template=key, host="pg-2")
    assert view.tenant.host == "pg-2"
    after = spare_databases(fleet.second, warm)
    assert len(after) <= len(before) - 1  # the claimed one is gone (and maybe one handed out)
    with psycopg.connect(
        local_target(warm).conninfo, dbname=warm.system_db_name, autocommit=True
    ) as reg:
        claimed = reg.execute("SELECT count(*) FROM spares WHERE status = 'claimed'").fetchone()
        live = reg.execute(
            "SELECT count(*) FROM tenants WHERE name = %s AND deleted_at IS NULL", (name,)
        ).fetchone()
    assert claimed == (0,)
    assert live == (1,)


# ---------------------------------------------------------------- host remove


def rows_of_host(s: Settings, host: str) -> dict[str, int]:
    """Rows naming ``host`` in every registry table with a ``host`` column, but the journal
    (operations) and the tenants' history (purged tenants), which keep where things were."""
    with psycopg.connect(local_target(s).conninfo, dbname=s.system_db_name, autocommit=True) as reg:
        tables = [
            str(r[0])
            for r in reg.execute(
                "SELECT table_name FROM information_schema.columns WHERE column_name = 'host'"
                " AND table_schema = current_schema()"
                " AND table_name NOT IN ('operations', 'tenants')"
                " ORDER BY 1"
            ).fetchall()
        ]
        counts = {}
        for table in tables:
            row = reg.execute(
                sql.SQL("SELECT count(*) FROM {} WHERE host = %s").format(sql.Identifier(table)),
                (host,),
            ).fetchone()
            assert row is not None
            counts[table] = int(str(row[0]))
    return {t: n for t, n in counts.items() if n}


def databases_like(fs: FleetServer, pattern: str) -> set[str]:
    with fs.connect() as conn:
        rows = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (pattern,))
        return {str(r[0]) for r in rows.fetchall()}


def test_host_remove_forgets_every_row_of_the_host_and_drops_its_templates(
    monk: RunMonk, warm: Settings, svc: TenantService, key: str, fleet: Fleet
) -> None:
    second = fleet.second
    # A retired build beside the current one, spares and spare roles: all of it on pg-2.
    done = monk("template", "build", key, "--source", BASIC, "--force")
    assert done.returncode == 0, done.stderr
    pool.refill(svc)
    role_pool.fill(svc, 2, host="pg-2")
    before = rows_of_host(warm, "pg-2")
    assert before["template_builds"] == 2
    assert before["spares"] == 2
    assert before["spare_roles"] == 2
    assert databases_like(second, f"monk\\_%\\_{key}%") != set()

    removed = monk("host", "remove", "pg-2")
    assert removed.returncode == 0, removed.stderr
    assert rows_of_host(warm, "pg-2") == {}
    # Its template databases (current and retired) and its spares are gone from the server.
    assert databases_like(second, f"monk\\_%\\_{key}%") == set()
    assert spare_databases(second, warm) == set()
    listed = monk("template", "list", "--all", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {b["host"] for b in json.loads(listed.stdout)} == {warm.host_name}
    doctor = monk("doctor", "--json")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    found = json.loads(doctor.stdout)
    assert "pg-2" not in json.dumps(found["problems"] + found["warnings"])

    # The same server added again receives the build anew (nothing of the old one in the way).
    again = monk("host", "add", "pg-2", "--url", second.url, "--json")
    assert again.returncode == 0, again.stderr
    (received,) = json.loads(again.stdout)["templates"]
    assert (received["built"], received.get("error")) == (True, None), received
    assert monk("template", "drop", key, "--host", "pg-2", "--force").returncode == 0


@pytest.mark.slow
def test_host_remove_killed_after_its_commit_leaves_nothing_the_doctor_finds(
    monk: RunMonk, warm: Settings, key: str, fleet: Fleet
) -> None:
    proc = subprocess.Popen(
        [MONK_BIN, "host", "remove", "pg-2"],
        env=settings_env(warm) | {"MONK_FAULT_PAUSE_AT": "host-remove.committed"},
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        cwd=warm.data_dir.parent,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert "paused at host-remove.committed" in line, line
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # The registry's part is one transaction: all of it is gone.
    assert rows_of_host(warm, "pg-2") == {}
    listed = monk("host", "list", "--json")
    assert [h["name"] for h in json.loads(listed.stdout)] == [warm.host_name]
    # The next read swept the password file the killed removal did not get to.
    assert sorted((warm.data_dir / "hosts").glob("*.json")) == []
    doctor = monk("doctor", "--json")
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    found = json.loads(doctor.stdout)
    assert "pg-2" not in json.dumps(found["problems"] + found["warnings"])
    assert monk("doctor", "--repair").returncode == 0
    # What it did not get to drop on the server stays there, unregistered: the template
    # database, which an add of that server again names instead of building over it.
    assert databases_like(fleet.second, f"monk\\_template\\_{key}") == {f"monk_template_{key}"}
    again = monk("host", "add", "pg-2", "--url", fleet.second.url, "--json")
    assert again.returncode == 0, again.stderr
    (received,) = json.loads(again.stdout)["templates"]
    assert received["error"]["code"] == "DATABASE_EXISTS", received
    assert f"monk_template_{key}" in received["error"]["message"]
    with fleet.second.connect() as conn:
        admin.drop_database(conn, f"monk_template_{key}")
