"""Spare roles: tenant roles made ahead of time, so that a cold provision renames one.

A new role's password is the costliest bookkeeping of a cold provision: the client derives the
SCRAM verifier (PBKDF2, ~2 ms at 4096 iterations) and the server checks the new secret against
the empty password at the same cost (~4 ms), both on the CPU the clone needs. A spare role
(``monk_role_<16 hex>``, LOGIN, its password known only to the process that set it, named by
``keyholder``, so no more exposed than the tenant role it becomes) is made in idle time by
``monk serve``'s refiller; the provision's intent transaction renames it to ``tenant_<hash>``
(system function ``claim_spare_role``), so a crash leaves the role either still a spare or the
tenant's, undone with the intent; the clone is then created with it as owner. The claim is part
of the reservation's one statement (``registry.tenants.reserve``).

With none ready, or when the registry is on another server than the tenant (roles are
per server), the provision makes its role beside the clone, as before.
"""

from __future__ import annotations

import logging
import secrets
from uuid import UUID

from monk.adapters import registry
from monk.adapters.registry import spare_roles
from monk.core import scram
from monk.service.pipeline import Pipeline

log = logging.getLogger(__name__)

ROLE_PREFIX = "monk_role_"


def is_spare_role_name(name: str) -> bool:
    rest = name.removeprefix(ROLE_PREFIX)
    return rest != name and len(rest) == 16 and all(c in "0123456789abcdef" for c in rest)


def _new_name() -> str:
    return f"{ROLE_PREFIX}{secrets.token_hex(8)}"


def fill(svc: Pipeline, count: int, *, host: str | None = None) -> int:
    """Make spare roles until this process holds ``count``; returns how many it made. Spare
    roles of this process that are gone from the registry (another server's start-up dropped
    them) are forgotten first."""
    pools = svc.hosts.pools(host)
    if not svc.registry_shares_server(pools):
        return 0
    with pools.system() as reg:
        held = spare_roles.held_by(reg, svc.instance_id)
    svc.role_secrets.keep_only(held)
    made = 0
    if len(svc.role_secrets) < count:
        svc.hold_keyholder_lock()
    while len(svc.role_secrets) < count:
        role, password = _new_name(), scram.generate_password()
        verifier = svc.verifier(password)
        with pools.system() as reg:
            spare_roles.make(
                reg, role, verifier=verifier, mark=svc.ownership_mark(), keyholder=svc.instance_id
            )
        svc.role_secrets.put(role, password)
        made += 1
    if made:
        log.info("made %d spare role(s)", made)
    return made


def drop_others(svc: Pipeline, *, host: str | None = None) -> int:
    """The spare roles of every keyholder that is gone, dropped (their passwords died with it):
    run when a server starts, the roles its predecessor made are useless to anyone. Those of
    a live keyholder (another server on this system database) are its own."""
    with svc.hosts.pools(host).system() as reg:
        dead = registry.dead_keyholders(reg, svc.instance_id, of="spare_roles")
    return sum(_drop(svc, keep=None, only=k, host=host) for k in dead if k is not None)


def drop_own(svc: Pipeline, *, host: str | None = None) -> int:
    """This process's spare roles, dropped; returns how many."""
    dropped = _drop(svc, keep=None, only=svc.instance_id, host=host)
    svc.role_secrets.keep_only(set())
    return dropped


def drain(svc: Pipeline, *, host: str | None = None) -> int:
    """Every spare role, of any keyholder, dropped; returns how many."""
    dropped = _drop(svc, keep=None, only=None, host=host)
    svc.role_secrets.keep_only(set())
    return dropped


def count(svc: Pipeline, *, host: str | None = None) -> int:
    with svc.hosts.pools(host).system() as reg:
        return spare_roles.count(reg)


def _drop(svc: Pipeline, *, keep: UUID | None, only: UUID | None, host: str | None) -> int:
    with svc.hosts.pools(host).system() as reg:
        return spare_roles.drop(reg, keep=keep, only=only)
