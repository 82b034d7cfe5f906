"""Fleet upgrades (issue 12, items 3 and 4): the runner, through the service, the CLI and HTTP,
on the real server."""

from __future__ import annotations

import json
import random
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg.conninfo import conninfo_to_dict

from monk.adapters.postgres import admin
from monk.adapters.postgres.connection import ServerTarget, open_connection, with_scram_keys
from monk.api.app import create_app
from monk.api.auth import issue_root_token
from monk.errors import DatabaseUnavailable, UpgradeRunning
from monk.service import operations, pool, purge, upgrades
from monk.service.server import Server
from monk.service.templates import TemplateService
from monk.service.tenants import TenantService
from monk.service.upgrades import UpgradeOptions
from monk.settings import Settings
from tests.conftest import MONK_BIN, RunMonk, settings_env
from tests.integration.template_support import copy_builtin, drop_key, new_key

# A migration that leaves a trace per run: applied twice, a tenant would hold two rows.
COUNTED = "CREATE TABLE IF NOT EXISTS upgrade_runs (n int); INSERT INTO upgrade_runs VALUES (1);"


@dataclass
class Fleet:
    settings: Settings
    target: ServerTarget
    key: str
    source: Path
    admin_url: str
    names: list[str]

    def service(self) -> TenantService:
        return TenantService(self.settings, self.target)

    def build(self) -> str:
        with TemplateService.open(self.settings, self.target) as templates:
            return templates.build(self.key, source_dir=self.source).build.version

    def add_migration(self, name: str, text: str) -> str:
        (self.source / "migrations").mkdir(exist_ok=True)
        (self.source / "migrations" / name).write_text(text)
        return self.build()

    def database(self, name: str) -> str:
        with self.service() as svc:
            return svc.get(name).database

    def tenant_db(self, name: str) -> psycopg.Connection[Any]:
        return psycopg.connect(self.admin_url, dbname=self.database(name), autocommit=True)

    @contextmanager
    def peek(self, name: str) -> Iterator[psycopg.Connection[Any]]:
        """A connection to the tenant's database even when it is closed (disabled): opened
        for the read, closed again after."""
        db = self.database(name)
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            row = conn.execute("SELECT datallowconn FROM pg_database WHERE datname = %s", (db,))
            closed = row.fetchone() == (False,)
            if closed:
                conn.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS true')
            try:
                with psycopg.connect(self.admin_url, dbname=db, autocommit=True) as tdb:
                    yield tdb
            finally:
                if closed:
                    conn.execute(f'ALTER DATABASE "{db}" ALLOW_CONNECTIONS false')

    def build_record(self, name: str) -> tuple[Any, ...] | None:
        with self.peek(name) as db:
            return db.execute("SELECT key, version, level FROM monk.build").fetchone()

    def counted(self, name: str) -> int:
        with self.peek(name) as db:
            row = db.execute("SELECT count(*) FROM upgrade_runs").fetchone()
            return int(row[0]) if row else 0

    def registry_versions(self) -> dict[str, tuple[str | None, int]]:
        with self.service() as svc:
            return {
                t.name: (t.template_version, t.migration_level)
                for t in svc.list(template=self.key, include_trashed=True)
            }

    def sessions(self) -> int:
        """Sessions ever opened on the fleet's tenant databases (pg_stat_database)."""
        dbs = [self.database(n) for n in self.names]
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute("SELECT pg_stat_clear_snapshot()")
            row = conn.execute(
                "SELECT sum(sessions) FROM pg_stat_database WHERE datname = ANY(%s)", (dbs,)
            ).fetchone()
        return int(row[0]) if row and row[0] is not None else 0


@pytest.fixture
def fleet(settings: Settings, admin_url: str, tmp_path: Path) -> Iterator[Fleet]:
    """A key built at A, with four tenants provisioned from it (the last one disabled)."""
    target, _ = Server.from_settings(settings).init()
    key = new_key("up")
    source = copy_builtin(tmp_path, "basic", key)
    f = Fleet(settings, target, key, source, admin_url, [])
    f.add_migration("0001_item.sql", "CREATE TABLE item (code text);")
    with f.service() as svc:
        for i in range(4):
            name = f"up-{uuid.uuid4().hex[:6]}-{i}"
            svc.provision(name, template=key)
            f.names.append(name)
        svc.disable(f.names[-1])
    yield f
    drop_key(admin_url, key)


