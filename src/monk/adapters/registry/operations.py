"""The operations journal's queue: what workers still have to do. (The journal's rows are
written and claimed by the functions in the package's ``__init__``.)"""

from __future__ import annotations

from typing import Any

import psycopg

Conn = psycopg.Connection[Any]


def queue_counts(conn: Conn, kind: str) -> tuple[int, int]:
    """How many operations of ``kind`` wait for a worker, and how many of them failed before."""
    row = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE attempts > 0) FROM operations"
        " WHERE kind = %s AND state = 'queued'",
        (kind,),
    ).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def retry_later(conn: Conn, op_id: Any, *, error: str, after_s: float) -> int:
    """A queued job's attempt failed: count it, keep its error, make it due in ``after_s``
    seconds; it stays queued. Returns its failed attempts so far."""
    row = conn.execute(
        "UPDATE operations SET attempts = attempts + 1, error = %s,"
        " next_attempt_at = now() + make_interval(secs => %s), updated_at = now()"
        " WHERE id = %s RETURNING attempts",
        (error, after_s, op_id),
    ).fetchone()
    return int(row[0]) if row else 0
