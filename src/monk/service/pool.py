"""The warm pool: spare databases cloned ahead of time, handed out by renaming.

A spare has gone through the tenant pipeline's steps that do not depend on the tenant, under a
neutral name (``monk_spare_<16 hex>``): obtain a database (a clone of a template build),
migrate, obtain a role (its own NOLOGIN role, same name), configure (the role owns the
database, CONNECT revoked from PUBLIC, database settings, the ownership mark). Handing one out
is the rest of the pipeline in one statement on the registry session, the system function
``hand_out_spare``: reserve the name, rename the database and the role to ``tenant_<hash>``,
LOGIN (and the tenant's own connection limit), journal, activate. A crash at any point leaves
the spare ready and no trace of the tenant.

Spare states: creating -> ready (-> row deleted by the handout that consumes it). The creator
holds the spare's advisory lock, so the reconciler can tell a live creation from a crash.

A spare also holds the tenant's first user, ``root`` (access ``root``), its password generated
and hashed (argon2id, ~80 ms of CPU) by the process that made it, in the step that connects to
the spare: a warm handout answers that password and hashes nothing.

Secrets of spares (the role's password, the root user's) live only in the memory of the
process that set them (never in the registry); the spare's ``keyholder`` column names that
process. A handout names a spare whose secrets this process knows; under the name's lock (the
provision's full path) it may also adopt a ready spare of another keyholder first
(``adopt_one``: new passwords for its role and its root user).

``adopt`` gives spares of departed keyholders secrets this process knows, ahead of time, so
that a restarted server hands out its predecessor's spares on the fast path.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any
from uuid import UUID, uuid4

import psycopg

from monk.adapters import registry
from monk.adapters.postgres import admin, tenant_users
from monk.adapters.postgres.connection import connect, translate
from monk.adapters.postgres.pools import ServerPools
from monk.adapters.registry import Tenant, spares
from monk.adapters.registry import templates as template_builds
from monk.adapters.registry import tenants as tenant_registry
from monk.adapters.registry.spares import SpareRow as SpareRow
from monk.adapters.registry.templates import TemplateBuild
from monk.core import scram
from monk.core.tenant_names import TenantName
from monk.errors import InvalidState, MonkError, TemplateBusy
from monk.service.pipeline import Pipeline, RootPassword, SpareSecret

log = logging.getLogger(__name__)

SPARE_PREFIX = "monk_spare_"


def _new_name() -> str:
    return f"{SPARE_PREFIX}{secrets.token_hex(8)}"


def counts(reg: psycopg.Connection[Any], host: str) -> dict[tuple[str, str], int]:
    """Spares being made or ready, per (template key, version)."""
    return spares.counts(reg, host)


def create_spare(svc: Pipeline, pools: ServerPools, build: TemplateBuild) -> str:
    """Make one ready spare of ``build``; a failure leaves nothing behind."""
    name = _new_name()
    svc.hold_keyholder_lock()
    with pools.system() as reg:
        registry.try_lock(reg, name)  # a fresh random name: always ours
        try:
            spare_id = spares.insert(
                reg,
                host=pools.target.name,
                template_key=build.key,
                template_version=build.version,
                database=name,
                keyholder=svc.instance_id,
            )
            try:
                with pools.admin() as adm:
                    cloned = svc.clone(adm, pools.target, name, build, lambda: reg)
                if cloned.id != build.id:
                    build = cloned
                    spares.set_version(reg, spare_id, build.version)
                svc.checkpoint("spare-cloned")
                # The refiller's thread pays for the root user's hash, never a handout.
                root_password, root_hash = svc.root_passwords.take()
                level, rooted = svc.prepare(
                    pools.target,
                    name,
                    build,
                    root_hash,
                    async_commit=svc.registry_shares_server(pools),
                )
                limit = svc.settings.tenant_connection_limit
                if pools.keeps_registry:
                    role = svc.create_role(reg, name, login=False)
                    svc.configure(reg, name, name, build.database_settings, limit)
                else:
                    # A host of the fleet: the same steps, run there (monk's functions).
                    role = svc.create_remote_role(pools, name, login=False)
                    svc.configure_remote(pools, name, name, build.database_settings, limit)
                svc.spare_secrets.put(
                    name,
                    SpareSecret(
                        role.password,
                        root_password if rooted else None,
                        build.key,
                        pools.target.name,
                    ),
                )
                try:
                    # Ready only if the build cloned is still current (a rebuild during the
                    # clone: dropped below; the refill clones the new build).
                    with registry.pipelined_transaction(reg):
                        template_builds.queue_build_check(
                            reg, build.key, pools.target.name, build.id
                        )
                        spares.mark_ready(reg, spare_id, level)
                except psycopg.Error as exc:
                    if not template_builds.rebuilt(exc):
                        raise
                    raise TemplateBusy(
                        f"template {build.key!r} was rebuilt during the clone of spare {name}",
                        template=build.key,
                    ) from None
            except BaseException:
                svc.spare_secrets.take(name)  # never served: its secret goes with it
                _drop_spare(pools, name)
                spares.delete(reg, spare_id)
                raise
        finally:
            registry.unlock(reg, name)
    return name


def _drop_spare(pools: ServerPools, name: str) -> None:
    with pools.admin() as adm:
        admin.drop_database(adm, name)
        admin.drop_role(adm, name)


def hand_out(
    svc: Pipeline,
    reg: psycopg.Connection[Any],
    *,
    name: TenantName,
    host: str,
    template: str,
    idempotency_key: str | None,
    connection_limit: int | None = None,
    any_spare: bool = False,
) -> tuple[Tenant, str, str | None] | None:
    """Hand a ready spare of the template's current build out as the tenant (see the module's
    docstring): first one whose secrets this process knows, then, with ``any_spare``, one of
    another keyholder, adopted first (``adopt_one``: new secrets). Returns (tenant, role
    password, root user's password), or None when no spare was handed out (none ready, or the
    name busy or taken: the caller's full path knows what to answer)."""
    picked = svc.spare_secrets.take_for(template, host)
    if picked is not None:
        handed = _hand_out_one(
            svc, reg, name, host, template, idempotency_key, connection_limit, picked
        )
        if handed is not None or not any_spare:
            return handed
    elif not any_spare:
        return None
    adopted = adopt_one(svc, reg, host, template)
    if adopted is None:
        return None
    return _hand_out_one(
        svc, reg, name, host, template, idempotency_key, connection_limit, adopted, full=True
    )


def hand_out_remote(
    svc: Pipeline,
    reg: psycopg.Connection[Any],
    pools: ServerPools,
    *,
    name: TenantName,
    build: TemplateBuild,
    idempotency_key: str | None,
    connection_limit: int | None = None,
    have_lock: bool = False,
    any_spare: bool = False,
) -> tuple[Tenant, str, str | None] | None:
    """The warm handout on a host of the fleet, where ``hand_out_spare`` cannot rename (its
    renames are on the registry's server): the name reserved (intent, journal), a ready spare
    of ``build`` claimed for it in the registry, renamed into the tenant's database and role
    on the host (``rename_spare_into``, monk's function there), then the tenant activated and
    the spare's row deleted in one transaction. A failure undoes it all (the intent's undo
    drops the claimed spare too); so does the reconciler after a crash. ``any_spare``: with
    none of this process ready, another keyholder's is adopted first (``adopt_one``). Returns
    (tenant, role password, root user's password), or None with nothing written (no spare
    ready; the name busy or taken)."""
    host = pools.target.name
    picked = svc.spare_secrets.take_for(build.key, host)
    if picked is None and any_spare:
        picked = adopt_one(svc, reg, host, build.key)
    if picked is None:
        return None
    intent = svc.reserve(
        reg,
        pools,
        name,
        template_key=build.key,
        template_version=build.version,
        template_database=build.database,
        idempotency_key=idempotency_key,
        have_lock=have_lock,
        spares_ok=True,
        spare_role_ok=False,  # the spare brings its own role
    )
    if intent is None:
        svc.spare_secrets.put(*picked)
        return None
    tenant = intent.tenant
    try:
        claimed = spares.claim(
            reg,
            host,
            template_key=build.key,
            template_version=build.version,
            tenant_id=tenant.id,
            database=picked[0],
        )
        if claimed is None:
            raise _NoSpare
        password = picked[1].password
        svc.checkpoint("claimed")
        with pools.admin() as adm:
            admin.rename_spare_into(
                adm,
                pools.admin_db,
                claimed.database,
                database=name.database,
                role=name.role,
                verifier=None,  # the password the keyholder set (``_take_over``, or the maker's)
                connection_limit=connection_limit,
            )
        svc.checkpoint("renamed")

        def unlock() -> None:
            if not have_lock:
                registry.unlock(reg, name.database, prepare=True)

        with registry.pipelined_transaction(reg, after_commit=unlock):
            activated = tenant_registry.queue_activation(
                reg,
                tenant.id,
                intent.op,
                migration_level=claimed.migration_level,
                template_version=claimed.template_version,
                configure=None,
                connection_limit=connection_limit,
            )
            spares.delete(reg, claimed.id)
        done = registry.fetch_tenant(activated)
    except BaseException as exc:
        if reg.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
            reg.rollback()
        try:
            svc.undo_provision(reg, pools, tenant)
            registry.finish_operation(
                reg,
                intent.op,
                "undone" if isinstance(exc, _NoSpare) else "failed",
                step="handout",
                error=None if isinstance(exc, _NoSpare) else str(exc)[:500],
            )
        finally:
            if not have_lock:
                registry.unlock_if_held(reg, name.database)
        if isinstance(exc, _NoSpare):
            return None
        raise
    return done, password, picked[1].root_password


class _NoSpare(Exception):
    """No spare was ready to claim after all (another process took it)."""


def _hand_out_one(
    svc: Pipeline,
    reg: psycopg.Connection[Any],
    name: TenantName,
    host: str,
    template: str,
    idempotency_key: str | None,
    connection_limit: int | None,
    known: tuple[str, SpareSecret],
    *,
    full: bool = False,
) -> tuple[Tenant, str, str | None] | None:
    """One ``hand_out_spare`` of the ``known`` (spare, secret). ``full``: on the full path,
    in a transaction with the checkpoint ``handout`` before its commit."""
    spare, secret = known
    password = secret.password

    def queue() -> psycopg.Cursor[Tenant]:
        return spares.queue_hand_out(
            reg,
            name,
            tenant_id=uuid4(),
            host=host,
            template=template,
            idempotency_key=idempotency_key,
            keyholder=svc.instance_id,
            spare=spare,
            verifier=None,  # the password the keyholder set (``_take_over``, or the maker's)
            connection_limit=connection_limit,
        )

    try:
        if not full:
            # The hot path: one statement, its own transaction, one round trip.
            cur = queue()
        else:
            with registry.pipelined_transaction(reg):
                cur = queue()
                svc.checkpoint("handout")  # sent, not committed
        tenant = cur.fetchone()
    except BaseException as exc:
        # One transaction: nothing changed, the spare may serve later, unless it is broken.
        dropped = None
        if isinstance(exc, psycopg.Error) and not (reg.broken or reg.closed):
            dropped = _drop_if_broken(svc, reg, host, template, spare, exc)
        if dropped is None:
            svc.spare_secrets.put(spare, secret)
        raise
    if tenant is None:
        # Declined: keep the password only if the spare is still ready and ours (not if another
        # process took it, or a drain or a rebuild dropped it).
        if spares.is_ready_and_held_by(reg, host, spare, svc.instance_id):
            svc.spare_secrets.put(spare, secret)
        return None
    return tenant, password, secret.root_password


def _drop_if_broken(
    svc: Pipeline,
    reg: psycopg.Connection[Any],
    host: str,
    template: str,
    spare: str,
    failure: psycopg.Error,
) -> str | None:
    """After a failed handout: the spare it was for (``spare``), dropped with its row at once if
    it is broken (its database or its role gone, or the database invalid), so that no later
    provision tries it again and the doctor finds nothing. Returns its name when dropped; a
    spare that is whole (the failure was elsewhere) stays."""
    pools = svc.hosts.pools(host)
    try:
        with reg.transaction():
            row = spares.pick_ready(reg, host, template_key=template, database=spare)
            if row is None:
                return None
            with pools.admin() as adm:
                if not admin.database_exists(adm, row.database):
                    why = "its database is gone"
                elif not admin.role_exists(adm, row.database):
                    why = "its role is gone"
                elif admin.is_invalid_database(adm, row.database):
                    why = "its database is invalid"
                else:
                    return None
            _drop_spare(pools, row.database)
            spares.delete(reg, row.id)
    except Exception as exc:
        log.warning("could not check or drop the spare of a failed handout: %s", exc)
        return None
    log.warning(
        "dropped spare %s of %s: its handout failed (%s) and %s",
        row.database,
        template,
        str(failure).strip().splitlines()[0] if str(failure).strip() else type(failure).__name__,
        why,
    )
    return row.database


def fill(svc: Pipeline, key: str, count: int, *, host: str | None = None) -> int:
    """Make spares of ``key``'s current build until ``count`` exist (within the global cap);
    returns how many were made. Blocking: the refiller calls it in the background."""
    target = svc.hosts.target(host)
    pools = svc.hosts.pools(target.name)
    build = svc.current_build(key, target)
    made = 0
    while True:
        with pools.system() as reg:
            have = spares.counts(reg, target.name)
        total = sum(have.values())
        if have.get((build.key, build.version), 0) >= count:
            return made
        if total >= svc.settings.pool_max_total:
            log.info("warm pool at its cap of %d spares", svc.settings.pool_max_total)
            return made
        try:
            create_spare(svc, pools, build)
        except TemplateBusy:
            fresh = svc.current_build(key, target)
            if fresh.id == build.id:
                raise
            build = fresh  # rebuilt during that clone (nothing left of it): the new build's
            continue
        made += 1


def retire_stale(svc: Pipeline, key: str, *, host: str | None = None) -> int:
    """Retire the ready spares of ``key`` that are not of its current build (after a rebuild)."""
    target = svc.hosts.target(host)
    pools = svc.hosts.pools(target.name)
    build = svc.current_build(key, target)
    dropped = 0
    failed: dict[UUID, str] = {}
    while True:
        with pools.system() as reg, reg.transaction():
            stale = spares.pick_ready(
                reg, target.name, template_key=key, not_version=build.version, exclude=list(failed)
            )
            if stale is None:
                return dropped
            if _try_drop_spare(pools, stale.database, failed, stale.id):
                spares.delete(reg, stale.id)
                svc.spare_secrets.take(stale.database)
                dropped += 1


def adopt(svc: Pipeline, *, host: str | None = None) -> int:
    """Give each ready spare whose keyholder is gone (a process that ended, or was killed) new
    secrets (``_take_over``), under its row lock, and become its keyholder; returns how many.
    Run once when a server starts: the spares its predecessor made are then served on the
    fast path. Spares of a live keyholder (another server on this system database) stay its
    own."""
    pools = svc.hosts.pools(host)
    svc.hold_keyholder_lock()
    with pools.system() as reg:
        dead = registry.dead_keyholders(reg, svc.instance_id, of="spares")
    if not dead:
        return 0
    adopted = 0
    while True:
        root = svc.root_passwords.take()
        with pools.system() as reg, reg.transaction():
            orphan = spares.pick_ready(
                reg, pools.target.name, keyholders=[k for k in dead if k is not None]
            )
            if orphan is None:
                svc.root_passwords.give_back(*root)
                return adopted
            try:
                _take_over(svc, reg, pools, orphan, root)
            except BaseException:
                svc.spare_secrets.take(orphan.database)  # rolled back: not its secrets
                raise
        adopted += 1


def adopt_one(
    svc: Pipeline, reg: psycopg.Connection[Any], host: str, template: str
) -> tuple[str, SpareSecret] | None:
    """One ready spare of ``template`` held by another keyholder (live or not), adopted for a
    handout on the full path: (database, its new secrets), or None when there is none.

    The keyholder changes first, in a transaction of its own: from then on the former
    keyholder's fast path declines it (``hand_out_spare`` checks the keyholder), so the root
    user's new hash can never reach a tenant whose answer carries the former password. A crash
    after that leaves a spare of a dead keyholder, adopted again by the next process."""
    pools = svc.hosts.pools(host)
    svc.hold_keyholder_lock()
    with reg.transaction():
        row = spares.pick_ready(reg, host, template_key=template, not_keyholder=svc.instance_id)
        if row is None:
            return None
        spares.set_keyholder(reg, row.id, svc.instance_id)
    root = svc.root_passwords.take()  # this rare path may hash on the request
    try:
        with reg.transaction():
            mine = spares.pick_ready(reg, host, database=row.database, keyholders=[svc.instance_id])
            if mine is None:
                svc.root_passwords.give_back(*root)
                return None  # adopted again by another process meanwhile
            _take_over(svc, reg, pools, mine, root)
    except BaseException:
        svc.spare_secrets.take(row.database)  # rolled back: not the spare's secrets
        raise
    secret = svc.spare_secrets.take(row.database)
    return None if secret is None else (row.database, secret)


def _take_over(
    svc: Pipeline,
    reg: psycopg.Connection[Any],
    pools: ServerPools,
    row: spares.PickedSpare,
    root: RootPassword,
) -> None:
    """New secrets for a spare whose row the caller's transaction holds locked: its role's
    password, its root user's hash (on a connection to the spare), this process its
    keyholder. A rollback after the root user's change leaves a keyholder that is no longer
    alive, or this process without the secrets: either way the spare is taken over again
    before it is handed out."""
    database = row.database
    password = scram.generate_password()
    verifier = svc.verifier(password)
    # The fast handout keeps the spare role's limit: this process's default.
    limit = svc.settings.tenant_connection_limit
    if pools.keeps_registry:
        admin.set_role_password(reg, database, password_verifier=verifier)
        admin.set_role_connection_limit(reg, database, limit)
    else:
        with pools.admin() as adm:
            admin.set_role_password(adm, database, password_verifier=verifier)
            admin.set_role_connection_limit(adm, database, limit)
    login = svc.hosts.login_target(pools.target.name)
    with connect(login, database, autocommit=True, purpose="prepare") as conn:
        rooted = tenant_users.put_root(conn, root[1].result())
    spares.set_keyholder(reg, row.id, svc.instance_id)
    # Before the commit: a handout that sees us as keyholder finds the secrets.
    svc.spare_secrets.put(
        database,
        SpareSecret(password, root[0] if rooted else None, row.template_key, pools.target.name),
    )


def refill(svc: Pipeline) -> None:
    """One pass of the background refiller: the configured templates' spares on every host
    that takes new tenants (the local one and each active host of the fleet; a draining host
    gets none, and its spares are dropped). First it clears spares left ``creating`` by a
    process that died (the pool would run one short). A host that fails (down, no build of a
    key) never keeps the others' spares from being made."""
    first: Exception | None = None
    for host, active in svc.hosts.spare_hosts():
        try:
            if not active:
                drain(svc, host=host)
                continue
            clear_crashed(svc, host=host)
        except Exception as exc:
            first = first or exc
            continue
        for key, count in svc.settings.pool_spares.items():
            try:
                if host == svc.hosts.local.name:
                    # In the background, never inside a request: a configured key with no
                    # build is built (on every host: ``monk template build`` does that).
                    svc.templates.ensure_built(key)
                retire_stale(svc, key, host=host)
                if count > 0:
                    fill(svc, key, count, host=host)
            except Exception as exc:
                # One key that fails (its build, a clone) never keeps the others' spares from
                # being made; the first failure is the pass's, reported by its caller.
                first = first or exc
    if first is not None:
        raise first


def drain(svc: Pipeline, *, key: str | None = None, host: str | None = None) -> int:
    """Every ready spare (of ``key``) on ``host`` (default: the local one), dropped; returns
    how many."""
    pools = svc.hosts.pools(host)
    dropped = 0
    failed: dict[UUID, str] = {}
    while True:
        with pools.system() as reg, reg.transaction():
            ready = spares.pick_ready(
                reg, pools.target.name, template_key=key, exclude=list(failed)
            )
            if ready is None:
                break
            if _try_drop_spare(pools, ready.database, failed, ready.id):
                spares.delete(reg, ready.id)
                svc.spare_secrets.take(ready.database)
                dropped += 1
    if failed:
        raise InvalidState(
            f"dropped {dropped} spare(s); {len(failed)} could not be dropped and stay ready:"
            f" {next(iter(failed.values()))}"
        )
    return dropped


def _try_drop_spare(pools: ServerPools, name: str, failed: dict[UUID, str], spare: UUID) -> bool:
    """One spare dropped; a failure is logged and noted in ``failed`` (the pass leaves that spare
    to a later one and goes on with the next: one spare that cannot be dropped never holds
    back the others)."""
    try:
        _drop_spare(pools, name)
    except Exception as exc:
        known = exc if isinstance(exc, MonkError) else translate(exc)
        message = known.message if known is not None else f"{type(exc).__name__}: {exc}"
        log.warning("could not drop spare %s, left for a later pass: %s", name, message)
        failed[spare] = message
        return False
    return True


# ---------------------------------------------------------------- reconciliation


def status(svc: Pipeline) -> list[dict[str, Any]]:
    """Spares per template build and state, with the configured target count."""
    pools = svc.hosts.pools()
    with pools.system() as reg:
        rows = spares.status_counts(reg, pools.target.name)
    return [
        {
            "template": k,
            "version": v,
            "status": s,
            "count": n,
            "target": svc.settings.pool_spares.get(k, 0),
        }
        for k, v, s, n in rows
    ]


def spare_rows(reg: psycopg.Connection[Any], host: str) -> list[SpareRow]:
    return spares.rows(reg, host)


def is_spare_name(name: str) -> bool:
    suffix = name.removeprefix(SPARE_PREFIX)
    return (
        name.startswith(SPARE_PREFIX)
        and len(suffix) == 16
        and all(c in "0123456789abcdef" for c in suffix)
    )


def clear_crashed(svc: Pipeline, *, host: str | None = None) -> list[str]:
    """Clear the spares left ``creating`` whose creator is gone (its advisory lock on the spare
    is free), and ready spares whose database an interrupted drop left invalid (a handout would
    fail on them), with ``repair_spare``, the doctor's own repair; returns the spares dropped.
    ``host``: on that host (default: the local one)."""
    pools = svc.hosts.pools(host)
    with pools.system() as reg:
        rows = spare_rows(reg, pools.target.name)
    ready = [r for r in rows if r.status == "ready"]
    invalid: set[str] = set()
    if ready:
        with pools.admin() as adm:
            states = admin.database_states(adm, [r.database for r in ready])
        invalid = {name for name, st in states.items() if st.invalid}
    cleared = []
    for row in [r for r in rows if r.status == "creating" or r.database in invalid]:
        try:
            outcome = repair_spare(svc, row, host=host)
        except Exception as exc:
            # Left for the next pass; the other leftovers are cleared meanwhile.
            log.warning("could not clear spare %s: %s", row.database, exc)
            continue
        if outcome == SPARE_DROPPED:
            log.warning(
                "dropped spare %s (%s, left by a process that died)",
                row.database,
                "invalid" if row.database in invalid else row.status,
            )
            cleared.append(row.database)
    return cleared


SPARE_DROPPED = "spare dropped"


def repair_spare(svc: Pipeline, row: SpareRow, *, host: str | None = None) -> str:
    """A spare whose creator or claimer died, dropped with its row (under the right lock), on
    ``host`` (default: the local one)."""
    pools = svc.hosts.pools(host)
    with pools.system() as reg:
        lock_name = row.database
        if row.status == "claimed" and row.tenant_id is not None:
            tenant = registry.get_by_id(reg, row.tenant_id)
            if tenant is not None and tenant.deleted_at is None:
                lock_name = tenant.database
        if not registry.try_lock(reg, lock_name):
            return "busy, skipped"
        try:
            # Under the lock, look again: its creator may have finished between our read and
            # the lock (a ready spare is not a leftover).
            now = spares.status(reg, row.id)
            if now is not None and now != row.status:
                return f"now {now}, left alone"
            _drop_spare(pools, row.database)
            spares.delete(reg, row.id)
        finally:
            registry.unlock(reg, lock_name)
    return SPARE_DROPPED
