"""Root users written after the answer: a cold provision by ``monk serve`` commits the root
user's hash in the registry with its activation (``pending_roots``) and answers; the hash is
written into the tenant's database here, right after the answer, at the first use of the
tenant's users (``tenant_auth``), before a move copies the database, at ``monk serve``'s start
and by ``monk doctor --repair``. The login into a brand-new database (its backend starts with
a cold catalog cache) is most of what a cold provision costs beyond its clone; this takes it
off the answer's path. Whoever writes it holds the row's lock, and an existing root user
(whose password may have changed since) is never overwritten."""

from __future__ import annotations

import logging
from typing import Any

import psycopg

from monk.adapters import registry
from monk.adapters.registry import Tenant, pending_roots
from monk.core.lifecycle import TenantStatus
from monk.core.reconcile import Problem
from monk.errors import MonkError
from monk.service.pipeline import Pipeline

log = logging.getLogger(__name__)


def write_pending(
    svc: Pipeline, tenant: Tenant, conn: psycopg.Connection[Any] | None = None
) -> bool:
    """``Pipeline.write_waiting_root``: the tenant's waiting root user written, if one waits."""
    return svc.write_waiting_root(tenant, conn)


def waiting(svc: Pipeline, *, older_than_seconds: float = 0.0) -> list[Tenant]:
    """The tenants whose root user waits (a purged one's row is forgotten on the way: there is
    no database left to write it into)."""
    out = []
    with svc.hosts.pools().system() as reg:
        for tenant_id in pending_roots.waiting(reg, older_than_seconds=older_than_seconds):
            tenant = registry.get_by_id(reg, tenant_id)
            if tenant is None or tenant.deleted_at is not None:
                pending_roots.forget(reg, tenant_id)
            else:
                out.append(tenant)
    return out


def write_all_pending(svc: Pipeline, *, older_than_seconds: float = 0.0) -> int:
    """Every waiting root user of an active tenant written (a closed tenant's database waits
    until it is enabled again); one that fails (its host down) is left for the next pass.
    Returns how many were written."""
    written = 0
    for tenant in waiting(svc, older_than_seconds=older_than_seconds):
        if tenant.status != TenantStatus.ACTIVE:
            continue
        try:
            written += write_pending(svc, tenant)
        except (MonkError, psycopg.Error) as exc:
            log.warning("root user of tenant %s not written yet: %s", tenant.name, exc)
    return written


ROOT_WAITING = "root_user_waiting"


def problems(svc: Pipeline, *, older_than_seconds: float = 5.0) -> list[Problem]:
    """Root users of active tenants still waiting well after their answer (their process died
    before writing them, or the host was down), as doctor problems. A closed tenant's waits
    for its database to open again (``open_tenant`` writes it then)."""
    return [
        Problem(
            ROOT_WAITING,
            tenant.database,
            f"the root user of tenant {tenant.name!r}, returned when it was provisioned, is not "
            "written into its database yet (a login writes it too)",
            "write it",
            host=tenant.host,
        )
        for tenant in waiting(svc, older_than_seconds=older_than_seconds)
        if tenant.status == TenantStatus.ACTIVE
    ]
