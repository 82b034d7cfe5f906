"""The warm pool: spare databases cloned ahead of time, handed out by renaming.

A spare is a clone of a template build under a neutral name (``monk_spare_<16 hex>``) with
every step that does not depend on the tenant already done: migrations, its own NOLOGIN role
(same name) owning the database, CONNECT revoked from PUBLIC, database settings, the ownership
mark. Handing one out is one transaction on the registry session: claim the spare, record the
tenant, rename the database and the role to ``tenant_<hash>``, give the role LOGIN, activate.

Spare states: creating -> ready (-> row deleted by the handout that consumes it). The creator
holds the spare's advisory lock, so the reconciler can tell a live creation from a crash.

Passwords of spares live only in the memory of the process that set them (never in the
registry); the spare's ``keyholder`` column names that process. Two handouts:

    fast   a spare whose keyholder is this process, named by it: one statement,
           ``SELECT … FROM hand_out_spare(…)`` (one round trip, one transaction: lock, checks,
           claim, renames, LOGIN, journal, tenant row returned)
    full   anything else (a name that is taken or busy, only spares of other keyholders): the
           lifecycle's own path under the session lock, which issues a fresh password when the
           spare's keyholder is another process (``ALTER ROLE … PASSWORD`` costs ~4 ms of
           server time: PostgreSQL checks every new secret against the empty password)

``adopt`` gives spares of other (or departed) keyholders a password this process knows, ahead
of time, so that a restarted server hands out its predecessor's spares on the fast path.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid4

import psycopg
from psycopg import sql
from psycopg.rows import class_row

from monk.adapters import registry
from monk.adapters.postgres import admin
from monk.adapters.postgres.pools import ServerPools
from monk.adapters.registry import Tenant
from monk.core import scram
from monk.core.tenant_names import TenantName
from monk.service.pipeline import Pipeline
from monk.service.templates import TemplateBuild

log = logging.getLogger(__name__)

SPARE_PREFIX = "monk_spare_"


@dataclass(frozen=True)
class Spare:
    id: UUID
    database: str
    migration_level: int


def _new_name() -> str:
    return f"{SPARE_PREFIX}{secrets.token_hex(8)}"


def counts(reg: psycopg.Connection[Any], host: str) -> dict[tuple[str, str], int]:
    rows = reg.execute(
        "SELECT template_key, template_version, count(*) FROM spares"
        " WHERE host = %s AND status IN ('creating', 'ready') GROUP BY 1, 2",
        (host,),
    ).fetchall()
    return {(str(k), str(v)): int(str(n)) for k, v, n in rows}


def create_spare(svc: Pipeline, pools: ServerPools, build: TemplateBuild) -> str:
    """Make one ready spare of ``build``; a failure leaves nothing behind."""
    name = _new_name()
    svc.hold_keyholder_lock()
    with pools.system() as reg:
        registry.try_lock(reg, name)  # a fresh random name: always ours
        try:
            row = reg.execute(
                "INSERT INTO spares (host, template_key, template_version, database, keyholder)"
                " VALUES (%s, %s, %s, %s, %s) RETURNING id",
                (pools.target.name, build.key, build.version, name, svc.instance_id),
            ).fetchone()
            assert row is not None
            spare_id = row[0]
            try:
                with pools.admin() as adm:
                    cloned = svc.clone(adm, pools.target, name, build, lambda: reg)
                    if cloned.id != build.id:
                        build = cloned
                        reg.execute(
                            "UPDATE spares SET template_version = %s WHERE id = %s",
                            (build.version, spare_id),
                        )
                    svc.checkpoint("spare-cloned")
                    level = svc.migrate(pools.target, name, build)
                    password = scram.generate_password()
                    admin.create_role(
                        adm,
                        name,
                        password_verifier=svc.verifier(password),
                        login=False,
                        connection_limit=svc.settings.tenant_connection_limit,
                    )
                    adm.execute(
                        sql.SQL("COMMENT ON ROLE {} IS {}").format(
                            sql.Identifier(name), sql.Literal(svc.ownership_mark())
                        )
                    )
                    svc.configure(adm, name, name, build, svc.settings.tenant_connection_limit)
                svc.spare_secrets.put(name, password, build.key)
                reg.execute(
                    "UPDATE spares SET status = 'ready', ready_at = now(), migration_level = %s"
                    " WHERE id = %s",
                    (level, spare_id),
                )
            except BaseException:
                _drop_spare(pools, name)
                reg.execute("DELETE FROM spares WHERE id = %s", (spare_id,))
                raise
        finally:
            registry.unlock(reg, name)
    return name


def _drop_spare(pools: ServerPools, name: str) -> None:
    with pools.admin() as adm:
        admin.drop_database(adm, name)
        admin.drop_role(adm, name)


@dataclass(frozen=True)
class Claim:
    spare: Spare
    template_version: str
    operation_id: UUID
    keyholder: UUID | None


_FAST = sql.SQL("""
SELECT {} FROM hand_out_spare(%(lock)s, %(id)s, %(name)s, %(name_key)s, %(database)s, %(role)s,
                              %(host)s, %(template)s, %(idempotency_key)s, %(keyholder)s,
                              %(spare)s)
