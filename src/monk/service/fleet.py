"""``monk template status``: where the tenants of a key are, from the system database alone
(no tenant database is opened): tenants per (build, migration level, status), the current
build, spares per build, the tenants behind the current build, and the last drift checks."""

from __future__ import annotations

from typing import Any

from monk.adapters import registry
from monk.adapters.registry import fleet as fleet_rows
from monk.adapters.registry import templates as builds
from monk.core.reconcile import behind_current
from monk.core.template_names import validate_template_key
from monk.errors import TemplateNotFound
from monk.service.tenants import TenantService


def template_status(svc: TenantService, key: str) -> dict[str, Any]:
    validate_template_key(key)
    host = svc.hosts.local.name
    with svc.hosts.pools().system() as reg:
        current = builds.current_build(reg, key, host)
        known = builds.list_builds(reg, host, key)
        tenants = fleet_rows.tenant_counts(reg, host, key)
        spares = fleet_rows.spare_counts(reg, host, key)
        live = [t for t in registry.all_live(reg, host) if t.template_key == key]
        checks = fleet_rows.drift_checks(reg, host, key=key)
    if current is None and not known and not tenants:
        raise TemplateNotFound(f"template {key!r} has no build and no tenants", template=key)
    current_version = current.version if current else None
    behind = behind_current(live, {key: current_version} if current_version else {}).get(key, [])

    def counted(rows: list[fleet_rows.FleetCount]) -> list[dict[str, Any]]:
        return [
            {
                "version": r.version,
                "level": r.level,
                "status": r.status,
                "count": r.count,
                "current": r.version == current_version,
            }
            for r in rows
        ]

    per_build: dict[str, dict[str, int]] = {}
    for r in tenants:
        per_build.setdefault(r.version, {"tenants": 0, "spares": 0})["tenants"] += r.count
    for r in spares:
        per_build.setdefault(r.version, {"tenants": 0, "spares": 0})["spares"] += r.count
    drifted = [c.name for c in checks if c.drifted]
    last = max((c.checked_at for c in checks), default=None)
    return {
        "key": key,
        "current": None
        if current is None
        else {
            "version": current.version,
            "level": current.migration_level,
            "built_at": current.built_at.isoformat() if current.built_at else None,
            "fingerprint": current.fingerprint,
        },
        "builds": [
            {
                "version": b.version,
                "status": b.status,
                "is_current": b.is_current,
                "level": b.migration_level,
                "retired_at": b.retired_at.isoformat() if b.retired_at else None,
                **per_build.get(b.version, {"tenants": 0, "spares": 0}),
            }
            for b in known
        ],
        "total": sum(r.count for r in tenants),
        "tenants": counted(tenants),
        "spares": counted(spares),
        "behind": {"count": len(behind), "tenants": behind},
        "drift": {
            "checked": len(checks),
            "drifted": len(drifted),
            "clean": sum(1 for c in checks if c.drifted is False),
            "not_compared": sum(1 for c in checks if c.drifted is None),
            "last_checked_at": last.isoformat() if last else None,
            "drifted_tenants": drifted,
        },
    }
