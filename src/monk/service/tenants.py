"""The tenant lifecycle: provision, disable/enable, trash/restore, purge, credentials, health.

Every multi-step operation is a recorded sequence of states. Provisioning is one pipeline of
steps (docs/architecture.md), each written once:

    reserve the name (lock, intent row 'provisioning', journal, spare role)
    -> obtain a database (a spare, or a clone) -> obtain a role (a spare's, a spare role, new)
    -> migrate -> configure -> activate (committed synchronously, then answered)

Warm and cold differ in where the database and the role come from: a spare went through the
steps that do not depend on the tenant when it was made, so its handout is the rest in one
statement. The worker holds a session advisory lock on the tenant for the whole operation. A
failure undoes what was done (database, role, row) and says which step failed; a crash (kill -9)
leaves the lock released with the dead session, which is how the reconciler (``monk doctor``,
service start-up, or the next provision of the same name) tells a crashed operation from a
running one, and then finishes or undoes it from what really exists on the server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from monk.adapters import registry
from monk.adapters.postgres import admin
from monk.adapters.postgres.connection import (
    translate,
    unavailable,
)
from monk.adapters.postgres.pools import ServerPools
from monk.adapters.registry import Tenant, pending_roots
from monk.adapters.registry import spare_roles as spare_role_rows
from monk.adapters.registry import templates as template_builds
from monk.adapters.registry import tenants as tenant_registry
from monk.adapters.registry.templates import TemplateBuild
from monk.core import lifecycle, scram
from monk.core.hosts import validate_label
from monk.core.lifecycle import Action
from monk.core.template_names import has_tenant_users, validate_template_key
from monk.core.tenant_names import TenantName
from monk.errors import (
    HostUnavailable,
    IdempotencyKeyReused,
    InvalidRequest,
    InvalidState,
    MonkError,
    OperationFailed,
    StrayDatabase,
    TemplateNotBuilt,
    TemplateNotFound,
    TenantNotFound,
)
from monk.service.pipeline import (
    Credentials,
    Hosts,
    Intent,
    Pipeline,
    RootPassword,
    TenantView,
    describe,
    validate_connection_limit,
)

# Re-exported: callers know these as the tenant service's.
__all__ = ["Credentials", "Hosts", "TenantService", "TenantView"]

log = logging.getLogger(__name__)


@dataclass
class _HeldLock:
    """The tenant's session advisory lock, while a provision holds it."""

    database: str
    held: bool = True