def run(f: Fleet, **options: Any) -> upgrades.RunReport:
    with f.service() as svc:
        return upgrades.begin(svc, f.key, UpgradeOptions(**options)).execute()


def test_every_tenant_upgraded_once_registry_follows_and_a_second_run_opens_nothing(
    fleet: Fleet,
) -> None:
    a = fleet.registry_versions()[fleet.names[0]][0]
    b = fleet.add_migration("0002_counted.sql", COUNTED)
    assert a != b
    report = run(fleet, parallel=3)
    assert report.state == "done"
    assert report.counts == {"done": 4}
    for name in fleet.names:
        assert fleet.build_record(name) == (fleet.key, b, 2)
        assert fleet.counted(name) == 1
    assert set(fleet.registry_versions().values()) == {(b, 2)}
    # The disabled tenant was upgraded, and is still closed.
    with psycopg.connect(fleet.admin_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT datallowconn FROM pg_database WHERE datname = %s",
            (fleet.database(fleet.names[-1]),),
        ).fetchone()
    assert row == (False,)
    # A no-op run: every tenant skipped from the registry alone, no tenant connection opened.
    before = fleet.sessions()
    again = run(fleet, parallel=3)
    assert again.counts == {"skipped": 4}
    assert {t.reason for t in again.tenants} == {"already at the target"}
    time.sleep(0.5)
    assert fleet.sessions() == before
    # (The measure sees a session when there is one.)
    with fleet.peek(fleet.names[0]):
        pass
    time.sleep(0.5)
    assert fleet.sessions() > before


def _duplicates(fleet: Fleet, name: str) -> None:
    with fleet.peek(name) as db:
        db.execute("INSERT INTO item VALUES ('x'), ('x')")


def test_a_migration_failing_on_one_tenant_continue_finishes_the_others(fleet: Fleet) -> None:
    _duplicates(fleet, fleet.names[1])
    b = fleet.add_migration("0002_unique.sql", "CREATE UNIQUE INDEX item_code ON item (code);")
    report = run(fleet, parallel=2, on_error="continue")
    assert report.state == "failed"
    by_name = {t.name: t for t in report.tenants}
    bad = by_name[fleet.names[1]]
    assert bad.state == "failed"
    assert bad.reason is not None
    assert "UniqueViolation" in bad.reason
    assert "item_code" in bad.reason
    # The step runs as one query; its error still names the statement that failed.
    assert "(in part 1 of 2 of the upgrade: CREATE UNIQUE INDEX item_code ON item" in bad.reason
    assert [by_name[n].state for n in fleet.names] == ["done", "failed", "done", "done"]
    # Nothing half-made on the failed tenant: its build and registry row unchanged.
    assert fleet.build_record(fleet.names[1])[1] != b  # type: ignore[index]
    assert fleet.registry_versions()[fleet.names[1]][0] != b


def test_a_migration_failing_on_one_tenant_stop_stops(fleet: Fleet) -> None:
    _duplicates(fleet, fleet.names[1])
    fleet.add_migration("0002_unique.sql", "CREATE UNIQUE INDEX item_code ON item (code);")
    report = run(fleet, parallel=1, on_error="stop")
    states = [next(t for t in report.tenants if t.name == n).state for n in fleet.names]
    assert states == ["done", "failed", "skipped", "skipped"]
    skipped = [t for t in report.tenants if t.state == "skipped"]
    assert all("not scheduled" in (t.reason or "") for t in skipped)


def test_a_failing_canary_stops_the_run_before_the_rest(fleet: Fleet) -> None:
    _duplicates(fleet, fleet.names[0])
    fleet.add_migration("0002_unique.sql", "CREATE UNIQUE INDEX item_code ON item (code);")
    report = run(fleet, parallel=4, canary=1, on_error="continue")
    states = {t.name: t.state for t in report.tenants}
    assert states[fleet.names[0]] == "failed"
    assert {states[n] for n in fleet.names[1:]} == {"skipped"}
    assert report.error is not None
    assert "canary" in report.error


