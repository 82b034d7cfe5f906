"""Clean-up of retired template builds: ``monk template prune`` and ``monk serve``'s schedule
(MONK_TEMPLATE_RETENTION) drop a retired build only when nothing needs it any more: no tenant
holding a database (trashed ones included), no archive a restore brings back at that build, no
spare."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import pytest

from monk.adapters.postgres.connection import ServerTarget
from monk.core.template_names import retired_db_name
from monk.errors import InvalidState
from monk.service import drift, fleet, pool, purge
from monk.service.server import Server
from monk.service.templates import TemplateBuild
from monk.service.tenants import TenantService
from monk.settings import Settings
from tests.conftest import MONK_BIN, RunMonk, drop_installation, free_port, settings_env
from tests.integration.template_support import copy_builtin, drop_key, new_key

SUFFIX = uuid.uuid4().hex[:6]


def _n(name: str) -> str:
    """A tenant name of this run: database names are cluster-wide."""
    return f"{name} {SUFFIX}"


@pytest.fixture
def key(admin_url: str, settings: Settings) -> Iterator[str]:
    k = new_key("r")
    yield k
    # What the test's installation made (tenants' databases and roles) goes with it.
    drop_installation(admin_url, settings.system_db_name)
    drop_key(admin_url, k)


@pytest.fixture
def svc(settings: Settings) -> Iterator[TenantService]:
    target: ServerTarget
    target, _ = Server.from_settings(settings).init()
    with TenantService(settings, target) as service:
        yield service


def _rebuild(svc: TenantService, key: str, source: Path, n: int) -> TemplateBuild:
    """One more build of ``key``: migration file ``n`` added."""
    migrations = source / "migrations"
    migrations.mkdir(exist_ok=True)
    (migrations / f"{n:04d}_t{n}.sql").write_text(f"CREATE TABLE t{n} (a int);")
    return svc.templates.build(key, source_dir=source).build


def _exists(admin_url: str, database: str) -> bool:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
        return found.fetchone() is not None


def _status(svc: TenantService, key: str) -> dict[str, str]:
    return {b.version: b.status for b in svc.templates.list_builds(key, everything=True)}


def test_prune_never_drops_a_build_a_tenant_an_archive_or_a_spare_needs(
    svc: TenantService, monk: RunMonk, key: str, admin_url: str, tmp_path: Path
) -> None:
    source = copy_builtin(tmp_path, "basic", key)
    archived = svc.templates.build(key, source_dir=source).build
    svc.provision(_n("Keep Archive"), template=key)
    purge.purge(svc, _n("Keep Archive"), archive=True)
    trashed = _rebuild(svc, key, source, 1)
    svc.provision(_n("Keep Trash"), template=key)
    svc.trash(_n("Keep Trash"))
    spared = _rebuild(svc, key, source, 2)
    assert pool.fill(svc, key, 1) == 1
    unneeded = _rebuild(svc, key, source, 3)
    current = _rebuild(svc, key, source, 4)

    # What status shows of it: the spare at its build, the trashed tenant at its own.
    status = fleet.template_status(svc, key)
    assert status["spares"] == [
        {"version": spared.version, "level": 2, "status": "ready", "count": 1, "current": False}
    ]
    assert status["tenants"] == [
        {"version": trashed.version, "level": 1, "status": "trashed", "count": 1, "current": False}
    ]
    assert status["behind"] == {"count": 0, "tenants": []}  # trashed: upgraded when restored
    per_build = {b["version"]: (b["status"], b["tenants"], b["spares"]) for b in status["builds"]}
    assert per_build[spared.version] == ("retired", 0, 1)
    assert per_build[current.version] == ("ready", 0, 0)

    # Retired too recently for the schedule: nothing goes.
    assert svc.templates.prune(retired_before=datetime.now(UTC) - timedelta(hours=1)) == []
    result = monk("template", "prune", key, "--json")
    assert result.returncode == 0, result.stderr
    assert [b["version"] for b in json.loads(result.stdout)] == [unneeded.version]
    assert _status(svc, key) == {
        archived.version: "retired",
        trashed.version: "retired",
        spared.version: "retired",
        unneeded.version: "dropped",
        current.version: "ready",
    }
    assert not _exists(admin_url, retired_db_name(key, unneeded.version))
    for kept in (archived, trashed, spared):
        assert _exists(admin_url, svc.templates.show(key, kept.version).database)

    # The archive comes back at its build and is brought to the current one (restore upgrades),
    # whose catalog drift then compares it with.
    restored = svc.restore(_n("Keep Archive"))
    assert restored.tenant.status == "active"
    assert restored.tenant.template_version == current.version
    assert drift.tenant_drift(svc, _n("Keep Archive")).drifted is False

    # Once nothing needs them, they go.
    assert pool.retire_stale(svc, key) == 1
    purge.purge(svc, _n("Keep Trash"), archive=False)
    dropped = {b.version for b in svc.templates.prune(key)}
    assert dropped == {trashed.version, spared.version, archived.version}


@pytest.mark.slow
def test_monk_serve_drops_unneeded_retired_builds_on_its_schedule(
    svc: TenantService, settings: Settings, key: str, admin_url: str, tmp_path: Path
) -> None:
    source = copy_builtin(tmp_path, "basic", key)
    needed = svc.templates.build(key, source_dir=source).build
    svc.provision(_n("Serve Trash"), template=key)
    svc.trash(_n("Serve Trash"))
    unneeded = _rebuild(svc, key, source, 1)
    current = _rebuild(svc, key, source, 2)
    port = free_port()
    environ = settings_env(settings) | {
        "MONK_TEMPLATE_RETENTION": "1s",
        "MONK_POOL_SPARES": "{}",
        "MONK_POOL_ROLES": "0",
    }
    proc = subprocess.Popen(
        [MONK_BIN, "serve", "--port", str(port), "--templates", key],
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while _status(svc, key)[unneeded.version] != "dropped":
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            if time.monotonic() > deadline:
                pytest.fail("monk serve did not drop the unneeded retired build within 60 s")
            time.sleep(0.3)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        time.sleep(2.5)  # two more passes: the needed one stays
        assert _status(svc, key) == {
            needed.version: "retired",
            unneeded.version: "dropped",
            current.version: "ready",
        }
        assert not _exists(admin_url, retired_db_name(key, unneeded.version))
        assert _exists(admin_url, svc.templates.show(key, needed.version).database)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert "Application shutdown complete" in out


def test_a_busy_build_is_kept_and_the_builds_after_it_still_go(
    settings: Settings, key: str, admin_url: str, tmp_path: Path
) -> None:
    """A session holding a lock on the oldest retired build's database makes its drop give up
    (after the statement timeout); prune keeps that one, drops the newer ones and says why."""
    quick = settings.model_copy(update={"statement_timeout_ms": 800})
    target, _ = Server.from_settings(quick).init()
    with TenantService(quick, target) as svc:
        source = copy_builtin(tmp_path, "basic", key)
        busy = svc.templates.build(key, source_dir=source).build
        free = _rebuild(svc, key, source, 1)
        _rebuild(svc, key, source, 2)
        busy_db = svc.templates.show(key, busy.version).database
        with psycopg.connect(admin_url) as holder:
            # COMMENT ON DATABASE locks the database object until the transaction ends.
            holder.execute(
                psycopg.sql.SQL("COMMENT ON DATABASE {} IS 'held by a test'").format(
                    psycopg.sql.Identifier(busy_db)
                )
            )
            with pytest.raises(InvalidState) as raised:
                svc.templates.prune(key)
            holder.rollback()
        assert f"{key} {busy.version}" in str(raised.value)
        assert "pruned 1 build(s); 1 kept" in str(raised.value)
        assert _status(svc, key)[busy.version] == "retired"
        assert _status(svc, key)[free.version] == "dropped"
        assert _exists(admin_url, busy_db)
        # Once the lock is gone, the next prune takes it.
        assert [b.version for b in svc.templates.prune(key)] == [busy.version]
        assert not _exists(admin_url, busy_db)
