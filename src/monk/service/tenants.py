"""The tenant lifecycle: provision, disable/enable, trash/restore, purge, credentials, health.

Every multi-step operation is a recorded sequence of states. Provisioning:

    intent (registry row 'provisioning', journaled, committed) -> cloned -> migrated -> role
    -> configured -> active (committed synchronously, then answered)

The worker holds a session advisory lock on the tenant for the whole operation. A failure undoes
what was done (database, role, row) and says which step failed; a crash (kill -9) leaves the lock
released with the dead session, which is how the reconciler (``monk doctor``, service start-up,
or the next provision of the same name) tells a crashed operation from a running one, and then
finishes or undoes it from what really exists on the server.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote
from uuid import UUID, uuid4

import psycopg
from psycopg import sql
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from monk.adapters import registry
from monk.adapters.postgres import admin
from monk.adapters.postgres.connection import (
    ServerTarget,
    connect,
    open_connection,
    translate,
    unavailable,
)
from monk.adapters.postgres.pools import ServerPools
from monk.adapters.registry import Tenant
from monk.adapters.registry import templates as template_builds
from monk.core import scram, tenant_names
from monk.core.identifiers import validate_database_name, validate_role_name
from monk.core.template_names import validate_template_key
from monk.core.tenant_names import Hasher, TenantName
from monk.errors import (
    DatabaseExists,
    DatabaseMissing,
    HashCollision,
    IdempotencyKeyReused,
    InvalidRequest,
    InvalidState,
    MonkError,
    OperationFailed,
    StrayDatabase,
    TemplateBusy,
    TemplateNotBuilt,
    TemplateNotFound,
    TenantExists,
    TenantNotFound,
)
from monk.service import pool, role_pool
from monk.service import templates as template_service
from monk.settings import MAX_TENANT_CONNECTION_LIMIT, Settings
from monk.templates.source import Migration

log = logging.getLogger(__name__)

_MIGRATION_CACHE_S = 5.0
_BUILD_CACHE_S = 2.0


@dataclass(frozen=True)
class Credentials:
    role: str
    password: str


@dataclass(frozen=True)
class TenantView:
    """What callers see of a tenant: the provisioning response and the API's tenant object."""

    tenant: Tenant
    host: str
    port: int
    credentials: Credentials | None = None
    provisioned_from: str | None = None  # "pool" or "clone", in the provisioning answer
    replayed: bool = False  # the answer to a retry with the first request's Idempotency-Key
    connection_limit: int | None = None  # the role's, the tenant's own or the default

    def as_dict(self) -> dict[str, Any]:
        t = self.tenant
        out: dict[str, Any] = {
            "id": str(t.id),
            "name": t.name,
            "database": t.database,
            "host": t.host,
            "port": self.port,
            "template": t.template_key,
            "template_version": t.template_version,
            "status": t.status,
            "is_active": t.is_active,
            "tenant_type": t.tenant_type,
            "role": t.role_name,
            "migration_level": t.migration_level,
            "connection_limit": self.connection_limit,
            "created_at": _iso(t.created_at),
            "updated_at": _iso(t.updated_at),
            "trashed_at": _iso(t.trashed_at),
            "deleted_at": _iso(t.deleted_at),
        }
        if t.archive_path:
            out["archive"] = {
                "path": t.archive_path,
                "size": t.archive_size,
                "sha256": t.archive_sha256,
                "archived_at": _iso(t.archived_at),
                "server_version": t.archive_server_version,
            }
        if self.provisioned_from is not None:
            out["provisioned_from"] = self.provisioned_from
        if self.credentials is not None:
            c = self.credentials
            out["connection_url"] = (
                f"postgresql://{quote(c.role, safe='')}:{quote(c.password, safe='')}"
                f"@{self.host}:{self.port}/{t.database}"
            )
        if self.replayed:
            out["replayed"] = True
            out["credentials_note"] = (
                "a retry of the request that made this tenant (same Idempotency-Key): its "
                "password was shown once, in the first answer, and is not kept; issue a new one "
                f"with POST /api/root/tenant/{quote(t.name, safe='')}/credentials or "
                f"'monk tenant credentials {shlex.quote(t.name)} --rotate'"
            )
        return out


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


class Hosts:
    """The PostgreSQL servers tenants live on, by the name the registry records."""

    def __init__(self, local: ServerTarget, system_db: str, *, pool_size: int) -> None:
        self.local = local
        self._pools = {local.name: ServerPools(local, system_db, max_size=pool_size)}

    def target(self, name: str | None) -> ServerTarget:
        if name is None or name == self.local.name:
            return self.local
        raise InvalidRequest(
            f"unknown host {name!r}: this monk administers {self.local.name!r}", host=name
        )

    def pools(self, name: str | None = None) -> ServerPools:
        return self._pools[self.target(name).name]

    def close(self) -> None:
        for pools in self._pools.values():
            pools.close()


@dataclass(frozen=True)
class _Intent:
    """A recorded intent to provision, as the cold path continues from it."""

    tenant: Tenant
    op: UUID
    template_in_use: bool
    role: Credentials | None  # a spare role renamed into the tenant's, with its password
    shared_wal: bool


@dataclass
class _HeldLock:
    """The tenant's session advisory lock, while a provision holds it."""

    database: str
    held: bool = True


