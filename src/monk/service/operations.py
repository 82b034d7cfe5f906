"""The operations journal and the tenant events, as the edges (HTTP, CLI) read them: the
routes and commands call these instead of opening registry sessions themselves."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

from monk.adapters import registry
from monk.adapters.registry import Operation as Operation  # re-exported: for the edges
from monk.core.records import plain
from monk.errors import OperationNotFound
from monk.service import events
from monk.service.events import Delivery, Event
from monk.service.tenants import TenantService


def list_operations(
    svc: TenantService,
    *,
    states: Sequence[str] | None = None,
    kind: str | None = None,
    subject: str | None = None,
    limit: int = 100,
) -> list[Operation]:
    """The newest journal entries first, filtered by state(s), kind and subject."""
    with svc.hosts.pools().system() as reg:
        return registry.list_operations(reg, states=states, kind=kind, subject=subject, limit=limit)


def get_operation(svc: TenantService, op_id: UUID) -> Operation:
    """One journal entry; OperationNotFound if there is none."""
    with svc.hosts.pools().system() as reg:
        op = registry.get_operation(reg, op_id)
    if op is None:
        raise OperationNotFound(f"operation {op_id} not found")
    return op


def operation_dict(op: Operation) -> dict[str, Any]:
    """An operation as the API renders it (every field; ids and times as strings)."""
    return plain(op)


def list_events(svc: TenantService, *, pending: bool = False, limit: int = 100) -> list[Event]:
    """The newest tenant events first (``pending``: only those not delivered yet)."""
    with svc.hosts.pools().system() as reg:
        return events.list_events(reg, pending=pending, limit=limit)


def deliver_events(svc: TenantService, *, limit: int = 50) -> Delivery:
    """One delivery pass over the due events (see monk.service.events)."""
    with svc.hosts.pools().system() as reg:
        return events.deliver_due(reg, svc.settings, limit=limit)