""").format(registry.TENANT_COLUMNS)


def hand_out_fast(
    svc: Pipeline,
    reg: psycopg.Connection[Any],
    *,
    name: TenantName,
    host: str,
    template: str,
    idempotency_key: str | None,
) -> tuple[Tenant, str] | None:
    """The fast handout (see the module's docstring): one statement. Returns (tenant,
    password), or None when this process knows no spare of ``template`` or the function
    declined (the caller then takes the full path, which knows what to answer for a busy or
    taken name, and serves spares of any keyholder)."""
    picked = svc.spare_secrets.take_for(template)
    if picked is None:
        return None
    spare, password = picked
    params = {
        "lock": registry.advisory_key(name.database),
        "id": uuid4(),
        "name": name.display,
        "name_key": name.key,
        "database": name.database,
        "role": name.role,
        "host": host,
        "template": template,
        "idempotency_key": idempotency_key,
        "keyholder": svc.instance_id,
        "spare": spare,
    }
    try:
        cur = reg.cursor(row_factory=class_row(Tenant))
        tenant = cur.execute(_FAST, params, prepare=True).fetchone()
    except BaseException:
        # One transaction: nothing changed, the spare may serve later.
        svc.spare_secrets.put(spare, password, template)
        raise
    if tenant is None:
        # Declined: keep the password only if the spare is still ready and ours (not if another
        # process's full path took it, or a drain or a rebuild dropped it).
        still = reg.execute(
            "SELECT 1 FROM spares WHERE host = %s AND database = %s AND status = 'ready'"
            " AND keyholder = %s",
            (host, spare, svc.instance_id),
        ).fetchone()
        if still is not None:
            svc.spare_secrets.put(spare, password, template)
        return None
    return tenant, password


# One statement, one round trip: claim the oldest ready spare of the template's current build
# (SKIP LOCKED: concurrent provisions never get the same one), and record the tenant's intent
# and its journal entry. No spare: no row at all is written.
_CLAIM = """
WITH spare AS (
    UPDATE spares SET status = 'claimed', tenant_id = %(id)s, claimed_at = now()
    WHERE id = (
        SELECT s.id FROM spares s
        JOIN template_builds b ON b.host = s.host AND b.key = s.template_key
            AND b.version = s.template_version AND b.is_current
        WHERE s.host = %(host)s AND s.template_key = %(template)s AND s.status = 'ready'
        ORDER BY s.created_at LIMIT 1 FOR UPDATE OF s SKIP LOCKED)
    RETURNING id, database, migration_level, template_version, keyholder
), tenant AS (
    INSERT INTO tenants (id, name, name_key, database, host, is_active, status, template_key,
                         template_version, role_name, step, idempotency_key, migration_level)
    SELECT %(id)s, %(name)s, %(name_key)s, %(database)s, %(host)s, false, 'provisioning',
           %(template)s, spare.template_version, %(role)s, 'intent', %(idempotency_key)s,
           spare.migration_level
    FROM spare
    RETURNING id
), op AS (
    INSERT INTO operations (kind, subject, database, host, params)
    SELECT 'provision', %(name_key)s, %(database)s, %(host)s,
           jsonb_build_object('template', %(template)s, 'version', spare.template_version,
                              'spare', spare.database)
    FROM spare
    RETURNING id
)
SELECT spare.id, spare.database, spare.migration_level, spare.template_version, op.id,
       spare.keyholder
