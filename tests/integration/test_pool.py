"""The warm pool: spares served instead of clones, never twice, crash-safe, rebuild-aware."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import uuid
from pathlib import Path

import psycopg
import pytest

from monk.service import pool, purge
from monk.service import templates as template_service
from monk.service.tenants import TenantService
from tests.integration.conftest import Env
from tests.integration.test_crash import kill_at, run
from tests.integration.test_tenants import databases, roles, unique


def spare_count(env: Env, status: str = "ready") -> int:
    with psycopg.connect(env.target.conninfo, dbname=env.settings.system_db_name) as conn:
        row = conn.execute("SELECT count(*) FROM spares WHERE status = %s", (status,)).fetchone()
    assert row is not None
    return int(row[0])


def describe(conninfo: str, dbname: str) -> dict[str, object]:
    """What a tenant database holds, independent of its name."""
    with psycopg.connect(conninfo, dbname=dbname) as conn:
        tables = conn.execute(
            "SELECT tablename, tableowner = current_database() FROM pg_tables"
            " WHERE schemaname = 'public' ORDER BY 1"
        ).fetchall()
        counts = {t: conn.execute(f'SELECT count(*) FROM "{t}"').fetchone() for t, _ in tables}
        checks = conn.execute(
            "SELECT conname FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace"
            " WHERE nspname = 'public' ORDER BY 1"
        ).fetchall()
    return {"tables": tables, "counts": counts, "constraints": checks}


@pytest.fixture
def drained(env: Env, svc: TenantService) -> TenantService:
    pool.drain(svc)
    yield svc
    pool.drain(svc)


def test_pool_served_tenant_equals_a_cold_clone(env: Env, drained: TenantService) -> None:
    svc = drained
    cold = svc.provision(unique("Cold"), template=env.template)
    assert cold.provisioned_from == "clone"
    assert pool.fill(svc, env.template, 1) == 1
    warm = svc.provision(unique("Warm"), template=env.template)
    assert warm.provisioned_from == "pool"
    assert warm.tenant.template_version == cold.tenant.template_version
    assert warm.tenant.status == "active"
    assert spare_count(env) == 0
    assert describe(env.target.conninfo, warm.tenant.database) == describe(
        env.target.conninfo, cold.tenant.database
    )
    url = warm.as_dict()["connection_url"]
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM account").fetchone() == (5,)
    # a spare made by another process has an unknown password: a fresh one is issued
    pool.fill(svc, env.template, 1)
    with TenantService(env.settings, env.target) as other:
        view = other.provision(unique("Other"), template=env.template)
    assert view.provisioned_from == "pool"
    with psycopg.connect(view.as_dict()["connection_url"]) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_parallel_provisions_never_share_a_spare(env: Env, drained: TenantService) -> None:
    svc = drained
    pool.fill(svc, env.template, 3)
    s = env.settings.model_copy(update={"pool_size": 12})
    with TenantService(s, env.target) as service:
        service.spare_secrets = svc.spare_secrets
        names = [unique("Par") for _ in range(6)]
        with concurrent.futures.ThreadPoolExecutor(6) as ex:
            views = list(ex.map(lambda n: service.provision(n, template=env.template), names))
    sources = sorted(v.provisioned_from or "" for v in views)
    assert sources == ["clone"] * 3 + ["pool"] * 3
    assert len({v.tenant.database for v in views}) == 6
    assert spare_count(env) == 0
    assert spare_count(env, "claimed") == 0


@pytest.mark.slow
@pytest.mark.parametrize("step", ["spare-claimed", "spare-renamed"])
def test_crash_in_the_middle_of_a_handout(env: Env, drained: TenantService, step: str) -> None:
    pool.fill(drained, env.template, 1)
    before_dbs, before_roles = databases(env), roles(env)
    name = unique("Handout")
    kill_at(env, step, "tenant", "create", name, "--template", env.template)
    fixed = run(env, "doctor", "--repair", "--json")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert json.loads(fixed.stdout)["remaining"] == []
    assert databases(env) == before_dbs
    assert roles(env) == before_roles
    # The handout is one transaction: killed anywhere in it, the spare is still there, ready.
    assert spare_count(env) == 1
    assert spare_count(env, "claimed") + spare_count(env, "creating") == 0
    again = run(env, "tenant", "create", name, "--template", env.template, "--json")
    assert again.returncode == 0, again.stderr


@pytest.mark.slow
def test_crash_while_making_a_spare(env: Env, drained: TenantService) -> None:
    before = databases(env, "monk_spare_%")
    kill_at(env, "spare-cloned", "pool", "fill", env.template, "--count", "1")
    assert spare_count(env, "creating") == 1
    fixed = run(env, "doctor", "--repair", "--json")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert spare_count(env, "creating") == 0
    assert databases(env, "monk_spare_%") == before


def test_rebuild_retires_old_spares(env: Env, drained: TenantService, tmp_path: Path) -> None:
    svc = drained
    key = f"tp_{uuid.uuid4().hex[:8]}"
    source = tmp_path / key
    shutil.copytree(template_service.builtin_source_dir("basic"), source)
    first = template_service.build(env.target, env.settings, key, source_dir=source)
    pool.fill(svc, key, 2)
    old_spares = databases(env, "monk_spare_%")
    manifest = json.loads((source / "template.json").read_text())
    manifest["description"] = "changed"
    (source / "template.json").write_text(json.dumps(manifest))
    second = template_service.build(env.target, env.settings, key, source_dir=source)
    assert second.version != first.version
    assert pool.retire_stale(svc, key) == 2
    assert not (databases(env, "monk_spare_%") & old_spares)
    pool.fill(svc, key, 1)
    view = svc.provision(unique("Rebuilt"), template=key)
    assert view.provisioned_from == "pool"
    assert view.tenant.template_version == second.version
    purge.request_purge(svc, view.tenant.name, archive=False, forget=True)
    purge.work_queue(svc)
