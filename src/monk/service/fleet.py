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
from monk.service import host_templates
from monk.service.tenants import TenantService


def template_status(svc: TenantService, key: str) -> dict[str, Any]:
    """The key's tenants on every host (``hosts``: each host's current build, tenants and
    those behind it); the builds listed are the local host's (each host builds the same
    versions)."""
    validate_template_key(key)
    local = svc.hosts.local.name
    every = host_templates.every_host(svc)
    tenants: list[fleet_rows.FleetCount] = []
    spares: list[fleet_rows.FleetCount] = []
    checks: list[fleet_rows.DriftCheck] = []
    per_host: list[dict[str, Any]] = []
    behind: list[str] = []
    with svc.hosts.pools().system() as reg:
        current = builds.current_build(reg, key, local)
        known = builds.list_builds(reg, local, key)
        for host in every:
            here = builds.current_build(reg, key, host) if host != local else current
            counts = fleet_rows.tenant_counts(reg, host, key)
            tenants += counts
            spares += fleet_rows.spare_counts(reg, host, key)
            checks += fleet_rows.drift_checks(reg, host, key=key)
            live = [t for t in registry.all_live(reg, host) if t.template_key == key]
            late = behind_current(live, {key: here.version} if here else {}).get(key, [])
            behind += late
            if host == local or here is not None or counts:
                per_host.append(
                    {
                        "host": host,
                        "current_version": here.version if here else None,
                        "tenants": sum(r.count for r in counts),
                        "behind": len(late),
                    }
                )
    if current is None and not known and not tenants:
        raise TemplateNotFound(f"template {key!r} has no build and no tenants", template=key)
    current_version = current.version if current else None
    tenants = _merged(tenants)
    spares = _merged(spares)

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
        "behind": {"count": len(behind), "tenants": sorted(behind, key=str.casefold)},
        "hosts": per_host,
        "drift": {
            "checked": len(checks),
            "drifted": len(drifted),
            "clean": sum(1 for c in checks if c.drifted is False),
            "not_compared": sum(1 for c in checks if c.drifted is None),
            "last_checked_at": last.isoformat() if last else None,
            "drifted_tenants": drifted,
        },
    }


def _merged(rows: list[fleet_rows.FleetCount]) -> list[fleet_rows.FleetCount]:
    """Counts of several hosts summed per (version, level, status), in that order."""
    total: dict[tuple[str, int, str], int] = {}
    for r in rows:
        k = (r.version, r.level, r.status)
        total[k] = total.get(k, 0) + r.count
    return [
        fleet_rows.FleetCount(version=v, level=lv, status=st, count=n)
        for (v, lv, st), n in sorted(total.items())
    ]