FROM spare, op, tenant
"""


_ACTIVATE = """
WITH gone AS (DELETE FROM spares WHERE id = %(spare)s),
op AS (
    UPDATE operations SET state = 'done', step = 'active', updated_at = now(),
        finished_at = now()
    WHERE id = %(op)s
)
UPDATE tenants SET status = 'active', is_active = true, step = 'active',
    connection_limit = %(connection_limit)s
WHERE id = %(id)s
RETURNING {}
"""


def hand_out(
    svc: Pipeline,
    reg: psycopg.Connection[Any],
    *,
    tenant_id: UUID,
    name: TenantName,
    host: str,
    template: str,
    idempotency_key: str | None,
    connection_limit: int | None = None,
) -> tuple[Tenant, str] | None:
    """Turn a ready spare of the template's current build into the tenant, in ONE transaction
    on the registry session (``ALTER DATABASE … RENAME`` and ``ALTER ROLE`` are cluster-wide
    and run from any database): claim + intent + journal, rename of the database and its role,
    the role's password and LOGIN, activation. All of it commits, or none: a crash at any
    point leaves the spare ready and no trace of the tenant. Two round trips in all.

    Returns (tenant, password), or None when no spare is ready. Raises TenantExists or
    HashCollision when the name (or its hash) is taken; a spare that cannot be renamed
    (its database vanished) is dropped and None is returned, so the caller clones instead.
    """
    params = {
        "id": tenant_id,
        "host": host,
        "template": template,
        "name": name.display,
        "name_key": name.key,
        "database": name.database,
        "role": name.role,
        "idempotency_key": idempotency_key,
    }
    claimed: Claim | None = None
    try:
        with reg.pipeline(), reg.transaction():
            # Prepared: the plan of this hot statement is made once per connection.
            row = reg.execute(_CLAIM, params, prepare=True).fetchone()
            if row is None:
                return None
            claimed = Claim(
                Spare(UUID(str(row[0])), str(row[1]), int(str(row[2]))),
                str(row[3]),
                UUID(str(row[4])),
                row[5],
            )
            svc.checkpoint("spare-claimed")
            password = _rename_into(
                svc, reg, claimed, name, connection_limit or svc.settings.tenant_connection_limit
            )
            svc.checkpoint("spare-renamed")
            cur = reg.cursor(row_factory=class_row(Tenant))
            cur.execute(
                sql.SQL(_ACTIVATE).format(registry.TENANT_COLUMNS),
                {
                    "spare": claimed.spare.id,
                    "op": claimed.operation_id,
                    "id": tenant_id,
                    "connection_limit": connection_limit,
                },
                prepare=True,
            )
        # Leaving the pipeline sent the renames, the activation and COMMIT together.
        tenant = cur.fetchone()
    except psycopg.errors.UniqueViolation:
        raise registry.exists_error(reg, name) from None
    except psycopg.Error as exc:
        if claimed is None:
            raise
        log.warning(
            "spare %s could not be handed out (%s); dropping it", claimed.spare.database, exc
        )
        _discard(svc, reg, claimed.spare)
        return None
    assert tenant is not None
    return tenant, password


def _rename_into(
    svc: Pipeline,
    reg: psycopg.Connection[Any],
    claimed: Claim,
    name: TenantName,
    connection_limit: int,
) -> str:
    """Queue the renames, the role's login and connection limit; returns its password."""
    spare = claimed.spare
    reg.execute(
        sql.SQL("ALTER DATABASE {} RENAME TO {}").format(
            sql.Identifier(spare.database), sql.Identifier(name.database)
        )
    )
    reg.execute(
        sql.SQL("ALTER ROLE {} RENAME TO {}").format(
            sql.Identifier(spare.database), sql.Identifier(name.role)
        )
    )
    password = svc.spare_secrets.take(spare.database)
    if password is None or claimed.keyholder != svc.instance_id:
        # Another process set its password (or adopted it since): issue a new one.
        password = scram.generate_password()
        admin.set_role_password(reg, name.role, password_verifier=svc.verifier(password))
    admin.set_role_login(reg, name.role, login=True)
    admin.set_role_connection_limit(reg, name.role, connection_limit)
    return password


