"""The provisioning pipeline's shared steps and state: what the tenant service, the warm
pool, the spare roles and the purge all use (so that none of them calls another's private
members, and none imports the tenant service)."""

from __future__ import annotations

import contextlib
import logging
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import quote
from uuid import UUID, uuid4

import psycopg
from psycopg.types.json import Jsonb
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from monk.adapters import registry
from monk.adapters.host_secrets import HostSecrets
from monk.adapters.postgres import admin
from monk.adapters.postgres.budget import Budget
from monk.adapters.postgres.connection import (
    ServerTarget,
    breaker,
    connect,
    translate,
    with_password,
    with_scram_keys,
)
from monk.adapters.postgres.pools import ServerPools
from monk.adapters.registry import Tenant, host_functions, pending_roots
from monk.adapters.registry import hosts as host_registry
from monk.adapters.registry import spare_roles as spare_role_rows
from monk.adapters.registry import spares as spare_rows
from monk.adapters.registry import templates as template_builds
from monk.adapters.registry import tenants as tenant_registry
from monk.adapters.registry.hosts import HostRow
from monk.adapters.registry.templates import TemplateBuild
from monk.core import placement, scram, tenant_names
from monk.core.clone_strategy import CloneChoice
from monk.core.lifecycle import TenantStatus
from monk.core.template_names import validate_template_key
from monk.core.tenant_names import Hasher, TenantName
from monk.errors import (
    DatabaseExists,
    DatabaseMissing,
    HashCollision,
    HostNotFound,
    HostUnsuitable,
    InvalidRequest,
    InvalidState,
    MonkError,
    NoHostAvailable,
    StrayDatabase,
    TemplateBusy,
    TemplateNotFound,
    TenantExists,
    TenantNotFound,
)
from monk.service import clone_support
from monk.service.clone_support import CloneSupport
from monk.service.presence import Presence
from monk.settings import MAX_TENANT_CONNECTION_LIMIT, Settings

