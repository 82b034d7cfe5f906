"""Connections: each tenant role held to its CONNECTION LIMIT, monk's own kept available, and
on the server monk runs itself, tenants reach their own database only."""

from __future__ import annotations

import contextlib
import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg import sql
from psycopg.conninfo import make_conninfo

from monk.adapters.embedded import EmbeddedServer
from monk.api.app import create_app
from monk.api.auth import issue_root_token
from monk.service import pool
from monk.service.tenants import TenantService
from monk.settings import Settings
from tests.conftest import MONK_BIN, settings_env
from tests.integration.conftest import Env
from tests.integration.test_crash import run
from tests.integration.test_embedded import Embedded


def unique(prefix: str) -> str:
    return f"{prefix} {uuid.uuid4().hex[:8]}"


def role_limit(env: Env, role: str) -> int:
    with psycopg.connect(env.target.conninfo, dbname="postgres") as conn:
        row = conn.execute("SELECT rolconnlimit FROM pg_roles WHERE rolname = %s", (role,))
        found = row.fetchone()
    assert found is not None
    return int(found[0])


def open_up_to(url: str, count: int) -> list[psycopg.Connection[tuple[Any, ...]]]:
    return [psycopg.connect(url, connect_timeout=5) for _ in range(count)]


def test_a_tenant_at_its_limit_is_refused_the_next_connection(env: Env, svc: TenantService) -> None:
    t = svc.provision(unique("Limited"), template=env.template, connection_limit=3).as_dict()
    assert t["connection_limit"] == 3
    held = open_up_to(t["connection_url"], 3)
    try:
        with pytest.raises(psycopg.OperationalError, match="too many connections for role"):
            psycopg.connect(t["connection_url"], connect_timeout=5)
        # Raised for this tenant: its next connection is accepted.
        view = svc.update(t["name"], connection_limit=4)
        assert view.as_dict()["connection_limit"] == 4
        held.append(psycopg.connect(t["connection_url"], connect_timeout=5))
    finally:
        for conn in held:
            conn.close()
    # Back to the installation's default.
    view = svc.update(t["name"], default_connection_limit=True)
    assert view.tenant.connection_limit is None
    assert role_limit(env, t["role"]) == env.settings.tenant_connection_limit == 20


def test_every_way_a_role_gets_login_sets_its_limit(env: Env, svc: TenantService) -> None:
    """Cold (spare role or new role), warm fast path, warm full path, restore."""
    cold = svc.provision(unique("Cold"), template=env.template).as_dict()
    assert cold["connection_limit"] == 20
    assert role_limit(env, cold["role"]) == 20
    pool.drain(svc)
    try:
        pool.fill(svc, env.template, 2)
        fast = svc.provision(unique("Fast"), template=env.template)
        assert fast.provisioned_from == "pool"
        assert role_limit(env, fast.tenant.role_name or "") == 20
        own = svc.provision(unique("Own"), template=env.template, connection_limit=7)
        assert own.provisioned_from == "pool"
        assert own.tenant.connection_limit == 7
        assert role_limit(env, own.tenant.role_name or "") == 7
    finally:
        pool.drain(svc)
    # A purged tenant restored from its archive keeps its own limit.
    purged = run(env, "tenant", "delete", own.tenant.name, "--purge", "--json")
    assert purged.returncode == 0, purged.stderr
    restored = run(env, "tenant", "restore", own.tenant.name, "--json")
    assert restored.returncode == 0, restored.stderr
    assert json.loads(restored.stdout)["connection_limit"] == 7
    assert role_limit(env, own.tenant.role_name or "") == 7
    # doctor: every limit is what monk set
    doctor = run(env, "doctor", "--json")
    assert doctor.returncode == 0, doctor.stdout


def test_limit_drift_is_found_and_repaired(env: Env, svc: TenantService) -> None:
    t = svc.provision(unique("Drift"), template=env.template).as_dict()
    with psycopg.connect(env.target.conninfo, dbname="postgres", autocommit=True) as conn:
        conn.execute(f'ALTER ROLE "{t["role"]}" CONNECTION LIMIT -1')
    found = run(env, "doctor", "--json")
    assert found.returncode == 1
    [problem] = [p for p in json.loads(found.stdout)["problems"] if p["subject"] == t["database"]]
    assert "role connection limit -1, not 20" in problem["detail"]
    fixed = run(env, "doctor", "--repair", "--json")
    assert fixed.returncode == 0, fixed.stdout
    assert role_limit(env, t["role"]) == 20