def _discard(svc: Pipeline, reg: psycopg.Connection[Any], spare: Spare) -> None:
    pools = svc.hosts.pools()
    _drop_spare(pools, spare.database)
    reg.execute("DELETE FROM spares WHERE id = %s", (spare.id,))


def fill(svc: Pipeline, key: str, count: int, *, host: str | None = None) -> int:
    """Create spares of ``key``'s current build until ``count`` exist (within the global cap);
    returns how many were made. Blocking: the refiller calls it in the background."""
    target = svc.hosts.target(host)
    pools = svc.hosts.pools(target.name)
    build = svc.current_build(key, target)
    made = 0
    while True:
        with pools.system() as reg:
            have = counts(reg, target.name)
        total = sum(have.values())
        if have.get((build.key, build.version), 0) >= count:
            return made
        if total >= svc.settings.pool_max_total:
            log.info("warm pool at its cap of %d spares", svc.settings.pool_max_total)
            return made
        create_spare(svc, pools, build)
        made += 1


def retire_stale(svc: Pipeline, key: str, *, host: str | None = None) -> int:
    """Drop ready spares of ``key`` that are not of its current build (after a rebuild)."""
    target = svc.hosts.target(host)
    pools = svc.hosts.pools(target.name)
    build = svc.current_build(key, target)
    dropped = 0
    while True:
        with pools.system() as reg, reg.transaction():
            row = reg.execute(
                "SELECT id, database FROM spares WHERE host = %s AND template_key = %s"
                " AND template_version <> %s AND status = 'ready'"
                " LIMIT 1 FOR UPDATE SKIP LOCKED",
                (target.name, key, build.version),
            ).fetchone()
            if row is None:
                return dropped
            _drop_spare(pools, str(row[1]))
            reg.execute("DELETE FROM spares WHERE id = %s", (row[0],))
            svc.spare_secrets.take(str(row[1]))
            dropped += 1


def adopt(svc: Pipeline, *, host: str | None = None) -> int:
    """Give each ready spare whose keyholder is gone (a process that ended, or was killed) a
    fresh password, under its row lock, and become its keyholder; returns how many. Run once
    when a server starts: the spares its predecessor made are then served on the fast path.
    Spares of a live keyholder (another server on this system database) stay its own."""
    pools = svc.hosts.pools(host)
    svc.hold_keyholder_lock()
    with pools.system() as reg:
        dead = registry.dead_keyholders(reg, svc.instance_id, of="spares")
    if not dead:
        return 0
    adopted = 0
    while True:
        with pools.system() as reg, reg.transaction():
            row = reg.execute(
                "SELECT id, database, template_key FROM spares WHERE host = %s"
                " AND status = 'ready' AND (keyholder IS NULL OR keyholder = ANY(%s))"
                " LIMIT 1 FOR UPDATE SKIP LOCKED",
                (pools.target.name, [k for k in dead if k is not None]),
            ).fetchone()
            if row is None:
                return adopted
            database = str(row[1])
            password = scram.generate_password()
            admin.set_role_password(reg, database, password_verifier=svc.verifier(password))
            # The fast handout keeps the spare role's limit: this process's default.
            admin.set_role_connection_limit(reg, database, svc.settings.tenant_connection_limit)
            reg.execute("UPDATE spares SET keyholder = %s WHERE id = %s", (svc.instance_id, row[0]))
            # Before the commit: a handout that sees us as keyholder finds the password.
            svc.spare_secrets.put(database, password, str(row[2]))
        adopted += 1