class TenantService(Pipeline):
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
        placement: Mapping[str, str] | None = None,
        root_password: str | None = None,
    ) -> TenantView:
        """Provision a tenant: its database cloned from the current build of ``template`` (or a
        spare of it), its role, configured and active.

        With ``idempotency_key``, a retry of the same request answers the tenant it made
        (``replayed``, without the password, which was shown once), and the key with other
        parameters is refused (IdempotencyKeyReused).

        ``connection_limit``: its role's own (None: ``MONK_TENANT_CONNECTION_LIMIT``).

        Every provision makes the tenant's first user, ``root`` (access ``root``), and answers
        its password once (``root_password``, the caller's, or generated). A spare carries its
        root user from when it was made, so a warm handout hashes nothing; a caller's password
        is hashed while a clone runs (a provision with one is always cold: its user is written
        by the step that connects to the new database, before the activation)."""
        view = self._request(
            raw_name,
            template=template,
            host=host,
            idempotency_key=idempotency_key,
            connection_limit=connection_limit,
            placement=placement,
            root_password=root_password,
            warm_only=False,
        )
        assert view is not None  # only a warm-only request answers None
        return view

    def hand_out(
        self,
        raw_name: str,
        *,
        template: str = "basic",
        host: str | None = None,
        idempotency_key: str | None = None,
        connection_limit: int | None = None,
        placement: Mapping[str, str] | None = None,
    ) -> TenantView | None:
        """``provision`` if a spare is ready now (registry statements only, nothing cloned);
        None when none is, with nothing written: the caller then asks ``provision``. Lets
        ``monk serve`` run a warm handout on its event loop without risking a clone there."""
        return self._request(
            raw_name,
            template=template,
            host=host,
            idempotency_key=idempotency_key,
            connection_limit=connection_limit,
            placement=placement,
            root_password=None,
            warm_only=True,
        )

    def _request(
        self,
        raw_name: str,
        *,
        template: str,
        host: str | None,
        idempotency_key: str | None,
        connection_limit: int | None,
        placement: Mapping[str, str] | None,
        root_password: str | None,
        warm_only: bool,
    ) -> TenantView | None:
        name = self.name(raw_name)
        validate_template_key(template)
        labels = dict(sorted((placement or {}).items()))
        for key, value in labels.items():
            validate_label(key, value)
        pools = self._place(host, template, labels)
        # Every parameter of the request (as asked: a retry may be placed elsewhere, and is
        # the same request): one Idempotency-Key stands for one request.
        request: dict[str, Any] = {
            "name": name.key,
            "template": template,
            "host": host or self.hosts.local.name,
            "connection_limit": connection_limit,
        }
        if labels:
            request["placement"] = labels
        validate_connection_limit(connection_limit)
        # Validated before anything is written; hashed meanwhile.
        root = self.root_passwords.take(root_password) if root_password is not None else None
        with pools.system() as reg:
            if idempotency_key is None:
                return self._provision(
                    reg, pools, name, template, None, connection_limit, root, warm_only=warm_only
                )
            recorded = self._remember_key(reg, idempotency_key, request)
            try:
                view = self._provision(
                    reg,
                    pools,
                    name,
                    template,
                    idempotency_key,
                    connection_limit,
                    root,
                    warm_only=warm_only,
                )
                if view is None and recorded:
                    # Nothing was made: the full provision that follows records the key.
                    registry.forget_idempotency_key(reg, idempotency_key, request)
                return view
            except MonkError:
                # Nothing was made: the key may name a corrected request next time.
                if recorded and not (reg.closed or reg.broken):
                    with contextlib.suppress(psycopg.Error):
                        registry.forget_idempotency_key(reg, idempotency_key, request)
                raise

    def _place(self, host: str | None, template: str, labels: Mapping[str, str]) -> ServerPools:
        """The pools of the host placement chooses, reachable: a host of the fleet that does
        not answer (HostUnavailable, within the connect timeout, at once while its breaker is
        open) is skipped and placement asked again, before anything is written; pinned, its
        failure is the answer."""
        unreachable: dict[str, str] = {}
        while True:
            target = self.hosts.placement(
                host, template=template, labels=labels, unreachable=unreachable
            )
            pools = self.hosts.pools(target.name)
            if pools.keeps_registry:
                return pools
            try:
                # The connection the clone will use: taken from the pool, no round trip.
                with pools.admin():
                    return pools
            except HostUnavailable as exc:
                if host is not None or target.name in unreachable:
                    raise
                log.warning("placement skips host %s: %s", target.name, exc.message)
                unreachable[target.name] = "does not answer"

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
        root: RootPassword | None = None,
        *,
        warm_only: bool = False,
    ) -> TenantView | None:
        """The pipeline (see the module's docstring). Two tries of one round trip each, then the
        full path under the name's lock, which knows what to answer in every case. ``root``:
        the caller's root password and its hash (then no spare: its root user has another).
        ``warm_only``: the first try alone (None if it served nothing)."""
        # Warm: a spare whose password this process knows, handed out in one statement.
        if root is None:
            warm = self._warm(reg, pools, name, template, idempotency_key, connection_limit)
            if warm is not None or warm_only:
                return warm
        # Cold: the name reserved in one statement, its lock taken inside.
        build = self._known_build(template, pools, reg)
        intent = None
        if build is not None:
            intent = self._reserve(reg, pools, name, build, idempotency_key, have_lock=False)
        existing, spares_ready = None, False
        if intent is None:
            # The full path: the name's lock, then what is there decides.
            locked, existing, spares_ready = registry.lock_and_find(
                reg, name, ready_spares_of=(pools.target.name, template)
            )
            if not locked:
                return self._concurrent(reg, name, idempotency_key)
        lock = _HeldLock(name.database)
        try:
            if intent is None:
                if existing is not None and existing.status in ("provisioning", "deleting"):
                    # We hold its lock, so the process that owned it is gone: finish or undo it.
                    self.repair(reg, self.hosts.pools(existing.host), existing)
                    existing = registry.get_live(reg, name.key)
                if existing is not None:
                    if idempotency_key is not None and existing.idempotency_key == idempotency_key:
                        return self.view(existing, replayed=True)
                    raise registry.exists_error(reg, name)
                if spares_ready and root is None:
                    warm = self._warm(
                        reg,
                        pools,
                        name,
                        template,
                        idempotency_key,
                        connection_limit,
                        any_spare=True,
                    )
                    if warm is not None:
                        return warm
                # A template without a ready build: TemplateNotBuilt (never built here).
                build = self.current_build(template, pools.target, reg, cached=True)
                intent = self._reserve(reg, pools, name, build, idempotency_key, have_lock=True)
                assert intent is not None
            assert build is not None
            return self._cold(reg, pools, name, build, intent, lock, connection_limit, root)
        finally:
            if lock.held:
                registry.unlock(reg, name.database)

    def _known_build(
        self, template: str, pools: ServerPools, reg: psycopg.Connection[Any]
    ) -> TemplateBuild | None:
        """The template's current build, if it has one (the full path says why not)."""
        try:
            return self.current_build(template, pools.target, reg, cached=True)
        except (TemplateNotFound, TemplateNotBuilt):
            return None

    def _concurrent(
        self, reg: psycopg.Connection[Any], name: TenantName, idempotency_key: str | None
    ) -> TenantView:
        """Someone else works on this name (or hash) right now."""
        if idempotency_key is None:
            raise registry.exists_error(reg, name)
        # The same request retried: wait for the first one, then answer what it made.
        registry.wait_lock(reg, name.database)
        registry.unlock(reg, name.database)
        existing = registry.get_live(reg, name.key)
        if existing is not None and existing.idempotency_key == idempotency_key:
            return self.view(existing, replayed=True)
        raise registry.exists_error(reg, name)

    def _warm(
        self,
        reg: psycopg.Connection[Any],
        pools: ServerPools,
        name: TenantName,
        template: str,
        idempotency_key: str | None,
        connection_limit: int | None,
        *,
        any_spare: bool = False,
    ) -> TenantView | None:
        """Obtain the database and the role from a spare, and activate, in one statement
        (``pool.hand_out``); ``any_spare``: also a spare whose password this process does not
        know (it gets a new one). None: no spare served, nothing written."""
        if not pools.keeps_registry:
            handed = self._warm_remote(
                reg, pools, name, template, idempotency_key, connection_limit, any_spare=any_spare
            )
        else:
            handed = self._warm_local(
                reg, pools, name, template, idempotency_key, connection_limit, any_spare=any_spare
            )
        if handed is None:
            return None
        tenant, password, root_password = handed
        log.info(
            "provisioned %s as %s from the warm pool of %s",
            name.display,
            name.database,
            pools.target.name,
        )
        return self.view(
            tenant,
            Credentials(name.role, password),
            provisioned_from="pool",
            root_password=root_password,
        )

    def _warm_local(
        self,
        reg: psycopg.Connection[Any],
        pools: ServerPools,
        name: TenantName,
        template: str,
        idempotency_key: str | None,
        connection_limit: int | None,
        *,
        any_spare: bool,
    ) -> tuple[Tenant, str, str | None] | None:
        """``_warm`` on the registry's server: ``pool.hand_out``, one statement."""
        # Imported here, as below: a CLI read ('monk tenant show') starts without the pool and
        # the upgrades.
        from monk.service import pool

        try:
            return pool.hand_out(
                self,
                reg,
                name=name,
                host=pools.target.name,
                template=template,
                idempotency_key=idempotency_key,
                connection_limit=connection_limit,
                any_spare=any_spare,
            )
        except psycopg.Error as exc:
            # One transaction: whatever failed left nothing behind.
            if reg.broken or reg.closed:
                raise unavailable(self.hosts.local, pools.system_db, exc) from None
            log.warning("handout of a spare to %s failed (%s); cloning", name.display, exc)
            return None

    def _warm_remote(
        self,
        reg: psycopg.Connection[Any],
        pools: ServerPools,
        name: TenantName,
        template: str,
        idempotency_key: str | None,
        connection_limit: int | None,
        *,
        any_spare: bool,
    ) -> tuple[Tenant, str, str | None] | None:
        """``_warm`` on a host of the fleet (``pool.hand_out_remote``)."""
        from monk.service import pool

        build = self._known_build(template, pools, reg)
        if build is None:
            return None
        return pool.hand_out_remote(
            self,
            reg,
            pools,
            name=name,
            build=build,
            idempotency_key=idempotency_key,
            connection_limit=connection_limit,
            have_lock=any_spare,  # the full path holds the name's lock
            any_spare=any_spare,
        )

    def _reserve(
        self,
        reg: psycopg.Connection[Any],
        pools: ServerPools,
        name: TenantName,
        build: TemplateBuild,
        idempotency_key: str | None,
        *,
        have_lock: bool,
    ) -> Intent | None:
        """The pipeline's first step (``Pipeline.reserve``) for a clone of ``build``."""
        return self.reserve(
            reg,
            pools,
            name,
            template_key=build.key,
            template_version=build.version,
            template_database=build.database,
            idempotency_key=idempotency_key,
            have_lock=have_lock,
        )

    def _cold(
        self,
        reg: psycopg.Connection[Any],
        pools: ServerPools,
        name: TenantName,
        build: TemplateBuild,
        intent: Intent,
        lock: _HeldLock,
        connection_limit: int | None = None,
        root: RootPassword | None = None,
    ) -> TenantView:
        """Obtain the database (a clone) and the role (a spare role taken by the reservation,
        claimed and renamed in with the activation on the registry's server, renamed on a host
        of the fleet while the clone runs; else a new one, made while the clone runs), prepare
        it (migrate, the root user), then configure and activate in one round trip, behind a
        reserved name (lock held); any failure undoes it all."""
        # Hashed ahead, or now on a side thread while the clone runs; the pair taken is hashed
        # again once this provision is done, not beside its clone (see RootPasswords.take).
        root_password, root_hash = root or self.root_passwords.take(refill=False)
        try:
            return self._cold_steps(
                reg, pools, name, build, intent, lock, connection_limit, root_password, root_hash
            )
        finally:
            self.root_passwords.refill()

    def _cold_steps(
        self,
        reg: psycopg.Connection[Any],
        pools: ServerPools,
        name: TenantName,
        build: TemplateBuild,
        intent: Intent,
        lock: _HeldLock,
        connection_limit: int | None,
        root_password: str,
        root_hash: Future[str],
    ) -> TenantView:
        """``_cold``'s steps, with the root password taken."""
        tenant, op, template_in_use = intent.tenant, intent.op, intent.template_in_use
        self.checkpoint("intent")
        role_limit = connection_limit or self.settings.tenant_connection_limit
        step = "clone"
        claim = intent.local_spare  # a spare role still to claim (None once claimed)
        try:
            # The role does not depend on the database: make it while the clone runs, on the
            # registry session this provision already holds (roles are cluster-wide), so that
            # no provision ever waits for a second pooled connection while holding one.
            role_job: Future[Credentials]
            if intent.local_spare is not None and intent.role is not None:
                # Claimed and renamed in the activation's transaction (below): nothing written
                # before the clone but the intent.
                role_job = Future()
                role_job.set_result(intent.role)
            elif not pools.keeps_registry:
                # A host of the fleet: the spare role claimed is renamed there, or a role is
                # made there, on its own admin connection.
                role_job = self.side_threads().submit(
                    self.obtain_role, reg, pools, intent, name.role
                )
            else:
                role_job = self.side_threads().submit(self.create_role, reg, name.role)

            def registry_free() -> psycopg.Connection[Any]:
                role_job.exception()  # waits: the role job is done with the session
                return reg

            def unlock() -> None:
                # After the COMMIT (a session lock released inside the transaction would let
                # another process see the intent before the activation), same round trip.
                registry.unlock(reg, lock.database, prepare=True)

            credentials: Credentials | None = None
            deadline = time.monotonic() + self.settings.clone_timeout
            while True:  # again only when a rebuild swapped the template during the clone
                try:
                    with pools.admin() as adm:
                        cloned = self.clone(
                            adm,
                            pools.target,
                            name.database,
                            build,
                            registry_free,
                            template_in_use,
                        )
                finally:
                    role_error = role_job.exception()  # waits: the undo must know of the role
                if role_error is not None:
                    step = "role"
                    raise role_error
                if credentials is None:
                    credentials = role_job.result()
                build = cloned
                self.checkpoint("cloned")
                step = "prepare"
                pending_root: str | None = None
                if (
                    self.root_after_answer
                    and not self.pending_migrations(build)
                    and has_tenant_users(build.compiler_version)
                ):
                    # Nothing to write into the new database but the root user: its hash
                    # commits with the activation and is written after the answer
                    # (service.root_users).
                    level, rooted, pending_root = build.migration_level, True, root_hash.result()
                else:
                    if self.pending_migrations(build):
                        # Long work follows: journal how far we got (informational: any crash
                        # before activation is undone whole, whatever the step).
                        registry.set_step(reg, tenant.id, "cloned")
                    level, rooted = self.prepare(
                        pools.target,
                        name.database,
                        build,
                        root_hash,
                        async_commit=self.registry_shares_server(pools),
                    )
                self.checkpoint("migrated")
                self.checkpoint("role")
                step = "configure"

                # One round trip: on one server, checking the build cloned, claiming the spare
                # role, configuring the database (ownership, rights, settings, mark:
                # cluster-wide catalogs, reachable from the registry's session) and activating
                # the tenant commit together, so a crash leaves all of it or none.
                configure = None
                if pools.keeps_registry:
                    configure = self.configure_args(
                        name.database, name.role, build.database_settings, role_limit
                    )
                else:
                    # Waits for the host's disk: once answered, the tenant must log in there
                    # even after a crash of the host (the reservation may be lazy, this may not).
                    self.configure_remote(
                        pools, name.database, name.role, build.database_settings, role_limit
                    )
                rebuilt = False
                while True:
                    try:
                        with registry.pipelined_transaction(reg, after_commit=unlock):
                            template_builds.queue_build_check(
                                reg, build.key, pools.target.name, build.id
                            )
                            if claim is not None:
                                # The spare role renamed into the tenant's, before configure
                                # hands it the database, in the same commit.
                                spare_role_rows.queue_claim(
                                    reg, claim, name.role, keyholder=self.instance_id
                                )
                            activated = tenant_registry.queue_activation(
                                reg,
                                tenant.id,
                                op,
                                migration_level=level,
                                template_version=build.version,
                                configure=configure,
                                connection_limit=connection_limit,
                            )
                            if pending_root is not None:
                                pending_roots.queue_add(reg, tenant.id, pending_root)
                            if intent.spare_role is not None:
                                spare_role_rows.delete_claimed(reg, tenant.id)
                            self.checkpoint("configured")  # sent, not committed
                        break
                    except psycopg.Error as exc:
                        if template_builds.rebuilt(exc):
                            rebuilt = True  # nothing was written
                            break
                        if claim is None or not spare_role_rows.claim_gone(exc):
                            raise
                    # The spare role was dropped since the reservation (a drain): nothing was
                    # written; a new role, then the activation again.
                    claim = None
                    step = "role"
                    credentials = self.create_role(reg, name.role)
                    step = "configure"
                if not rebuilt:
                    break
                # The template was rebuilt during the clone: clone the current build instead.
                log.info(
                    "template %s was rebuilt during the clone of %s: cloning its new build",
                    build.key,
                    name.display,
                )
                step = "clone"
                build = self.clone_again(pools, name.database, build, reg, deadline)
                template_in_use = True  # a template just swapped in: look for sessions first
            claim = None  # committed
            lock.held = False
            tenant = registry.fetch_tenant(activated)
        except BaseException as exc:
            if claim is not None:
                self.unclaimed(pools, intent)
            if reg.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
                reg.rollback()  # a pipeline reports an error after queueing the COMMIT
            clone_refused = isinstance(exc, StrayDatabase)
            self.undo_provision(reg, pools, tenant, drop_database=not clone_refused)
            registry.finish_operation(reg, op, "failed", step=step, error=describe(exc))
            if clone_refused:
                raise
            if isinstance(exc, MonkError) and exc.retryable:
                raise
            if (known := translate(exc)) is not None:
                raise known from exc
            if isinstance(exc, Exception):
                raise OperationFailed(
                    f"provisioning {name.display!r} failed at step {step!r} and was undone: "
                    f"{describe(exc)}",
                    step=step,
                ) from exc
            raise
        log.info(
            "provisioned %s as %s from %s@%s", name.display, name.database, build.key, build.version
        )
        return self.view(
            tenant,
            credentials,
            provisioned_from="clone",
            root_password=root_password if rooted else None,
        )

    def repair(self, reg: psycopg.Connection[Any], pools: ServerPools, tenant: Tenant) -> str:
        """Finish or undo the crashed operation of ``tenant`` (caller holds its lock)."""
        if tenant.status == "provisioning":
            self.undo_provision(reg, pools, tenant)
            for op in registry.list_operations(
                reg, states=["running"], kind="provision", subject=tenant.name_key
            ):
                registry.finish_operation(reg, op.id, "undone", error="process died; undone")
            return "undone"
        if tenant.status == "deleting":
            # Imported when used: the purge brings pg_dump's adapter, which reading or
            # provisioning a tenant does not need (a CLI command starts without it).
            from monk.service.purge import purge_now

            purge_now(self, reg, pools, tenant)
            return "finished"
        return "nothing"

    def disable(self, raw_name: str) -> TenantView:
        with self.locked(raw_name) as (reg, pools, tenant):
            lifecycle.check(Action.DISABLE, tenant.status, tenant=tenant.name)
            self.close_tenant(pools, tenant)
            tenant = registry.update(reg, tenant.id, status="disabled", is_active=False)
            return self.view(tenant)

    def enable(self, raw_name: str) -> TenantView:
        with self.locked(raw_name) as (reg, pools, tenant):
            lifecycle.check(Action.ENABLE, tenant.status, tenant=tenant.name)
            self.open_tenant(pools, tenant)
            tenant = registry.update(reg, tenant.id, status="active", is_active=True)
            return self.view(tenant)

    def trash(self, raw_name: str) -> TenantView:
        """Soft delete: disabled and marked trashed; ``restore`` brings it back."""
        with self.locked(raw_name) as (reg, pools, tenant):
            lifecycle.check(Action.TRASH, tenant.status, tenant=tenant.name)
            self.close_tenant(pools, tenant)
            tenant = registry.update(
                reg,
                tenant.id,
                status="trashed",
                is_active=False,
                trashed_at=tenant.trashed_at or datetime.now().astimezone(),
            )
            return self.view(tenant)

    def restore(self, raw_name: str, *, host: str | None = None) -> TenantView:
        """A trashed tenant back to active; a purged one back from its archive, onto ``host``
        (default: placement's choice; a trashed one stays on its host). Either is then
        brought to its template's current build (fleet upgrades skip trashed and purged
        tenants); if that fails the tenant stays restored at its build, and the warning says
        why (``monk template upgrade KEY --tenants NAME`` retries it)."""
        name = self.name(raw_name)
        with self.hosts.pools().system() as reg:
            live = registry.get_live(reg, name.key)
        if live is None:
            from monk.service.purge import restore_from_archive  # as above: when used

            return self._up_to_date(restore_from_archive(self, name, host))
        if host is not None and host != live.host:
            raise InvalidRequest(
                f"tenant {live.name!r} is trashed on host {live.host!r}: it is restored there "
                "(only a purged tenant, restored from its archive, may go to another host)"
            )
        with self.locked(raw_name) as (reg, pools, tenant):
            lifecycle.check(Action.RESTORE, tenant.status, tenant=tenant.name)
            self.open_tenant(pools, tenant)
            tenant = registry.update(
                reg, tenant.id, status="active", is_active=True, trashed_at=None
            )
            view = self.view(tenant)
        return self._up_to_date(view)

    def _up_to_date(self, view: TenantView) -> TenantView:
        from monk.service import upgrades

        why_not = upgrades.upgrade_one(self, view.tenant.id)
        if why_not is not None:
            log.warning(
                "restored %s stays at build %s: %s",
                view.tenant.name,
                view.tenant.template_version,
                why_not,
            )
            return view
        with self.hosts.pools().system() as reg:
            tenant = registry.get_by_id(reg, view.tenant.id)
        return dataclasses.replace(view, tenant=tenant) if tenant is not None else view

    def rotate_credentials(self, raw_name: str) -> TenantView:
        with self.locked(raw_name) as (_reg, pools, tenant):
            lifecycle.check(Action.ROTATE_CREDENTIALS, tenant.status, tenant=tenant.name)
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
        validate_connection_limit(connection_limit)
        view = None
        if connection_limit is not None or default_connection_limit:
            view = self.set_connection_limit(raw_name, connection_limit)
        if is_active is None:
            return view or self.view(self.get(raw_name))
        return self.enable(raw_name) if is_active else self.disable(raw_name)

    def set_connection_limit(self, raw_name: str, limit: int | None) -> TenantView:
        """The tenant's own connection limit (None: the default), on its role and its row."""
        validate_connection_limit(limit)
        with self.locked(raw_name) as (reg, pools, tenant):
            lifecycle.check(Action.SET_CONNECTION_LIMIT, tenant.status, tenant=tenant.name)
            with reg.transaction():
                tenant = registry.update(reg, tenant.id, connection_limit=limit)
                if tenant.role_name:
                    with pools.admin() as adm:
                        if admin.role_exists(adm, tenant.role_name):
                            admin.set_role_connection_limit(
                                adm, tenant.role_name, self.connection_limit(tenant)
                            )
            return self.view(tenant)

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
            keep = {role, admin.current_role(adm), "PUBLIC"}  # configure revokes PUBLIC's
            others = sorted({grantee for grantee, _ in state.grants} - keep)
            with pools.system() as reg:
                # The provision's own configure step, again (the owner first: then the grants
                # of a former owner can be revoked).
                self.configure_on(
                    reg,
                    pools,
                    tenant.database,
                    role,
                    self.database_settings(tenant),
                    self.connection_limit(tenant),
                )
            admin.revoke_database_access(adm, tenant.database, others)
            admin.set_allow_connections(adm, tenant.database, is_open)
            admin.set_role_login(adm, role, login=is_open)
            if not is_open:
                admin.terminate_sessions(adm, tenant.database)
        return f"restored as {tenant.status}"
