"""The connection budget against a real server and many real databases: the cap holds under
concurrent load (sampled from pg_stat_activity), a greedy tenant does not block the others, the
queue is fair, BUDGET_EXHAUSTED after the wait, LRU eviction, evict(database), a restart."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg import sql

from monk.adapters.embedded import EmbeddedServer
from monk.adapters.postgres import budget as budget_module
from monk.adapters.postgres.budget import Budget
from monk.adapters.postgres.connection import ServerTarget
from monk.api.app import create_app
from monk.api.deps import RuntimeDep
from monk.errors import BudgetExhausted, DatabaseMissing, DatabaseUnavailable, status_and_exit
from monk.service.tenants import TenantService
from tests.conftest import free_port
from tests.integration.conftest import Env

DATABASES = 60


def _create(target: ServerTarget, names: list[str]) -> None:
    with psycopg.connect(target.conninfo, dbname="postgres", autocommit=True) as conn:
        for name in names:
            # FILE_COPY: an empty database copied whole is quicker than WAL-logged block by block.
            conn.execute(
                sql.SQL("CREATE DATABASE {} STRATEGY FILE_COPY").format(sql.Identifier(name))
            )


def _drop(target: ServerTarget, names: list[str]) -> None:
    with psycopg.connect(target.conninfo, dbname="postgres", autocommit=True) as conn:
        for name in names:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture(scope="module")
def databases(env: Env) -> Iterator[list[str]]:
    """Many real databases (plain ones: the budget does not care what is in them)."""
    prefix = f"bud_{uuid.uuid4().hex[:6]}"
    names = [f"{prefix}_{i:02d}" for i in range(DATABASES)]
    _create(env.target, names)
    yield names
    _drop(env.target, names)


def sessions(target: ServerTarget, names: list[str]) -> dict[str, int]:
    """Server sessions of the budget (application_name monk:data) per database."""
    with psycopg.connect(target.conninfo, dbname="postgres", autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname, count(*) FROM pg_stat_activity"
            " WHERE application_name = 'monk:data' AND datname = ANY(%s) GROUP BY datname",
            (names,),
        ).fetchall()
    return {str(db): int(n) for db, n in rows}


class Sampler:
    """Counts the budget's server sessions every few milliseconds, in a thread of its own."""

    def __init__(self, target: ServerTarget, names: list[str], *, only: str | None = None) -> None:
        self.target, self.names, self.only = target, names, only
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with psycopg.connect(self.target.conninfo, dbname="postgres", autocommit=True) as conn:
            while not self._stop.is_set():
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'monk:data'"
                    " AND datname = ANY(%s)",
                    ([self.only] if self.only else self.names,),
                ).fetchone()
                assert row is not None
                self.peak = max(self.peak, int(row[0]))
                self.samples += 1
                time.sleep(0.002)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def budget(target: ServerTarget, *, host: int, tenant: int, wait_ms: int = 5000) -> Budget:
    return Budget(target, host_connections=host, tenant_connections=tenant, wait_ms=wait_ms)


def query(b: Budget, database: str, sleep: float = 0.0) -> int:
    with b.connection(database) as conn:
        row = conn.execute("SELECT pg_backend_pid(), pg_sleep(%s)", (sleep,)).fetchone()
    assert row is not None
    return int(row[0])