class TenantService:
    def __init__(
        self,
        settings: Settings,
        target: ServerTarget,
        *,
        hasher: Hasher = tenant_names.stable_hex_16,
    ) -> None:
        self.settings = settings
        self.hosts = Hosts(target, settings.system_db_name, pool_size=settings.pool_size)
        self.templates = template_service.TemplateService(settings, self.hosts.pools())
        self._hasher = hasher
        self._admin_is_superuser: bool | None = None
        self.spare_secrets = pool.SpareSecrets()
        self.role_secrets = role_pool.RoleSecrets()
        # Names this process as the keyholder of the spares whose passwords it remembers.
        self.instance_id = uuid4()
        self._keyholder_conn: psycopg.Connection[Any] | None = None
        self._keyholder_mutex = threading.Lock()
        self._side_lock = threading.Lock()
        self._side_pool: ThreadPoolExecutor | None = None
        self._migration_cache: dict[UUID, tuple[float, Sequence[Migration]]] = {}
        self._build_cache: dict[tuple[str, str], tuple[float, template_service.TemplateBuild]] = {}

    def close(self) -> None:
        if self._side_pool is not None:
            self._side_pool.shutdown(wait=True)
        with self._keyholder_mutex:
            if self._keyholder_conn is not None:
                self._keyholder_conn.close()
                self._keyholder_conn = None
        self.hosts.close()

    def hold_keyholder_lock(self, *, check: bool = False) -> None:
        """Hold this process's keyholder lock (on a connection of its own) before it names
        itself keyholder of a spare or a spare role, so that no other process takes those
        over while it lives. ``check``: make sure the connection still holds it (a server
        restart ends every session), and take it again if not."""
        with self._keyholder_mutex:
            conn = self._keyholder_conn
            if conn is not None and check and not registry.keyholder_session_alive(conn):
                conn.close()
                conn = self._keyholder_conn = None
                log.warning("keyholder lock lost with its connection; taking it again")
            if conn is not None and not conn.closed:
                return
            local = self.hosts.local
            conn = open_connection(
                local, self.settings.system_db_name, autocommit=True, purpose="keyholder"
            )
            if not registry.hold_keyholder_lock(conn, self.instance_id):
                conn.close()  # a transient check by another process: try again next time
                log.warning("keyholder lock of %s is busy", self.instance_id)
                return
            self._keyholder_conn = conn

    def __enter__(self) -> TenantService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def verifier(self, password: str) -> str:
        """The SCRAM verifier of a tenant password, at the configured iteration count."""
        return scram.verifier(password, iterations=self.settings.scram_iterations)

    # ------------------------------------------------------------------ names

    def name(self, raw: str) -> TenantName:
        return tenant_names.normalize(raw, hasher=self._hasher)

    def view(
        self,
        tenant: Tenant,
        credentials: Credentials | None = None,
        provisioned_from: str | None = None,
        *,
        replayed: bool = False,
    ) -> TenantView:
        target = self.hosts.target(tenant.host)
        return TenantView(
            tenant,
            target.public_host,
            target.public_port,
            credentials,
            provisioned_from,
            replayed=replayed,
            connection_limit=self.connection_limit(tenant),
        )

    def connection_limit(self, tenant: Tenant) -> int:
        """The CONNECTION LIMIT its role should have: its own, or the installation's."""
        return tenant.connection_limit or self.settings.tenant_connection_limit

    # ------------------------------------------------------------------ queries

    def get(self, raw_name: str, *, include_deleted: bool = False) -> Tenant:
        """The live tenant of this name; with ``include_deleted``, else its latest purged row
        (as ``list(include_deleted=True)`` shows it)."""
        name = self.name(raw_name)
        with self.hosts.pools().system() as reg:
            tenant = registry.get_live(reg, name.key)
            if tenant is None and include_deleted:
                tenant = registry.get_latest_deleted(reg, name.key)
        if tenant is None:
            raise TenantNotFound(f"tenant {name.display!r} not found")
        return tenant

    def list(self, **filters: Any) -> list[Tenant]:
        with self.hosts.pools().system() as reg:
            return registry.list_tenants(reg, **filters)

    # ------------------------------------------------------------------ provision

    def provision(
        self,
        raw_name: str,
        *,
        template: str = "basic",
        host: str | None = None,
        idempotency_key: str | None = None,
        connection_limit: int | None = None,
    ) -> TenantView:
        """Create a tenant database cloned from the current build of ``template``.

        With ``idempotency_key``, a retry of the same request answers the tenant it made
        (``replayed``, without the password, which was shown once), and the key with other
        parameters is refused (IdempotencyKeyReused).

        ``connection_limit``: its role's own (None: ``MONK_TENANT_CONNECTION_LIMIT``)."""
        name = self.name(raw_name)
        target = self.hosts.target(host)
        pools = self.hosts.pools(target.name)
        validate_template_key(template)
        # Every parameter of the request: one Idempotency-Key stands for one request.
        request = {
            "name": name.key,
            "template": template,
            "host": target.name,
            "connection_limit": connection_limit,
        }
        _validate_connection_limit(connection_limit)
        with pools.system() as reg:
            if idempotency_key is None:
                return self._provision(reg, pools, name, template, None, connection_limit)
            recorded = self._remember_key(reg, idempotency_key, request)
            try:
                return self._provision(
                    reg, pools, name, template, idempotency_key, connection_limit
                )
            except MonkError:
                # Nothing was made: the key may name a corrected request next time.
                if recorded and not (reg.closed or reg.broken):
                    with contextlib.suppress(psycopg.Error):
                        registry.forget_idempotency_key(reg, idempotency_key, request)
                raise

    def _remember_key(
        self, reg: psycopg.Connection[Any], key: str, request: dict[str, Any]
    ) -> bool:
        """Record the request under its key (True: first use), or check it is the same."""
        recorded, first = registry.remember_idempotency_key(reg, key, request)
        if first != request:
            differs = ", ".join(
                f"{field} {first.get(field)!r}, not {value!r}"
                for field, value in request.items()
                if first.get(field) != value
            )
            raise IdempotencyKeyReused(
                f"this Idempotency-Key was first used for another request ({differs}); "
                "a different request needs a new key",
                fields=[f for f, v in request.items() if first.get(f) != v],
            )
        return recorded

    def _provision(
        self,
        reg: psycopg.Connection[Any],
        pools: ServerPools,
        name: TenantName,
        template: str,
        idempotency_key: str | None,
        connection_limit: int | None,
    ) -> TenantView:
        if connection_limit is None:
            # A spare's role has the default limit already; an own limit takes the full
            # path, which sets it in the handout's transaction.
            fast = self._provision_fast(reg, pools, name, template, idempotency_key)
            if fast is not None:
                return fast
        gated = self._provision_gated(reg, pools, name, template, idempotency_key, connection_limit)
        if gated is not None:
            return gated
        locked, existing, spares_ready = registry.lock_and_find(
            reg, name, ready_spares_of=(pools.target.name, template)
        )
        if not locked:
            return self._concurrent(reg, name, idempotency_key)
        lock = _HeldLock(name.database)
        try:
            return self._provision_locked(
                reg,
                pools,
                name,
                template,
                idempotency_key,
                existing,
                spares_ready,
                lock,
                connection_limit,
            )
        finally:
            if lock.held:
                registry.unlock(reg, name.database)

    def _concurrent(
        self, reg: psycopg.Connection[Any], name: TenantName, idempotency_key: str | None
    ) -> TenantView:
        """Someone else works on this name (or hash) right now."""
        if idempotency_key is None:
            raise registry.exists_error(reg, name)
        # The same request retried: wait for the first one, then answer what it made.
        reg.execute("SELECT pg_advisory_lock(%s)", (registry.advisory_key(name.database),))
        registry.unlock(reg, name.database)
        existing = registry.get_live(reg, name.key)
        if existing is not None and existing.idempotency_key == idempotency_key:
            return self.view(existing, replayed=True)
        raise registry.exists_error(reg, name)

    def _provision_locked(
        self,
        reg: psycopg.Connection[Any],
        pools: ServerPools,
        name: TenantName,
        template: str,
        idempotency_key: str | None,
        existing: Tenant | None,
        spares_ready: bool,
        lock: _HeldLock,
        connection_limit: int | None = None,
    ) -> TenantView:
        if existing is not None and existing.status in ("provisioning", "deleting"):
            # We hold its lock, so the process that owned it is gone: finish or undo it first.
            self._repair(reg, pools, existing)
            existing = registry.get_live(reg, name.key)
        if existing is not None:
            if idempotency_key is not None and existing.idempotency_key == idempotency_key:
                return self.view(existing, replayed=True)
            raise registry.exists_error(reg, name)

        if spares_ready:
            warm = self._provision_from_pool(
                reg, pools, name, template, idempotency_key, connection_limit
            )
            if warm is not None:
                return warm
        build = self._current_build(template, pools.target, reg, cached=True)
        intent = self._record_intent(reg, pools, name, build, idempotency_key)
        return self._provision_cold(reg, pools, name, build, intent, lock, connection_limit)

    def _provision_gated(
        self,
        reg: psycopg.Connection[Any],
        pools: ServerPools,
        name: TenantName,
        template: str,
        idempotency_key: str | None,
        connection_limit: int | None = None,
    ) -> TenantView | None:
        """The cold path of a free name, its lock, checks and intent in one round trip; None
        (nothing written, no lock kept) sends the caller down the full path: the name is busy
        or taken, a spare is ready, or the template has no build (the full path says which)."""
        try:
            build = self._current_build(template, pools.target, reg, cached=True)
        except (TemplateNotFound, TemplateNotBuilt):
            return None
        intent = self._record_gated_intent(reg, pools, name, build, idempotency_key)
        if intent is None:
            return None
        lock = _HeldLock(name.database)
        try:
            return self._provision_cold(reg, pools, name, build, intent, lock, connection_limit)
        finally:
            if lock.held:
                registry.unlock(reg, name.database)

    def _record_intent(
        self,
        reg: psycopg.Connection[Any],
        pools: ServerPools,
        name: TenantName,
        build: template_service.TemplateBuild,
        idempotency_key: str | None,
    ) -> _Intent:
        """One round trip (the caller holds the name's lock): the intent and its journal entry
        commit together (with a spare role renamed into the tenant's, when this process has
        one), and the template's sessions are counted (a session on it would make the clone
        wait 5 s, then fail)."""
        shared_wal = self.registry_shares_server(pools)
        tenant_id, op_id = uuid4(), uuid4()
        claim = None
        try:
            with registry.intent_errors(reg, name), registry.pipelined_transaction(reg):
                if shared_wal:
                    # The clone's synchronous commit that follows flushes this record too.
                    reg.execute("SET LOCAL synchronous_commit = off")
                sessions = reg.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
                    " AND backend_type = 'client backend'",
                    (build.database,),
                    prepare=True,
                )
                intent = registry.queue_intent(
                    reg,
                    name,
                    tenant_id=tenant_id,
                    host=pools.target.name,
                    template_key=build.key,
                    template_version=build.version,
                    idempotency_key=idempotency_key,
                )
                registry.start_operation(
                    reg,
                    "provision",
                    name.key,
                    database=name.database,
                    host=pools.target.name,
                    params={"template": build.key, "version": build.version},
                    op_id=op_id,
                )
                if shared_wal:
                    claim = role_pool.claim(self, reg, name.role)
        except BaseException:
            if claim is not None:
                role_pool.release(self, claim[1])
            raise
        renamed = role_pool.settle(self, claim)
        return _Intent(
            tenant=registry.fetch_tenant(intent),
            op=op_id,
            template_in_use=bool((sessions.fetchone() or (0,))[0]),
            role=Credentials(name.role, claim[1][1]) if renamed and claim is not None else None,
            shared_wal=shared_wal,
        )

    def _record_gated_intent(
        self,
        reg: psycopg.Connection[Any],
        pools: ServerPools,
        name: TenantName,
        build: template_service.TemplateBuild,
        idempotency_key: str | None,
    ) -> _Intent | None:
        """``_record_intent`` for a name that is probably free, lock included, in one statement
        (``registry.gated_intent``); None (nothing written, no lock kept) when the name is
        busy or taken or a spare is ready."""
        shared_wal = self.registry_shares_server(pools)
        # Spare roles live on the registry's server: only there can the intent rename one.
        spare = self.role_secrets.take() if shared_wal else None
        op_id = uuid4()
        try:
            with registry.intent_errors(reg, name):
                gate = registry.gated_intent(
                    reg,
                    name,
                    tenant_id=uuid4(),
                    op_id=op_id,
                    host=pools.target.name,
                    template_key=build.key,
                    template_version=build.version,
                    template_database=build.database,
                    idempotency_key=idempotency_key,
                    spare_role=spare[0] if spare else None,
                    keyholder=self.instance_id,
                    async_commit=shared_wal,
                )
        except (TenantExists, HashCollision):
            # A tenant committed after the statement's snapshot: the full path looks again,
            # under the lock (an idempotent retry must get the first answer, not a refusal).
            if spare is not None:
                self.role_secrets.put(*spare)
            registry.unlock_if_held(reg, name.database)
            return None
        except BaseException:
            if spare is not None:
                self.role_secrets.put(*spare)
            if not (reg.closed or reg.broken):
                with contextlib.suppress(psycopg.Error):
                    registry.unlock_if_held(reg, name.database)
            raise
        if spare is not None and gate.claimed is None:
            self.role_secrets.put(*spare)  # no intent, no claim: still a spare, still ours
        # gate.claimed False: the spare was gone (another server's start-up dropped it).
        if gate.tenant is None:
            if gate.locked:
                registry.unlock(reg, name.database)
            return None
        return _Intent(
            tenant=gate.tenant,
            op=op_id,
            template_in_use=gate.sessions > 0,
            role=Credentials(name.role, spare[1]) if spare and gate.claimed else None,
            shared_wal=shared_wal,
        )

    def _provision_cold(
        self,
        reg: psycopg.Connection[Any],
        pools: ServerPools,
        name: TenantName,
        build: template_service.TemplateBuild,
        intent: _Intent,
        lock: _HeldLock,
        connection_limit: int | None = None,
    ) -> TenantView:
        """Clone, role, configure and activate behind a recorded intent (lock held); any
        failure undoes it all."""
        tenant, op, shared_wal, template_in_use = (
            intent.tenant,
            intent.op,
            intent.shared_wal,
            intent.template_in_use,
        )
        self._checkpoint("intent")
        role_limit = connection_limit or self.settings.tenant_connection_limit
        step = "clone"
        try:
            # The role does not depend on the database: make it while the clone runs, on the
            # registry session this provision already holds (roles are cluster-wide), so that
            # no provision ever waits for a second pooled connection while holding one.
            role_job: Future[Credentials]
            if intent.role is not None:
                role_job = Future()
                role_job.set_result(intent.role)
            else:
                role_job = self._side().submit(self._create_role, reg, name.role)

            def registry_free() -> psycopg.Connection[Any]:
                role_job.exception()  # waits: the role job is done with the session
                return reg

            try:
                with pools.admin() as adm:
                    cloned = self._clone(
                        adm,
                        pools.target,
                        name.database,
                        build,
                        registry_free,
                        template_in_use,
                        # A role renamed in already exists: owning the clone from its creation
                        # spares configure's ALTER DATABASE OWNER a catalog update.
                        owner=name.role if intent.role is not None else None,
                    )
            finally:
                role_error = role_job.exception()  # waits: the undo must know of the role
            if role_error is not None:
                step = "role"
                raise role_error
            credentials = role_job.result()
            build = cloned
            self._checkpoint("cloned")
            step = "migrate"
            if self._pending_migrations(build):
                # Long work follows: journal how far we got (informational: any crash before
                # activation is undone whole, whatever the step).
                registry.set_step(reg, tenant.id, "cloned")
            level = self._migrate(pools.target, name.database, build)
            self._checkpoint("migrated")
            self._checkpoint("role")
            step = "configure"
            if not shared_wal:
                with pools.admin() as adm:
                    self._configure(adm, name.database, name.role, build, role_limit)
                registry.set_step(reg, tenant.id, "configured")

            # One round trip: on one server, configuring the database (ownership, rights,
            # settings, mark: cluster-wide catalogs, reachable from the registry's session) and
            # activating the tenant commit together, so a crash leaves all of it or none.
            def unlock() -> None:
                # After the COMMIT (a session lock released inside the transaction would let
                # another process see the intent before the activation), same round trip.
                reg.execute(
                    "SELECT pg_advisory_unlock(%s)",
                    (registry.advisory_key(lock.database),),
                    prepare=True,
                )

            with registry.pipelined_transaction(reg, after_commit=unlock):
                activated = registry.queue_activation(
                    reg,
                    tenant.id,
                    op,
                    migration_level=level,
                    template_version=build.version,
                    configure=self._configure_args(name.database, name.role, build, role_limit)
                    if shared_wal
                    else None,
                    connection_limit=connection_limit,
                )
                self._checkpoint("configured")  # sent, not committed
            lock.held = False
            tenant = registry.fetch_tenant(activated)
        except BaseException as exc:
            if reg.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
                reg.rollback()  # a pipeline reports an error after queueing the COMMIT
            clone_refused = isinstance(exc, StrayDatabase)
            self._undo_provision(reg, pools, tenant, drop_database=not clone_refused)
            registry.finish_operation(reg, op, "failed", step=step, error=_describe(exc))
            if clone_refused:
                raise
            if isinstance(exc, MonkError) and exc.retryable:
                raise
            if (known := translate(exc)) is not None:
                raise known from exc
            if isinstance(exc, Exception):
                raise OperationFailed(
                    f"provisioning {name.display!r} failed at step {step!r} and was undone: "
                    f"{_describe(exc)}",
                    step=step,
                ) from exc
            raise
        log.info(
            "provisioned %s as %s from %s@%s", name.display, name.database, build.key, build.version
        )
        return self.view(tenant, credentials, provisioned_from="clone")

    def _provision_fast(
        self,
        reg: psycopg.Connection[Any],
        pools: ServerPools,
        name: TenantName,
        template: str,
        idempotency_key: str | None,
    ) -> TenantView | None:
        """The warm pool's one-round-trip handout; None sends the caller down the full path."""
        try:
            handed = pool.hand_out_fast(
                self,
                reg,
                name=name,
                host=pools.target.name,
                template=template,
                idempotency_key=idempotency_key,
            )
        except psycopg.Error as exc:
            # One transaction: whatever failed left nothing behind.
            if reg.broken or reg.closed:
                raise unavailable(pools.target, pools.system_db, exc) from None
            log.warning("fast handout of %s failed (%s); taking the full path", name.display, exc)
            return None
        if handed is None:
            return None
        tenant, password = handed
        log.info("provisioned %s as %s from the warm pool", name.display, name.database)
        return self.view(tenant, Credentials(name.role, password), provisioned_from="pool")

    def _provision_from_pool(
        self,
        reg: psycopg.Connection[Any],
        pools: ServerPools,
        name: TenantName,
        template: str,
        idempotency_key: str | None,
        connection_limit: int | None = None,
    ) -> TenantView | None:
        """Serve from a ready spare of the template's current build; None when there is none
        (or the handout failed and was undone): the caller then clones cold."""
        handed = pool.hand_out(
            self,
            reg,
            tenant_id=uuid4(),
            name=name,
            host=pools.target.name,
            template=template,
            idempotency_key=idempotency_key,
            connection_limit=connection_limit,
        )
        if handed is None:
            return None
        tenant, password = handed
        return self.view(tenant, Credentials(name.role, password), provisioned_from="pool")

    def _current_build(
        self,
        key: str,
        target: ServerTarget,
        reg: psycopg.Connection[Any] | None = None,
        *,
        cached: bool = False,
    ) -> template_service.TemplateBuild:
        """The build to clone from; a template without a ready build raises TemplateNotBuilt
        (no build starts inside a request: ``monk template build`` or the CLI's create does it).

        ``cached``: an answer up to ``_BUILD_CACHE_S`` old will do, for callers that clone
        with ``_clone`` (it checks the registry after cloning and clones again from the new
        build if a rebuild came in between)."""
        validate_template_key(key)
        now = time.monotonic()
        with self._side_lock:
            hit = self._build_cache.get((key, target.name))
        if cached and hit is not None and now - hit[0] < _BUILD_CACHE_S:
            return hit[1]
        if reg is None:
            with self.hosts.pools(target.name).system() as own:
                build = template_builds.current_build(own, key, target.name)
                if build is None:
                    raise template_service.missing_build(own, target.name, self.settings, key)
        else:
            build = template_builds.current_build(reg, key, target.name)
            if build is None:
                raise template_service.missing_build(reg, target.name, self.settings, key)
        with self._side_lock:
            self._build_cache[(key, target.name)] = (now, build)
        return build

    def _clone(
        self,
        adm: psycopg.Connection[Any],
        target: ServerTarget,
        database: str,
        build: template_service.TemplateBuild,
        registry_session: Callable[[], psycopg.Connection[Any]],
        template_in_use: bool = True,
        owner: str | None = None,
    ) -> template_service.TemplateBuild:
        """CREATE DATABASE … TEMPLATE [OWNER], keeping the template free of sessions; returns the
        build whose content the clone really holds. ``registry_session`` gives the caller's registry
        connection when it is free to use.

        Templates are closed to connections, but a session opened before (or by a superuser
        flipping the flag) makes PostgreSQL wait 5 s and fail: end them first (the caller tells
        whether it saw any; every retry looks again), and retry with backoff until the clone
        timeout. A rebuild swaps the template's name and the registry
        in one transaction; if the registry names another build after the clone than before,
        the swap may have happened in between, so the clone is dropped and made again from the
        new build: a tenant never records one version while holding another.
        """
        cloning = build
        look_for_sessions = template_in_use

        def current() -> template_service.TemplateBuild:
            fresh = template_builds.current_build(registry_session(), build.key, target.name)
            if fresh is None:
                raise TemplateNotFound(f"template {build.key!r} has no ready build")
            return fresh

        def attempt() -> None:
            nonlocal cloning, look_for_sessions
            if look_for_sessions and admin.sessions_on(adm, cloning.database):
                # Someone opened the template (a session cannot start on a closed one): close
                # it again, then end the sessions, or the next one would start right away.
                admin.revoke_public_connect(adm, [cloning.database])
                admin.close_database(adm, cloning.database, as_template=True)
            look_for_sessions = True
            try:
                admin.create_database(adm, database, template=cloning.database, owner=owner)
            except DatabaseMissing:
                cloning = current()
                raise TemplateBusy(f"template {build.key!r} is being swapped") from None
            after = template_builds.current_build_id(registry_session(), build.key, target.name)
            if after != cloning.id:
                admin.drop_database(adm, database)
                cloning = current()
                raise TemplateBusy(f"template {build.key!r} was rebuilt during the clone")

        try:
            for tried in Retrying(
                retry=retry_if_exception_type(TemplateBusy),
                stop=stop_after_delay(self.settings.clone_timeout),
                wait=wait_exponential(multiplier=0.05, max=1.0),
                reraise=True,
            ):
                with tried:
                    attempt()
        except TemplateBusy as exc:
            raise TemplateBusy(
                f"template {build.key!r} stayed busy for {self.settings.clone_timeout:.0f}s "
                f"({exc}); retry later",
                template=build.key,
            ) from None
        except DatabaseExists:
            raise StrayDatabase(
                f"database {database} already exists on {target.name!r} without a live tenant: "
                "a leftover of an earlier crash; run 'monk doctor --repair'",
                database=database,
            ) from None
        return cloning

    def ownership_mark(self) -> str:
        """Written on every tenant database and role: several monk installations may share a
        server, and the reconciler only touches what its own system database made."""
        return f"monk:{self.settings.system_db_name}"

    def _migrate(
        self, target: ServerTarget, database: str, build: template_service.TemplateBuild
    ) -> int:
        """Apply the template's migrations newer than the build (source changed since)."""
        pending = self._pending_migrations(build)
        if not pending:
            return build.migration_level
        with connect(target, database, purpose="migrate") as conn:
            for migration in pending:
                with conn.transaction():
                    # Objects a migration creates belong to the database owner, like the rest.
                    conn.execute("SET LOCAL ROLE pg_database_owner")
                    conn.execute(migration.sql.encode())
        return max(m.number for m in pending)

    def _pending_migrations(self, build: template_service.TemplateBuild) -> Sequence[Migration]:
        """Reading the source costs more than the rest of a provision's bookkeeping, so the
        answer is kept a few seconds per build: a migration added to a source reaches new
        tenants within ``_MIGRATION_CACHE_S``."""
        now = time.monotonic()
        with self._side_lock:
            cached = self._migration_cache.get(build.id)
        if cached is not None and now - cached[0] < _MIGRATION_CACHE_S:
            return cached[1]
        pending = template_service.pending_migrations(build, self.settings)
        with self._side_lock:
            self._migration_cache[build.id] = (now, pending)
        return pending

    def _side(self) -> ThreadPoolExecutor:
        """Threads for steps that run beside the clone (one per provision that can hold a
        registry connection, so a job never waits for a thread)."""
        with self._side_lock:
            if self._side_pool is None:
                self._side_pool = ThreadPoolExecutor(
                    self.settings.pool_size, thread_name_prefix="monk-side"
                )
            return self._side_pool

    def registry_shares_server(self, pools: ServerPools) -> bool:
        """The registry and this server are one PostgreSQL instance: commits are flushed in
        order, so only the last commit of an operation needs to wait for the disk."""
        return pools.target is self.hosts.local

    def _create_role(self, adm: psycopg.Connection[Any], role: str) -> Credentials:
        password = scram.generate_password()
        # A role left by a crashed attempt on this very name: we hold the name, it is ours.
        admin.drop_role(adm, role)
        admin.create_role(
            adm,
            role,
            password_verifier=self.verifier(password),
            connection_limit=self.settings.tenant_connection_limit,
        )
        adm.execute(
            sql.SQL("COMMENT ON ROLE {} IS {}").format(
                sql.Identifier(role), sql.Literal(self.ownership_mark())
            )
        )
        if not self._superuser(adm):
            # A CREATEROLE admin needs membership to hand objects over and to manage the role.
            adm.execute(sql.SQL("GRANT {} TO CURRENT_USER").format(sql.Identifier(role)))
        return Credentials(role, password)

    def _superuser(self, adm: psycopg.Connection[Any]) -> bool:
        if self._admin_is_superuser is None:
            row = adm.execute(
                "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
            ).fetchone()
            self._admin_is_superuser = bool(row and row[0])
        return self._admin_is_superuser

    def _configure(
        self,
        adm: psycopg.Connection[Any],
        database: str,
        role: str,
        build: template_service.TemplateBuild,
        connection_limit: int,
    ) -> None:
        """Ownership, connect rights, settings and the ownership mark: a clone copies none of
        them. One transaction, so a crash leaves all or none. Every object inside a template is
        owned by ``pg_database_owner``, so owning the database gives the tenant's role owner
        rights over all of them, with no connection to the new database."""
        with adm.transaction():
            # Flushed by the registry's final synchronous commit (one server, one WAL).
            adm.execute("SET LOCAL synchronous_commit = off")
            self._configure_statements(adm, database, role, build)
            admin.set_role_connection_limit(adm, role, connection_limit)

    def _configure_args(
        self,
        database: str,
        role: str,
        build: template_service.TemplateBuild,
        connection_limit: int,
    ) -> tuple[str, str, str, dict[str, str], int]:
        """``_configure`` as the arguments of the system database's function
        ``configure_tenant_database``, which runs the same statements on the registry session
        (in the activation's statement), validated here as the client-side path does."""
        validate_database_name(database)
        validate_role_name(role)
        admin.validate_setting_names(build.database_settings)
        return (
            database,
            role,
            self.ownership_mark(),
            dict(build.database_settings),
            connection_limit,
        )

    def _configure_statements(
        self,
        conn: psycopg.Connection[Any],
        database: str,
        role: str,
        build: template_service.TemplateBuild,
    ) -> None:
        """The statements of ``_configure``, in the caller's transaction."""
        db, r = sql.Identifier(database), sql.Identifier(role)
        conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(db, r))
        conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(db))
        conn.execute(sql.SQL("GRANT CONNECT, TEMPORARY ON DATABASE {} TO {}").format(db, r))
        conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO CURRENT_USER").format(db))
        conn.execute(
            sql.SQL("COMMENT ON DATABASE {} IS {}").format(db, sql.Literal(self.ownership_mark()))
        )
        admin.set_database_settings(conn, database, build.database_settings)

    def _undo_provision(
        self,
        reg: psycopg.Connection[Any],
        pools: ServerPools,
        tenant: Tenant,
        *,
        drop_database: bool = True,
    ) -> None:
        """Remove every trace of a provisioning that did not finish: database, role, row.

        ``drop_database`` is False when the clone itself failed because a database of that name
        was already there: it is not ours to drop here (the doctor judges it).
        """
        with pools.admin() as adm:
            if drop_database:
                admin.drop_database(adm, tenant.database)
            if tenant.role_name:
                admin.drop_role(adm, tenant.role_name)
        registry.delete_row(reg, tenant.id)
        log.warning("undid provisioning of %s (%s)", tenant.name, tenant.database)

    def _repair(self, reg: psycopg.Connection[Any], pools: ServerPools, tenant: Tenant) -> str:
        """Finish or undo the crashed operation of ``tenant`` (caller holds its lock)."""
        if tenant.status == "provisioning":
            self._undo_provision(reg, pools, tenant)
            for op in registry.list_operations(
                reg, states=["running"], kind="provision", subject=tenant.name_key
            ):
                registry.finish_operation(reg, op.id, "undone", error="process died; undone")
            return "undone"
        if tenant.status == "deleting":
            from monk.service.purge import purge_now

            purge_now(self, reg, pools, tenant)
            return "finished"
        return "nothing"

    # ------------------------------------------------------------------ state changes

    @contextmanager
    def _locked(
        self, raw_name: str
    ) -> Iterator[tuple[psycopg.Connection[Any], ServerPools, Tenant]]:
        """The live tenant, with its lock held: one operation at a time per tenant."""
        name = self.name(raw_name)
        with self.hosts.pools().system() as reg:
            tenant = registry.get_live(reg, name.key)
            if tenant is None:
                raise TenantNotFound(f"tenant {name.display!r} not found")
            pools = self.hosts.pools(tenant.host)
            if not registry.try_lock(reg, tenant.database):
                raise InvalidState(
                    f"tenant {tenant.name!r} is busy with another operation; retry shortly"
                )
            try:
                tenant = registry.get_by_id(reg, tenant.id) or tenant
                yield reg, pools, tenant
            finally:
                registry.unlock(reg, tenant.database)

    def disable(self, raw_name: str) -> TenantView:
        with self._locked(raw_name) as (reg, pools, tenant):
            _require(tenant, "disable", "active", "disabled")
            self._close(pools, tenant)
            tenant = registry.update(reg, tenant.id, status="disabled", is_active=False)
            return self.view(tenant)

    def enable(self, raw_name: str) -> TenantView:
        with self._locked(raw_name) as (reg, pools, tenant):
            _require(tenant, "enable", "active", "disabled")
            self._open(pools, tenant)
            tenant = registry.update(reg, tenant.id, status="active", is_active=True)
            return self.view(tenant)

    def trash(self, raw_name: str) -> TenantView:
        """Soft delete: disabled and marked trashed; ``restore`` brings it back."""
        with self._locked(raw_name) as (reg, pools, tenant):
            _require(tenant, "delete", "active", "disabled", "trashed")
            self._close(pools, tenant)
            tenant = registry.update(
                reg,
                tenant.id,
                status="trashed",
                is_active=False,
                trashed_at=tenant.trashed_at or datetime.now().astimezone(),
            )
            return self.view(tenant)

    def restore(self, raw_name: str) -> TenantView:
        """A trashed tenant back to active; a purged one back from its archive."""
        name = self.name(raw_name)
        with self.hosts.pools().system() as reg:
            live = registry.get_live(reg, name.key)
        if live is None:
            from monk.service.purge import restore_from_archive

            return restore_from_archive(self, name)
        with self._locked(raw_name) as (reg, pools, tenant):
            _require(tenant, "restore", "trashed", "active")
            self._open(pools, tenant)
            tenant = registry.update(
                reg, tenant.id, status="active", is_active=True, trashed_at=None
            )
            return self.view(tenant)

    def rotate_credentials(self, raw_name: str) -> TenantView:
        with self._locked(raw_name) as (_reg, pools, tenant):
            _require(tenant, "rotate credentials of", "active", "disabled")
            if tenant.role_name is None:
                raise InvalidState(f"tenant {tenant.name!r} has no role of its own")
            password = scram.generate_password()
            with pools.admin() as adm:
                admin.set_role_password(
                    adm, tenant.role_name, password_verifier=self.verifier(password)
                )
            return self.view(tenant, Credentials(tenant.role_name, password))

    def update(
        self,
        raw_name: str,
        *,
        is_active: bool | None = None,
        connection_limit: int | None = None,
        default_connection_limit: bool = False,
    ) -> TenantView:
        """PATCH: the editable fields: active or not, the role's connection limit (its own, or
        back to the default with ``default_connection_limit``)."""
        _validate_connection_limit(connection_limit)
        view = None
        if connection_limit is not None or default_connection_limit:
            view = self.set_connection_limit(raw_name, connection_limit)
        if is_active is None:
            return view or self.view(self.get(raw_name))
        return self.enable(raw_name) if is_active else self.disable(raw_name)

    def set_connection_limit(self, raw_name: str, limit: int | None) -> TenantView:
        """The tenant's own connection limit (None: the default), on its role and its row."""
        _validate_connection_limit(limit)
        with self._locked(raw_name) as (reg, pools, tenant):
            _require(tenant, "change the connection limit of", "active", "disabled", "trashed")
            with reg.transaction():
                tenant = registry.update(reg, tenant.id, connection_limit=limit)
                if tenant.role_name:
                    with pools.admin() as adm:
                        if admin.role_exists(adm, tenant.role_name):
                            admin.set_role_connection_limit(
                                adm, tenant.role_name, self.connection_limit(tenant)
                            )
            return self.view(tenant)

    def _close(self, pools: ServerPools, tenant: Tenant) -> None:
        """No new connections, its sessions ended, its role unable to log in."""
        self._set_open(pools, tenant, False)

    def _open(self, pools: ServerPools, tenant: Tenant) -> None:
        self._set_open(pools, tenant, True)

    def _set_open(self, pools: ServerPools, tenant: Tenant, is_open: bool) -> None:
        with pools.admin() as adm:
            if not admin.database_exists(adm, tenant.database):
                raise DatabaseMissing(
                    f"database {tenant.database} of tenant {tenant.name!r} is missing; "
                    "run 'monk doctor'"
                )
            # An interrupted DROP DATABASE left it invalid: it refuses ALTER DATABASE and every
            # connection; it can be closed (its role) but not opened.
            invalid = admin.is_invalid_database(adm, tenant.database)
            if invalid and is_open:
                raise InvalidState(
                    f"database {tenant.database} of tenant {tenant.name!r} is invalid (an "
                    "interrupted DROP DATABASE); run 'monk doctor --repair'"
                )
            if not invalid:
                admin.set_allow_connections(adm, tenant.database, is_open)
            if tenant.role_name and admin.role_exists(adm, tenant.role_name):
                admin.set_role_login(adm, tenant.role_name, login=is_open)
            if not is_open and not invalid:
                admin.terminate_sessions(adm, tenant.database)

    def database_settings(self, tenant: Tenant) -> dict[str, str]:
        """The database settings of the build the tenant was cloned from ({} if unknown)."""
        with self.hosts.pools(tenant.host).system() as reg:
            by_build = template_builds.settings_by_build(reg, self.hosts.target(tenant.host).name)
        return by_build.get((tenant.template_key or "", tenant.template_version or ""), {})

    def restore_access(self, tenant: Tenant) -> str:
        """Put back what monk set on the tenant's database and role (``monk doctor --repair``):
        the role owns the database, no one but it and monk's admin has a grant, connections
        allowed and LOGIN as its status says, the role's connection limit. The caller holds
        the tenant's lock."""
        pools = self.hosts.pools(tenant.host)
        is_open = tenant.status == "active"
        role = tenant.role_name
        with pools.admin() as adm:
            state = admin.database_states(adm, [tenant.database]).get(tenant.database)
            if state is None or state.invalid or role is None:
                return "nothing to restore (database missing or invalid, or no role)"
            if not admin.role_exists(adm, role):
                return "nothing to restore (its role is missing)"
            keep = {role, admin.current_role(adm)}
            others = sorted({grantee for grantee, _ in state.grants} - keep)
            admin.reset_database_access(adm, tenant.database, role, revoke_from=others)
            admin.set_database_settings(adm, tenant.database, self.database_settings(tenant))
            admin.set_allow_connections(adm, tenant.database, is_open)
            admin.set_role_login(adm, role, login=is_open)
            admin.set_role_connection_limit(adm, role, self.connection_limit(tenant))
            if not is_open:
                admin.terminate_sessions(adm, tenant.database)
        return f"restored as {tenant.status}"

    # ------------------------------------------------------------------ fault injection

    def _checkpoint(self, step: str) -> None:
        """Test hook (MONK_FAULT_PAUSE_AT): stop here so a test can kill -9 the process."""
        if self.settings.fault_pause_at == step:
            sys.stderr.write(f"monk: paused at {step}\n")
            sys.stderr.flush()
            time.sleep(3600)


def _validate_connection_limit(limit: int | None) -> None:
    if limit is not None and not 1 <= limit <= MAX_TENANT_CONNECTION_LIMIT:
        raise InvalidRequest(
            f"connection limit must be between 1 and {MAX_TENANT_CONNECTION_LIMIT}, not {limit}",
            field="connection_limit",
        )


def _require(tenant: Tenant, action: str, *allowed: str) -> None:
    if tenant.status not in allowed:
        raise InvalidState(
            f"cannot {action} tenant {tenant.name!r}: it is {tenant.status} "
            f"(allowed when {' or '.join(allowed)})"
        )


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
