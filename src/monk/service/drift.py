"""Drift: does each tenant's schema still match the build it claims to be at?

The claim is the tenant's own ``monk.build`` row (the registry's ``template_version`` for a
tenant cloned before monk kept one); the expected catalog is the one that build recorded (see
``TemplateService.build_catalog``). The tenant's catalog is read over one connection of monk's
admin to its database, opened and closed; a closed tenant (disabled, trashed) is opened to monk's
admin alone for the read, under the tenant's lock, as an archive does. Every result is kept in
the system database (``drift_checks``): ``monk template status`` and ``monk doctor`` report the
last one.

There is no repair: a difference is either a hand change to undo, or a change the template
should make (a migration file), which the next build and upgrade bring to every tenant.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg

from monk.adapters.postgres import admin, template_db
from monk.adapters.postgres.catalog import read_catalog
from monk.adapters.postgres.connection import connect, translate
from monk.adapters.registry import Tenant, locks
from monk.adapters.registry import fleet as fleet_rows
from monk.core import lifecycle
from monk.core.catalog import Catalog, Difference, differences
from monk.core.template_names import validate_template_key
from monk.errors import MonkError, TemplateNotFound
from monk.service import host_templates
from monk.service.tenants import TenantService

Conn = psycopg.Connection[Any]

DEFAULT_PARALLEL = 4

FIX_HINT = (
    "undo the hand change in the tenant's database, or make it part of the template (a migration "
    "file), build, and run `monk template upgrade`; `monk tenant drift NAME` lists the differences"
)


@dataclass(frozen=True)
class DriftResult:
    """One tenant's drift check. ``drifted`` is None when it could not be compared (``error``
    says why: a closed database that was busy, a build whose catalog is unknown…)."""

    name: str
    database: str
    status: str
    template_key: str | None
    template_version: str | None
    claimed_by: str  # 'database' (its monk.build row) or 'registry'
    drifted: bool | None
    differences: tuple[Difference, ...]
    fingerprint: str | None
    expected_fingerprint: str | None
    error: str | None
    checked_at: datetime

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["differences"] = [d.as_dict() for d in self.differences]
        out["checked_at"] = self.checked_at.isoformat()
        return out


@dataclass(frozen=True)
class _Read:
    """What was read in a tenant's database."""

    claim: tuple[str, str] | None  # (key, version) of its monk.build row
    catalog: Catalog | None
    error: str | None = None


def tenant_drift(svc: TenantService, raw_name: str) -> DriftResult:
    """Check one tenant now, and keep the result."""
    tenant = svc.get(raw_name)
    result = _check(svc, tenant, _read(svc, tenant), {})
    _record(svc, tenant, result)
    return result


def template_drift(
    svc: TenantService, key: str, *, parallel: int = DEFAULT_PARALLEL
) -> list[DriftResult]:
    """Check every tenant of ``key`` that holds a database, ``parallel`` at a time (one
    connection each, opened and closed); keep each result."""
    validate_template_key(key)
    # Every host's: each is read on its own host, against its host's build of its version.
    tenants = svc.list(template=key, include_trashed=True, limit=1_000_000)
    if not tenants and svc.templates.current_build(key) is None:
        raise TemplateNotFound(f"template {key!r} has no build and no tenants", template=key)
    open_ones = [t for t in tenants if t.status == lifecycle.TenantStatus.ACTIVE]
    reads: dict[str, _Read] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        found = pool.map(lambda t: _read(svc, t), open_ones)
        for tenant, read in zip(open_ones, found, strict=True):
            reads[tenant.database] = read
    # Closed ones one by one: each is opened (to monk's admin alone) under its lock.
    for tenant in tenants:
        if tenant.database not in reads:
            reads[tenant.database] = _read(svc, tenant)
    expected: dict[tuple[str, str, str], tuple[str, Catalog] | None] = {}
    results = []
    for tenant in tenants:
        result = _check(svc, tenant, reads[tenant.database], expected)
        _record(svc, tenant, result)
        results.append(result)
    return results


