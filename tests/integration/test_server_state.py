"""The server's real state against the registry: drift made for real, found, repaired.

Each test makes the state with SQL as the tenant or as the admin, or by interrupting a real
DROP DATABASE, then runs the real ``monk doctor`` (exit 1 naming it), ``--repair``, and doctor
again (exit 0).
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import sql

from monk.service import purge
from monk.service.health import tenant_health
from monk.service.tenants import TenantService
from tests.conftest import MONK_BIN, free_port, settings_env
from tests.integration import template_support
from tests.integration.conftest import Env
from tests.integration.server_faults import interrupt_drop
from tests.integration.test_crash import registry_rows, run
from tests.integration.test_tenants import databases, roles


def unique(prefix: str) -> str:
    return f"{prefix} {uuid.uuid4().hex[:8]}"


def admin_exec(env: Env, statement: sql.Composable, dbname: str = "postgres") -> None:
    with psycopg.connect(env.target.conninfo, dbname=dbname, autocommit=True) as conn:
        conn.execute(statement)


def doctor(env: Env, *args: str) -> tuple[int, dict[str, Any]]:
    done = run(env, "doctor", "--json", *args)
    assert done.returncode in (0, 1), done.stdout + done.stderr
    return done.returncode, json.loads(done.stdout)


def problems_of(report: dict[str, Any], subject: str) -> list[dict[str, str]]:
    return [p for p in report["problems"] if p["subject"] == subject]


def can_connect(url: str, dbname: str | None = None) -> bool:
    try:
        kw = {"dbname": dbname} if dbname else {}
        with psycopg.connect(url, connect_timeout=5, **kw):  # type: ignore[arg-type]
            return True
    except psycopg.OperationalError:
        return False


def repaired_clean(env: Env) -> None:
    fixed = run(env, "doctor", "--repair", "--json")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert json.loads(fixed.stdout)["remaining"] == []
    again = run(env, "doctor", "--json")
    assert again.returncode == 0, again.stdout + again.stderr


# ------------------------------------------------------------------ item 3: ACL drift


def test_tenant_opening_its_database_to_public_is_found_and_repaired(
    env: Env, svc: TenantService
) -> None:
    a = svc.provision(unique("Open"), template=env.template).as_dict()
    b = svc.provision(unique("Other"), template=env.template).as_dict()
    assert not can_connect(b["connection_url"], a["database"])
    # The tenant, as the owner of its database, opens it to everyone.
    with psycopg.connect(a["connection_url"], autocommit=True) as conn:
        conn.execute(
            sql.SQL("GRANT CONNECT ON DATABASE {} TO PUBLIC").format(sql.Identifier(a["database"]))
        )
    assert can_connect(b["connection_url"], a["database"])  # another tenant gets in

    code, report = doctor(env)
    assert code == 1
    [found] = problems_of(report, a["database"])
    assert found["kind"] == "access_drift"
    assert "PUBLIC CONNECT" in found["detail"], found
    health = tenant_health(svc, a["name"])
    assert health["status"] == "error"
    assert any(c["check"] == "access as monk set it" and not c["ok"] for c in health["checks"])

    repaired_clean(env)
    assert not can_connect(b["connection_url"], a["database"])
    assert can_connect(a["connection_url"])
    assert tenant_health(svc, a["name"])["status"] == "healthy"


def test_owner_and_grant_to_another_role_are_drift(env: Env, svc: TenantService) -> None:
    a = svc.provision(unique("Owner"), template=env.template).as_dict()
    b = svc.provision(unique("Grantee"), template=env.template).as_dict()
    admin_exec(
        env,
        sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
            sql.Identifier(a["database"]), sql.Identifier(b["role"])
        ),
    )
    code, report = doctor(env)
    assert code == 1
    [found] = problems_of(report, a["database"])
    assert f"{b['role']} CONNECT" in found["detail"], found
    repaired_clean(env)
    assert not can_connect(b["connection_url"], a["database"])


def test_database_setting_changed_by_the_tenant_is_drift(env: Env, svc: TenantService) -> None:
    from psycopg.types.json import Jsonb

    from monk.service import templates as template_service

    build = template_support.build(
        env.target,
        env.settings,
        f"tb_drift_{uuid.uuid4().hex[:6]}",
        source_dir=template_service.builtin_source_dir("empty"),
    )
    with psycopg.connect(
        env.target.conninfo, dbname=env.settings.system_db_name, autocommit=True
    ) as conn:
        conn.execute(
            "UPDATE template_builds SET database_settings = %s WHERE id = %s",
            (Jsonb({"work_mem": "8MB"}), build.id),
        )
    t = svc.provision(unique("Settings"), template=build.key).as_dict()
    assert tenant_health(svc, t["name"])["status"] == "healthy"
    with psycopg.connect(t["connection_url"], autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER DATABASE {} RESET work_mem").format(sql.Identifier(t["database"]))
        )
    code, report = doctor(env)
    assert code == 1
    [found] = problems_of(report, t["database"])
    assert "setting work_mem is unset, not '8MB'" in found["detail"], found
    assert tenant_health(svc, t["name"])["status"] == "error"
    repaired_clean(env)
    with psycopg.connect(t["connection_url"]) as conn:
        assert conn.execute("SHOW work_mem").fetchone() == ("8MB",)


# ------------------------------------------------------------------ item 11: status vs state


def test_active_tenant_closed_on_the_server_is_found_and_reopened(
    env: Env, svc: TenantService
) -> None:
    """What a purge cut short after closing the tenant leaves: registered active, its role
    NOLOGIN, its database refusing connections."""
    t = svc.provision(unique("Closed"), template=env.template).as_dict()
    admin_exec(env, sql.SQL("ALTER ROLE {} NOLOGIN").format(sql.Identifier(t["role"])))
    admin_exec(
        env,
        sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(
            sql.Identifier(t["database"])
        ),
    )
    assert not can_connect(t["connection_url"])
    code, report = doctor(env)
    assert code == 1
    [found] = problems_of(report, t["database"])
    assert "refuses connections while active" in found["detail"], found
    assert "cannot log in while active" in found["detail"], found
    assert tenant_health(svc, t["name"])["status"] == "error"
    repaired_clean(env)
    assert can_connect(t["connection_url"])


def test_disabled_tenant_reopened_on_the_server_is_closed_again(
    env: Env, svc: TenantService
) -> None:
    t = svc.provision(unique("Reopened"), template=env.template).as_dict()
    svc.disable(t["name"])
    admin_exec(env, sql.SQL("ALTER ROLE {} LOGIN").format(sql.Identifier(t["role"])))
    admin_exec(
        env,
        sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(
            sql.Identifier(t["database"])
        ),
    )
    assert can_connect(t["connection_url"])
    code, report = doctor(env)
    assert code == 1
    [found] = problems_of(report, t["database"])
    assert "allows connections while disabled" in found["detail"], found
    repaired_clean(env)
    assert not can_connect(t["connection_url"])
    svc.enable(t["name"])
    assert can_connect(t["connection_url"])


# ------------------------------------------------------------------ item 13: open template


def template_db(env: Env) -> str:
    return f"monk_template_{env.template}"


def allows_connections(env: Env, database: str) -> bool:
    with psycopg.connect(env.target.conninfo, dbname="postgres") as conn:
        row = conn.execute(
            "SELECT datallowconn FROM pg_database WHERE datname = %s", (database,)
        ).fetchone()
    assert row is not None
    return bool(row[0])


def test_clone_that_ends_sessions_on_the_template_closes_it_again(
    env: Env, svc: TenantService
) -> None:
    db = template_db(env)
    admin_exec(
        env, sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(sql.Identifier(db))
    )
    try:
        session = psycopg.connect(env.target.conninfo, dbname=db)
        svc.provision(unique("Busy"), template=env.template)  # ends that session to clone
        with pytest.raises(psycopg.OperationalError):
            session.execute("SELECT 1")  # ended
        session.close()
        assert not can_connect(env.target.conninfo, db)
        assert not allows_connections(env, db)
        check = run(env, "template", "check", env.template)
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        admin_exec(
            env,
            sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(sql.Identifier(db)),
        )


def test_doctor_sees_an_open_template_and_closes_it(env: Env) -> None:
    db = template_db(env)
    admin_exec(
        env, sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(sql.Identifier(db))
    )
    try:
        code, report = doctor(env)
        assert code == 1
        [found] = problems_of(report, db)
        assert found["kind"] == "open_template"
        assert "allows connections" in found["detail"]
        repaired_clean(env)
        assert not allows_connections(env, db)
    finally:
        admin_exec(
            env,
            sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(sql.Identifier(db)),
        )


# ------------------------------------------------------------------ item 1: invalid databases


def test_purge_finishes_over_an_interrupted_drop(env: Env, svc: TenantService) -> None:
    """The purge's DROP DATABASE is cut short: the database is invalid, the job still queued.
    The next worker (here doctor --repair) drops it and marks the tenant deleted."""
    t = svc.provision(unique("Halfdropped"), template=env.template).as_dict()
    queued = run(env, "tenant", "delete", t["name"], "--purge", "--no-wait", "--json")
    assert queued.returncode == 0, queued.stderr
    interrupt_drop(env.target.conninfo, t["database"])

    code, report = doctor(env)
    assert code == 1
    assert problems_of(report, t["database"])[0]["kind"] == "queued_purge"
    repaired_clean(env)
    assert t["database"] not in databases(env)
    assert t["role"] not in roles(env)
    assert registry_rows(env, t["database"]) == []


def test_active_tenant_with_invalid_database_is_dropped_and_name_freed(
    env: Env, svc: TenantService
) -> None:
    t = svc.provision(unique("Invalid"), template=env.template).as_dict()
    interrupt_drop(env.target.conninfo, t["database"])
    # No operation on it wedges: disable closes what can be closed, the purge drops it.
    health = tenant_health(svc, t["name"])
    assert health["status"] == "error"
    assert any(c["check"] == "database valid" and not c["ok"] for c in health["checks"])

    code, report = doctor(env)
    assert code == 1
    [found] = problems_of(report, t["database"])
    assert found["kind"] == "invalid_database", found
    repaired_clean(env)
    assert t["database"] not in databases(env)
    assert registry_rows(env, t["database"]) == []
    again = svc.provision(t["name"], template=env.template)
    assert again.tenant.status == "active"


def test_purge_request_over_an_invalid_database(env: Env, svc: TenantService) -> None:
    t = svc.provision(unique("Purgeinvalid"), template=env.template).as_dict()
    interrupt_drop(env.target.conninfo, t["database"])
    _, op = purge.request_purge(svc, t["name"])
    assert purge.work_queue(svc, only=op) == 1
    assert t["database"] not in databases(env)
    assert registry_rows(env, t["database"]) == []


def create_marked_database(env: Env, name: str) -> None:
    """A database carrying this installation's mark, as monk's own would."""
    admin_exec(env, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    admin_exec(
        env,
        sql.SQL("COMMENT ON DATABASE {} IS {}").format(
            sql.Identifier(name), sql.Literal(f"monk:{env.settings.system_db_name}")
        ),
    )


def test_orphan_invalid_database_is_dropped(env: Env) -> None:
    orphan = f"tenant_{uuid.uuid4().hex[:16]}"
    create_marked_database(env, orphan)
    interrupt_drop(env.target.conninfo, orphan)
    code, report = doctor(env)
    assert code == 1
    [found] = problems_of(report, orphan)
    assert found["kind"] == "orphan_database"
    assert "invalid" in found["detail"]
    repaired_clean(env)
    assert orphan not in databases(env)


def test_orphan_spare_and_missing_database_are_repaired(env: Env, svc: TenantService) -> None:
    """The doctor's own registry reads (which spares the registry knows) and its lifecycle
    repair (a settled tenant whose database is gone is marked deleted)."""
    spare = f"monk_spare_{uuid.uuid4().hex[:16]}"
    create_marked_database(env, spare)
    t = svc.provision(unique("Vanished"), template=env.template).as_dict()
    svc.disable(t["name"])
    admin_exec(env, sql.SQL("DROP DATABASE {}").format(sql.Identifier(t["database"])))
    code, report = doctor(env)
    assert code == 1
    assert [p["kind"] for p in problems_of(report, spare)] == ["orphan_spare"]
    assert [p["kind"] for p in problems_of(report, t["database"])] == ["missing_database"]
    first = run(env, "doctor", "--repair", "--json")
    assert f"{spare}: dropped" in json.loads(first.stdout)["repaired"]
    assert f"{t['database']}: marked deleted" in json.loads(first.stdout)["repaired"]
    repaired_clean(env)  # its role, now without a live row, goes on the second pass
    assert spare not in databases(env, "monk_spare_%")
    assert t["role"] not in roles(env)
    assert registry_rows(env, t["database"]) == []
    assert svc.get(t["name"], include_deleted=True).status == "deleted"
    assert svc.provision(t["name"], template=env.template).tenant.status == "active"


@pytest.mark.slow
def test_serve_starts_over_an_invalid_database(env: Env, svc: TenantService) -> None:
    """monk serve's start-up reconciles a queued purge whose database is invalid, and serves."""
    t = svc.provision(unique("Startup"), template=env.template).as_dict()
    queued = run(env, "tenant", "delete", t["name"], "--purge", "--no-wait", "--json")
    assert queued.returncode == 0, queued.stderr
    interrupt_drop(env.target.conninfo, t["database"])
    init = run(env, "init")
    assert init.returncode == 0, init.stdout + init.stderr
    port = free_port()
    proc = subprocess.Popen(
        [MONK_BIN, "serve", "--port", str(port), "--templates", env.template],
        env=settings_env(env.settings) | {"MONK_POOL_ROLES": "0"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            pytest.fail("monk serve did not answer /health within 60 s")
        assert t["database"] not in databases(env)
        assert registry_rows(env, t["database"]) == []
    finally:
        proc.terminate()
        proc.wait(30)


# ------------------------------------------------------------------ item 2: template1


def test_tenant_session_on_template1_blocks_no_build(env: Env, svc: TenantService) -> None:
    """On a server monk does not own, PUBLIC may connect to template1: a tenant's session there
    used to make every template build fail (TEMPLATE_BUSY … None). Builds clone template0."""
    t = svc.provision(unique("Squatter"), template=env.template).as_dict()
    try:
        squatter = psycopg.connect(t["connection_url"], dbname="template1", connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.skip(f"this server does not let PUBLIC connect to template1: {exc}")
    key = f"tp_{uuid.uuid4().hex[:8]}"
    try:
        built = run(env, "template", "build", key, "--source", str(basic_source()))
        assert built.returncode == 0, built.stdout + built.stderr
        code, report = doctor(env)
        assert code == 0, report
        [warning] = [w for w in report["warnings"] if w["kind"] == "open_to_public"]
        assert "template1" in warning["subject"].split(", ")
    finally:
        squatter.close()


def test_template_busy_names_the_database(env: Env) -> None:
    """CREATE DATABASE without TEMPLATE clones template1: a busy one is named, not None."""
    from monk.adapters.postgres import admin
    from monk.errors import TemplateBusy

    with (
        psycopg.connect(env.target.conninfo, dbname="template1") as holder,
        psycopg.connect(env.target.conninfo, dbname="postgres", autocommit=True) as adm,
    ):
        holder.execute("SELECT 1")
        with pytest.raises(TemplateBusy, match="'template1' is in use"):
            admin.create_database(adm, f"tenant_{uuid.uuid4().hex[:16]}")


def basic_source() -> Path:
    from monk.service import templates as template_service

    return template_service.builtin_source_dir("basic")