def run_threads(count: int, work: Any) -> list[BaseException]:
    errors: list[BaseException] = []

    def wrapped(i: int) -> None:
        try:
            work(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=wrapped, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return errors


@pytest.mark.slow
def test_under_concurrent_load_over_many_databases_the_server_never_holds_more_than_the_cap(
    env: Env, databases: list[str]
) -> None:
    cap = 8
    b = budget(env.target, host=cap, tenant=2)
    rng = random.Random(14)
    plan = [[rng.choice(databases) for _ in range(25)] for _ in range(24)]
    try:
        with Sampler(env.target, databases) as sampler:
            errors = run_threads(24, lambda i: [query(b, db, 0.001) for db in plan[i]])
        stats = b.stats()
    finally:
        b.close()
    assert errors == []
    assert sampler.samples > 20
    # The server's own count too: an evicted backend has exited before its successor opens.
    assert 0 < sampler.peak <= cap, sampler.peak
    assert stats.open <= cap
    assert stats.evictions > 0  # 60 databases through 8 connections
    assert stats.waits > 0
    assert stats.busy == 0
    assert stats.waiting == 0
    assert sessions(env.target, databases) == {}  # closed with the budget


def test_a_greedy_tenant_holds_at_most_its_share_and_does_not_block_the_others(
    env: Env, databases: list[str]
) -> None:
    greedy, others = databases[0], databases[1:6]
    b = budget(env.target, host=4, tenant=2)
    waits: list[float] = []

    def request(i: int) -> None:
        if i < 12:
            query(b, greedy, 0.3)  # 12 slow requests of one tenant
            return
        time.sleep(0.05)  # the greedy ones are in first
        started = time.monotonic()
        query(b, others[i % len(others)])
        waits.append(time.monotonic() - started)

    try:
        with Sampler(env.target, databases, only=greedy) as sampler:
            errors = run_threads(22, request)
    finally:
        b.close()
    assert errors == []
    assert sampler.peak <= 2  # never more than MONK_TENANT_CONNECTIONS
    assert len(waits) == 10
    # The greedy tenant's queue takes 12 / 2 * 0.3 s = 1.8 s; the others are never behind it.
    assert max(waits) < 0.5, waits


def test_waiting_requests_are_served_in_arrival_order(env: Env, databases: list[str]) -> None:
    b = budget(env.target, host=1, tenant=1)
    order: list[str] = []
    threads = []
    try:
        with b.connection(databases[0]):
            for i, db in enumerate(databases[1:6], start=1):

                def work(db: str = db) -> None:
                    query(b, db)
                    order.append(db)

                t = threading.Thread(target=work)
                t.start()
                threads.append(t)
                deadline = time.monotonic() + 5
                while b.stats().waiting < i:  # queued before the next one arrives
                    assert time.monotonic() < deadline
                    time.sleep(0.002)
        for t in threads:
            t.join(timeout=30)
    finally:
        b.close()
    assert order == databases[1:6]


def test_past_the_wait_limit_a_request_gets_budget_exhausted(
    env: Env, databases: list[str]
) -> None:
    b = budget(env.target, host=1, tenant=1, wait_ms=200)
    try:
        with b.connection(databases[0]):
            started = time.monotonic()
            with pytest.raises(BudgetExhausted, match="within 200 ms") as caught:
                query(b, databases[1])
            waited = time.monotonic() - started
        assert 0.2 <= waited < 1.0
        assert status_and_exit(caught.value) == (503, 5)
        assert caught.value.code == "BUDGET_EXHAUSTED"
        assert caught.value.retryable
        assert b.stats().exhausted == 1
        assert "MONK_HOST_CONNECTIONS" in str(caught.value)
        query(b, databases[1])  # the slot is free again: served at once
    finally:
        b.close()
    b = budget(env.target, host=4, tenant=1, wait_ms=100)
    try:
        with b.connection(databases[0]):
            with pytest.raises(BudgetExhausted, match="MONK_TENANT_CONNECTIONS"):
                query(b, databases[0])  # its tenant's one connection is in use
            query(b, databases[1])  # another tenant is served
    finally:
        b.close()


def test_a_full_host_closes_the_least_recently_used_idle_connection(
    env: Env, databases: list[str]
) -> None:
    a, c, d = databases[10:13]
    b = budget(env.target, host=2, tenant=2)
    try:
        pid_a = query(b, a)
        pid_c = query(b, c)
        assert query(b, c) == pid_c  # reused (and now the most recently used)
        query(b, d)  # no free slot: a's idle connection (least recently used) goes
        assert sessions(env.target, [a, c, d]) == {c: 1, d: 1}
        assert b.stats().evictions == 1
        assert query(b, c) == pid_c
        assert query(b, a) != pid_a
    finally:
        b.close()


def _stoppable(pid: int) -> None:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        pytest.skip("the server's backends are not processes this test may signal (remote)")


def test_an_evicted_backend_has_exited_before_its_successor_opens(
    env: Env, databases: list[str]
) -> None:
    a, c = databases[40:42]
    b = budget(env.target, host=1, tenant=1)
    try:
        pid_a = query(b, a)
        _stoppable(pid_a)
        # Stopped, the evicted backend cannot finish its exit until it is continued, 0.3 s on.
        os.kill(pid_a, signal.SIGSTOP)
        resume = threading.Timer(0.3, os.kill, (pid_a, signal.SIGCONT))
        resume.start()
        try:
            started = time.monotonic()
            with b.connection(c) as conn:  # the host is full: a's connection is evicted
                waited = time.monotonic() - started
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid_a,)
                ).fetchone()
        finally:
            resume.join()
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid_a, signal.SIGCONT)
        assert row == (0,)  # gone before its successor was opened
        assert waited >= 0.25, waited
        stats = b.stats()
        assert stats.evictions == 1
        assert stats.exit_wait_seconds >= 0.25
    finally:
        b.close()


