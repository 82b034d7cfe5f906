"""Tenant events: the outbox the ``tenants`` trigger fills, and its delivery to observers.

Delivery, one pass (``deliver_due``): lease up to ``limit`` due events (``next_attempt_at`` pushed
a minute ahead, ``FOR UPDATE SKIP LOCKED``: several workers never take one event twice), POST
each to every hook that wants its type, then mark it delivered, or schedule the next attempt
with exponential backoff (2^attempts s, at most an hour) and the error. A worker that dies
mid-delivery leaves the lease to expire: the event is delivered again (at least once; receivers
deduplicate on ``Monk-Event-Id``). Events are delivered in ``seq`` order within a pass; a
retried event may arrive after later ones. An event no hook wants (none configured) is settled
at once without counting as a delivery: the table is then an audit trail only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql

from monk.adapters import hooks
from monk.settings import Settings

log = logging.getLogger(__name__)

_LEASE_S = 60
_MAX_BACKOFF_S = 3600


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


def list_events(
    reg: psycopg.Connection[Any], *, pending: bool = False, limit: int = 100
) -> list[Event]:
    """The newest events first (``pending``: only those not delivered yet)."""
    rows = reg.execute(
        sql.SQL(
            "SELECT {} FROM events WHERE (NOT %s OR delivered_at IS NULL)"
            " ORDER BY seq DESC LIMIT %s"
        ).format(_COLUMNS),
        (pending, limit),
    ).fetchall()
    return [_event(r) for r in rows]


@dataclass
class Delivery:
    delivered: int = 0  # POSTed to every hook that wants it
    failed: int = 0
    unobserved: int = 0  # no hook wants it: closed without a delivery (not counted as one)
    errors: list[str] = field(default_factory=list)


def deliver_due(reg: psycopg.Connection[Any], settings: Settings, *, limit: int = 50) -> Delivery:
    """One delivery pass (see the module docstring); ``reg``: an autocommit registry session."""
    report = Delivery()
    rows = reg.execute(
        sql.SQL(
            "UPDATE events SET next_attempt_at = now() + make_interval(secs => %s),"
            " attempts = attempts + 1"
            " WHERE id IN (SELECT id FROM events WHERE delivered_at IS NULL"
            " AND next_attempt_at <= now() ORDER BY seq LIMIT %s FOR UPDATE SKIP LOCKED)"
            " RETURNING {}"
        ).format(_COLUMNS),
        (_LEASE_S, limit),
    ).fetchall()
    for event in sorted((_event(r) for r in rows), key=lambda e: e.seq):
        body = event.body()
        observed = any(hook.wants(event.kind) for hook in settings.hooks)
        errors = [
            f"{hook.url}: {error}"
            for hook in settings.hooks
            if hook.wants(event.kind)
            and (
                error := hooks.post(
                    hook.url,
                    body,
                    event_id=str(event.id),
                    event_type=event.kind,
                    secret=hook.secret.get_secret_value() if hook.secret else None,
                    timeout=hook.timeout,
                )
            )
        ]
        if errors:
            backoff = min(2**event.attempts, _MAX_BACKOFF_S)
            reg.execute(
                "UPDATE events SET next_attempt_at = now() + make_interval(secs => %s),"
                " last_error = %s WHERE id = %s",
                (backoff, "; ".join(errors)[:1000], event.id),
            )
            report.failed += 1
            report.errors.extend(errors[: max(0, 3 - len(report.errors))])
            log.warning(
                "event %s %s not delivered (attempt %d): %s",
                event.seq,
                event.kind,
                event.attempts,
                errors[0],
            )
        else:
            reg.execute(
                "UPDATE events SET delivered_at = now(), last_error = NULL WHERE id = %s",
                (event.id,),
            )
            if observed:
                report.delivered += 1
            else:
                report.unobserved += 1
    return report


def forget_old(reg: psycopg.Connection[Any], settings: Settings) -> int:
    """Delete delivered events older than the retention; returns how many."""
    cur = reg.execute(
        "DELETE FROM events WHERE delivered_at IS NOT NULL"
        " AND delivered_at < now() - make_interval(days => %s)",
        (settings.events_retention_days,),
    )
    return cur.rowcount
