"""Spare roles in the system database. On the registry's own server (``host`` NULL) rows and
roles are made, claimed and dropped together by the system functions ``make_spare_role``,
``claim_spare_role`` (a cold provision's: ``claim_spare_role_or_raise``, in its activation's
transaction, migration 0027) and ``drop_spare_roles``; on a host of the fleet the row is
written here and the role there, in a crash-safe order (migration 0026,
``monk.service.role_pool``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

import psycopg

Conn = psycopg.Connection[Any]


@dataclass(frozen=True)
class SpareRoleRow:
    role: str
    keyholder: UUID
    tenant_id: UUID | None  # claimed by this intent (a host of the fleet)


def make(conn: Conn, role: str, *, verifier: str, mark: str, keyholder: UUID) -> None:
    """The role (LOGIN, with the password of ``verifier``, marked) and its row, in one
    transaction: the registry's own server."""
    conn.execute("SELECT make_spare_role(%s, %s, %s, %s)", (role, verifier, mark, keyholder))


def claim(conn: Conn, spare: str, role: str, *, keyholder: UUID) -> bool:
    """Rename ``spare``, a spare role of ``keyholder`` on the registry's server, into ``role``
    and delete its row, in the caller's transaction; False (nothing changed) when it is no
    longer such a spare (drained, dropped by another server's start-up)."""
    row = conn.execute(
        "SELECT claim_spare_role(%s, %s, %s)", (spare, role, keyholder), prepare=True
    ).fetchone()
    return bool(row and row[0])


# Raised by claim_spare_role_or_raise (migration 0027): the role is no longer a spare of the
# caller's process.
_GONE = "MK001"


def queue_claim(conn: Conn, spare: str, role: str, *, keyholder: UUID) -> None:
    """``claim``, queued in the caller's pipelined transaction (a cold provision's activation),
    failing the whole transaction when ``spare`` is no longer a spare of ``keyholder``
    (``claim_gone`` tells that error)."""
    conn.execute(
        "SELECT claim_spare_role_or_raise(%s, %s, %s)", (spare, role, keyholder), prepare=True
    )


def claim_gone(exc: BaseException) -> bool:
    """``exc`` is ``queue_claim``'s refusal: the spare role was gone (nothing was written)."""
    return isinstance(exc, psycopg.Error) and exc.sqlstate == _GONE


def add_row(conn: Conn, role: str, *, host: str, keyholder: UUID) -> None:
    """The row of a spare role about to be made on ``host`` (committed before the role)."""
    conn.execute(
        "INSERT INTO spare_roles (role, keyholder, host) VALUES (%s, %s, %s)",
        (role, keyholder, host),
    )


def held_by(conn: Conn, keyholder: UUID, host: str | None) -> set[str]:
    """The unclaimed spare roles of ``keyholder`` on ``host`` (None: the registry's server)."""
    rows = conn.execute(
        "SELECT role FROM spare_roles WHERE keyholder = %s AND host IS NOT DISTINCT FROM %s"
        " AND tenant_id IS NULL",
        (keyholder, host),
    )
    return {str(r[0]) for r in rows.fetchall()}


def count(conn: Conn, host: str | None) -> int:
    """Unclaimed spare roles on ``host`` (None: the registry's server)."""
    row = conn.execute(
        "SELECT count(*) FROM spare_roles WHERE host IS NOT DISTINCT FROM %s AND tenant_id IS NULL",
        (host,),
    ).fetchone()
    return int(row[0]) if row else 0


def counts_by_host(conn: Conn) -> dict[str | None, int]:
    """Unclaimed spare roles per host (None: the registry's server)."""
    rows = conn.execute(
        "SELECT host, count(*) FROM spare_roles WHERE tenant_id IS NULL GROUP BY host"
    ).fetchall()
    return {None if h is None else str(h): int(n) for h, n in rows}


def rows(conn: Conn, host: str | None) -> list[SpareRoleRow]:
    """Every spare role row of ``host`` (None: the registry's server), claimed ones too."""
    found = conn.execute(
        "SELECT role, keyholder, tenant_id FROM spare_roles WHERE host IS NOT DISTINCT FROM %s",
        (host,),
    ).fetchall()
    return [SpareRoleRow(str(r[0]), r[1], r[2]) for r in found]


def drop(conn: Conn, *, keep: UUID | None, only: UUID | None) -> int:
    """Drop the registry server's spare roles of every keyholder but ``keep`` (None: none
    spared), only of ``only`` (None: of any); returns how many."""
    row = conn.execute("SELECT drop_spare_roles(%s, %s)", (keep, only)).fetchone()
    return int(row[0]) if row else 0


def lock_one_unclaimed(conn: Conn, host: str, *, only: UUID | None, skip: list[str]) -> str | None:
    """One unclaimed spare role of ``host`` (of keyholder ``only``; None: of any), its row
    locked until the caller's transaction ends (a claim waits, then finds it gone)."""
    row = conn.execute(
        "SELECT role FROM spare_roles WHERE host = %s AND tenant_id IS NULL"
        " AND (%s::uuid IS NULL OR keyholder = %s) AND NOT role = ANY(%s)"
        " LIMIT 1 FOR UPDATE SKIP LOCKED",
        (host, only, only, skip),
    ).fetchone()
    return None if row is None else str(row[0])


def lock_row(conn: Conn, role: str) -> SpareRoleRow | None:
    """The row of ``role``, locked (FOR UPDATE) until the caller's transaction ends."""
    row = conn.execute(
        "SELECT role, keyholder, tenant_id FROM spare_roles WHERE role = %s FOR UPDATE", (role,)
    ).fetchone()
    return None if row is None else SpareRoleRow(str(row[0]), row[1], row[2])


def delete(conn: Conn, role: str) -> None:
    conn.execute("DELETE FROM spare_roles WHERE role = %s", (role,))


def claimed_by(conn: Conn, tenant_id: UUID) -> list[str]:
    """The spare roles claimed by the intent ``tenant_id`` (on a host of the fleet)."""
    found = conn.execute(
        "SELECT role FROM spare_roles WHERE tenant_id = %s", (tenant_id,)
    ).fetchall()
    return [str(r[0]) for r in found]


def delete_claimed(conn: Conn, tenant_id: UUID) -> None:
    """The rows of the spare roles the tenant ``tenant_id`` claimed (at its activation)."""
    conn.execute("DELETE FROM spare_roles WHERE tenant_id = %s", (tenant_id,))


def keyholders(conn: Conn, host: str) -> set[UUID]:
    """Keyholders of the unclaimed spare roles on ``host``."""
    found = conn.execute(
        "SELECT DISTINCT keyholder FROM spare_roles WHERE host = %s AND tenant_id IS NULL",
        (host,),
    ).fetchall()
    return {r[0] for r in found}


def forget_host(conn: Conn, host: str) -> int:
    """Delete the rows of every spare role of a host that is removed; returns how many."""
    return conn.execute("DELETE FROM spare_roles WHERE host = %s", (host,)).rowcount