def test_a_tenant_holding_a_long_lock_is_retried_and_not_blocked_past_the_timeout(
    fleet: Fleet,
) -> None:
    fleet.settings = fleet.settings.model_copy(update={"upgrade_lock_timeout": 0.5})
    b = fleet.add_migration("0002_col.sql", "ALTER TABLE item ADD COLUMN note text;")
    busy = fleet.names[0]
    holder = fleet.tenant_db(busy)
    holder.execute("BEGIN")
    holder.execute("SELECT * FROM item")  # ACCESS SHARE, held until the commit
    waits: list[float] = []

    def app_session() -> None:
        # The tenant's own session, querying all along while the upgrade waits for its lock.
        with fleet.tenant_db(busy) as db:
            end = time.monotonic() + 2.4
            while time.monotonic() < end:
                started = time.monotonic()
                db.execute("SELECT count(*) FROM item")
                waits.append(time.monotonic() - started)
                time.sleep(0.05)

    def release() -> None:
        time.sleep(2.5)
        holder.execute("COMMIT")

    threads = [threading.Thread(target=app_session), threading.Thread(target=release)]
    for t in threads:
        t.start()
    report = run(fleet, parallel=1)
    for t in threads:
        t.join()
    holder.close()
    first = next(t for t in report.tenants if t.name == busy)
    assert first.state == "done"
    assert first.attempts >= 2
    assert report.counts == {"done": 4}
    assert fleet.build_record(busy) == (fleet.key, b, 2)
    # Its queries queued behind the upgrade's attempts (the measure is real), each at most
    # about the lock timeout; without it one would wait for the holder (2.5 s).
    assert max(waits) > 0.1, waits
    assert max(waits) < 0.5 + 1.0, waits


def test_a_second_process_gets_a_clear_error(fleet: Fleet) -> None:
    fleet.add_migration("0002_counted.sql", COUNTED)
    with fleet.service() as svc:
        first = upgrades.begin(svc, fleet.key, UpgradeOptions())
        try:
            with pytest.raises(UpgradeRunning, match="being upgraded by another process"):
                upgrades.begin(svc, fleet.key, UpgradeOptions())
        finally:
            first.execute()
    assert {fleet.counted(n) for n in fleet.names} == {1}


# ---------------------------------------------------------------------- the CLI


