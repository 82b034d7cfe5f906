"""Server states the hardening tests make for real: an invalid database (interrupted drop)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql


def _checkpointer(conn: psycopg.Connection[tuple[object, ...]]) -> int | None:
    """The checkpointer's pid, if it is a process this test can signal (same pid namespace)."""
    row = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'checkpointer'"
    ).fetchone()
    if row is None:
        return None
    pid = int(str(row[0]))
    try:
        if b"checkpointer" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return None
    except OSError:
        return None
    return pid


def interrupt_drop(admin_url: str, database: str) -> str:
    """Leave ``database`` invalid the way PostgreSQL does when DROP DATABASE is cut short.

    DROP DATABASE marks the database invalid (datconnlimit = -2, in place, flushed), then asks
    the checkpointer for a checkpoint and waits for it before removing files and committing.
    With the checkpointer stopped (SIGSTOP) the drop waits there; terminating its backend then
    aborts the transaction and leaves the mark, exactly what a crash or a full disk at that
    point leaves. Where the checkpointer cannot be signalled, the mark is written as superuser
    (``UPDATE pg_database``): the same state. Returns which way it was made.
    """
    with psycopg.connect(admin_url, dbname="postgres", autocommit=True) as conn:
        pid = _checkpointer(conn)
        if pid is None:
            conn.execute("UPDATE pg_database SET datconnlimit = -2 WHERE datname = %s", (database,))
            return "catalog update"
        os.kill(pid, signal.SIGSTOP)
        try:
            dropper = psycopg.connect(admin_url, dbname="postgres", autocommit=True)
            backend = dropper.info.backend_pid
            errors: list[BaseException] = []

            def drop() -> None:
                try:
                    dropper.execute(
                        sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(database))
                    )
                except psycopg.Error as exc:
                    errors.append(exc)

            thread = threading.Thread(target=drop)
            thread.start()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                row = conn.execute(
                    "SELECT datconnlimit FROM pg_database WHERE datname = %s", (database,)
                ).fetchone()
                if row is not None and row[0] == -2:
                    break
                time.sleep(0.02)
            else:
                raise AssertionError(f"DROP DATABASE {database} never marked it invalid")
            conn.execute("SELECT pg_terminate_backend(%s)", (backend,))
            thread.join(30)
            assert errors, "the interrupted DROP DATABASE did not fail"
        finally:
            os.kill(pid, signal.SIGCONT)
        row = conn.execute(
            "SELECT datconnlimit FROM pg_database WHERE datname = %s", (database,)
        ).fetchone()
        assert row is not None
        assert row[0] == -2, row
        return "interrupted drop"


@contextlib.contextmanager
def checkpointer_stopped(admin_url: str, *, for_s: float) -> Iterator[None]:
    """Make every checkpoint slow, as a server under heavy write load does: the checkpointer is
    stopped (SIGSTOP) and resumed after ``for_s`` seconds (or on leaving, at the latest). A
    DROP DATABASE started meanwhile waits that long for its checkpoint. Skips the test where
    the checkpointer cannot be signalled (another pid namespace)."""
    with psycopg.connect(admin_url, dbname="postgres", autocommit=True) as conn:
        pid = _checkpointer(conn)
    if pid is None:
        pytest.skip("the server's checkpointer is not a process this test can signal")
    os.kill(pid, signal.SIGSTOP)
    timer = threading.Timer(for_s, os.kill, (pid, signal.SIGCONT))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        os.kill(pid, signal.SIGCONT)