def test_cli_and_api_take_a_connection_limit(env: Env) -> None:
    name = unique("Cli")
    made = run(
        env,
        "tenant",
        "create",
        name,
        "--template",
        env.template,
        "--connection-limit",
        "5",
        "--json",
    )
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["connection_limit"] == 5
    changed = run(env, "tenant", "connection-limit", name, "9", "--json")
    assert changed.returncode == 0, changed.stderr
    assert json.loads(changed.stdout)["connection_limit"] == 9
    bad = run(env, "tenant", "create", unique("Bad"), "--connection-limit", "0")
    assert bad.returncode == 2

    token = issue_root_token(env.settings, ttl_seconds=600)
    headers = {"Authorization": f"Bearer {token}"}
    with TestClient(create_app(env.settings)) as client:
        api_name = unique("Api")
        created = client.post(
            "/api/root/tenant",
            json={"name": api_name, "template": env.template, "connection_limit": 6},
            headers=headers,
        )
        assert created.status_code == 201, created.text
        assert created.json()["data"]["connection_limit"] == 6
        patched = client.patch(
            f"/api/root/tenant/{api_name}", json={"connection_limit": 11}, headers=headers
        )
        assert patched.status_code == 200, patched.text
        assert patched.json()["data"]["connection_limit"] == 11
        reset = client.patch(
            f"/api/root/tenant/{api_name}", json={"connection_limit": None}, headers=headers
        )
        assert reset.json()["data"]["connection_limit"] == 20
        refused = client.patch(
            f"/api/root/tenant/{api_name}", json={"connection_limit": 0}, headers=headers
        )
        assert refused.status_code == 422


# ------------------------------------------------------------ the server monk runs itself


@pytest.fixture(scope="module")
def own_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Embedded]:
    """An embedded server of monk's own (the session's server is external to monk)."""
    e = Embedded(Path(tmp_path_factory.mktemp("own")) / "monk-data")
    e.env |= {"MONK_POOL_SPARES": "{}"}
    done = e.run("init")
    assert done.returncode == 0, done.stderr
    yield e
    EmbeddedServer(e.data_dir, port=e.port).stop()


def create_tenant(server: Embedded) -> dict[str, Any]:
    made = server.run("tenant", "create", unique("Own"), "--template", "empty", "--json")
    assert made.returncode == 0, made.stderr
    return dict(json.loads(made.stdout))


@pytest.mark.slow
def test_on_monks_own_server_a_tenant_reaches_its_own_database_only(
    own_server: Embedded,
) -> None:
    again = own_server.run("init")  # idempotent
    assert again.returncode == 0, again.stderr
    t = create_tenant(own_server)
    with psycopg.connect(t["connection_url"], connect_timeout=5) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (t["database"],)
    for other in ("postgres", "template1", "monk_main"):
        with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
            psycopg.connect(t["connection_url"], dbname=other, connect_timeout=5)
    doctor = own_server.run("doctor", "--json")
    assert doctor.returncode == 0, doctor.stdout
    assert json.loads(doctor.stdout)["warnings"] == []


@pytest.mark.slow
def test_monk_keeps_working_while_tenants_hold_every_connection(own_server: Embedded) -> None:
    """max_connections = 100, 20 kept for monk: four tenants at their default limit of 20 take
    every other slot; a fifth tenant is refused, monk's CLI is not."""
    tenants = [create_tenant(own_server) for _ in range(5)]
    held: list[psycopg.Connection[tuple[Any, ...]]] = []
    try:
        for t in tenants[:4]:
            held += open_up_to(t["connection_url"], 20)
            with pytest.raises(psycopg.OperationalError, match="too many connections for role"):
                psycopg.connect(t["connection_url"], connect_timeout=5)
        with pytest.raises(psycopg.OperationalError, match="reserved for roles with the"):
            psycopg.connect(tenants[4]["connection_url"], connect_timeout=5)
        listed = own_server.run("tenant", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        assert {t["database"] for t in tenants} <= {
            t["database"] for t in json.loads(listed.stdout)
        }
        doctor = own_server.run("doctor")
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    finally:
        for conn in held:
            with contextlib.suppress(psycopg.Error):
                conn.close()


def test_doctor_warns_a_non_superuser_admin_without_reserved_connections(
    settings: Settings, admin_url: str
) -> None:
    """An admin with CREATEDB and CREATEROLE only: tenants filling max_connections would lock it
    out unless it may use reserved connections (PostgreSQL 16+); doctor says so, exit 0."""
    role, password = f"monk_admin_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN CREATEDB CREATEROLE PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
    url = make_conninfo(admin_url, user=role, password=password)
    env = settings_env(settings) | {"MONK_DATABASE_URL": url}
    try:
        done = subprocess.run(
            [MONK_BIN, "doctor", "--json"], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stdout + done.stderr
        [warning] = [
            w for w in json.loads(done.stdout)["warnings"] if w["kind"] == "no_reserved_connections"
        ]
        assert warning["subject"] == role
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(settings.system_db_name)
                )
            )
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
