"""The purge queue under faults made for real: a slow checkpoint (the checkpointer stopped), a
database left invalid by an interrupted drop, a session that holds a database's lock.

A purge's DROP DATABASE outlasts the short statement timeout meant for requests; a database an
interrupted drop left invalid is dropped by the next attempt; a job that fails is recorded and
retried later with backoff while the queue goes on with the next; ``monk doctor`` reports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator

import httpx
import psycopg
import pytest
from psycopg import sql

from monk.errors import OperationFailed
from monk.service import pool, purge
from monk.service.tenants import TenantService
from tests.conftest import MONK_BIN, free_port, settings_env
from tests.integration.conftest import Env
from tests.integration.server_faults import checkpointer_stopped, interrupt_drop
from tests.integration.test_crash import registry_rows, run
from tests.integration.test_tenants import databases

# Far below a forced checkpoint's wait in these tests (the checkpointer stopped for 3 s).
SHORT_MS = "1000"


def unique(prefix: str) -> str:
    return f"{prefix} {uuid.uuid4().hex[:8]}"


def status_of(env: Env, database: str) -> str | None:
    with psycopg.connect(env.target.conninfo, dbname=env.settings.system_db_name) as conn:
        row = conn.execute(
            "SELECT status FROM tenants WHERE database = %s ORDER BY created_at DESC LIMIT 1",
            (database,),
        ).fetchone()
    return None if row is None else str(row[0])


def purge_job(env: Env, database: str) -> tuple[str, int, str | None]:
    with psycopg.connect(env.target.conninfo, dbname=env.settings.system_db_name) as conn:
        row = conn.execute(
            "SELECT state, attempts, error FROM operations WHERE kind = 'purge'"
            " AND database = %s ORDER BY created_at DESC LIMIT 1",
            (database,),
        ).fetchone()
    assert row is not None
    return str(row[0]), int(str(row[1])), None if row[2] is None else str(row[2])


def backoff(env: Env, database: str) -> tuple[float, bool]:
    """Seconds from the job's last failed attempt to its next one, and whether it is due."""
    with psycopg.connect(env.target.conninfo, dbname=env.settings.system_db_name) as conn:
        row = conn.execute(
            "SELECT round(extract(epoch FROM next_attempt_at - updated_at)),"
            " next_attempt_at <= now()"
            " FROM operations WHERE kind = 'purge' AND database = %s"
            " ORDER BY created_at DESC LIMIT 1",
            (database,),
        ).fetchone()
    assert row is not None
    return float(str(row[0])), bool(row[1])


def queue_no_wait(env: Env, svc: TenantService, prefix: str) -> dict[str, str]:
    t = svc.provision(unique(prefix), template=env.template).as_dict()
    done = run(env, "tenant", "delete", t["name"], "--purge", "--no-wait", "--no-archive")
    assert done.returncode == 0, done.stderr
    return t


@pytest.fixture
def short_svc(env: Env) -> Iterator[TenantService]:
    """The service with a statement timeout far below a slow checkpoint."""
    settings = env.settings.model_copy(update={"statement_timeout_ms": int(SHORT_MS)})
    target = dataclasses.replace(env.target, statement_timeout_ms=int(SHORT_MS))
    with TenantService(settings, target) as service:
        yield service


@contextlib.contextmanager
def database_locked(env: Env, database: str) -> Iterator[None]:
    """A session (connected elsewhere, so DROP … WITH (FORCE) does not end it) holding a lock
    on ``database`` in an open transaction: its DROP DATABASE waits for it."""
    with psycopg.connect(env.target.conninfo, dbname="postgres") as conn:
        conn.execute(sql.SQL("COMMENT ON DATABASE {} IS 'held'").format(sql.Identifier(database)))
        yield
        conn.rollback()