# The template service brings jsonschema and the schema compiler: imported on first use, so a
# command that only reads tenants starts without them.
if TYPE_CHECKING:
    from monk.service.templates import TemplateService
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
    root_password: str | None = None  # the first tenant user's, in the provisioning answer

    def as_dict(self) -> dict[str, Any]:
        t = self.tenant
        out: dict[str, Any] = {
            "id": str(t.id),
            "name": t.name,
            "database": t.database,
            "host": t.host,
            "address": self.host,
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
        if self.root_password is not None:
            out["root_user"] = {"username": "root", "password": self.root_password}
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


_HOST_RECHECK_S = 5.0


@dataclass(frozen=True)
class BudgetLimits:
    """The connection budget's settings (MONK_HOST_CONNECTIONS, MONK_TENANT_CONNECTIONS,
    MONK_BUDGET_WAIT_MS), the same for every host."""

    host_connections: int = 40
    tenant_connections: int = 4
    wait_ms: int = 2000


@dataclass(frozen=True)
class _KnownHost:
    seen: float  # time.monotonic() of the last look at its row
    host_id: UUID
    url: str
    target: ServerTarget


def _plain(row: HostRow) -> bool:
    """A local host's row that changes no placement (made to record its clone support)."""
    return row.state == "active" and row.capacity is None and not row.labels


class Hosts:
    """The PostgreSQL servers tenants live on, by the name the registry records: the local one
    (it keeps the system database) and the hosts of the fleet (``monk host add``), whose
    targets and pools are made on first use."""

    def __init__(
        self,
        local: ServerTarget,
        system_db: str,
        *,
        pool_size: int,
        secrets: HostSecrets | None = None,
        connect_timeout: int = 10,
        statement_timeout_ms: int = 60_000,
        budget: BudgetLimits | None = None,
    ) -> None:
        self.local = local
        self._budget_limits = budget or BudgetLimits()
        self._budgets: dict[str, Budget] = {}
        self._logins: dict[str, ServerTarget] = {}
        self.secrets = secrets
        self._system_db = system_db
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self._statement_timeout_ms = statement_timeout_ms
        self._lock = threading.Lock()
        self._targets: dict[str, _KnownHost] = {}
        self._pools = {local.name: ServerPools(local, system_db, max_size=pool_size)}
        self._no_fleet_until = 0.0  # monotonic time until which "no host but the local one" holds
        self._fleet_until = 0.0  # ... until which placement has hosts (or labels) to weigh

    def alone(self) -> bool:
        """No host but the local one (placement then reads nothing and picks it), as read
        within ``_HOST_RECHECK_S``; not known then: placement reads the hosts now."""
        now = time.monotonic()
        if self._no_fleet_until > now:
            return True
        if self._fleet_until > now:
            return False
        try:
            self.placement(None)
        except (MonkError, psycopg.Error):
            return False  # the provision's own placement says why
        return self._no_fleet_until > time.monotonic()

    def target(self, name: str | None) -> ServerTarget:
        """The server of host ``name`` (None: the local one); HostNotFound if not registered.

        A host's target is kept for ``_HOST_RECHECK_S``, then its row is read again: a host
        removed, or removed and added again with another URL, by another process is seen
        within that time (its old pools are closed)."""
        if name is None or name == self.local.name:
            return self.local
        now = time.monotonic()
        with self._lock:
            known = self._targets.get(name)
        if known is not None and now - known.seen < _HOST_RECHECK_S:
            return known.target
        with self._pools[self.local.name].system() as reg:
            row = host_registry.get(reg, name)
        if row is None or row.is_local or row.url is None:
            self.forget(name)
            raise HostNotFound(f"host {name!r} is not registered ('monk host list')", host=name)
        if known is not None and (known.host_id, known.url) == (row.id, row.url):
            with self._lock:
                self._targets[name] = _KnownHost(now, row.id, row.url, known.target)
            return known.target
        if known is not None:
            self.forget(name)
        found = _KnownHost(now, row.id, row.url, self.remote_target(row))
        with self._lock:
            return self._targets.setdefault(name, found).target

    def remote_target(self, row: HostRow) -> ServerTarget:
        """How to reach a registered host as its admin: its URL and its stored password."""
        assert row.url is not None
        password = self.secrets.get(row.id) if self.secrets is not None else None
        return ServerTarget.from_url(
            with_password(row.url, password),
            name=row.name,
            connect_timeout=self._connect_timeout,
            statement_timeout_ms=self._statement_timeout_ms,
            source=f"host {row.name!r}",
            remote=True,
        )

    def placement(
        self,
        name: str | None,
        *,
        template: str | None = None,
        labels: Mapping[str, str] | None = None,
        unreachable: Mapping[str, str] | None = None,
    ) -> ServerTarget:
        """Where a new tenant goes (``monk.core.placement``): ``name`` pins a host, ``labels``
        restrict; else the active host with the most free capacity that has a ready build of
        ``template`` and is not known to be down (its breaker open, or in ``unreachable``:
        host -> why, found down by this provision). NoHostAvailable (503) when none is
        eligible; InvalidRequest (422) for a pinned host that is not registered. With no
        host of the fleet, the local one as before (a template it has not built then fails
        as it always did)."""
        alone = name is None or name == self.local.name
        if alone and not labels and self._no_fleet_until > time.monotonic():
            # The hot path of a single server: no registry read per provision. A host added
            # by another process is seen within _HOST_RECHECK_S.
            return self.local
        with self._pools[self.local.name].system() as reg:
            rows = host_registry.list_all(reg)
            remote = [r for r in rows if not r.is_local]
            local_row = next((r for r in rows if r.is_local), None)
            if not remote and (local_row is None or _plain(local_row)):
                self._no_fleet_until = time.monotonic() + _HOST_RECHECK_S
            else:
                self._fleet_until = time.monotonic() + _HOST_RECHECK_S
            if not remote and not labels:
                if name is None or name == self.local.name:
                    return self.local
                raise _unknown_host(name)
            counts = host_registry.live_tenant_counts(reg)
            built = template_builds.hosts_with_current(reg, template) if template else None
        candidates = [
            placement.Candidate(
                name=self.local.name,
                state=local_row.state if local_row else "active",
                capacity=local_row.capacity if local_row else None,
                tenants=counts.get(self.local.name, 0),
                labels=dict(local_row.labels) if local_row else {},
                has_template=built is None or self.local.name in built,
            )
        ] + [
            placement.Candidate(
                name=r.name,
                state=r.state,
                capacity=r.capacity,
                tenants=counts.get(r.name, 0),
                labels=dict(r.labels),
                has_template=built is None or r.name in built,
                # A pinned host is tried anyway: its failure then names it (HOST_UNAVAILABLE).
                down=None if r.name == name else self._down(r, unreachable or {}),
            )
            for r in remote
        ]
        if built is not None and not built and name is None:
            # No host has a build of it: the local host says why (TemplateNotBuilt/NotFound).
            return self.local
        if name is not None and all(c.name != name for c in candidates):
            raise _unknown_host(name)
        choice = placement.choose(candidates, pinned=name, labels=labels)
        if choice.host is None:
            raise NoHostAvailable(
                f"no host can take a new tenant: {choice.reason}; add or undrain a host, raise "
                "a capacity ('monk host set'), or build the template there",
                host=name,
                labels=dict(labels or {}),
            )
        return self.target(choice.host)

    def spare_hosts(self) -> list[tuple[str, bool]]:
        """The hosts whose warm pool the refiller looks after: (name, takes new tenants), the
        local one first. A host of the fleet whose breaker is open (down) is left out: no
        refill, and its spares wait for it."""
        with self._pools[self.local.name].system() as reg:
            rows = host_registry.list_all(reg)
        local_row = next((r for r in rows if r.is_local), None)
        found = [(self.local.name, local_row is None or local_row.state == "active")]
        for r in rows:
            if r.is_local or self._down(r, {}) is not None:
                continue
            found.append((r.name, r.state == "active"))
        return found

    def install_functions(self, target: ServerTarget) -> None:
        """monk's functions on host ``target`` (``admin.HOST_FUNCTIONS``), as the system
        database defines them: in a database of monk's there named like the system database,
        made if missing, installed again if their version differs. Run once per process and
        host, before its first admin connection (``ServerPools(prepare=…)``), and by
        ``monk host add``."""
        with self._pools[self.local.name].system() as reg:
            definitions = host_functions.definitions(reg, admin.HOST_FUNCTIONS)
        version = host_functions.version(definitions)
        try:
            with connect(target, autocommit=True, purpose="admin") as adm:
                made = admin.ensure_database(
                    adm, self._system_db, f"monk functions of {self._system_db}"
                )
            with connect(target, self._system_db, autocommit=True, purpose="admin") as conn:
                stale = made or admin.installed_functions(conn, self._system_db) != version
                if stale and admin.install_functions(conn, self._system_db, definitions, version):
                    log.info("installed monk's functions (%s) on host %s", version, target.name)
        except psycopg.Error as exc:
            if (known := translate(exc)) is not None:
                raise known from exc
            # The server answered and refused (a privilege, a database it would not make).
            raise HostUnsuitable(
                f"host {target.name!r}: cannot install monk's functions in database "
                f"{self._system_db!r} there: {describe(exc)}",
                host=target.name,
            ) from None

    @staticmethod
    def _down(row: HostRow, unreachable: Mapping[str, str]) -> str | None:
        """Why placement should skip host ``row`` now: found down by the caller, or its breaker
        open in this process (until its next probe is due: then it is tried again)."""
        if row.name in unreachable:
            return unreachable[row.name]
        if row.url is None:
            return None
        return breaker(row.url).refusal(probe=False)

    def pools(self, name: str | None = None) -> ServerPools:
        target = self.target(name)
        with self._lock:
            pools = self._pools.get(target.name)
            if pools is None:
                # A host of the fleet: its own admin pool, the local server's registry.
                pools = self._pools[target.name] = ServerPools(
                    target,
                    self._system_db,
                    max_size=self._pool_size,
                    registry=self._pools[self.local.name],
                    # Its DDL runs in monk's database there, beside monk's functions.
                    admin_db=self._system_db,
                    prepare=self.install_functions,
                )
            return pools

    def budget(self, name: str | None = None) -> Budget:
        """The connection budget of host ``name`` (None: the local one): every tenant data
        connection of this process to that server goes through it."""
        target = self.target(name)
        with self._lock:
            budget = self._budgets.get(target.name)
        if budget is not None:
            return budget
        keyed = self.login_target(target.name)
        with self._lock:
            budget = self._budgets.get(target.name)
            if budget is None:
                limits = self._budget_limits
                budget = self._budgets[target.name] = Budget(
                    keyed,
                    host_connections=limits.host_connections,
                    tenant_connections=limits.tenant_connections,
                    wait_ms=limits.wait_ms,
                )
            return budget

    def login_target(self, name: str | None = None) -> ServerTarget:
        """Host ``name`` (None: the local one) logging in with the admin's SCRAM keys where it
        can (libpq 18, the verifier readable), kept per host: every login into a tenant's
        database (a budget's connections, a provision's prepare step, an upgrade) is spared
        the password's PBKDF2 (4.2 ms a login against 10.8 ms, measured for fleet upgrades)."""
        target = self.target(name)
        with self._lock:
            found = self._logins.get(target.name)
        if found is not None:
            return found
        try:
            with self.pools(target.name).admin() as adm:
                verifier = admin.own_scram_verifier(adm)
        except (MonkError, psycopg.Error) as exc:
            log.info("logins into %s's tenant databases use the password: %s", target.name, exc)
            verifier = None
        keyed = with_scram_keys(target, verifier)
        with self._lock:
            return self._logins.setdefault(target.name, keyed)

    def budgets(self) -> list[Budget]:
        """The budgets made so far (for /metrics)."""
        with self._lock:
            return list(self._budgets.values())

    def evict(self, host: str, database: str) -> None:
        """Close this process's pooled data connections to ``database`` on ``host``."""
        with self._lock:
            budget = self._budgets.get(host)
        if budget is not None:
            budget.evict(database)

    def forget(self, name: str) -> None:
        """Forget what this process keeps of a host (removed, or its URL changed)."""
        if name == self.local.name:
            return
        with self._lock:
            self._targets.pop(name, None)
            self._logins.pop(name, None)
            pools = self._pools.pop(name, None)
            budget = self._budgets.pop(name, None)
        if pools is not None:
            pools.close()
        if budget is not None:
            budget.close()

    def close(self) -> None:
        with self._lock:
            every = list(self._pools.values())
            budgets = list(self._budgets.values())
        for budget in budgets:
            budget.close()
        for pools in every:
            pools.close()


@dataclass(frozen=True)
class SpareSecret:
    """What the keyholder of a spare knows of it: its role's password and the password of the
    ``root`` user already in its ``users`` table (hashed when the spare was made)."""

    password: str
    root_password: str | None  # None: a template build without tenant users
    template: str
    host: str


class SpareSecrets:
    """The secrets of the spares whose keyholder is this process (never written anywhere),
    with their template key and host."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_database: dict[str, SpareSecret] = {}

    def put(self, database: str, secret: SpareSecret) -> None:
        with self._lock:
            self._by_database[database] = secret

    def take(self, database: str) -> SpareSecret | None:
        with self._lock:
            return self._by_database.pop(database, None)

    def has_for(self, template: str, host: str) -> bool:
        """A spare of ``template`` on ``host`` is known now (``take_for`` would find one)."""
        with self._lock:
            return any(
                s.template == template and s.host == host for s in self._by_database.values()
            )

    def take_for(self, template: str, host: str) -> tuple[str, SpareSecret] | None:
        """(database, secret) of the oldest known spare of ``template`` on ``host``, taken
        out, so that no other thread of this process picks it; ``put`` it back if it was not
        handed out."""
        with self._lock:
            for database, secret in self._by_database.items():
                if secret.template == template and secret.host == host:
                    del self._by_database[database]
                    return database, secret
        return None


RootPassword = tuple[str, "Future[str]"]  # a root password and its hash (being) made


class RootPasswords:
    """Generated passwords for tenants' ``root`` users, with their argon2id hashes.

    Hashing costs ~80 ms of CPU, so it never runs on a warm provision: a spare gets its root
    user when it is made (by the refiller), and a cold provision takes a pair hashed ahead
    (``keep``: ``monk serve`` keeps a few) or hashes on a side thread while the clone runs
    (argon2-cffi releases the GIL). Pairs live in this process's memory only."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready: list[tuple[str, str]] = []
        self._pending = 0
        self._size = 0
        self._threads: ThreadPoolExecutor | None = None
        self._held = threading.local()

    @contextmanager
    def held(self) -> Iterator[None]:
        """Inside, ``refill`` asked for on this thread does nothing: the caller refills once
        its own work is out (``monk serve``: once a cold provision's answer is sent; ~80 ms
        of argon2 beside the answer took one of the two cores it needed)."""
        self._held.on = True
        try:
            yield
        finally:
            self._held.on = False

    def hashing(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._threads is None:
                self._threads = ThreadPoolExecutor(2, thread_name_prefix="monk-argon2")
            return self._threads

    def keep(self, size: int) -> None:
        """Keep ``size`` pairs hashed ahead, refilled in the background after each take."""
        self._size = size
        self._refill()

    def take(self, password: str | None = None, *, refill: bool = True) -> RootPassword:
        """The root password (``password``, the caller's, validated; else generated) and its
        hash: a pair made ahead when there is one, else hashed on a side thread.

        ``refill=False``: the caller calls ``refill`` when its work is done. A cold provision
        does: a refill's ~80 ms of argon2 running beside its clone slowed the clone (on 2
        busy cores the cold provision's p50 went from 1.24x to 1.76x the raw clone)."""
        from monk.core import passwords  # argon2: loaded by the commands that hash

        if password is None:
            with self._lock:
                pair = self._ready.pop() if self._ready else None
            if refill:
                self._refill()
            if pair is not None:
                done: Future[str] = Future()
                done.set_result(pair[1])
                return pair[0], done
            password = passwords.generate_password()
        else:
            password = passwords.validate_password(password)
        return password, self.hashing().submit(passwords.hash_password, password)

    def refill(self) -> None:
        """Hash ahead again up to the size ``keep`` asked for (in the background), unless
        ``held`` on this thread."""
        if not getattr(self._held, "on", False):
            self._refill()

    def outstanding(self) -> int:
        """Pairs ready plus pairs being hashed."""
        with self._lock:
            return len(self._ready) + self._pending

    def settle(self, timeout: float) -> bool:
        """Wait (at most ``timeout`` seconds) until no pair is being hashed; whether none is.
        For ``monk bench``: a serving monk refills between requests, so a sample measured next
        must not pay for the previous one's hashing."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._pending == 0:
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)

    def give_back(self, password: str, hashed: Future[str]) -> None:
        """A generated pair that was not used (no spare to adopt after all): kept for later."""
        if hashed.done() and hashed.exception() is None:
            with self._lock:
                self._ready.append((password, hashed.result()))

    def _refill(self) -> None:
        with self._lock:
            missing = max(self._size - len(self._ready) - self._pending, 0)
            self._pending += missing
        for _ in range(missing):
            self.hashing().submit(self._make)

    def _make(self) -> None:
        from monk.core import passwords

        try:
            password = passwords.generate_password()
            pair = (password, passwords.hash_password(password))
        finally:
            with self._lock:
                self._pending -= 1
        with self._lock:
            self._ready.append(pair)

    def close(self) -> None:
        with self._lock:
            threads, self._threads = self._threads, None
        if threads is not None:
            threads.shutdown(wait=False, cancel_futures=True)


class RoleSecrets:
    """Passwords of the spare roles whose keyholder is this process, by host (each host's
    roles are its own: a role is renamed on the server it is on)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_role: dict[str, tuple[str, str]] = {}  # role -> (host, password)

    def put(self, role: str, password: str, host: str) -> None:
        with self._lock:
            self._by_role[role] = (host, password)

    def take(self, host: str) -> tuple[str, str] | None:
        """(role, password) of the oldest known spare role on ``host``, taken out so that no
        other thread claims it; ``put`` it back if the claim was rolled back."""
        with self._lock:
            for role, (on, password) in self._by_role.items():
                if on == host:
                    del self._by_role[role]
                    return role, password
        return None

    def keep_only(self, roles: set[str], host: str) -> None:
        """Forget ``host``'s roles not in ``roles``."""
        with self._lock:
            for role in [r for r, (on, _) in self._by_role.items() if on == host]:
                if role not in roles:
                    del self._by_role[role]

    def count(self, host: str) -> int:
        with self._lock:
            return sum(1 for on, _ in self._by_role.values() if on == host)

    def clear(self) -> None:
        with self._lock:
            self._by_role.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_role)


@dataclass(frozen=True)
class Intent:
    """A reserved name, as the steps after ``Pipeline.reserve`` continue from it."""

    tenant: Tenant  # the intent row, 'provisioning'
    op: UUID  # its journal entry, running
    template_in_use: bool  # the template had client sessions (a clone would wait)
    # The tenant's role as a spare role will make it: its name and the spare's password.
    role: Credentials | None
    # On a host of the fleet: the claimed spare role's name, renamed there after the commit
    # (``Pipeline.obtain_role``).
    spare_role: str | None = None
    # On the registry's server: the spare role taken, not claimed yet (still a spare of this
    # process in the registry): claimed and renamed in the activation's transaction
    # (``spare_roles.queue_claim``), or by ``Pipeline.obtain_role``. Put back (``unclaimed``)
    # if it never is.
    local_spare: str | None = None


class Pipeline:
    """The state and the steps shared by every tenant operation; ``TenantService`` adds the
    operations themselves."""

    def __init__(
        self,
        settings: Settings,
        target: ServerTarget,
        *,
        hasher: Hasher = tenant_names.stable_hex_16,
    ) -> None:
        self.settings = settings
        self.hosts = Hosts(
            target,
            settings.system_db_name,
            pool_size=settings.pool_size,
            secrets=HostSecrets(settings.data_dir / "hosts"),
            connect_timeout=settings.connect_timeout,
            statement_timeout_ms=settings.statement_timeout_ms,
            budget=BudgetLimits(
                host_connections=settings.host_connections,
                tenant_connections=settings.tenant_connections,
                wait_ms=settings.budget_wait_ms,
            ),
        )
        self._hasher = hasher
        self.spare_secrets = SpareSecrets()
        self.root_passwords = RootPasswords()
        # ``monk serve`` writes a cold provision's root user after the answer (service.root_users);
        # a command, which has no after, writes it before.
        self.root_after_answer = False
        self.role_secrets = RoleSecrets()
        # Names this process as the keyholder of the spares whose passwords it remembers.
        self.instance_id = uuid4()
        # This process's one session of presence: its keyholder lock (and a serve's mark).
        self.presence = Presence(target, settings.system_db_name, self.instance_id)
        self._side_lock = threading.Lock()
        self._side_pool: ThreadPoolExecutor | None = None
        self._migration_cache: dict[UUID, tuple[float, Sequence[Migration]]] = {}
        self._build_cache: dict[tuple[str, str], tuple[float, TemplateBuild]] = {}
        self._clone_support: dict[str, CloneSupport] = {}

    @cached_property
    def templates(self) -> TemplateService:
        """The template service on this server's pools (made on first use)."""
        from monk.service.templates import TemplateService

        return TemplateService(self.settings, self.hosts.pools())

    def close(self) -> None:
        if self._side_pool is not None:
            self._side_pool.shutdown(wait=True)
        self.root_passwords.close()
        self.presence.release()
        self.hosts.close()

    def hold_keyholder_lock(self, *, check: bool = False) -> None:
        """Hold this process's keyholder lock before it names itself keyholder of a spare or
        a spare role (``Presence.hold``)."""
        self.presence.hold(check=check)

    def __enter__(self) -> Self:
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
        root_password: str | None = None,
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
            root_password=root_password,
        )

    def connection_limit(self, tenant: Tenant) -> int:
        """The CONNECTION LIMIT its role should have: its own, or the installation's."""
        return tenant.connection_limit or self.settings.tenant_connection_limit

    def current_build(
        self,
        key: str,
        target: ServerTarget,
        reg: psycopg.Connection[Any] | None = None,
        *,
        cached: bool = False,
    ) -> TemplateBuild:
        """The build to clone from; a template without a ready build raises TemplateNotBuilt
        (no build starts inside a request: ``monk template build`` or the CLI's create does it).

        ``cached``: an answer up to ``_BUILD_CACHE_S`` old will do, for callers that clone
        with ``clone`` and check the build in the commit that uses the clone
        (``templates.queue_build_check``; refused, they clone the new build: ``clone_again``)."""
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
                    raise _missing_build(own, target.name, self.settings, key)
        else:
            build = template_builds.current_build(reg, key, target.name)
            if build is None:
                raise _missing_build(reg, target.name, self.settings, key)
        with self._side_lock:
            self._build_cache[(key, target.name)] = (now, build)
        return build

    def clone_support(
        self,
        adm: psycopg.Connection[Any],
        target: ServerTarget,
        *,
        refresh: bool = False,
        registry_session: Callable[[], psycopg.Connection[Any]] | None = None,
    ) -> CloneSupport:
        """Can the host clone files? As recorded in its row; detected (and recorded) when
        never detected, or with ``refresh`` (``monk host check``, ``host add``, ``db start``).
        Kept in memory afterwards: the hot path reads no registry for it.
        ``registry_session``: gives the caller's registry connection, if it holds one (taking
        a second one from the pool while holding the first deadlocks concurrent provisions on
        a small pool); asked for only when the answer is not in memory."""
        with self._side_lock:
            known = None if refresh else self._clone_support.get(target.name)
        if known is not None:
            return known
        with contextlib.ExitStack() as stack:
            if registry_session is not None:
                reg = registry_session()
            else:
                reg = stack.enter_context(self.hosts.pools().system())
            found = None if refresh else clone_support.recorded(reg, target.name)
            if found is None:
                found = clone_support.detect_and_record(
                    reg, adm, target, is_local=target.name == self.hosts.local.name
                )
        with self._side_lock:
            self._clone_support[target.name] = found
        return found

    def clone_choice(
        self,
        adm: psycopg.Connection[Any],
        target: ServerTarget,
        build: TemplateBuild,
        registry_session: Callable[[], psycopg.Connection[Any]] | None = None,
    ) -> CloneChoice:
        """The strategy of a clone of ``build`` on ``target``: the one decision
        (``monk.core.clone_strategy.choose``) every clone of a template uses."""
        supported = self.clone_support(adm, target, registry_session=registry_session).supported
        return clone_support.choice(self.settings, build, supported=supported)

    def clone(
        self,
        adm: psycopg.Connection[Any],
        target: ServerTarget,
        database: str,
        build: TemplateBuild,
        registry_session: Callable[[], psycopg.Connection[Any]],
        template_in_use: bool = True,
        owner: str | None = None,
    ) -> TemplateBuild:
        """Obtain a database, a clone: ``CREATE DATABASE … TEMPLATE [OWNER] STRATEGY`` with the
        strategy ``clone_choice`` picks (the one clone step of every provision and refill),
        keeping the template free of sessions; returns the build cloned (another than
        ``build`` when the template was swapped away at the moment of the clone).
        ``registry_session`` gives the caller's registry connection when it is free to use.

        Templates are closed to connections, but a session opened before (or by a superuser
        flipping the flag) makes PostgreSQL wait 5 s and fail: end them first (the caller tells
        whether it saw any; every retry looks again), and retry with backoff until the clone
        timeout. A rebuild swaps the template's name and the registry in one transaction, so a
        clone made while it ran may hold either build: the caller's commit checks the build it
        records (``templates.queue_build_check``, no round trip of its own) and, refused, drops
        the clone and clones again (``clone_again``): a tenant never records one version while
        holding another.
        """
        cloning = build
        look_for_sessions = template_in_use

        def current() -> TemplateBuild:
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
                admin.create_database(
                    adm,
                    database,
                    template=cloning.database,
                    owner=owner,
                    choice=self.clone_choice(adm, target, cloning, registry_session),
                )
            except DatabaseMissing:
                cloning = current()
                raise TemplateBusy(f"template {build.key!r} is being swapped") from None

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

    def clone_again(
        self,
        pools: ServerPools,
        database: str,
        build: TemplateBuild,
        reg: psycopg.Connection[Any],
        deadline: float,
    ) -> TemplateBuild:
        """The commit that used a clone of ``build`` was refused (``templates.rebuilt``): drop
        the clone, and return the build to clone again (TemplateBusy past ``deadline``)."""
        with pools.admin() as adm:
            admin.drop_database(adm, database)
        if time.monotonic() > deadline:
            raise TemplateBusy(
                f"template {build.key!r} was rebuilt during every clone for "
                f"{self.settings.clone_timeout:.0f}s; retry later",
                template=build.key,
            )
        return self.current_build(build.key, pools.target, reg)

    def ownership_mark(self) -> str:
        """Written on every tenant database and role: several monk installations may share a
        server, and the reconciler only touches what its own system database made."""
        return f"monk:{self.settings.system_db_name}"

    def prepare(
        self,
        target: ServerTarget,
        database: str,
        build: TemplateBuild,
        root_hash: Future[str],
        *,
        async_commit: bool = False,
    ) -> tuple[int, bool]:
        """The step that connects to the new database (a tenant's clone, or a spare): apply the
        template's migrations newer than the build (source changed since), then write the
        ``root`` user with ``root_hash`` (waited for here: it was hashed while the clone ran).
        Returns (migration level, whether the root user was written: False for a build older
        than tenant users). One connection; ``async_commit`` when a later commit of the same
        operation on the same server waits for the disk (WAL is flushed in order)."""
        from monk.adapters.postgres import tenant_users

        pending = self.pending_migrations(build)
        login = self.hosts.login_target(target.name)
        # Autocommit: the root user's INSERT is one round trip; synchronous_commit comes with
        # the start-up packet (no SET of its own).
        with connect(
            login, database, autocommit=True, purpose="prepare", async_commit=async_commit
        ) as conn:
            for migration in pending:
                with conn.transaction():
                    # Objects a migration creates belong to the database owner, like the rest.
                    conn.execute("SET LOCAL ROLE pg_database_owner")
                    conn.execute(migration.sql.encode())
                    if migration is pending[-1]:
                        # As after a build's migrations: ``columns`` follows the catalog.
                        # (Imported here: it loads the schema compiler, which most commands
                        # never need; see tests/unit/test_cli_startup.py.)
                        from monk.adapters.postgres import template_db

                        template_db.sync_columns(conn)
            rooted = tenant_users.put_root(conn, root_hash.result())
        level = max(m.number for m in pending) if pending else build.migration_level
        return level, rooted

    def pending_migrations(self, build: TemplateBuild) -> Sequence[Migration]:
        """Reading the source costs more than the rest of a provision's bookkeeping, so the
        answer is kept a few seconds per build: a migration added to a source reaches new
        tenants within ``_MIGRATION_CACHE_S``."""
        now = time.monotonic()
        with self._side_lock:
            cached = self._migration_cache.get(build.id)
        if cached is not None and now - cached[0] < _MIGRATION_CACHE_S:
            return cached[1]
        from monk.service.templates import pending_migrations

        pending = pending_migrations(build, self.settings)
        with self._side_lock:
            self._migration_cache[build.id] = (now, pending)
        return pending

    def side_threads(self) -> ThreadPoolExecutor:
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

    def reserve(
        self,
        reg: psycopg.Connection[Any],
        pools: ServerPools,
        name: TenantName,
        *,
        template_key: str,
        template_version: str,
        template_database: str,
        idempotency_key: str | None,
        have_lock: bool,
        operation: str = "provision",
        params: Mapping[str, Any] | None = None,
        host: str | None = None,
        spares_ok: bool | None = None,
        spare_role_ok: bool = True,
    ) -> Intent | None:
        """Reserve the name, the pipeline's first step, in one statement
        (``registry.tenants.reserve``): its lock (unless ``have_lock``), the intent row on
        ``host`` (default: the pools' server), its journal entry (``operation``, ``params``),
        and on a host of the fleet one of this process's spare roles there marked claimed, all
        committed together; ``template_database``'s sessions counted (a session on it would
        make a clone wait 5 s, then fail). On the registry's server a spare role of this
        process is only taken out of memory (``Intent.local_spare``): its claim and rename go
        into the activation's transaction, so that the reservation dirties no ``pg_authid``
        or ``spare_roles`` page for a FILE_COPY clone's checkpoint to write and fsync.

        Without ``have_lock``, None (nothing written, no lock kept) when the name is busy or
        taken or a spare is ready: the caller takes the full path. With it, a taken name
        raises TenantExists or HashCollision. ``spares_ok``: write the intent even if a spare is
        ready (default: with ``have_lock``, after the caller tried the warm handout).
        ``spare_role_ok``: claim a spare role (False: the caller brings a role, a spare's)."""
        shared_wal = self.registry_shares_server(pools)
        # Spare roles are per server: a host's are claimed by the reservation's statement
        # (renamed there after the commit), the local ones later, in the activation.
        remote = not pools.keeps_registry
        on = pools.target.name
        spare = self.role_secrets.take(on) if spare_role_ok else None
        op_id = uuid4()
        try:
            with registry.intent_errors(reg, name):
                gate = tenant_registry.reserve(
                    reg,
                    name,
                    tenant_id=uuid4(),
                    op_id=op_id,
                    host=host or on,
                    template_key=template_key,
                    template_version=template_version,
                    template_database=template_database,
                    idempotency_key=idempotency_key,
                    spare_role=spare[0] if spare and remote else None,
                    keyholder=self.instance_id,
                    # On a host of the fleet the activation, a synchronous commit on the
                    # registry's server, flushes it too (a clone the crash orphans there is
                    # the doctor's orphan_database).
                    async_commit=shared_wal or remote,
                    have_lock=have_lock,
                    spares_ok=have_lock if spares_ok is None else spares_ok,
                    operation=operation,
                    params=params,
                    remote=remote,
                )
        except (TenantExists, HashCollision):
            if spare is not None:
                self.role_secrets.put(*spare, on)
            if have_lock:
                raise
            # A tenant committed after the statement's snapshot: the full path looks again,
            # under the lock (an idempotent retry must get the first answer, not a refusal).
            registry.unlock_if_held(reg, name.database)
            return None
        except BaseException:
            if spare is not None:
                self.role_secrets.put(*spare, on)
            if not have_lock and not (reg.closed or reg.broken):
                with contextlib.suppress(psycopg.Error):
                    registry.unlock_if_held(reg, name.database)
            raise
        if gate.tenant is None:
            if spare is not None:
                self.role_secrets.put(*spare, on)  # no intent, no claim: still a spare, ours
            if have_lock:
                raise registry.exists_error(reg, name)
            if gate.locked:
                registry.unlock(reg, name.database)
            return None
        # A host's claim False: its spare role was gone (a drain dropped it). The registry's
        # server's spare role stays taken for the intent, claimed in its activation.
        claimed = spare is not None and (not remote or bool(gate.claimed))
        return Intent(
            tenant=gate.tenant,
            op=op_id,
            template_in_use=gate.sessions > 0,
            role=Credentials(name.role, spare[1]) if spare and claimed else None,
            spare_role=spare[0] if spare and claimed and remote else None,
            local_spare=spare[0] if spare and not remote else None,
        )

    def unclaimed(self, pools: ServerPools, intent: Intent) -> None:
        """The intent's local spare role was not claimed (the provision failed before its
        activation committed): this process's spare again."""
        if intent.local_spare is not None and intent.role is not None:
            self.role_secrets.put(intent.local_spare, intent.role.password, pools.target.name)

    def obtain_role(
        self, reg: psycopg.Connection[Any], pools: ServerPools, intent: Intent, role: str
    ) -> Credentials:
        """The tenant's role on the server of ``pools``, now (a restore; a cold provision on
        the registry's server claims its spare role in its activation instead): the spare role
        taken by the reservation, claimed and renamed now on the registry's server
        (``spare_roles.claim``, its own commit), on a host of the fleet (claimed by the
        reservation) renamed there (``rename_spare_role``); else a new one
        (``create_role_on``). A crash or a failure after the claim is undone by the intent's
        undo, which drops the claimed role under either name; a crash before it leaves a
        spare role of a dead process (dropped by the next start-up, or ``monk doctor``)."""
        if intent.role is None:
            return self.create_role_on(reg, pools, role)
        if intent.local_spare is not None:
            try:
                claimed = spare_role_rows.claim(
                    reg, intent.local_spare, role, keyholder=self.instance_id
                )
            except BaseException:
                self.unclaimed(pools, intent)
                raise
            return intent.role if claimed else self.create_role_on(reg, pools, role)
        if intent.spare_role is not None:
            with pools.admin() as adm:
                admin.rename_spare_role(adm, pools.admin_db, intent.spare_role, role)
            self.checkpoint("role-renamed")
        return intent.role

    def create_role(
        self, reg: psycopg.Connection[Any], role: str, *, login: bool = True
    ) -> Credentials:
        """Obtain a role, new (``make_tenant_role``, on the registry's session: roles are
        cluster-wide), with the default connection limit; a leftover of that name, from a
        crashed attempt on a name the caller holds, is dropped first."""
        password = scram.generate_password()
        tenant_registry.make_role(
            reg,
            role,
            verifier=self.verifier(password),
            mark=self.ownership_mark(),
            login=login,
            connection_limit=self.settings.tenant_connection_limit,
        )
        return Credentials(role, password)

    def create_remote_role(
        self, pools: ServerPools, role: str, *, login: bool = True
    ) -> Credentials:
        """``create_role`` on a host of the fleet: the same ``make_tenant_role``, installed
        there (``Hosts.install_functions``), on the host's admin connection."""
        password = scram.generate_password()
        self.make_role_on(
            pools,
            role,
            verifier=self.verifier(password),
            login=login,
            connection_limit=self.settings.tenant_connection_limit,
        )
        return Credentials(role, password)

    def make_role_on(
        self,
        pools: ServerPools,
        role: str,
        *,
        verifier: str,
        login: bool,
        connection_limit: int,
    ) -> None:
        """``make_tenant_role`` on the server of ``pools``, wherever its functions live: the
        system database on the local host, monk's database on a host of the fleet."""
        if pools.keeps_registry:
            with pools.system() as reg:
                tenant_registry.make_role(
                    reg,
                    role,
                    verifier=verifier,
                    mark=self.ownership_mark(),
                    login=login,
                    connection_limit=connection_limit,
                )
            return
        with pools.admin() as adm:
            admin.make_tenant_role(
                adm,
                pools.admin_db,
                role,
                verifier=verifier,
                mark=self.ownership_mark(),
                login=login,
                connection_limit=connection_limit,
            )

    def configure_remote(
        self,
        pools: ServerPools,
        database: str,
        role: str,
        settings: Mapping[str, str],
        connection_limit: int,
    ) -> None:
        """Configure on a host of the fleet (the same ``configure_tenant_database``, installed
        there), before the activation (which then only commits the registry): a crash between
        leaves an intent, undone whole like any other. Its commit waits for the host's disk:
        once answered, the tenant logs in there even after a crash of the host."""
        with pools.admin() as adm:
            admin.configure_database(
                adm,
                pools.admin_db,
                database,
                role,
                self.ownership_mark(),
                settings,
                connection_limit,
            )

    def configure_on(
        self,
        reg: psycopg.Connection[Any] | None,
        pools: ServerPools,
        database: str,
        role: str,
        settings: Mapping[str, str],
        connection_limit: int,
    ) -> None:
        """``configure`` on the server of ``pools``: on the registry's session where it keeps
        the registry (``reg``, or one of its own when None), else on that host's admin
        connection."""
        if pools.keeps_registry and reg is None:
            with pools.system() as own:
                self.configure(own, database, role, settings, connection_limit)
        elif pools.keeps_registry:
            assert reg is not None
            self.configure(reg, database, role, settings, connection_limit)
        else:
            self.configure_remote(pools, database, role, settings, connection_limit)

    def create_role_on(
        self, reg: psycopg.Connection[Any], pools: ServerPools, role: str
    ) -> Credentials:
        """``create_role`` on the server of ``pools`` (see ``configure_on``)."""
        if pools.keeps_registry:
            return self.create_role(reg, role)
        return self.create_remote_role(pools, role)

    def configure_args(
        self, database: str, role: str, settings: Mapping[str, str], connection_limit: int
    ) -> tuple[str, str, str, Jsonb, int]:
        """Configure's arguments: ownership, connect rights, the build's database settings,
        the ownership mark and the role's connection limit, which a clone does not copy. Every
        object inside a template is owned by ``pg_database_owner``, so owning the database
        gives the tenant's role owner rights over all of them."""
        return tenant_registry.configure_args(
            database, role, self.ownership_mark(), settings, connection_limit
        )

    def configure(
        self,
        reg: psycopg.Connection[Any],
        database: str,
        role: str,
        settings: Mapping[str, str],
        connection_limit: int,
    ) -> None:
        """Configure on its own (a spare when it is made, a restored tenant), on the registry's
        session; a provision configures in its activation's statement instead."""
        tenant_registry.configure(
            reg, self.configure_args(database, role, settings, connection_limit)
        )

    def undo_provision(
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
        claimed = spare_rows.claimed_by(reg, tenant.id)
        claimed_roles = spare_role_rows.claimed_by(reg, tenant.id)
        with pools.admin() as adm:
            if drop_database:
                admin.drop_database(adm, tenant.database)
            if tenant.role_name:
                admin.drop_role(adm, tenant.role_name)
            for _spare_id, spare in claimed:
                # A spare on a host of the fleet claimed for it, renamed in or not yet.
                admin.drop_database(adm, spare)
                admin.drop_role(adm, spare)
            for role in claimed_roles:
                # A spare role on a host of the fleet claimed for it, renamed in or not yet.
                admin.drop_role(adm, role)
        for spare_id, _spare in claimed:
            spare_rows.delete(reg, spare_id)
        for role in claimed_roles:
            spare_role_rows.delete(reg, role)
        registry.delete_row(reg, tenant.id)
        log.warning("undid provisioning of %s (%s)", tenant.name, tenant.database)

    # ------------------------------------------------------------------ state changes

    @contextmanager
    def locked(
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

    def close_tenant(self, pools: ServerPools, tenant: Tenant) -> None:
        """No new connections, its sessions ended, its role unable to log in. This process's
        pooled data connections to it are closed first (cleanly, rather than terminated with
        the other sessions, which ends those of other processes). A root user still waiting
        to be written (``root_users``) is written first, while its database can be reached."""
        self.hosts.evict(pools.target.name, tenant.database)
        if tenant.status == TenantStatus.ACTIVE:
            self.write_waiting_root(tenant)
        self._set_open(pools, tenant, False)

    def open_tenant(self, pools: ServerPools, tenant: Tenant) -> None:
        self._set_open(pools, tenant, True)
        self.write_waiting_root(tenant)

    def write_waiting_root(
        self, tenant: Tenant, conn: psycopg.Connection[Any] | None = None
    ) -> bool:
        """Write the tenant's waiting root user (``service.root_users``) into its database (on
        ``conn``, an autocommit connection to it, if given), then forget it; False when none
        waits. The registry row's lock is held throughout: two writers never both write it,
        and a root user that exists (its password changed since) is never overwritten."""
        from monk.adapters.postgres import tenant_users  # as in prepare

        with self.hosts.pools().system() as reg, reg.transaction():
            hashed = pending_roots.lock(reg, tenant.id)
            if hashed is None:
                return False
            if conn is not None:
                tenant_users.put_root(conn, hashed, replace=False)
            else:
                login = self.hosts.login_target(tenant.host)
                with connect(login, tenant.database, autocommit=True, purpose="root-user") as db:
                    tenant_users.put_root(db, hashed, replace=False)
            pending_roots.forget(reg, tenant.id)
        return True

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

    # ------------------------------------------------------------------ fault injection

    def checkpoint(self, step: str) -> None:
        """Test hook (MONK_FAULT_PAUSE_AT): stop here so a test can kill -9 the process."""
        pause_at(self.settings, step)


class _Resume(Exception):
    pass


def _resume(_signum: int, _frame: object) -> None:
    raise _Resume


def pause_at(settings: Settings, step: str) -> None:
    """Test hook (MONK_FAULT_PAUSE_AT): pause when an operation reaches ``step``, so that a
    test can kill -9 the process there, or break something and let it go on (SIGUSR1 resumes
    a pause in the main thread)."""
    if settings.fault_pause_at != step:
        return
    if threading.current_thread() is not threading.main_thread():
        sys.stderr.write(f"monk: paused at {step}\n")
        sys.stderr.flush()
        time.sleep(3600)
        return
    # The handler first: a test sends SIGUSR1 as soon as it reads the line.
    previous = signal.signal(signal.SIGUSR1, _resume)
    try:
        sys.stderr.write(f"monk: paused at {step}\n")
        sys.stderr.flush()
        time.sleep(3600)
    except _Resume:
        sys.stderr.write(f"monk: resumed at {step}\n")
        sys.stderr.flush()
    finally:
        signal.signal(signal.SIGUSR1, previous)


def _unknown_host(name: str) -> InvalidRequest:
    """A provision pinned to a host that is not registered: bad input (422), nothing made."""
    return InvalidRequest(
        f"host {name!r} is not registered ('monk host list')", field="host", host=name
    )


def validate_connection_limit(limit: int | None) -> None:
    if limit is not None and not 1 <= limit <= MAX_TENANT_CONNECTION_LIMIT:
        raise InvalidRequest(
            f"connection limit must be between 1 and {MAX_TENANT_CONNECTION_LIMIT}, not {limit}",
            field="connection_limit",
        )


def describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _missing_build(
    reg: psycopg.Connection[Any], host: str, settings: Settings, key: str
) -> MonkError:
    from monk.service.templates import missing_build

    return missing_build(reg, host, settings, key)
