"""Tenant health: what an operator asks when a tenant misbehaves."""

from __future__ import annotations

from typing import Any

from monk.adapters.postgres import admin
from monk.adapters.postgres.connection import connect
from monk.errors import MonkError
from monk.service.doctor import access_drift
from monk.service.tenants import TenantService

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
    closed = tenant.status in ("disabled", "trashed")
    if db_ok and not closed:
        try:
            with connect(pools.target, tenant.database, purpose="health") as conn:
                rows = conn.execute(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                    " AND tablename = ANY(%s)",
                    (list(CORE_TABLES),),
                ).fetchall()
            found = {str(r[0]) for r in rows}
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
        "status": status,
        "tenant_status": tenant.status,
        "template": tenant.template_key,
        "template_version": tenant.template_version,
        "size_bytes": size,
        "checks": checks,
    }