def test_cli_json_result_and_exit_code_when_a_tenant_failed(fleet: Fleet, monk: RunMonk) -> None:
    _duplicates(fleet, fleet.names[2])
    fleet.add_migration("0002_unique.sql", "CREATE UNIQUE INDEX item_code ON item (code);")
    dry = monk("template", "upgrade", fleet.key, "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    planned = json.loads(dry.stdout)
    assert planned["state"] == "planned"
    assert planned["counts"] == {"pending": 4}
    done = monk("template", "upgrade", fleet.key, "--on-error", "continue", "--json")
    assert done.returncode == 1, done.stderr
    result = json.loads(done.stdout)
    states = {t["name"]: t["state"] for t in result["tenants"]}
    assert states == {n: "failed" if n == fleet.names[2] else "done" for n in fleet.names}
    failed = next(t for t in result["tenants"] if t["state"] == "failed")
    assert "UniqueViolation" in failed["reason"]
    assert "Traceback" not in done.stderr
    text = monk("template", "upgrade", fleet.key, "--on-error", "sometimes")
    assert text.returncode == 2
    assert "on_error must be 'stop' or 'continue'" in text.stderr


@pytest.mark.slow
def test_kill_9_at_random_moments_then_the_command_again_upgrades_each_tenant_once(
    fleet: Fleet, monk: RunMonk
) -> None:
    with fleet.service() as svc:
        for i in range(4):
            name = f"up-{uuid.uuid4().hex[:6]}-k{i}"
            svc.provision(name, template=fleet.key)
            fleet.names.append(name)
    # Each tenant takes a little while: a random kill lands in the middle of the run.
    b = fleet.add_migration("0002_counted.sql", COUNTED + " SELECT pg_sleep(0.03);")
    env = settings_env(fleet.settings)
    command = [MONK_BIN, "template", "upgrade", fleet.key, "--parallel", "2", "--json"]
    rng = random.Random(12)
    moments: list[str | float] = ["upgrade-started", "upgrade-applied", "upgrade-committed"]
    moments += ["upgrade-committed", *(rng.uniform(0.0, 0.25) for _ in range(4))]
    paused = 0
    for moment in moments:
        fault = {"MONK_FAULT_PAUSE_AT": moment} if isinstance(moment, str) else {}
        proc = subprocess.Popen(
            command,
            env=env | fault,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        if isinstance(moment, str):
            assert proc.stderr is not None
            for line in proc.stderr:  # blocks until the pause (or the end)
                if "paused at" in line:
                    paused += 1
                    break
        else:
            # A random moment of the run itself (the interpreter's start-up is not of interest).
            _wait_for_run(fleet, proc)
            time.sleep(moment)
        proc.kill()  # SIGKILL
        proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
    assert paused == 4  # each pause point was reached, the process killed there
    last = None
    for _ in range(50):  # the killed sessions end within moments; until then: UPGRADE_RUNNING
        last = monk("template", "upgrade", fleet.key, "--json")
        if last.returncode != 4:
            break
        time.sleep(0.2)
    assert last is not None
    assert last.returncode == 0, last.stderr
    for name in fleet.names:
        assert fleet.counted(name) == 1, name
        assert fleet.build_record(name) == (fleet.key, b, 2)
    assert set(fleet.registry_versions().values()) == {(b, 2)}
    with fleet.service() as svc:
        runs = operations.list_operations(svc, kind=upgrades.KIND, subject=fleet.key)
    assert runs
    assert {op.state for op in runs} == {"done"}
    with psycopg.connect(fleet.admin_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT datallowconn FROM pg_database WHERE datname = %s",
            (fleet.database(fleet.names[3]),),
        ).fetchone()
    assert row == (False,)  # the disabled tenant is closed again


def _wait_for_run(fleet: Fleet, proc: subprocess.Popen[str]) -> None:
    """Until the process has a run going (its tenant rows written), or has ended."""
    with psycopg.connect(
        fleet.admin_url, dbname=fleet.settings.system_db_name, autocommit=True
    ) as conn:
        for _ in range(300):
            row = conn.execute(
                "SELECT count(*) FROM upgrade_tenants u JOIN operations o ON o.id = u.op_id"
                " WHERE o.subject = %s AND o.state = 'running'",
                (fleet.key,),
            ).fetchone()
            if (row and row[0]) or proc.poll() is not None:
                return
            time.sleep(0.02)


# ---------------------------------------------------------------------- HTTP, spares, doctor


def test_http_upgrade_answers_at_once_and_the_operation_shows_per_tenant_results(
    fleet: Fleet,
) -> None:
    _duplicates(fleet, fleet.names[0])
    b = fleet.add_migration("0002_unique.sql", "CREATE UNIQUE INDEX item_code ON item (code);")
    s = fleet.settings.model_copy(update={"pool_spares": {}})
    headers = {"Authorization": f"Bearer {issue_root_token(s, ttl_seconds=600)}"}
    with TestClient(create_app(s)) as client:
        bad = client.post(
            f"/api/root/template/{fleet.key}/upgrade", json={"parallel": 0}, headers=headers
        )
        assert bad.status_code == 422
        started = client.post(
            f"/api/root/template/{fleet.key}/upgrade",
            json={"on_error": "continue", "parallel": 2},
            headers=headers,
        )
        assert started.status_code == 202, started.text
        op_id = started.json()["data"]["operation_id"]
        assert started.json()["data"]["to_version"] == b
        deadline = time.monotonic() + 60
        while True:
            got = client.get(f"/api/root/operations/{op_id}", headers=headers)
            assert got.status_code == 200, got.text
            upgrade = got.json()["data"]["upgrade"]
            if upgrade["state"] != "running" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        missing = client.get(f"/api/root/operations/{uuid.uuid4()}", headers=headers)
        assert missing.status_code == 404
    assert got.json()["data"]["kind"] == "template_upgrade"
    assert upgrade["state"] == "failed"
    assert upgrade["counts"] == {"done": 3, "failed": 1}
    failed = [t for t in upgrade["tenants"] if t["state"] == "failed"]
    assert [t["name"] for t in failed] == [fleet.names[0]]
    assert "UniqueViolation" in failed[0]["reason"]


def test_spares_of_the_old_build_are_dropped_and_a_provision_gets_the_new_build(
    fleet: Fleet,
) -> None:
    a = fleet.registry_versions()[fleet.names[0]][0]
    with fleet.service() as svc:
        assert pool.fill(svc, fleet.key, 2) == 2
        before = [r for r in pool.status(svc) if r["template"] == fleet.key]
    assert [(r["version"], r["status"], r["count"]) for r in before] == [(a, "ready", 2)]
    b = fleet.add_migration("0002_counted.sql", COUNTED)
    report = run(fleet)
    assert report.counts == {"done": 4}
    with fleet.service() as svc:
        rows = [r for r in pool.status(svc) if r["template"] == fleet.key]
        assert {r["version"] for r in rows} <= {b}
        name = f"up-{uuid.uuid4().hex[:6]}-new"
        view = svc.provision(name, template=fleet.key)
    assert view.tenant.template_version == b
    fleet.names.append(name)
    assert fleet.build_record(name) == (fleet.key, b, 2)


def test_doctor_reports_a_dead_run_and_repair_finishes_it(fleet: Fleet, monk: RunMonk) -> None:
    fleet.add_migration("0002_counted.sql", COUNTED)
    proc = subprocess.Popen(
        [MONK_BIN, "template", "upgrade", fleet.key, "--parallel", "1"],
        env=settings_env(fleet.settings) | {"MONK_FAULT_PAUSE_AT": "upgrade-applied"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if "paused at" in line:
            break
    proc.kill()
    proc.wait()
    proc.stderr.close()
    found = None
    for _ in range(50):  # until the killed process's sessions are gone
        found = monk("doctor", "--json")
        if "unfinished_upgrade" in found.stdout:
            break
        time.sleep(0.2)
    assert found is not None
    assert found.returncode == 1, found.stdout
    kinds = [p["kind"] for p in json.loads(found.stdout)["problems"]]
    assert kinds == ["unfinished_upgrade"]
    repaired = monk("doctor", "--repair", "--json")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    lines = json.loads(repaired.stdout)["repaired"]
    assert len(lines) == 1
    assert "finished (4 done)" in lines[0]
    assert {fleet.counted(n) for n in fleet.names} == {1}
    assert monk("doctor").returncode == 0


def test_a_trashed_tenant_is_skipped_then_brought_up_to_date_when_restored(fleet: Fleet) -> None:
    trashed = fleet.names[0]
    with fleet.service() as svc:
        svc.trash(trashed)
    b = fleet.add_migration("0002_counted.sql", COUNTED)
    report = run(fleet)
    mine = next(t for t in report.tenants if t.name == trashed)
    assert mine.state == "skipped"
    assert mine.reason == "trashed: upgraded when restored"
    assert fleet.registry_versions()[trashed][0] != b
    with fleet.service() as svc:
        view = svc.restore(trashed)
    assert view.tenant.template_version == b
    assert view.tenant.status == "active"
    assert fleet.build_record(trashed) == (fleet.key, b, 2)
    assert fleet.counted(trashed) == 1


def test_the_same_command_again_resumes_the_dead_run_and_trusts_the_tenant_database(
    fleet: Fleet, monk: RunMonk
) -> None:
    b = fleet.add_migration("0002_counted.sql", COUNTED)
    proc = subprocess.Popen(
        [MONK_BIN, "template", "upgrade", fleet.key, "--parallel", "1"],
        env=settings_env(fleet.settings) | {"MONK_FAULT_PAUSE_AT": "upgrade-committed"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if "paused at" in line:
            break
    proc.kill()  # the first tenant's database committed, the registry not told
    proc.wait()
    proc.stderr.close()
    assert fleet.build_record(fleet.names[0]) == (fleet.key, b, 2)
    assert fleet.registry_versions()[fleet.names[0]][0] != b
    with fleet.service() as svc:
        (dead,) = operations.list_operations(svc, kind=upgrades.KIND, subject=fleet.key)
    again = None
    for _ in range(50):
        again = monk("template", "upgrade", fleet.key, "--json")
        if again.returncode != 4:  # UPGRADE_RUNNING until the killed sessions are gone
            break
        time.sleep(0.2)
    assert again is not None
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)
    assert result["operation_id"] == str(dead.id)
    assert result["resumed"] is True
    assert result["counts"] == {"done": 4}
    first = next(t for t in result["tenants"] if t["name"] == fleet.names[0])
    assert first["reason"] == "already at the target (its database said so)"
    assert {fleet.counted(n) for n in fleet.names} == {1}
    assert set(fleet.registry_versions().values()) == {(b, 2)}
    with fleet.service() as svc:
        assert len(operations.list_operations(svc, kind=upgrades.KIND, subject=fleet.key)) == 1


def test_a_tenant_provisioned_with_migrations_newer_than_its_build_is_refused_not_migrated_twice(
    fleet: Fleet,
) -> None:
    # A migration file added to the source but not built: a provision runs it on its clone.
    (fleet.source / "migrations" / "0002_counted.sql").write_text(COUNTED)
    ahead = f"up-{uuid.uuid4().hex[:6]}-ahead"
    with fleet.service() as svc:
        svc.provision(ahead, template=fleet.key)
    fleet.names.append(ahead)
    assert fleet.registry_versions()[ahead][1] == 2
    assert fleet.counted(ahead) == 1
    b = fleet.build()  # now the build holds it: the step A -> B runs 0002
    report = run(fleet, on_error="continue")
    mine = next(t for t in report.tenants if t.name == ahead)
    assert mine.state == "failed"
    assert mine.reason is not None
    assert "ran migrations up to level 2 when provisioned" in mine.reason
    assert fleet.counted(ahead) == 1
    assert report.counts == {"done": 4, "failed": 1}
    assert {fleet.counted(n) for n in fleet.names} == {1}
    assert fleet.build_record(fleet.names[0]) == (fleet.key, b, 2)


def test_a_tenant_restored_from_its_archive_is_brought_to_the_current_build(
    fleet: Fleet,
) -> None:
    gone = fleet.names.pop(0)  # out of the fleet's live names
    with fleet.service() as svc:
        purge.purge(svc, gone, archive=True)
    b = fleet.add_migration("0002_counted.sql", COUNTED)
    assert run(fleet).counts == {"done": 3}
    with fleet.service() as svc:
        view = svc.restore(gone)
    fleet.names.append(gone)
    assert view.tenant.template_version == b
    assert view.tenant.migration_level == 2
    assert view.credentials is not None  # the restore's new password is still shown
    assert fleet.build_record(gone) == (fleet.key, b, 2)
    assert fleet.counted(gone) == 1


def test_tenant_logins_with_the_admins_scram_keys_need_no_password(target: ServerTarget) -> None:
    """An upgrade's tenant connections log in with the admin's SCRAM keys (no PBKDF2 each)."""
    with psycopg.connect(target.conninfo, dbname=target.maintenance_db, autocommit=True) as conn:
        verifier = admin.own_scram_verifier(conn)
    keyed = with_scram_keys(target, verifier)
    if keyed == target:
        pytest.skip("this server's admin has no readable SCRAM verifier, or libpq < 18")
    params = conninfo_to_dict(keyed.conninfo)
    assert "password" not in params
    assert params["scram_client_key"]
    assert params["scram_server_key"]
    with open_connection(keyed, autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (params["user"],)
    other_key = "A" * 43 + "="  # 32 zero bytes: a well-formed key, not the admin's
    wrong = replace(
        keyed, conninfo=keyed.conninfo.replace(str(params["scram_client_key"]), other_key)
    )
    with pytest.raises(DatabaseUnavailable):
        open_connection(wrong, autocommit=True).close()