def test_the_wait_for_an_evicted_backend_is_bounded(
    env: Env,
    databases: list[str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, c = databases[42:44]
    monkeypatch.setattr(budget_module, "EXIT_WAIT_S", 0.2)
    b = budget(env.target, host=1, tenant=1)
    try:
        pid_a = query(b, a)
        _stoppable(pid_a)
        os.kill(pid_a, signal.SIGSTOP)  # never exits while the request waits
        try:
            started = time.monotonic()
            query(b, c)
            waited = time.monotonic() - started
        finally:
            os.kill(pid_a, signal.SIGCONT)
        assert 0.2 <= waited < 1.5, waited
        assert "did not exit within 0.2 s" in caplog.text
    finally:
        b.close()


def test_evict_leaves_no_session_on_the_database(env: Env, databases: list[str]) -> None:
    a, other = databases[20], databases[21]
    b = budget(env.target, host=6, tenant=4)
    try:
        run_threads(3, lambda _i: query(b, a, 0.1))  # three idle connections to a
        query(b, other)
        with b.connection(a) as held:
            assert sessions(env.target, [a, other]) == {a: 3, other: 1}
            assert b.evict(a) == 2  # the idle ones now
            held.execute("SELECT 1")  # the one in use is left to finish its request
        assert sessions(env.target, [a, other]) == {other: 1}  # and closed as it came back
        assert b.stats().open == 1
    finally:
        b.close()


def test_a_connection_comes_back_clean(env: Env, databases: list[str]) -> None:
    db = databases[30]
    b = budget(env.target, host=2, tenant=1)
    try:
        with b.connection(db) as conn:
            pid = conn.execute("SELECT pg_backend_pid()").fetchone()
            assert pid is not None
            conn.execute("SET statement_timeout = 1234")
            conn.execute("SET search_path = nowhere")
            conn.execute("SELECT pg_advisory_lock(14)")
            conn.execute("CREATE TEMP TABLE leftover (x int)")
            conn.execute("SET ROLE pg_read_all_data")
            conn.execute("BEGIN")  # and a transaction left open
            conn.execute("SELECT 1")
        with b.connection(db) as conn:
            assert conn.execute("SELECT pg_backend_pid()").fetchone() == pid  # the same session
            row = conn.execute(
                "SELECT current_setting('statement_timeout'), current_setting('search_path'),"
                " current_user = session_user,"
                " (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                "  AND pid = pg_backend_pid()),"
                " to_regclass('pg_temp.leftover') IS NULL"
            ).fetchone()
            assert row is not None
            assert row[0] == "1min"  # monk's statement_timeout, set at connection
            assert row[1:] == ('"$user", public', True, 0, True)
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        with b.connection(db) as conn:
            conn.execute("SET statement_timeout = 1")
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(1)")
        assert query(b, db) == pid[0]  # an error in use: the session is kept, cleaned
    finally:
        b.close()


def test_commit_commits_and_cleans_in_one_round_trip(env: Env, databases: list[str]) -> None:
    """``Budget.commit``: the caller's transaction committed and the session reset by one
    query, so the connection comes back without another; a failing COMMIT still comes back
    clean (the reset runs on return)."""
    db = databases[31]
    b = budget(env.target, host=2, tenant=1)
    table = f"committed_{uuid.uuid4().hex[:8]}"
    try:
        with b.connection(db) as conn:
            pid = conn.execute("SELECT pg_backend_pid()").fetchone()
            conn.execute(f"CREATE TABLE {table} (x int PRIMARY KEY DEFERRABLE INITIALLY DEFERRED)")
            conn.execute("BEGIN")
            conn.execute("SET search_path = nowhere")
            conn.execute("SELECT pg_advisory_lock(15)")
            conn.execute(f"INSERT INTO public.{table} VALUES (1)")
            before = conn.pgconn.transaction_status
            b.commit(conn)
            assert before == psycopg.pq.TransactionStatus.INTRANS
        with b.connection(db) as conn:
            assert conn.execute("SELECT pg_backend_pid()").fetchone() == pid
            row = conn.execute(
                f"SELECT current_setting('search_path'), (SELECT count(*) FROM public.{table}),"
                " (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                "  AND pid = pg_backend_pid())"
            ).fetchone()
            assert row == ('"$user", public', 1, 0)
            conn.execute("BEGIN")
            conn.execute("SET search_path = nowhere")
            conn.execute(f"INSERT INTO public.{table} VALUES (1)")  # fails at COMMIT
            with pytest.raises(psycopg.errors.UniqueViolation):
                b.commit(conn)
        with b.connection(db) as conn:
            assert conn.execute("SELECT pg_backend_pid()").fetchone() == pid
            assert conn.execute("SHOW search_path").fetchone() == ('"$user", public',)
            assert conn.execute(f"SELECT count(*) FROM public.{table}").fetchone() == (1,)
            conn.execute(f"DROP TABLE public.{table}")
    finally:
        b.close()