def refill(svc: Pipeline) -> None:
    """One pass of the background refiller over the configured templates; first it clears
    spares left ``creating`` by a process that died (the pool would run one short)."""
    clear_crashed(svc)
    for key, count in svc.settings.pool_spares.items():
        retire_stale(svc, key)
        if count > 0:
            fill(svc, key, count)


def drain(svc: Pipeline, *, key: str | None = None) -> int:
    """Drop every ready spare (of ``key``); returns how many."""
    pools = svc.hosts.pools()
    dropped = 0
    while True:
        with pools.system() as reg, reg.transaction():
            row = reg.execute(
                "SELECT id, database FROM spares WHERE host = %s AND status = 'ready'"
                " AND (%s::text IS NULL OR template_key = %s)"
                " LIMIT 1 FOR UPDATE SKIP LOCKED",
                (pools.target.name, key, key),
            ).fetchone()
            if row is None:
                return dropped
            _drop_spare(pools, str(row[1]))
            reg.execute("DELETE FROM spares WHERE id = %s", (row[0],))
            dropped += 1


# ---------------------------------------------------------------- reconciliation


@dataclass(frozen=True)
class SpareRow:
    id: UUID
    database: str
    status: str
    tenant_id: UUID | None


def status(svc: Pipeline) -> list[dict[str, Any]]:
    """Spares per template build and state, with the configured target count."""
    pools = svc.hosts.pools()
    with pools.system() as reg:
        rows = reg.execute(
            "SELECT template_key, template_version, status, count(*) FROM spares"
            " WHERE host = %s GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
            (pools.target.name,),
        ).fetchall()
    return [
        {
            "template": str(k),
            "version": str(v),
            "status": str(s),
            "count": int(str(n)),
            "target": svc.settings.pool_spares.get(str(k), 0),
        }
        for k, v, s, n in rows
    ]


def spare_rows(reg: psycopg.Connection[Any], host: str) -> list[SpareRow]:
    rows = reg.execute(
        "SELECT id, database, status, tenant_id FROM spares WHERE host = %s", (host,)
    ).fetchall()
    return [SpareRow(r[0], str(r[1]), str(r[2]), r[3]) for r in rows]


def is_spare_name(name: str) -> bool:
    suffix = name.removeprefix(SPARE_PREFIX)
    return (
        name.startswith(SPARE_PREFIX)
        and len(suffix) == 16
        and all(c in "0123456789abcdef" for c in suffix)
    )


def clear_crashed(svc: Pipeline) -> list[str]:
    """Drop the spares left ``creating`` whose creator is gone (its advisory lock on the spare
    is free), and ready spares whose database an interrupted drop left invalid (a handout would
    fail on them), with ``repair_spare``, the doctor's own repair; returns the spares dropped."""
    pools = svc.hosts.pools()
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
        if repair_spare(svc, row) == SPARE_DROPPED:
            log.warning(
                "dropped spare %s (%s, left by a process that died)",
                row.database,
                "invalid" if row.database in invalid else row.status,
            )
            cleared.append(row.database)
    return cleared


SPARE_DROPPED = "spare dropped"


def repair_spare(svc: Pipeline, row: SpareRow) -> str:
    """Drop a spare whose creator or claimer died, and its row (under the right lock)."""
    pools = svc.hosts.pools()
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
            now = registry.spare_status(reg, row.id)
            if now is not None and now != row.status:
                return f"now {now}, left alone"
            _drop_spare(pools, row.database)
            reg.execute("DELETE FROM spares WHERE id = %s", (row.id,))
        finally:
            registry.unlock(reg, lock_name)
    return SPARE_DROPPED