def test_a_drop_outlasts_the_statement_timeout_and_finishes_an_invalid_database(
    env: Env, svc: TenantService
) -> None:
    """Through the CLI, with MONK_STATEMENT_TIMEOUT_MS=1000 and every checkpoint taking 3 s:
    the queued purge of a database an interrupted drop left invalid, and the CLI's own, both
    drop (today: the drop is cancelled at the timeout, the invalid database stays, and the CLI
    fails on the other tenant's job)."""
    left = queue_no_wait(env, svc, "Leftinvalid")
    interrupt_drop(env.target.conninfo, left["database"])
    mine = svc.provision(unique("Slowdrop"), template=env.template).as_dict()
    with checkpointer_stopped(env.target.conninfo, for_s=3.0):
        started = time.monotonic()
        done = run(
            env,
            "tenant",
            "delete",
            mine["name"],
            "--purge",
            "--no-archive",
            extra={"MONK_STATEMENT_TIMEOUT_MS": SHORT_MS},
        )
        waited = time.monotonic() - started
    assert done.returncode == 0, done.stdout + done.stderr
    assert waited > 2.0, "the drop did not wait for the stopped checkpointer"
    assert left["database"] not in databases(env)
    assert mine["database"] not in databases(env)
    assert status_of(env, left["database"]) == "deleted"
    assert status_of(env, mine["database"]) == "deleted"
    assert purge_job(env, left["database"])[:2] == ("done", 0)