def test_disable_trash_and_purge_close_the_tenants_pooled_connections_first(
    env: Env, svc: TenantService
) -> None:
    name = f"Budgeted {uuid.uuid4().hex[:8]}"
    database = svc.provision(name, template=env.template).tenant.database
    b = svc.hosts.budget()
    run_threads(2, lambda _i: query(b, database, 0.05))
    assert sessions(env.target, [database]) == {database: 2}
    svc.disable(name)
    assert sessions(env.target, [database]) == {}
    # Closed by the budget, not terminated with the other sessions.
    assert b.stats().closed_for_tenant == 2
    svc.enable(name)
    query(b, database)
    svc.trash(name)
    assert sessions(env.target, [database]) == {}
    assert b.stats().closed_for_tenant == 3


def test_over_http_budget_exhausted_is_a_503_with_retry_after_and_metrics_show_it(
    env: Env, databases: list[str]
) -> None:
    settings = env.settings.model_copy(update={"host_connections": 1, "budget_wait_ms": 100})
    app = create_app(settings)

    # A route of the test's own, through the real app and its error handler (the data routes
    # of issue 14 item 4 will be the budget's callers).
    @app.get("/test/budget/{database}")
    def use(database: str, rt: RuntimeDep) -> dict[str, bool]:
        with rt.tenants.hosts.budget().connection(database) as conn:
            conn.execute("SELECT pg_sleep(0.6)")
        return {"success": True}

    with TestClient(app) as client, ThreadPoolExecutor(1) as pool:
        budget_of_app = app.state.runtime.tenants.hosts.budget()
        slow = pool.submit(client.get, f"/test/budget/{databases[40]}")
        deadline = time.monotonic() + 5
        while budget_of_app.stats().busy < 1:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        refused = client.get(f"/test/budget/{databases[41]}")
        assert slow.result(timeout=30).status_code == 200
        metrics = client.get("/metrics").text
    assert refused.status_code == 503, refused.text
    assert refused.json()["error_code"] == "BUDGET_EXHAUSTED"
    assert refused.headers["Retry-After"] == "1"
    for line in (
        'monk_budget_connections_open{host="localhost"} 1.0',
        'monk_budget_connections_opened_total{host="localhost"} 1.0',
        'monk_budget_exhausted_total{host="localhost"} 1.0',
        'monk_budget_waits_total{host="localhost"} 1.0',
        'monk_budget_evictions_total{host="localhost",reason="lru"} 0.0',
    ):
        assert line in metrics, metrics


