"""Warm spares on every host (issue 13, item 3) and monk's functions installed on each host,
against real servers: the session's own (the local host) and the fleet's second
(``fleet.second``, shared by the session: every name here is this test's own)."""

from __future__ import annotations

import contextlib
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
from monk.service import pool
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
