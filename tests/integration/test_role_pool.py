"""Spare roles: made ahead, renamed into a cold provision's role (in its activation on one
server), never twice, crash-safe."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from monk.errors import StrayDatabase
from monk.service import pool, purge, role_pool
from monk.service.tenants import TenantService
from tests.conftest import settings_env
from tests.integration.conftest import Env, end_keyholder_sessions
from tests.integration.test_crash import run
from tests.integration.test_tenants import roles, unique


def spare_roles(env: Env) -> dict[str, set[str]]:
    """Spare roles as the registry records them and as the server has them."""
    with psycopg.connect(env.target.conninfo, dbname=env.settings.system_db_name) as conn:
        rows = {str(r[0]) for r in conn.execute("SELECT role FROM spare_roles").fetchall()}
        on_server = {
            str(r[0])
            for r in conn.execute(
                "SELECT rolname FROM pg_roles WHERE rolname LIKE 'monk\\_role\\_%'"
            ).fetchall()
        }
    return {"registry": rows, "server": on_server}


@pytest.fixture
def fresh(svc: TenantService) -> Iterator[TenantService]:
    pool.drain(svc)
    role_pool.drain(svc)
    yield svc
    role_pool.drain(svc)


def can_log_in(url: str) -> str:
    with psycopg.connect(url, connect_timeout=5) as conn:
        row = conn.execute("SELECT current_user").fetchone()
    assert row is not None
    return str(row[0])


def test_cold_provision_renames_a_spare_role(env: Env, fresh: TenantService) -> None:
    svc = fresh
    assert role_pool.fill(svc, 3) == 3
    assert role_pool.fill(svc, 3) == 0  # topped up already
    made = spare_roles(env)
    assert made["registry"] == made["server"]
    assert len(made["registry"]) == 3

    view = svc.provision(unique("Spare role"), template=env.template)
    assert view.provisioned_from == "clone"
    role = view.tenant.role_name
    assert can_log_in(view.as_dict()["connection_url"]) == role
    left = spare_roles(env)
    assert left["registry"] == left["server"]
    assert len(left["registry"]) == 2
    assert role not in left["registry"]
    with psycopg.connect(env.target.conninfo, dbname="postgres") as conn:
        row = conn.execute(
            "SELECT r.rolcanlogin, d.datdba = r.oid, shobj_description(r.oid, 'pg_authid')"
            " FROM pg_roles r, pg_database d WHERE r.rolname = %s AND d.datname = %s",
            (role, view.tenant.database),
        ).fetchone()
    assert row == (True, True, f"monk:{env.settings.system_db_name}")

    # the rest are dropped with their rows
    assert role_pool.drop_own(svc) == 2
    assert spare_roles(env) == {"registry": set(), "server": set()}


def test_parallel_cold_provisions_never_share_a_spare_role(env: Env, fresh: TenantService) -> None:
    svc = fresh
    role_pool.fill(svc, 2)
    names = [unique("Par role") for _ in range(4)]
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        views = list(ex.map(lambda n: svc.provision(n, template=env.template), names))
    logins = {can_log_in(v.as_dict()["connection_url"]) for v in views}
    assert logins == {v.tenant.role_name for v in views}
    assert len(logins) == 4
    assert spare_roles(env) == {"registry": set(), "server": set()}
    for v in views:
        purge.request_purge(svc, v.tenant.name, archive=False, forget=True)
    purge.work_queue(svc)


def test_a_spare_role_gone_from_the_registry_is_not_used(env: Env, fresh: TenantService) -> None:
    svc = fresh
    role_pool.fill(svc, 1)
    # another server starting up drops the roles of every keyholder that is gone, and only them
    with TenantService(env.settings, env.target) as other:
        assert role_pool.drop_others(other) == 0  # svc lives: its keyholder lock is held
    assert len(spare_roles(env)["registry"]) == 1
    end_keyholder_sessions(env)
    with TenantService(env.settings, env.target) as other:
        assert role_pool.drop_others(other) == 1
    assert spare_roles(env) == {"registry": set(), "server": set()}
    view = svc.provision(unique("Gone role"), template=env.template)
    assert can_log_in(view.as_dict()["connection_url"]) == view.tenant.role_name
    # and the process forgets it when it tops up
    assert len(svc.role_secrets) == 0
    assert role_pool.fill(svc, 1) == 1


def test_a_lost_keyholder_lock_is_taken_again(env: Env, fresh: TenantService) -> None:
    """A server restart ends the keyholder's session: its next check takes the lock again, so
    its spare roles are its own again for servers starting after that."""
    role_pool.fill(fresh, 1)
    end_keyholder_sessions(env)
    fresh.hold_keyholder_lock(check=True)
    with TenantService(env.settings, env.target) as other:
        assert role_pool.drop_others(other) == 0
    assert len(spare_roles(env)["registry"]) == 1


def test_a_refused_provision_keeps_the_spare_role(env: Env, fresh: TenantService) -> None:
    svc = fresh
    name = unique("Twice")
    svc.provision(name, template=env.template)
    role_pool.fill(svc, 1)
    with pytest.raises(Exception, match="already exists"):
        svc.provision(name, template=env.template)
    assert len(svc.role_secrets) == 1
    assert len(spare_roles(env)["server"]) == 1
    view = svc.provision(unique("Next"), template=env.template)
    assert can_log_in(view.as_dict()["connection_url"]) == view.tenant.role_name
    assert spare_roles(env) == {"registry": set(), "server": set()}


_PROVISION_WITH_A_SPARE_ROLE = textwrap.dedent(
    """
    import json, sys
    from monk.adapters.postgres.connection import ServerTarget
    from monk.service import role_pool
    from monk.service.tenants import TenantService
    from monk.settings import load_settings

    s = load_settings()
    target = ServerTarget.from_url(s.database_url.get_secret_value(), name="localhost")
    svc = TenantService(s, target)
    role_pool.fill(svc, 1)
    view = svc.provision(sys.argv[1], template=sys.argv[2])
    print(json.dumps(view.as_dict()))
    """
)


def provision_paused_at(env: Env, step: str, name: str) -> subprocess.Popen[str]:
    """A process with one spare role provisioning ``name`` with FILE_COPY (whose checkpoints
    write and fsync every page left dirty before the clone), paused at ``step``."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _PROVISION_WITH_A_SPARE_ROLE, name, env.template],
        env=os.environ
        | settings_env(env.settings)
        | {"MONK_FAULT_PAUSE_AT": step, "MONK_CLONE_STRATEGY": "file_copy"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    if f"paused at {step}" not in line:
        proc.kill()
        pytest.fail(line + proc.stderr.read())
    return proc


def dead_spare_roles(env: Env) -> list[str]:
    done = run(env, "doctor", "--json")
    problems = json.loads(done.stdout)["problems"]
    return [p["subject"] for p in problems if p["kind"] == "dead_spare_role"]


@pytest.mark.slow
@pytest.mark.parametrize("step", ["intent", "cloned", "configured"])
def test_kill_before_the_activation_commits_leaves_the_spare_role_a_spare_then_doctor(
    env: Env, fresh: TenantService, step: str
) -> None:
    """On one server the spare role is claimed and renamed in the activation's transaction,
    not by the reservation: up to the activation's commit (``configured``: sent, not committed)
    it is still a spare, under its name, with its row, and the tenant's role does not exist,
    so a FILE_COPY clone's checkpoint had nothing of the claim to write. Killed there: the
    doctor undoes the intent and drops the dead process's spare role, role then row."""
    name = unique("Crash role")
    before = roles(env)
    proc = provision_paused_at(env, step, name)
    try:
        paused = spare_roles(env)
        assert len(paused["registry"]) == 1, paused
        assert paused["server"] == paused["registry"]
        assert roles(env) == before  # the tenant's role: not there yet
    finally:
        proc.kill()
        proc.wait()
    (spare,) = paused["registry"]
    assert spare_roles(env) == paused  # the kill rolled nothing forward

    # The killed process's keyholder session ends with its connection, just after the kill.
    deadline = time.monotonic() + 60
    while dead_spare_roles(env) != [spare]:
        assert time.monotonic() < deadline, "the doctor never reported the dead spare role"
        time.sleep(0.2)
    fixed = run(env, "doctor", "--repair", "--json")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert json.loads(fixed.stdout)["remaining"] == []
    assert roles(env) == before
    assert spare_roles(env) == {"registry": set(), "server": set()}
    again = run(env, "tenant", "create", name, "--template", env.template, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["status"] == "active"


@pytest.mark.slow
def test_a_spare_role_drained_before_the_activation_gives_way_to_a_new_role(
    env: Env, fresh: TenantService
) -> None:
    """``monk pool drain`` drops every unclaimed spare role, the one a provision took too
    (claimed only in its activation): the activation's claim fails, nothing of it is written,
    and the provision makes a new role and activates with it."""
    name = unique("Drained role")
    proc = provision_paused_at(env, "cloned", name)
    try:
        drained = run(env, "pool", "drain")
        assert drained.returncode == 0, drained.stderr
        assert "dropped 1 spare role(s)" in drained.stdout, drained.stdout
        proc.send_signal(signal.SIGUSR1)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    view = json.loads(out)
    assert view["status"] == "active"
    assert can_log_in(view["connection_url"]) == view["role"]
    assert spare_roles(env) == {"registry": set(), "server": set()}


def test_a_provision_that_fails_before_its_activation_keeps_the_spare_role(
    env: Env, fresh: TenantService
) -> None:
    """The spare role a failed provision took was never claimed: it is this process's spare
    again, and the next provision renames it."""
    svc = fresh
    role_pool.fill(svc, 1)
    name = unique("Stray")
    database = svc.name(name).database
    with psycopg.connect(env.target.conninfo, dbname="postgres", autocommit=True) as adm:
        adm.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    try:
        with pytest.raises(StrayDatabase):
            svc.provision(name, template=env.template)
    finally:
        with psycopg.connect(env.target.conninfo, dbname="postgres", autocommit=True) as adm:
            adm.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(database)))
    kept = spare_roles(env)
    assert len(kept["registry"]) == 1
    assert kept["server"] == kept["registry"]
    assert len(svc.role_secrets) == 1
    view = svc.provision(unique("Next"), template=env.template)
    assert can_log_in(view.as_dict()["connection_url"]) == view.tenant.role_name
    assert spare_roles(env) == {"registry": set(), "server": set()}


