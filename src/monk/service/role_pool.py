"""Spare roles: tenant roles made ahead of time, so that a cold provision renames one.

A new role's password is the costliest bookkeeping of a cold provision: the client derives the
SCRAM verifier (PBKDF2, ~2 ms at 4096 iterations) and the server checks the new secret against
the empty password at the same cost (~4 ms), both on the CPU the clone needs. A spare role
(``monk_role_<16 hex>``, LOGIN, its password known only to the process that set it, named by
``keyholder``, so no more exposed than the tenant role it becomes) is made in idle time by
``monk serve``'s refiller, on every host that takes new tenants (roles are per server).

- **On the registry's server** (the local host) role and row are made together
  (``make_spare_role``); a provision takes one in memory at its reservation, and its
  activation's transaction renames it to ``tenant_<hash>`` and deletes the row
  (``claim_spare_role_or_raise``, ``spare_roles.queue_claim``), so that nothing of it is
  dirty when a FILE_COPY clone's checkpoint runs: a crash leaves the role either still a spare
  (of a dead process: dropped at the next start-up or by ``monk doctor``) or the tenant's,
  active. A spare role dropped meanwhile (a drain) fails the claim, and the provision makes a
  new role.
- **On a host of the fleet** the registry's transaction cannot reach the role, so the steps are
  ordered: the row commits first, then the role is made there (``make_tenant_role``, monk's
  function on the host): a crash leaves a row without a role, never a role nobody knows. The
  reservation marks the row with the intent (``claim_host_spare_role``), the role is renamed
  on the host after its commit (``Pipeline.obtain_role``, ``rename_spare_role`` there) and the
  row deleted with the activation; the intent's undo drops the role under either name. A
  host's spare roles are dropped role first, then row, each under its row's lock.

With none ready the provision makes its role beside the clone, as before.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any
from uuid import UUID

import psycopg

from monk.adapters import registry
from monk.adapters.postgres import admin
from monk.adapters.postgres.pools import ServerPools
from monk.adapters.registry import hosts as host_registry
from monk.adapters.registry import spare_roles
from monk.core import scram
from monk.errors import MonkError
from monk.service.pipeline import Pipeline

log = logging.getLogger(__name__)

ROLE_PREFIX = "monk_role_"


def is_spare_role_name(name: str) -> bool:
    rest = name.removeprefix(ROLE_PREFIX)
    return rest != name and len(rest) == 16 and all(c in "0123456789abcdef" for c in rest)


def _new_name() -> str:
    return f"{ROLE_PREFIX}{secrets.token_hex(8)}"


def row_host(pools: ServerPools) -> str | None:
    """How ``spare_roles.host`` names the server of ``pools``: NULL for the registry's own."""
    return None if pools.keeps_registry else pools.target.name


def fill(svc: Pipeline, count: int, *, host: str | None = None) -> int:
    """Make spare roles on ``host`` (default: the local one) until this process holds
    ``count`` there; returns how many it made. Spare roles of this process that are gone from
    the registry (another server's start-up dropped them, a claim) are forgotten first."""
    pools = svc.hosts.pools(host)
    on, where = pools.target.name, row_host(pools)
    with pools.system() as reg:
        held = spare_roles.held_by(reg, svc.instance_id, where)
    svc.role_secrets.keep_only(held, on)
    made = 0
    if svc.role_secrets.count(on) < count:
        svc.hold_keyholder_lock()
    while svc.role_secrets.count(on) < count:
        role, password = _new_name(), scram.generate_password()
        verifier = svc.verifier(password)
        if where is None:
            with pools.system() as reg:
                spare_roles.make(
                    reg,
                    role,
                    verifier=verifier,
                    mark=svc.ownership_mark(),
                    keyholder=svc.instance_id,
                )
        else:
            _make_on_host(svc, pools, role, verifier)
        svc.role_secrets.put(role, password, on)
        made += 1
    if made:
        log.info("made %d spare role(s) on %s", made, on)
    return made