def test_a_connection_that_cannot_be_opened_gives_its_slot_back(
    env: Env, databases: list[str]
) -> None:
    b = budget(env.target, host=1, tenant=1, wait_ms=200)
    try:
        # The server answered (no such database): a 404-class error, not "server down".
        with pytest.raises(DatabaseMissing, match="no_such_database"):
            query(b, "no_such_database")
        stats = b.stats()
        assert (stats.open, stats.busy, stats.waiting) == (0, 0, 0)
        query(b, databases[50])  # the one slot is free
    finally:
        b.close()


def test_monks_own_connections_never_wait_for_a_budget_in_full_use(
    env: Env, databases: list[str]
) -> None:
    settings = env.settings.model_copy(update={"host_connections": 2, "budget_wait_ms": 3000})
    with TenantService(settings, env.target) as service:
        b = service.hosts.budget()
        release = threading.Event()

        def hold(i: int) -> None:
            with b.connection(databases[51 + i]):
                release.wait(10)

        holders = [threading.Thread(target=hold, args=(i,)) for i in range(2)]
        for t in holders:
            t.start()
        waiter = threading.Thread(target=query, args=(b, databases[53]))
        try:
            deadline = time.monotonic() + 5
            while b.stats().busy < 2:
                assert time.monotonic() < deadline
                time.sleep(0.005)
            waiter.start()
            while b.stats().waiting < 1:
                assert time.monotonic() < deadline
                time.sleep(0.005)
            # Every data connection in use and a request queued: the registry and the admin
            # pool answer at once.
            started = time.monotonic()
            service.list()
            with service.hosts.pools().admin() as adm:
                adm.execute("SELECT 1")
            assert time.monotonic() - started < 1.0
            assert b.stats().waiting == 1
        finally:
            release.set()
            for t in [*holders, waiter]:
                if t.is_alive() or t.ident is not None:
                    t.join(timeout=10)
        assert b.stats().exhausted == 0


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    """A server of this test's own: it is restarted."""
    server = EmbeddedServer(tmp_path / "pg", port=free_port(), durable=False)
    server.ensure_running()
    yield server
    server.stop()


@pytest.mark.slow
def test_after_a_server_restart_broken_connections_are_discarded_and_requests_recover(
    own_server: EmbeddedServer,
) -> None:
    target = own_server.target(name="restarted", connect_timeout=5, statement_timeout_ms=60_000)
    names = [f"rs_{i}" for i in range(6)]
    _create(target, names)
    b = budget(target, host=4, tenant=2)
    try:
        for name in names[:4]:
            query(b, name)
        assert b.stats().open == 4
        own_server.stop()
        with pytest.raises(DatabaseUnavailable):
            query(b, names[0])  # the server is down: a clear, retryable error
        assert b.stats().busy == 0
        assert b.stats().open <= 4
        own_server.ensure_running()
        recovered = False
        deadline = time.monotonic() + 10
        while not recovered:
            try:
                errors = run_threads(12, lambda i: query(b, names[i % len(names)], 0.01))
                recovered = errors == []
            except DatabaseUnavailable:
                pass
            if not recovered:
                assert time.monotonic() < deadline, errors
                time.sleep(0.2)
        stats = b.stats()
        assert stats.discarded >= 1  # the idle connections the restart broke
        assert stats.open <= 4
        assert stats.busy == 0
        assert sum(sessions(target, names).values()) <= 4
    finally:
        b.close()
