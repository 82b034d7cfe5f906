"""The warm pool: spares served instead of clones, never twice, crash-safe, rebuild-aware."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from monk.adapters import registry
from monk.adapters.registry import console as console_reads
from monk.adapters.registry.locks import KEYHOLDER_LOCK_SPACE
from monk.errors import DatabaseUnavailable, InvalidState, TenantExists
from monk.service import doctor, pool, purge
from monk.service import templates as template_service
from monk.service.pipeline import SpareSecret
from monk.service.presence import refuse_beside_serve
from monk.service.tenants import TenantService
from tests.conftest import MONK_BIN, settings_env
from tests.integration import template_support
from tests.integration.conftest import Env, end_keyholder_sessions
from tests.integration.server_faults import interrupt_drop
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
        assert other.spare_secrets.take(next(iter(databases(env, "monk_spare_%")))) is None
        view = other.provision(unique("Other"), template=env.template)
    assert view.provisioned_from == "pool"
    with psycopg.connect(view.as_dict()["connection_url"]) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def handout_journal(env: Env, database: str) -> list[tuple[object, ...]]:
    with psycopg.connect(env.target.conninfo, dbname=env.settings.system_db_name) as conn:
        return conn.execute(
            "SELECT kind, state, step, params ? 'spare' FROM operations WHERE database = %s",
            (database,),
        ).fetchall()


def test_fast_handout_is_one_committed_transaction(env: Env, drained: TenantService) -> None:
    svc = drained
    pool.fill(svc, env.template, 1)
    [spare] = databases(env, "monk_spare_%")
    name = unique("Fast")
    key = f"k1-{uuid.uuid4().hex}"
    with svc.hosts.pools().system() as reg:
        handed = pool.hand_out(
            svc,
            reg,
            name=svc.name(name),
            host="localhost",
            template=env.template,
            idempotency_key=key,
        )
    assert handed is not None
    tenant, password, _root = handed
    assert (tenant.status, tenant.is_active, tenant.step) == ("active", True, "active")
    assert tenant.idempotency_key == key
    assert spare not in databases(env, "monk_spare_%")
    assert tenant.database in databases(env)
    assert handout_journal(env, tenant.database) == [("provision", "done", "active", True)]
    with psycopg.connect(
        env.target.conninfo, dbname=tenant.database, user=tenant.role_name, password=password
    ) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (tenant.role_name,)
    # The same name again: the function declines ('taken'), the full path answers.
    again = svc.provision(name, template=env.template, idempotency_key=key)
    assert again.tenant.id == tenant.id
    with pytest.raises(TenantExists):
        svc.provision(name, template=env.template)


def test_fast_handout_declines_what_it_must_not_serve(env: Env, drained: TenantService) -> None:
    svc = drained
    pool.fill(svc, env.template, 1)
    name = svc.name(unique("Decline"))

    def fast(service: TenantService, template: str = env.template) -> object:
        with service.hosts.pools().system() as reg:
            return pool.hand_out(
                service, reg, name=name, host="localhost", template=template, idempotency_key=None
            )

    with TenantService(env.settings, env.target) as other:
        # another keyholder's spare: not served fast
        other.spare_secrets.put(
            "monk_spare_0000000000000000", SpareSecret("x", None, env.template, "localhost")
        )
        assert fast(other) is None
    # the name's lock held elsewhere: 'busy'
    with psycopg.connect(env.target.conninfo, dbname=env.settings.system_db_name) as lock:
        lock.execute("SELECT pg_advisory_lock(%s)", (registry.advisory_key(name.database),))
        assert fast(svc) is None
    # another template: 'none'
    assert fast(svc, "no_such") is None
    assert spare_count(env) == 1
    assert name.database not in databases(env)


def test_fast_handout_killed_mid_transaction_leaves_the_spare(
    env: Env, drained: TenantService
) -> None:
    """The function's backend is terminated after the renames, before the journal insert: the
    whole transaction rolls back, so the spare is still ready under its own name."""
    svc = drained
    pool.fill(svc, env.template, 1)
    [spare] = databases(env, "monk_spare_%")
    name = unique("Killed")
    system_db = env.settings.system_db_name
    with (
        psycopg.connect(env.target.conninfo, dbname=system_db) as blocker,
        # autocommit: pg_stat_activity is read once per transaction
        psycopg.connect(env.target.conninfo, dbname=system_db, autocommit=True) as watcher,
    ):
        blocker.execute("LOCK TABLE operations IN SHARE ROW EXCLUSIVE MODE")
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            attempt = ex.submit(svc.provision, name, template=env.template)
            pid = None
            for _ in range(200):
                row = watcher.execute(
                    "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND datname = %s AND pid <> %s",
                    (system_db, blocker.info.backend_pid),
                ).fetchone()
                if row is not None:
                    pid = row[0]
                    break
                time.sleep(0.05)
            assert pid is not None, "the handout never reached the journal insert"
            blocker.execute("SELECT pg_terminate_backend(%s)", (pid,))
            blocker.rollback()
            with pytest.raises(DatabaseUnavailable):
                attempt.result(timeout=60)
    assert databases(env, "monk_spare_%") == {spare}
    assert spare_count(env) == 1
    assert svc.name(name).database not in databases(env)
    assert svc.name(name).role not in roles(env)
    with psycopg.connect(env.target.conninfo, dbname=env.settings.system_db_name) as conn:
        rows = conn.execute(
            "SELECT count(*) FROM tenants WHERE name_key = %s", (svc.name(name).key,)
        ).fetchone()
    assert rows == (0,)
    # The caller's retry is served by the very same spare.
    view = svc.provision(name, template=env.template)
    assert view.provisioned_from == "pool"
    assert databases(env, "monk_spare_%") == set()


def test_parallel_provisions_never_share_a_spare(env: Env, drained: TenantService) -> None:
    svc = drained
    pool.fill(svc, env.template, 3)
    s = env.settings.model_copy(update={"pool_size": 12})
    with TenantService(s, env.target) as service:
        # the same keyholder: the handouts take the fast path, concurrently
        service.spare_secrets, service.instance_id = svc.spare_secrets, svc.instance_id
        names = [unique("Par") for _ in range(6)]
        with concurrent.futures.ThreadPoolExecutor(6) as ex:
            views = list(ex.map(lambda n: service.provision(n, template=env.template), names))
    sources = sorted(v.provisioned_from or "" for v in views)
    assert sources == ["clone"] * 3 + ["pool"] * 3
    assert len({v.tenant.database for v in views}) == 6
    assert spare_count(env) == 0
    assert spare_count(env, "claimed") == 0


@pytest.mark.slow
@pytest.mark.parametrize("step", ["handout"])
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
    first = template_support.build(env.target, env.settings, key, source_dir=source)
    pool.fill(svc, key, 2)
    old_spares = databases(env, "monk_spare_%")
    manifest = json.loads((source / "template.json").read_text())
    manifest["description"] = "changed"
    (source / "template.json").write_text(json.dumps(manifest))
    second = template_support.build(env.target, env.settings, key, source_dir=source)
    assert second.version != first.version
    assert pool.retire_stale(svc, key) == 2
    assert not (databases(env, "monk_spare_%") & old_spares)
    pool.fill(svc, key, 1)
    view = svc.provision(unique("Rebuilt"), template=key)
    assert view.provisioned_from == "pool"
    assert view.tenant.template_version == second.version
    purge.request_purge(svc, view.tenant.name, archive=False, forget=True)
    purge.work_queue(svc)


def test_a_new_process_adopts_spares_and_serves_them_fast(env: Env, drained: TenantService) -> None:
    pool.fill(drained, env.template, 2)
    with TenantService(env.settings, env.target) as other:
        assert pool.adopt(other) == 0  # their keyholder lives
    end_keyholder_sessions(env)  # as if it had died
    with TenantService(env.settings, env.target) as other:
        assert pool.adopt(other) == 2
        assert pool.adopt(other) == 0
        name = other.name(unique("Adopted"))
        with other.hosts.pools().system() as reg:
            handed = pool.hand_out(
                other, reg, name=name, host="localhost", template=env.template, idempotency_key=None
            )
        assert handed is not None
        tenant, password, root_password = handed
        with psycopg.connect(
            env.target.conninfo, dbname=tenant.database, user=tenant.role_name, password=password
        ) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        # The adopter gave the spare's root user a new password too, and answers it.
        assert root_password is not None
        assert root_password_works(env, tenant.database, root_password)
    # The maker's remembered secrets are stale now: its handout adopts the spare again.
    view = drained.provision(unique("Stale"), template=env.template)
    assert view.provisioned_from == "pool"
    with psycopg.connect(view.as_dict()["connection_url"]) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert view.root_password is not None
    assert root_password_works(env, view.tenant.database, view.root_password)


def root_password_works(env: Env, database: str, password: str) -> bool:
    """The tenant's ``root`` user (access root) checks against ``password``."""
    from monk.core import passwords

    with psycopg.connect(env.target.conninfo, dbname=database) as conn:
        rows = conn.execute(
            "SELECT access, password_hash FROM users WHERE auth = 'root'"
            " AND trashed_at IS NULL AND deleted_at IS NULL"
        ).fetchall()
    return len(rows) == 1 and rows[0][0] == "root" and passwords.verify(rows[0][1], password)