def last_results(svc: TenantService, key: str | None = None) -> list[fleet_rows.DriftCheck]:
    """The last drift check of each live tenant (of ``key``), from the system database."""
    out: list[fleet_rows.DriftCheck] = []
    with svc.hosts.pools().system() as reg:
        for host in host_templates.every_host(svc):
            out += fleet_rows.drift_checks(reg, host, key=key)
    return out


def last_result(svc: TenantService, raw_name: str) -> fleet_rows.DriftCheck | None:
    tenant = svc.get(raw_name)
    with svc.hosts.pools(tenant.host).system() as reg:
        return fleet_rows.drift_check(reg, tenant.id)


# ---------------------------------------------------------------------------- the steps


def _read(svc: TenantService, tenant: Tenant) -> _Read:
    """The tenant's claim and catalog, read in its database (one connection)."""
    if tenant.status not in lifecycle.SETTLED:
        return _Read(None, None, f"not checked: the tenant is {tenant.status}")
    pools = svc.hosts.pools(tenant.host)
    try:
        if tenant.status == lifecycle.TenantStatus.ACTIVE:
            return _read_open(svc, tenant)
        with pools.system() as reg:
            if not locks.try_lock(reg, tenant.database):
                return _Read(None, None, "not checked: busy with another operation")
            try:
                with pools.admin() as adm:
                    admin.set_allow_connections(adm, tenant.database, True)
                    try:
                        return _read_open(svc, tenant)
                    finally:
                        admin.set_allow_connections(adm, tenant.database, False)
            finally:
                locks.unlock(reg, tenant.database)
    except MonkError as exc:
        return _Read(None, None, f"not checked: {exc.message}")
    except psycopg.Error as exc:
        known = translate(exc)
        return _Read(None, None, f"not checked: {known.message if known else exc}")


def _read_open(svc: TenantService, tenant: Tenant) -> _Read:
    target = svc.hosts.target(tenant.host)
    with connect(target, tenant.database, purpose="drift") as db:
        # One snapshot for the claim and the catalog: an upgrade commits both or neither.
        db.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        record = template_db.read_build_record(db)
        catalog = read_catalog(db)
        db.rollback()
    return _Read((record[0], record[1]) if record else None, catalog)


def _check(
    svc: TenantService,
    tenant: Tenant,
    read: _Read,
    expected: dict[tuple[str, str, str], tuple[str, Catalog] | None],
) -> DriftResult:
    """Compare what was read with the claimed build's catalog on the tenant's host (looked up
    once per host and build: a host of another major renders its catalog its own way)."""
    if read.claim is not None:
        key, version, claimed_by = read.claim[0], read.claim[1], "database"
    else:
        key, version = tenant.template_key or "", tenant.template_version or ""
        claimed_by = "registry"
    base = DriftResult(
        name=tenant.name,
        database=tenant.database,
        status=tenant.status,
        template_key=key or None,
        template_version=version or None,
        claimed_by=claimed_by,
        drifted=None,
        differences=(),
        fingerprint=read.catalog.fingerprint() if read.catalog else None,
        expected_fingerprint=None,
        error=read.error,
        checked_at=datetime.now(UTC),
    )
    if read.catalog is None:
        return base
    if not key or not version:
        return dataclasses.replace(base, error="not checked: no build recorded for the tenant")
    if (tenant.host, key, version) not in expected:
        found = host_templates.service_of(svc, tenant.host).build_catalog(key, version)
        expected[tenant.host, key, version] = (found[1].fingerprint(), found[1]) if found else None
    want = expected[tenant.host, key, version]
    if want is None:
        return dataclasses.replace(
            base,
            error=f"not checked: build {version} of {key!r} recorded no catalog and its "
            "database is gone",
        )
    found_differences = tuple(differences(want[1], read.catalog))
    return dataclasses.replace(
        base,
        drifted=bool(found_differences),
        differences=found_differences,
        expected_fingerprint=want[0],
    )


def _record(svc: TenantService, tenant: Tenant, result: DriftResult) -> None:
    with svc.hosts.pools(tenant.host).system() as reg:
        fleet_rows.record_drift(
            reg,
            tenant_id=tenant.id,
            host=tenant.host,
            template_key=result.template_key,
            template_version=result.template_version,
            drifted=result.drifted,
            differences=[d.as_dict() for d in result.differences],
            fingerprint=result.fingerprint,
            error=result.error,
        )
