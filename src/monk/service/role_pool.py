"""Spare roles: tenant roles made ahead of time, so that a cold provision renames one.

A new role's password is the costliest bookkeeping of a cold provision: the client derives the
SCRAM verifier (PBKDF2, ~2 ms at 4096 iterations) and the server checks the new secret against
the empty password at the same cost (~4 ms), both on the CPU the clone needs. A spare role
(``monk_role_<16 hex>``, LOGIN, its password known only to the process that set it, named by
``keyholder``, so no more exposed than the tenant role it becomes) is made in idle time by
``monk serve``'s refiller; the provision's intent transaction renames it to ``tenant_<hash>``
(system function ``claim_spare_role``), so a crash leaves the role either still a spare or the
tenant's, undone with the intent; the clone is then created with it as owner.

With none ready, or when the registry is on another server than the tenant (roles are
per server), the provision makes its role beside the clone, as before.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any
from uuid import UUID

import psycopg

from monk.adapters import registry
from monk.core import scram
from monk.service.pipeline import Pipeline

log = logging.getLogger(__name__)

ROLE_PREFIX = "monk_role_"


def is_spare_role_name(name: str) -> bool:
    rest = name.removeprefix(ROLE_PREFIX)
    return rest != name and len(rest) == 16 and all(c in "0123456789abcdef" for c in rest)


def _new_name() -> str:
    return f"{ROLE_PREFIX}{secrets.token_hex(8)}"


def claim(
    svc: Pipeline, reg: psycopg.Connection[Any], role: str
) -> tuple[psycopg.Cursor[Any], tuple[str, str]] | None:
    """Queue, in the caller's transaction (and pipeline), the renaming of one of this process's
    spare roles into ``role``; returns the cursor that answers whether it happened, and the
    spare's (name, password), to give back with ``release`` if the transaction rolled back.
    None when this process knows no spare role. (A free name's intent claims inside
    ``registry.gated_intent`` instead.)"""
    spare = svc.role_secrets.take()
    if spare is None:
        return None
    cur = reg.execute(
        "SELECT claim_spare_role(%s, %s, %s)", (spare[0], role, svc.instance_id), prepare=True
    )
    return cur, spare


def settle(svc: Pipeline, claim: tuple[psycopg.Cursor[Any], tuple[str, str]] | None) -> bool:
    """After the claim's transaction committed: whether its spare role was renamed (if not, it
    was gone: another server's start-up dropped it, and it is forgotten)."""
    if claim is None:
        return False
    row = claim[0].fetchone()
    return bool(row and row[0])


def release(svc: Pipeline, spare: tuple[str, str]) -> None:
    """A claim whose transaction rolled back: the role is still a spare, and ours."""
    svc.role_secrets.put(*spare)


def fill(svc: Pipeline, count: int, *, host: str | None = None) -> int:
    """Make spare roles until this process holds ``count``; returns how many it made. Spare
    roles of this process that are gone from the registry (another server's start-up dropped
    them) are forgotten first."""
    pools = svc.hosts.pools(host)
    if not svc.registry_shares_server(pools):
        return 0
    with pools.system() as reg:
        rows = reg.execute(
            "SELECT role FROM spare_roles WHERE keyholder = %s", (svc.instance_id,)
        ).fetchall()
    svc.role_secrets.keep_only({str(r[0]) for r in rows})
    made = 0
    if len(svc.role_secrets) < count:
        svc.hold_keyholder_lock()
    while len(svc.role_secrets) < count:
        role, password = _new_name(), scram.generate_password()
        verifier = svc.verifier(password)
        with pools.system() as reg:
            reg.execute(
                "SELECT make_spare_role(%s, %s, %s, %s)",
                (role, verifier, svc.ownership_mark(), svc.instance_id),
            )
        svc.role_secrets.put(role, password)
        made += 1
    if made:
        log.info("made %d spare role(s)", made)
    return made


def drop_others(svc: Pipeline, *, host: str | None = None) -> int:
    """Drop the spare roles of every keyholder that is gone (their passwords died with it):
    run when a server starts, the roles its predecessor made are useless to anyone. Those of
    a live keyholder (another server on this system database) are its own."""
    with svc.hosts.pools(host).system() as reg:
        dead = registry.dead_keyholders(reg, svc.instance_id, of="spare_roles")
    return sum(_drop(svc, keep=None, only=k, host=host) for k in dead if k is not None)


def drop_own(svc: Pipeline, *, host: str | None = None) -> int:
    """Drop this process's spare roles; returns how many."""
    dropped = _drop(svc, keep=None, only=svc.instance_id, host=host)
    svc.role_secrets.keep_only(set())
    return dropped


def drain(svc: Pipeline, *, host: str | None = None) -> int:
    """Drop every spare role, of any keyholder; returns how many."""
    dropped = _drop(svc, keep=None, only=None, host=host)
    svc.role_secrets.keep_only(set())
    return dropped


def count(svc: Pipeline, *, host: str | None = None) -> int:
    with svc.hosts.pools(host).system() as reg:
        row = reg.execute("SELECT count(*) FROM spare_roles").fetchone()
    return int(row[0]) if row else 0


def _drop(svc: Pipeline, *, keep: UUID | None, only: UUID | None, host: str | None) -> int:
    with svc.hosts.pools(host).system() as reg:
        row = reg.execute("SELECT drop_spare_roles(%s, %s)", (keep, only)).fetchone()
    return int(row[0]) if row else 0