def test_one_presence_lock_says_keyholder_and_serving(env: Env, drained: TenantService) -> None:
    """A process's keyholder lock is its one presence: a serving process names that same
    session as serving (monk bench refuses beside it, not beside any keyholder), and when the
    process is gone, its spares are adopted."""
    with TenantService(env.settings, env.target) as serving:
        pool.fill(serving, env.template, 1)  # takes the keyholder lock: a keyholder, not a serve
        refuse_beside_serve(env.target, env.settings.system_db_name, "the figures")
        serving.presence.serve()
        with pytest.raises(InvalidState, match="monk serve is running on this installation"):
            refuse_beside_serve(env.target, env.settings.system_db_name, "the figures")
        with psycopg.connect(env.target.conninfo, dbname=env.settings.system_db_name) as conn:
            holders = conn.execute(
                "SELECT a.application_name FROM pg_locks AS l"
                " JOIN pg_stat_activity AS a ON a.pid = l.pid"
                " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2"
                " AND l.classid = %s AND l.objid::bigint = hashtext(%s)::bigint & 4294967295",
                (KEYHOLDER_LOCK_SPACE, str(serving.instance_id)),
            ).fetchall()
        assert holders == [("monk:serve",)]  # one session: the keyholder's is the serve's
        serving.presence.release()  # a lost session, taken again, still says serving
        serving.hold_keyholder_lock(check=True)
        with pytest.raises(InvalidState):
            refuse_beside_serve(env.target, env.settings.system_db_name, "the figures")
    refuse_beside_serve(env.target, env.settings.system_db_name, "the figures")  # gone
    with TenantService(env.settings, env.target) as other:
        assert pool.adopt(other) == 1  # the departed serve's spare


