"""Tenant health: what an operator asks when a tenant misbehaves."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

import psycopg

from monk.adapters.postgres import admin
from monk.adapters.postgres.connection import (
    ServerTarget,
    breaker,
    connect,
    open_connection,
    translate,
    unavailable,
)
from monk.adapters.registry import hosts as host_registry
from monk.core import lifecycle
from monk.core.reconcile import access_drift
from monk.errors import DatabaseUnavailable, MonkError
from monk.service.pipeline import Hosts
from monk.service.tenants import TenantService

T = TypeVar("T")

CORE_TABLES = ("users", "schemas", "columns")


def tenant_health(svc: TenantService, raw_name: str) -> dict[str, Any]:
    """healthy: every check passes; warning: the tenant is closed on purpose (disabled,
    trashed) so its database was not opened; error: something is missing or broken."""
    tenant = svc.get(raw_name)
    pools = svc.hosts.pools(tenant.host)
    checks: list[dict[str, Any]] = [{"check": "registry", "ok": True, "detail": tenant.status}]
    size = None
    with pools.admin() as adm:
        db_ok = admin.database_exists(adm, tenant.database)
        checks.append({"check": "database exists", "ok": db_ok, "detail": tenant.database})
        role_ok = bool(tenant.role_name) and admin.role_exists(adm, tenant.role_name or "")
        checks.append({"check": "role exists", "ok": role_ok, "detail": tenant.role_name})
        if db_ok:
            size = admin.database_size(adm, tenant.database)
            state = admin.database_states(adm, [tenant.database]).get(tenant.database)
            if state is not None and state.invalid:
                db_ok = False
                checks.append(
                    {
                        "check": "database valid",
                        "ok": False,
                        "detail": "invalid: an interrupted DROP DATABASE left it",
                    }
                )
            elif state is not None:
                role_state = admin.role_states(adm).get(tenant.role_name or "")
                drift = access_drift(
                    tenant,
                    state,
                    role_state,
                    admin.current_role(adm),
                    svc.connection_limit(tenant),
                    svc.database_settings(tenant),
                )
                checks.append(
                    {
                        "check": "access as monk set it",
                        "ok": not drift,
                        "detail": "; ".join(drift) or "as set",
                    }
                )
    closed = tenant.status in lifecycle.CLOSED
    if db_ok and not closed:
        try:
            with connect(pools.target, tenant.database, purpose="health") as conn:
                found = admin.tables_present(conn, CORE_TABLES)
            checks.append({"check": "connection", "ok": True, "detail": "accepted"})
            missing = [t for t in CORE_TABLES if t not in found]
            checks.append(
                {
                    "check": "core tables",
                    "ok": not missing,
                    "detail": "present" if not missing else f"missing: {', '.join(missing)}",
                }
            )
        except MonkError as exc:
            checks.append({"check": "connection", "ok": False, "detail": exc.message})
    failed = any(not c["ok"] for c in checks)
    status = "error" if failed else ("warning" if closed else "healthy")
    return {
        "name": tenant.name,
        "database": tenant.database,
        "host": tenant.host,
        "status": status,
        "tenant_status": tenant.status,
        "template": tenant.template_key,
        "template_version": tenant.template_version,
        "size_bytes": size,
        "checks": checks,
    }


class Recent(Generic[T]):
    """A value computed at most once per ``ttl`` seconds however many threads ask: one computes,
    the others wait for it and share it. Unauthenticated routes (/health, /metrics) answer
    through this, so a crowd of pollers costs the server one session, not one each."""

    def __init__(self, compute: Callable[[], T], ttl: float) -> None:
        self._compute = compute
        self._ttl = ttl
        self._lock = threading.Lock()
        self._value: T | None = None
        self._at = float("-inf")

    def get(self) -> T:
        with self._lock:
            if self._value is None or time.monotonic() - self._at >= self._ttl:
                self._value = self._compute()
                self._at = time.monotonic()
            return self._value


class ServerProbe:
    """Is the server up, and which version: /health's question, asked on one kept session
    (no new connection per request), at most every ``ttl`` seconds."""

    def __init__(self, target: ServerTarget, *, ttl: float = 0.5) -> None:
        self.target = target
        self._breaker = breaker(target.conninfo)
        self._conn: psycopg.Connection[Any] | None = None
        self._recent: Recent[tuple[str | None, MonkError | None]] = Recent(self._probe, ttl)

    def check(self) -> tuple[str | None, MonkError | None]:
        """(server version, None) when reachable, else (None, why not)."""
        reason = self._breaker.refusal(probe=False)
        if reason is not None:  # known down since the last answer: no need to wait for it
            return None, unavailable(self.target, self.target.maintenance_db, reason)
        return self._recent.get()

    def _probe(self) -> tuple[str | None, MonkError | None]:
        # A kept session that died (a restart) gets one fresh try before the answer is "down".
        for fresh in (False, True):
            try:
                if fresh or self._conn is None or self._conn.closed or self._conn.broken:
                    self.close()
                    self._conn = open_connection(self.target, autocommit=True, purpose="health")
                return admin.server_version(self._conn), None
            except MonkError as exc:
                self.close()
                return None, exc
            except psycopg.Error as exc:
                self.close()
                if fresh:
                    return None, translate(exc) or DatabaseUnavailable(str(exc).strip())
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()


HOST_LIST_WAIT_S = 1.0
"""How long /health waits for a registry connection to read the hosts."""


class HostProbes:
    """Each host's state for /health: the local one (``local``, the probe /health already
    asks) and every host of the fleet, each probed on a kept session of its own (a
    ``ServerProbe``), all at once, the whole answer shared for ``ttl`` seconds. A host that
    is down answers at once while its breaker is open; the first look at one that hangs takes
    the connect timeout."""

    def __init__(self, hosts: Hosts, local: ServerProbe, *, ttl: float = 0.5) -> None:
        self.hosts = hosts
        self.local = local
        self._lock = threading.Lock()
        self._probes: dict[str, ServerProbe] = {}
        self._recent: Recent[list[dict[str, Any]]] = Recent(self._look, ttl)

    def check(self) -> list[dict[str, Any]]:
        """[{name, state, reachable, server_version, error}], the local host first."""
        return self._recent.get()

    def _look(self) -> list[dict[str, Any]]:
        # A bounded wait: every registry connection busy (a burst of provisions) must not
        # hold /health for the pool's full wait; the hosts are then unknown, said so.
        with self.hosts.pools().system(wait=HOST_LIST_WAIT_S) as reg:
            rows = host_registry.list_all(reg)
        local_row = next((r for r in rows if r.is_local), None)
        remote = [r for r in rows if not r.is_local]
        entries = [(self.hosts.local.name, local_row.state if local_row else "active")]
        entries += [(r.name, r.state) for r in remote]
        with ThreadPoolExecutor(max(1, min(8, len(entries)))) as threads:
            answers = list(threads.map(self._probe, [name for name, _ in entries]))
        self._forget_except({r.name for r in remote})
        return [
            {
                "name": name,
                "state": state,
                "reachable": exc is None,
                "server_version": version,
                "error": None if exc is None else exc.message,
                "error_code": None if exc is None else exc.code,
            }
            for (name, state), (version, exc) in zip(entries, answers, strict=True)
        ]

    def _probe(self, name: str) -> tuple[str | None, MonkError | None]:
        if name == self.hosts.local.name:
            return self.local.check()
        try:
            target = self.hosts.target(name)
        except MonkError as exc:
            return None, exc
        with self._lock:
            probe = self._probes.get(name)
            if probe is None or probe.target is not target:
                if probe is not None:
                    probe.close()  # the host was removed and added again, another URL
                probe = self._probes[name] = ServerProbe(target)
        return probe.check()

    def _forget_except(self, names: set[str]) -> None:
        with self._lock:
            gone = [n for n in self._probes if n not in names]
            closing = [self._probes.pop(n) for n in gone]
        for probe in closing:
            probe.close()

    def close(self) -> None:
        self._forget_except(set())
