"""Spare roles: made ahead, renamed into a cold provision's role, never twice, crash-safe."""

from __future__ import annotations

import concurrent.futures
import json
import re
import sys
import textwrap
from collections.abc import Iterator

import psycopg
import pytest

from monk.service import pool, purge, role_pool
from monk.service.tenants import TenantService
from tests.integration.conftest import Env, end_keyholder_sessions
from tests.integration.test_crash import kill_at, run
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
    import sys
    from monk.adapters.postgres.connection import ServerTarget
    from monk.service import role_pool
    from monk.service.tenants import TenantService
    from monk.settings import load_settings

    s = load_settings()
    target = ServerTarget.from_url(s.database_url.get_secret_value(), name="localhost")
    svc = TenantService(s, target)
    role_pool.fill(svc, 1)
    svc.provision(sys.argv[1], template=sys.argv[2])
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("step", ["intent", "cloned", "configured"])
def test_kill_after_claiming_a_spare_role_then_doctor(
    env: Env, fresh: TenantService, step: str
) -> None:
    """A process that renamed a spare role into the tenant's, killed: the doctor undoes the
    provision, role included, and leaves no spare role without its row (nor a row without its
    role)."""
    name = unique("Crash role")
    before = roles(env)
    kill_at(
        env, step, command=[sys.executable, "-c", _PROVISION_WITH_A_SPARE_ROLE, name, env.template]
    )
    assert spare_roles(env) == {"registry": set(), "server": set()}  # claimed: now the tenant's
    assert len(roles(env) - before) == 1

    fixed = run(env, "doctor", "--repair", "--json")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert json.loads(fixed.stdout)["remaining"] == []
    assert roles(env) == before
    again = run(env, "tenant", "create", name, "--template", env.template, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["status"] == "active"


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
