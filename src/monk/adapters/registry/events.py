"""The events outbox (table ``events``, filled by the ``tenants`` trigger of 0006_events.sql):
reading it, leasing due events for delivery, recording each attempt's outcome, forgetting old
ones. The delivery itself (who wants what, backoff) is the service's (service/events.py)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql

Conn = psycopg.Connection[Any]


@dataclass(frozen=True)
class Event:
    id: UUID
    seq: int
    kind: str
    tenant_id: UUID | None
    payload: dict[str, Any]
    created_at: datetime
    attempts: int
    next_attempt_at: datetime
    delivered_at: datetime | None
    last_error: str | None

    def body(self) -> bytes:
        """What an observer receives (the webhook's JSON body)."""
        return json.dumps(
            {
                "id": str(self.id),
                "seq": self.seq,
                "type": self.kind,
                "created_at": self.created_at.isoformat(),
                "attempt": self.attempts,
                "tenant": self.payload,
            },
            sort_keys=True,
        ).encode()

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "seq": self.seq,
            "type": self.kind,
            "tenant": self.payload,
            "created_at": self.created_at.isoformat(),
            "attempts": self.attempts,
            "next_attempt_at": self.next_attempt_at.isoformat(),
            "delivered_at": self.delivered_at.isoformat() if self.delivered_at else None,
            "last_error": self.last_error,
        }


_COLUMNS = sql.SQL(", ").join(sql.Identifier(f.name) for f in dataclasses.fields(Event))


def _event(row: tuple[Any, ...]) -> Event:
    return Event(
        UUID(str(row[0])),
        int(row[1]),
        str(row[2]),
        UUID(str(row[3])) if row[3] is not None else None,
        dict(row[4]),
        row[5],
        int(row[6]),
        row[7],
        row[8],
        str(row[9]) if row[9] is not None else None,
    )


def list_events(conn: Conn, *, pending: bool = False, limit: int = 100) -> list[Event]:
    """The newest events first (``pending``: only those not delivered yet)."""
    rows = conn.execute(
        sql.SQL(
            "SELECT {} FROM events WHERE (NOT %s OR delivered_at IS NULL)"
            " ORDER BY seq DESC LIMIT %s"
        ).format(_COLUMNS),
        (pending, limit),
    ).fetchall()
    return [_event(r) for r in rows]


def lease_due(conn: Conn, *, lease_s: int, limit: int) -> list[Event]:
    """Up to ``limit`` undelivered events whose time has come, in ``seq`` order, each leased:
    its next attempt pushed ``lease_s`` ahead and its attempts counted. ``FOR UPDATE SKIP
    LOCKED``: concurrent workers never lease one event twice."""
    rows = conn.execute(
        sql.SQL(
            "UPDATE events SET next_attempt_at = now() + make_interval(secs => %s),"
            " attempts = attempts + 1"
            " WHERE id IN (SELECT id FROM events WHERE delivered_at IS NULL"
            " AND next_attempt_at <= now() ORDER BY seq LIMIT %s FOR UPDATE SKIP LOCKED)"
            " RETURNING {}"
        ).format(_COLUMNS),
        (lease_s, limit),
    ).fetchall()
    return sorted((_event(r) for r in rows), key=lambda e: e.seq)


def retry_later(conn: Conn, event_id: UUID, *, after_s: int, error: str) -> None:
    """An attempt failed: the next one in ``after_s`` seconds, and why this one failed."""
    conn.execute(
        "UPDATE events SET next_attempt_at = now() + make_interval(secs => %s),"
        " last_error = %s WHERE id = %s",
        (after_s, error, event_id),
    )


def mark_delivered(conn: Conn, event_id: UUID) -> None:
    conn.execute(
        "UPDATE events SET delivered_at = now(), last_error = NULL WHERE id = %s", (event_id,)
    )


def forget_delivered(conn: Conn, *, older_than_days: int) -> int:
    """Delete events delivered more than ``older_than_days`` ago; returns how many."""
    cur = conn.execute(
        "DELETE FROM events WHERE delivered_at IS NOT NULL"
        " AND delivered_at < now() - make_interval(days => %s)",
        (older_than_days,),
    )
    return cur.rowcount


def undelivered_backlog(conn: Conn, *, older_than_s: int) -> tuple[int, str | None]:
    """How many events have waited undelivered for over ``older_than_s`` seconds, and the
    newest of their errors."""
    row = conn.execute(
        "SELECT count(*), (array_agg(last_error ORDER BY seq DESC))[1] FROM events"
        " WHERE delivered_at IS NULL AND created_at < now() - make_interval(secs => %s)",
        (older_than_s,),
    ).fetchone()
    if row is None:
        return 0, None
    return int(row[0]), None if row[1] is None else str(row[1])
