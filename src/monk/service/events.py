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

import logging
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import psycopg

from monk.adapters import hooks
from monk.adapters.registry import events as outbox
from monk.adapters.registry.events import Event
from monk.settings import Hook, Settings

__all__ = ["Delivery", "Event", "deliver_due", "forget_old", "list_events"]

log = logging.getLogger(__name__)

_LEASE_S = 60
_MAX_BACKOFF_S = 3600


def list_events(
    reg: psycopg.Connection[Any], *, pending: bool = False, limit: int = 100
) -> list[Event]:
    """The newest events first (``pending``: only those not delivered yet)."""
    return outbox.list_events(reg, pending=pending, limit=limit)


@dataclass
class Delivery:
    delivered: int = 0  # POSTed to every hook that wants it
    failed: int = 0
    unobserved: int = 0  # no hook wants it: closed without a delivery (not counted as one)
    errors: list[str] = field(default_factory=list)


def deliver_due(reg: psycopg.Connection[Any], settings: Settings, *, limit: int = 50) -> Delivery:
    """One delivery pass (see the module docstring); ``reg``: an autocommit registry session."""
    report = Delivery()
    for event in outbox.lease_due(reg, lease_s=_LEASE_S, limit=limit):
        body = event.body()
        observed = any(hook.wants(event.kind) for hook in settings.hooks)
        errors = [
            f"{hook.url}: {error}"
            for hook in settings.hooks
            if hook.wants(event.kind) and (error := _post(hook, event.id, event.kind, body))
        ]
        if errors:
            backoff = min(2**event.attempts, _MAX_BACKOFF_S)
            outbox.retry_later(reg, event.id, after_s=backoff, error="; ".join(errors)[:1000])
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
            outbox.mark_delivered(reg, event.id)
            if observed:
                report.delivered += 1
            else:
                report.unobserved += 1
    return report


def _post(hook: Hook, event_id: UUID, kind: str, body: bytes) -> str | None:
    """One POST; whatever goes wrong (an unusable URL raises, not only a refused connection)
    is this event's failed attempt, retried later: never the pass's, so the events leased
    after it are delivered all the same."""
    try:
        return hooks.post(
            hook.url,
            body,
            event_id=str(event_id),
            event_type=kind,
            secret=hook.secret.get_secret_value() if hook.secret else None,
            timeout=hook.timeout,
        )
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[:500]


def forget_old(reg: psycopg.Connection[Any], settings: Settings) -> int:
    """Delete delivered events older than the retention; returns how many."""
    return outbox.forget_delivered(reg, older_than_days=settings.events_retention_days)