def test_a_restore_from_archive_renames_a_spare_role(env: Env, fresh: TenantService) -> None:
    """A restore claims the spare role its reservation took in a commit of its own."""
    svc = fresh
    name = unique("Restored role")
    svc.provision(name, template=env.template)
    purge.request_purge(svc, name, archive=True)
    purge.work_queue(svc)
    role_pool.fill(svc, 1)
    restored = svc.restore(name)
    assert restored.credentials is not None
    assert can_log_in(restored.as_dict()["connection_url"]) == restored.tenant.role_name
    assert spare_roles(env) == {"registry": set(), "server": set()}
    assert len(svc.role_secrets) == 0


def test_doctor_drops_a_spare_role_without_its_row(env: Env, fresh: TenantService) -> None:
    svc = fresh
    role_pool.fill(svc, 1)  # a spare role with its row: no problem
    stray = "monk_role_" + "ab" * 8
    with psycopg.connect(env.target.conninfo, dbname="postgres", autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {stray} NOLOGIN")
        conn.execute(f"COMMENT ON ROLE {stray} IS 'monk:{env.settings.system_db_name}'")
    found = run(env, "doctor", "--json")
    assert found.returncode == 1, found.stdout + found.stderr
    problems = json.loads(found.stdout)["problems"]
    assert [p["subject"] for p in problems if p["kind"] == "orphan_spare_role"] == [stray]

    fixed = run(env, "doctor", "--repair", "--json")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    after = spare_roles(env)
    assert stray not in after["server"]
    assert after["server"] == after["registry"]
    assert len(after["registry"]) == 1


def test_pool_cli_shows_and_drains_spare_roles(env: Env, fresh: TenantService) -> None:
    role_pool.fill(fresh, 2)
    shown = run(env, "pool", "status")
    assert shown.returncode == 0, shown.stderr
    assert "spare roles" in shown.stdout
    assert re.search(r"│ localhost +│ 2 +│", shown.stdout), shown.stdout
    drained = run(env, "pool", "drain")
    assert drained.returncode == 0, drained.stderr
    assert "dropped 2 spare role(s)" in drained.stdout
    assert spare_roles(env) == {"registry": set(), "server": set()}