def test_a_failing_purge_is_retried_later_and_never_blocks_the_queue(
    env: Env, svc: TenantService, short_svc: TenantService
) -> None:
    """A's drop cannot take its database's lock (a session holds it): A's job fails, is
    recorded and retried later; B queued behind it and the CLI's own purge C are done (today
    the worker stops at A on every pass, and the CLI fails with A's error). ``monk doctor``
    reports A, failing, with its error and attempts; once the session is gone, --repair
    finishes it."""
    a = queue_no_wait(env, svc, "Headofline")
    b = queue_no_wait(env, svc, "Behind")
    c = svc.provision(unique("Mine"), template=env.template).as_dict()
    with database_locked(env, a["database"]):
        done = run(
            env,
            "tenant",
            "delete",
            c["name"],
            "--purge",
            "--no-archive",
            extra={"MONK_STATEMENT_TIMEOUT_MS": SHORT_MS},
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert status_of(env, b["database"]) == "deleted"
        assert status_of(env, c["database"]) == "deleted"
        assert status_of(env, a["database"]) == "deleting"
        state, attempts, error = purge_job(env, a["database"])
        assert (state, attempts) == ("queued", 1)
        assert error is not None
        assert "locked by another session" in error, error

        # Due again 2 s after its attempt began, then 4 s: a pass meanwhile leaves it.
        assert backoff(env, a["database"])[0] == 2
        wait_for("the job due again", lambda: backoff(env, a["database"])[1], within=10)
        assert purge.work_queue(short_svc) == 0
        assert purge_job(env, a["database"])[1] == 2
        assert backoff(env, a["database"]) == (4, False)
        assert purge.work_queue(short_svc) == 0
        assert purge_job(env, a["database"])[1] == 2

        found = run(env, "doctor", "--json")
        assert found.returncode == 1, found.stdout + found.stderr
        [problem] = [
            p for p in json.loads(found.stdout)["problems"] if p["subject"] == a["database"]
        ]
        assert problem["kind"] == "failing_purge", problem
        assert "2 attempts" in problem["detail"], problem
        assert "locked by another session" in problem["detail"], problem

        # Asked for now, as doctor --repair does, it is tried at once and fails the same way.
        with (
            pytest.raises(OperationFailed, match="locked by another session"),
            short_svc.locked(a["name"]) as (reg, pools, tenant),
        ):
            purge.purge_now(short_svc, reg, pools, tenant)
        assert purge_job(env, a["database"])[1] == 3

    fixed = run(env, "doctor", "--repair", "--json")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert a["database"] not in databases(env)
    assert status_of(env, a["database"]) == "deleted"
    assert registry_rows(env, a["database"]) == []
    assert purge_job(env, a["database"])[0] == "done"


def test_the_clis_own_failing_purge_is_one_line_and_stays_queued(
    env: Env, svc: TenantService
) -> None:
    t = svc.provision(unique("Ownfail"), template=env.template).as_dict()
    with database_locked(env, t["database"]):
        done = run(
            env,
            "tenant",
            "delete",
            t["name"],
            "--purge",
            "--no-archive",
            extra={"MONK_STATEMENT_TIMEOUT_MS": SHORT_MS},
        )
    assert done.returncode != 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    # The worker's warning (logged), then the one-line error.
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("error OPERATION_FAILED: "), done.stderr
    assert "failed (attempt 1)" in line, line
    assert "stays queued" in line, line
    assert status_of(env, t["database"]) == "deleting"
    assert purge_job(env, t["database"])[:2] == ("queued", 1)
    repaired = run(env, "doctor", "--repair", "--json")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert t["database"] not in databases(env)


def ready_spares(env: Env, key: str) -> list[str]:
    with psycopg.connect(env.target.conninfo, dbname=env.settings.system_db_name) as conn:
        rows = conn.execute(
            "SELECT database FROM spares WHERE template_key = %s AND status = 'ready'"
            " ORDER BY created_at",
            (key,),
        ).fetchall()
    return [str(r[0]) for r in rows]


def test_a_spare_that_cannot_be_dropped_never_holds_back_the_others(
    env: Env, svc: TenantService
) -> None:
    """``monk pool drain`` with the oldest spare's database locked by a session: the others
    are dropped, the locked one stays ready and the command fails naming why (today it fails
    at the first and drops none)."""
    pool.fill(svc, env.template, 2)
    spares = ready_spares(env, env.template)
    assert len(spares) >= 2
    with database_locked(env, spares[0]):
        done = run(
            env, "pool", "drain", env.template, extra={"MONK_STATEMENT_TIMEOUT_MS": SHORT_MS}
        )
    assert done.returncode != 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert "could not be dropped" in done.stderr, done.stderr
    assert ready_spares(env, env.template) == [spares[0]]
    assert spares[1] not in databases(env)
    again = run(env, "pool", "drain", env.template)
    assert again.returncode == 0, again.stdout + again.stderr
    assert ready_spares(env, env.template) == []
    assert spares[0] not in databases(env)


@pytest.mark.slow
def test_serves_worker_goes_on_past_a_failing_purge_and_retries_it(
    env: Env, svc: TenantService
) -> None:
    """A real ``monk serve`` (MONK_STATEMENT_TIMEOUT_MS=1000) with two purges queued, the
    older one's database locked by a session: its start-up repair and its worker record the
    failure and purge the younger one; once the session is gone a retry purges the older."""
    a = queue_no_wait(env, svc, "Servehead")
    b = queue_no_wait(env, svc, "Servebehind")
    port = free_port()
    environ = settings_env(env.settings) | {
        "MONK_STATEMENT_TIMEOUT_MS": SHORT_MS,
        "MONK_POOL_ROLES": "0",
        "MONK_POOL_SPARES": "{}",
    }
    with database_locked(env, a["database"]):
        proc = subprocess.Popen(
            [MONK_BIN, "serve", "--port", str(port), "--templates", env.template],
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            wait_for("the purge queued behind the failing one", lambda: gone(env, b))
            wait_for("the failure recorded", lambda: purge_job(env, a["database"])[1] >= 1)
            assert status_of(env, a["database"]) == "deleting"
            state, _, error = purge_job(env, a["database"])
            assert state == "queued"
            assert error is not None
            assert "locked by another session" in error
            # The journal says so over HTTP: attempts, error, next attempt.
            wait_for("monk serve answering", lambda: answers(port))
            token = subprocess.run(
                [MONK_BIN, "token", "--root"],
                env=environ,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            listed = httpx.get(
                f"http://127.0.0.1:{port}/api/root/operations",
                params={"kind": "purge", "state": "queued"},
                headers={"Authorization": f"Bearer {token}"},
                timeout=10,
            )
            assert listed.status_code == 200, listed.text
            [job] = [o for o in listed.json()["data"] if o["database"] == a["database"]]
            assert job["attempts"] >= 1
            assert job["next_attempt_at"] is not None
            assert "locked by another session" in job["error"]
            wait_for(
                "the failing purge counted in /metrics",
                lambda: (
                    "monk_purge_failing 1.0"
                    in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
                ),
                within=10,
            )
        except BaseException:
            proc.kill()
            raise
    try:
        wait_for("the failing purge, retried", lambda: gone(env, a), within=30)
        assert purge_job(env, a["database"])[0] == "done"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert "purge of servehead" in out
    assert "Traceback" not in out, out


def failing(port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    found = re.search(r"^monk_purge_failing ([0-9.]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def gone(env: Env, tenant: dict[str, str]) -> bool:
    return status_of(env, tenant["database"]) == "deleted" and tenant["database"] not in (
        databases(env)
    )


def wait_for(what: str, check: Callable[[], bool], *, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {within} s: {what}")
        time.sleep(0.2)