def _make_on_host(svc: Pipeline, pools: ServerPools, role: str, verifier: str) -> None:
    """The row committed, then the role made on the host; a failure of the second step
    removes the row again (a crash leaves it: a row without a role, dropped with its dead
    keyholder's others, or by ``monk doctor --repair``)."""
    with pools.system() as reg:
        spare_roles.add_row(reg, role, host=pools.target.name, keyholder=svc.instance_id)
    svc.checkpoint("spare-role-row")
    try:
        svc.make_role_on(pools, role, verifier=verifier, login=True, connection_limit=-1)
    except BaseException:
        try:
            with pools.system() as reg:
                spare_roles.delete(reg, role)
        except Exception as exc:  # the row alone is harmless: no role, no password
            log.warning("could not remove the row of spare role %s: %s", role, exc)
        raise


def refill(svc: Pipeline, count: int) -> None:
    """One pass of the refiller for spare roles: ``count`` of them on every host that takes new
    tenants (``Hosts.spare_hosts``: the local one and each active, reachable host of the
    fleet); a draining host's are dropped. A host that fails never keeps the others' spare
    roles from being made; the first failure is the pass's, raised at its end."""
    first: Exception | None = None
    for host, active in svc.hosts.spare_hosts():
        try:
            if active:
                fill(svc, count, host=host)
            else:
                drain(svc, host=host)
        except Exception as exc:
            first = first or exc
    if first is not None:
        raise first


def _fleet_hosts(svc: Pipeline) -> list[str]:
    """Hosts of the fleet that have spare role rows."""
    with svc.hosts.pools().system() as reg:
        return sorted(h for h in spare_roles.counts_by_host(reg) if h is not None)


def drop_others(svc: Pipeline) -> int:
    """The spare roles of every keyholder that is gone, dropped on every host (their passwords
    died with it): run when a server starts, the roles its predecessor made are useless to
    anyone. Those of a live keyholder (another server on this system database) are its own.
    A host that cannot be reached keeps its rows for a later start or ``monk doctor``."""
    with svc.hosts.pools().system() as reg:
        dead = [k for k in registry.dead_keyholders(reg, svc.instance_id, of="spare_roles") if k]
    if not dead:
        return 0
    with svc.hosts.pools().system() as reg:
        dropped = sum(spare_roles.drop(reg, keep=None, only=k) for k in dead)
    for host in _fleet_hosts(svc):
        for k in dead:
            dropped += _try_drop_on_host(svc, host, only=k)
    return dropped


def drop_own(svc: Pipeline) -> int:
    """This process's spare roles, dropped on every host; returns how many."""
    with svc.hosts.pools().system() as reg:
        dropped = spare_roles.drop(reg, keep=None, only=svc.instance_id)
    for host in _fleet_hosts(svc):
        dropped += _try_drop_on_host(svc, host, only=svc.instance_id)
    svc.role_secrets.clear()
    return dropped


def drain(svc: Pipeline, *, host: str | None = None) -> int:
    """Every unclaimed spare role on ``host`` (default: the local one), of any keyholder,
    dropped; returns how many."""
    pools = svc.hosts.pools(host)
    if pools.keeps_registry:
        with pools.system() as reg:
            dropped = spare_roles.drop(reg, keep=None, only=None)
    else:
        dropped = _drop_on_host(svc, pools, only=None)
    svc.role_secrets.keep_only(set(), pools.target.name)
    return dropped


def drain_all(svc: Pipeline) -> dict[str, int]:
    """``drain`` on the local host and on every host of the fleet with spare roles: how many
    were dropped on each (a host that fails is left out, logged)."""
    out = {svc.hosts.local.name: drain(svc)}
    for host in _fleet_hosts(svc):
        try:
            out[host] = drain(svc, host=host)
        except MonkError as exc:
            log.warning("could not drop the spare roles of host %s: %s", host, exc.message)
    return out


def count(svc: Pipeline, *, host: str | None = None) -> int:
    """Unclaimed spare roles on ``host`` (default: the local one)."""
    pools = svc.hosts.pools(host)
    with pools.system() as reg:
        return spare_roles.count(reg, row_host(pools))


