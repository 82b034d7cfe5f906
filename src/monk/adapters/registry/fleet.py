"""The tenants of a template key as a fleet: where they are (build, level, status), the spares
per build, and the last drift check of each tenant (``drift_checks``).

Every function takes an open autocommit connection to the system database.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

Conn = psycopg.Connection[Any]


@dataclass(frozen=True)
class DriftCheck:
    """The last drift check of one tenant."""

    tenant_id: UUID
    name: str
    database: str
    template_key: str | None
    template_version: str | None
    checked_at: datetime
    drifted: bool | None
    differences: list[dict[str, str]]
    fingerprint: str | None
    error: str | None
    registry_version: str | None
    """The build the registry records for the tenant now (an upgrade since the check moves it)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "database": self.database,
            "template_key": self.template_key,
            "template_version": self.template_version,
            "drifted": self.drifted,
            "differences": list(self.differences),
            "fingerprint": self.fingerprint,
            "error": self.error,
            "checked_at": self.checked_at.isoformat(),
        }


@dataclass(frozen=True)
class FleetCount:
    """How many tenants (or spares) of a key are at one build and level, in one status."""

    version: str
    level: int
    status: str
    count: int


def record_drift(
    conn: Conn,
    *,
    tenant_id: UUID,
    host: str,
    template_key: str | None,
    template_version: str | None,
    drifted: bool | None,
    differences: Sequence[dict[str, str]],
    fingerprint: str | None,
    error: str | None,
) -> None:
    """Keep the result of a tenant's drift check (replacing the one before)."""
    conn.execute(
        "INSERT INTO drift_checks (tenant_id, host, template_key, template_version, drifted,"
        " differences, fingerprint, error) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (tenant_id) DO UPDATE SET host = EXCLUDED.host,"
        " template_key = EXCLUDED.template_key, template_version = EXCLUDED.template_version,"
        " checked_at = now(), drifted = EXCLUDED.drifted, differences = EXCLUDED.differences,"
        " fingerprint = EXCLUDED.fingerprint, error = EXCLUDED.error",
        (
            tenant_id,
            host,
            template_key,
            template_version,
            drifted,
            Jsonb(list(differences)),
            fingerprint,
            error,
        ),
    )


def forget_host(conn: Conn, host: str) -> int:
    """Delete the drift checks made against the builds of a host that is removed (they are
    listed under that host only); returns how many."""
    return conn.execute("DELETE FROM drift_checks WHERE host = %s", (host,)).rowcount


_DRIFT_SELECT = (
    "SELECT d.tenant_id, t.name, t.database, d.template_key, d.template_version, d.checked_at,"
    " d.drifted, d.differences, d.fingerprint, d.error, t.template_version AS registry_version"
    " FROM drift_checks d JOIN tenants t ON t.id = d.tenant_id"
    " WHERE t.deleted_at IS NULL AND d.host = %s"
)


def drift_checks(
    conn: Conn, host: str, *, key: str | None = None, drifted_only: bool = False
) -> list[DriftCheck]:
    """The last drift check of each live tenant (of ``key``; only those that drifted), by name."""
    with conn.cursor(row_factory=class_row(DriftCheck)) as cur:
        cur.execute(
            _DRIFT_SELECT + " AND (%s::text IS NULL OR t.template_key = %s)"
            " AND (NOT %s OR d.drifted) ORDER BY t.name_key",
            (host, key, key, drifted_only),
        )
        return cur.fetchall()


def drift_check(conn: Conn, tenant_id: UUID) -> DriftCheck | None:
    with conn.cursor(row_factory=class_row(DriftCheck)) as cur:
        cur.execute(
            "SELECT d.tenant_id, t.name, t.database, d.template_key, d.template_version,"
            " d.checked_at, d.drifted, d.differences, d.fingerprint, d.error,"
            " t.template_version AS registry_version"
            " FROM drift_checks d JOIN tenants t ON t.id = d.tenant_id WHERE d.tenant_id = %s",
            (tenant_id,),
        )
        return cur.fetchone()


def tenant_counts(conn: Conn, host: str, key: str) -> list[FleetCount]:
    """Tenants of ``key`` that hold a database, per (build version, level, status)."""
    with conn.cursor(row_factory=class_row(FleetCount)) as cur:
        cur.execute(
            "SELECT coalesce(template_version, '') AS version, migration_level AS level,"
            " status, count(*)::int AS count FROM tenants"
            " WHERE host = %s AND template_key = %s AND deleted_at IS NULL"
            " GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
            (host, key),
        )
        return cur.fetchall()


def spare_counts(conn: Conn, host: str, key: str) -> list[FleetCount]:
    """Spares of ``key`` per (build version, level, status)."""
    with conn.cursor(row_factory=class_row(FleetCount)) as cur:
        cur.execute(
            "SELECT template_version AS version, migration_level AS level, status,"
            " count(*)::int AS count FROM spares WHERE host = %s AND template_key = %s"
            " GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
            (host, key),
        )
        return cur.fetchall()
