"""kill -9 of the real CLI at each step of provisioning and purge, then doctor --repair.

The process is paused at a step by the MONK_FAULT_PAUSE_AT hook, killed with SIGKILL there, and
then the registry and the server must be brought back to agreement: no orphan database or role,
no tenant stuck, and the same name can be provisioned again.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid

import psycopg
import pytest

from tests.conftest import MONK_BIN, settings_env
from tests.integration.conftest import Env
from tests.integration.test_tenants import databases, roles

pytestmark = pytest.mark.slow


def run(
    env: Env, *args: str, extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MONK_BIN, *args],
        env=settings_env(env.settings) | (extra or {}),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def kill_at(env: Env, step: str, *args: str, command: list[str] | None = None) -> None:
    """Run ``monk args`` (or ``command``) until it reports reaching ``step``, then SIGKILL it."""
    proc = subprocess.Popen(
        command or [MONK_BIN, *args],
        env=os.environ | settings_env(env.settings) | {"MONK_FAULT_PAUSE_AT": step},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert f"paused at {step}" in line, line + proc.stderr.read()
    proc.kill()
    proc.wait()


def registry_rows(env: Env, database: str) -> list[tuple[str, ...]]:
    with psycopg.connect(env.target.conninfo, dbname=env.settings.system_db_name) as conn:
        return conn.execute(
            "SELECT status, coalesce(step, '') FROM tenants"
            " WHERE database = %s AND deleted_at IS NULL",
            (database,),
        ).fetchall()


@pytest.mark.parametrize("step", ["intent", "cloned", "migrated", "role", "configured"])
def test_kill_during_provisioning_then_doctor(env: Env, step: str) -> None:
    name = f"Crash {uuid.uuid4().hex[:8]}"
    before_dbs, before_roles = databases(env), roles(env)
    kill_at(env, step, "tenant", "create", name, "--template", env.template)

    found = run(env, "doctor", "--json")
    assert found.returncode == 1, found.stdout + found.stderr
    problems = json.loads(found.stdout)["problems"]
    assert any(p["kind"] == "stuck_operation" for p in problems), problems

    fixed = run(env, "doctor", "--repair", "--json")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert json.loads(fixed.stdout)["remaining"] == []
    assert databases(env) == before_dbs
    assert roles(env) == before_roles

    again = run(env, "tenant", "create", name, "--template", env.template, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["status"] == "active"


@pytest.mark.parametrize("step", ["intent", "cloned", "role"])
def test_next_provision_of_the_name_repairs_a_crashed_one(env: Env, step: str) -> None:
    name = f"Crash {uuid.uuid4().hex[:8]}"
    kill_at(env, step, "tenant", "create", name, "--template", env.template)
    again = run(env, "tenant", "create", name, "--template", env.template, "--json")
    assert again.returncode == 0, again.stderr
    database = json.loads(again.stdout)["database"]
    assert registry_rows(env, database) == [("active", "active")]


@pytest.mark.parametrize("step", ["purge-archived", "purge-dropped"])
def test_kill_during_purge_then_doctor(env: Env, step: str) -> None:
    name = f"Purge {uuid.uuid4().hex[:8]}"
    created = run(env, "tenant", "create", name, "--template", env.template, "--json")
    assert created.returncode == 0, created.stderr
    database = json.loads(created.stdout)["database"]
    kill_at(env, step, "tenant", "delete", name, "--purge")
    assert registry_rows(env, database) == [("deleting", "queued")]

    fixed = run(env, "doctor", "--repair", "--json")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert database not in databases(env)
    assert database not in roles(env)
    assert registry_rows(env, database) == []
    again = run(env, "tenant", "create", name, "--template", env.template, "--json")
    assert again.returncode == 0, again.stderr


def test_purge_no_wait_leaves_it_queued_for_a_worker(env: Env) -> None:
    name = f"Queued {uuid.uuid4().hex[:8]}"
    created = run(env, "tenant", "create", name, "--template", env.template, "--json")
    database = json.loads(created.stdout)["database"]
    queued = run(env, "tenant", "delete", name, "--purge", "--no-archive", "--no-wait", "--json")
    assert queued.returncode == 0, queued.stderr
    assert json.loads(queued.stdout)["status"] == "deleting"
    assert database in databases(env)
    worked = run(env, "doctor", "--repair", "--json")
    assert worked.returncode == 0, worked.stdout + worked.stderr
    assert database not in databases(env)


def test_doctor_finds_and_repairs_orphans(env: Env) -> None:
    orphan = f"tenant_{uuid.uuid4().hex[:16]}"
    stray_role = f"tenant_{uuid.uuid4().hex[:16]}"
    mark = f"monk:{env.settings.system_db_name}"
    from psycopg import sql

    with psycopg.connect(env.target.conninfo, dbname="postgres", autocommit=True) as adm:
        adm.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(orphan)))
        adm.execute(
            sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                sql.Identifier(orphan), sql.Literal(mark)
            )
        )
        adm.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(stray_role)))
        adm.execute(
            sql.SQL("COMMENT ON ROLE {} IS {}").format(
                sql.Identifier(stray_role), sql.Literal(mark)
            )
        )
        # another installation's tenant database on the same server: not ours to touch
        foreign = f"tenant_{uuid.uuid4().hex[:16]}"
        adm.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(foreign)))
        adm.execute(
            sql.SQL("COMMENT ON DATABASE {} IS 'monk:someone_else'").format(sql.Identifier(foreign))
        )
    try:
        found = run(env, "doctor", "--json")
        assert found.returncode == 1
        kinds = {(p["kind"], p["subject"]) for p in json.loads(found.stdout)["problems"]}
        assert ("orphan_database", orphan) in kinds
        assert ("stray_role", stray_role) in kinds
        assert all(subject != foreign for _, subject in kinds)
        fixed = run(env, "doctor", "--repair")
        assert fixed.returncode == 0, fixed.stdout + fixed.stderr
        assert orphan not in databases(env)
        assert stray_role not in roles(env)
        assert foreign in databases(env, every=True)
    finally:
        with psycopg.connect(env.target.conninfo, dbname="postgres", autocommit=True) as adm:
            adm.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(foreign)))


def test_kill_during_restore_from_archive_then_restore_again(env: Env) -> None:
    """A restore killed after creating the database leaves the purged tenant as it was (doctor
    undoes the half-made copy), and the next restore brings back the same tenant."""
    name = f"Restore {uuid.uuid4().hex[:8]}"
    created = run(env, "tenant", "create", name, "--template", env.template, "--json")
    assert created.returncode == 0, created.stderr
    first = json.loads(created.stdout)
    assert run(env, "tenant", "delete", name, "--purge").returncode == 0
    kill_at(env, "restore-created", "tenant", "restore", name)

    fixed = run(env, "doctor", "--repair", "--json")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert first["database"] not in databases(env)
    assert registry_rows(env, first["database"]) == []

    restored = run(env, "tenant", "restore", name, "--json")
    assert restored.returncode == 0, restored.stderr
    again = json.loads(restored.stdout)
    assert (again["id"], again["created_at"]) == (first["id"], first["created_at"])
    assert registry_rows(env, first["database"]) == [("active", "active")]
