"""The operations journal's queue: what workers still have to do. (The journal's rows are
written and claimed by the functions in the package's ``__init__``.)"""

from __future__ import annotations

from typing import Any

import psycopg

Conn = psycopg.Connection[Any]


def count_queued(conn: Conn, kind: str) -> int:
    """How many operations of ``kind`` wait for a worker."""
    row = conn.execute(
        "SELECT count(*) FROM operations WHERE kind = %s AND state = 'queued'", (kind,)
    ).fetchone()
    return int(row[0]) if row else 0