def test_a_broken_spare_is_dropped_by_the_handout_that_found_it(
    env: Env, drained: TenantService, caplog: pytest.LogCaptureFixture
) -> None:
    """A spare whose database was dropped behind monk's back fails its handout: the provision
    clones, and the handout drops the broken spare (role and row) at once, saying so, instead
    of leaving it ready for every later provision to try and for the doctor to find."""
    svc = drained
    assert pool.fill(svc, env.template, 1) == 1
    (spare,) = databases(env, "monk_spare_%")
    with psycopg.connect(env.target.conninfo, dbname="postgres", autocommit=True) as adm:
        adm.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(spare)))
    with caplog.at_level(logging.WARNING, logger="monk"):
        view = svc.provision(unique("Broken spare"), template=env.template)
    assert view.provisioned_from == "clone"
    assert view.tenant.status == "active"
    assert spare_count(env) == 0  # its row is gone
    with psycopg.connect(env.target.conninfo, dbname="postgres") as conn:
        assert (
            conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (spare,)).fetchone() is None
        )
    dropped = [r.getMessage() for r in caplog.records if "dropped spare" in r.getMessage()]
    assert len(dropped) == 1
    assert spare in dropped[0]
    assert "its database is gone" in dropped[0]
    assert not [p for p in doctor.checkup(svc).problems if spare in p.subject]
    # the next provision does not try it again: no failed handout, no second warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="monk"):
        assert svc.provision(unique("After"), template=env.template).provisioned_from == "clone"
    assert not [r for r in caplog.records if "handout" in r.getMessage()]