def status(svc: Pipeline) -> list[dict[str, Any]]:
    """Spare roles per host, as ``monk pool status`` and the console show them: ``ready``
    (unclaimed), and ``target``, what ``monk serve``'s refiller keeps there (MONK_POOL_ROLES on
    a host that takes new tenants, 0 on a draining one). The local host first, then each host
    of the fleet by name (registered, or still holding spare roles), read in one session."""
    with svc.hosts.pools().system() as reg:
        return status_in(svc, reg)


def status_in(svc: Pipeline, reg: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """``status``, read on the caller's registry session (/metrics reads it with the rest)."""
    found = spare_roles.counts_by_host(reg)
    rows = host_registry.list_all(reg)
    local = svc.hosts.local.name
    local_row = next((r for r in rows if r.is_local), None)
    takes = {local: local_row is None or local_row.state == "active"}
    takes |= {r.name: r.state == "active" for r in rows if not r.is_local}
    ready = {local: found.pop(None, 0)} | {str(h): n for h, n in found.items()}
    names = [local, *sorted((set(takes) | set(ready)) - {local})]
    target = svc.settings.pool_roles
    return [
        {"host": h, "ready": ready.get(h, 0), "target": target if takes.get(h) else 0}
        for h in names
    ]


def _try_drop_on_host(svc: Pipeline, host: str, *, only: UUID | None) -> int:
    try:
        return _drop_on_host(svc, svc.hosts.pools(host), only=only)
    except MonkError as exc:
        log.warning("could not drop spare roles on host %s: %s", host, exc.message)
        return 0


def _drop_on_host(svc: Pipeline, pools: ServerPools, *, only: UUID | None) -> int:
    """Unclaimed spare roles on a host of the fleet (of keyholder ``only``; None: of any),
    dropped one at a time: its row locked, the role dropped there, then the row deleted (a
    crash in between leaves a row without a role; a claim waits for the lock and then finds
    the row gone)."""
    host = pools.target.name
    dropped = 0
    failed: list[str] = []
    while True:
        with pools.system() as reg, reg.transaction():
            role = spare_roles.lock_one_unclaimed(reg, host, only=only, skip=failed)
            if role is None:
                break
            try:
                with pools.admin() as adm:
                    admin.drop_role(adm, role)
            except MonkError as exc:
                if exc.retryable:  # the host went away: the rest waits for it too
                    raise
                log.warning("could not drop spare role %s on %s: %s", role, host, exc.message)
                failed.append(role)
                continue
            spare_roles.delete(reg, role)
            dropped += 1
    return dropped


def repair_dead_row(svc: Pipeline, role: str, *, host: str | None = None) -> str:
    """A spare role whose keyholder is gone (its password died with it), dropped on its
    server, then its row, under the row's lock (a crash in between leaves a row without a
    role: ``lost_spare_role``); ``monk doctor --repair``. A claimed row, or one of a live
    keyholder, is left alone."""
    pools = svc.hosts.pools(host)
    with pools.system() as reg, reg.transaction():
        row = spare_roles.lock_row(reg, role)
        if row is None or row.tenant_id is not None:
            return "gone or claimed, left alone"
        dead = registry.dead_keyholders(reg, svc.instance_id, of="spare_roles")
        if row.keyholder not in dead:
            return "its process is alive, left alone"
        with pools.admin() as adm:
            admin.drop_role(adm, role)
        spare_roles.delete(reg, role)
    return "role and row dropped"


def repair_lost_row(svc: Pipeline, role: str, *, host: str | None = None) -> str:
    """A spare role row whose role is not on its server (its maker died between the row and
    the role), deleted under its lock if that is still so; ``monk doctor --repair``."""
    pools = svc.hosts.pools(host)
    with pools.system() as reg, reg.transaction():
        row = spare_roles.lock_row(reg, role)
        if row is None or row.tenant_id is not None:
            return "gone or claimed, left alone"
        with pools.admin() as adm:
            if admin.role_exists(adm, role):
                return "its role is there, left alone"
        spare_roles.delete(reg, role)
    return "row deleted"