@pytest.mark.slow
def test_refiller_clears_a_spare_left_creating_by_a_dead_process(
    env: Env, drained: TenantService
) -> None:
    """A spare stuck in `creating` after its creator died is cleared by the refiller itself
    (monk serve's background pass), not left for doctor; a live creation is left alone."""
    before = databases(env, "monk_spare_%")
    live = subprocess.Popen(
        [MONK_BIN, "pool", "fill", env.template, "--count", "1"],
        env=os.environ | settings_env(env.settings) | {"MONK_FAULT_PAUSE_AT": "spare-cloned"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert live.stderr is not None
    try:
        assert "paused at spare-cloned" in live.stderr.readline()
        assert spare_count(env, "creating") == 1
        assert pool.clear_crashed(drained) == []  # its creator is alive: not a leftover
        [stuck] = databases(env, "monk_spare_%") - before
    finally:
        live.kill()
        live.wait()
    s = env.settings.model_copy(update={"pool_spares": {env.template: 1}})
    with TenantService(s, env.target) as refiller:
        pool.refill(refiller)
    assert spare_count(env, "creating") == 0
    assert spare_count(env) == 1
    assert stuck not in databases(env, "monk_spare_%")
    with psycopg.connect(env.target.conninfo, dbname="postgres") as conn:
        left = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (stuck,)).fetchone()
    assert left is None
    # A drain cut short in its DROP DATABASE leaves a ready row over an invalid database: the
    # refiller drops it too, and makes a good one.
    [ready] = databases(env, "monk_spare_%") - before
    interrupt_drop(env.target.conninfo, ready)
    with TenantService(s, env.target) as refiller:
        pool.refill(refiller)
    assert spare_count(env) == 1
    assert ready not in databases(env, "monk_spare_%")


def test_the_journal_times_a_warm_handout_and_the_overview_reads_it(
    env: Env, drained: TenantService
) -> None:
    """The handout's journal entry is written and finished inside one statement: it records the
    time that statement took (not 0), and the console's overview reads every process's
    provision latency from the journal."""
    svc = drained
    pool.fill(svc, env.template, 1)
    warm = svc.provision(unique("Timed"), template=env.template)
    assert warm.provisioned_from == "pool"
    with psycopg.connect(env.target.conninfo, dbname=env.settings.system_db_name) as conn:
        row = conn.execute(
            "SELECT 1000 * extract(epoch FROM finished_at - created_at)::float8"
            " FROM operations WHERE database = %s AND kind = 'provision'",
            (warm.tenant.database,),
        ).fetchone()
        assert row is not None
        assert 0 < row[0] < 5000
        overview = console_reads.overview(conn)
    latest = overview.minutes[-1]
    assert latest.provisions >= 1
    assert 0 < latest.p50_ms <= latest.p99_ms


def test_a_spare_whose_template_is_rebuilt_before_it_is_ready_is_never_served(
    env: Env, drained: TenantService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rebuild lands between a spare's clone and its 'ready' (its commit checks the build):
    that clone is dropped, and the fill makes a spare of the new build instead."""
    svc = drained
    key = f"tq_{uuid.uuid4().hex[:8]}"
    source = tmp_path / key
    shutil.copytree(template_service.builtin_source_dir("basic"), source)
    first = template_support.build(env.target, env.settings, key, source_dir=source)
    rebuilt: list[str] = []
    monkeypatch.setattr(
        svc,
        "prepare",
        template_support.rebuild_after_first_prepare(
            svc.prepare, env.target, env.settings, key, source, rebuilt
        ),
    )
    before = databases(env, "monk_spare_%")
    assert pool.fill(svc, key, 1) == 1
    assert rebuilt
    assert rebuilt[0] != first.version
    with psycopg.connect(env.target.conninfo, dbname=env.settings.system_db_name) as conn:
        rows = conn.execute(
            "SELECT database, template_version, status FROM spares WHERE template_key = %s", (key,)
        ).fetchall()
    assert [(r[1], r[2]) for r in rows] == [(rebuilt[0], "ready")]
    # the refused clone is gone: one new spare database, holding the new build
    assert databases(env, "monk_spare_%") - before == {rows[0][0]}
    with psycopg.connect(env.target.conninfo, dbname=rows[0][0]) as conn:
        assert template_service.clone_marker(conn) == (key, rebuilt[0])
    monkeypatch.undo()
    pool.drain(svc)
