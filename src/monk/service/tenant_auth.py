"""Tenant users, their logins, and the tenant state every tenant request is checked against.

A tenant's users live in its own database (core table ``users``); monk reaches it as its admin
on a connection of its own, opened for the call (the connection budget replaces this later).
Passwords are hashed with argon2id (monk.core.passwords) and never stored or logged anywhere
else: the system database only counts failed logins (``login_failures``).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import psycopg

from monk.adapters.postgres import tenant_users as users_db
from monk.adapters.postgres.connection import connect
from monk.adapters.postgres.tenant_users import UserRow
from monk.adapters.registry import Tenant
from monk.adapters.registry import logins as logins_db
from monk.adapters.registry.logins import TenantState
from monk.core import passwords
from monk.core.lifecycle import TenantStatus
from monk.errors import (
    InvalidName,
    InvalidState,
    LoginFailed,
    LoginThrottled,
    NotFound,
    TenantDisabled,
    TenantExists,
    TenantGone,
)
from monk.service import root_users
from monk.service.tenants import TenantService

ROOT_USER = "root"

__all__ = ["ROOT_USER", "Identity", "TenantState", "TenantStates", "UserView"]


@dataclass(frozen=True)
class UserView:
    id: str
    username: str
    name: str
    access: str
    created_at: str | None
    updated_at: str | None
    password: str | None = None  # only when monk generated it: shown once

    @classmethod
    def of(cls, row: users_db.UserRow, password: str | None = None) -> UserView:
        return cls(
            id=str(row.id),
            username=row.auth,
            name=row.name,
            access=row.access,
            created_at=row.created_at.isoformat() if row.created_at else None,
            updated_at=row.updated_at.isoformat() if row.updated_at else None,
            password=password,
        )

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "password"}
        if self.password is not None:
            out["password"] = self.password
        return out


@dataclass(frozen=True)
class Identity:
    """A tenant user who proved who they are: what a tenant token says."""

    user_id: str
    username: str
    tenant: str
    tenant_id: str
    database: str
    access: str


# --------------------------------------------------------------------------- tenant databases


@contextmanager
def _tenant_db(svc: TenantService, tenant: Tenant) -> Iterator[psycopg.Connection[Any]]:
    target = svc.hosts.pools(tenant.host).target
    with connect(target, tenant.database, autocommit=True, purpose="auth") as conn:
        # A root user written after its provision's answer may still wait: first, so that
        # every use of the tenant's users (a login within milliseconds of it) sees it.
        root_users.write_pending(svc, tenant, conn)
        yield conn


def _live(svc: TenantService, raw_name: str) -> Tenant:
    tenant = svc.get(raw_name)
    if tenant.status != TenantStatus.ACTIVE:
        raise InvalidState(
            f"tenant {tenant.name!r} is {tenant.status}: its users cannot be changed"
        )
    return tenant


def _check_users_table(conn: psycopg.Connection[Any], tenant: Tenant) -> None:
    if not users_db.has_password_column(conn):
        raise InvalidState(
            f"tenant {tenant.name!r} was cloned from a template build older than tenant users "
            "(users.password_hash missing); rebuild its template and upgrade it"
        )


def insert_user(
    conn: psycopg.Connection[Any], tenant: Tenant, username: str, access: str, password_hash: str
) -> users_db.UserRow:
    _check_users_table(conn, tenant)
    row = users_db.insert(
        conn, name=username, auth=username, access=access, password_hash=password_hash
    )
    if row is None:
        raise TenantExists(f"tenant {tenant.name!r} already has a user {username!r}")
    return row


# --------------------------------------------------------------------------- the root user


def warm_up(svc: TenantService, root_passwords: int) -> None:
    """``monk serve``: keep ``root_passwords`` generated root passwords hashed ahead (for cold
    provisions; a spare carries its own root user), and make the dummy hash an unknown tenant
    or user is checked against before the first such login (else that login would pay for two
    hashes, and stand out)."""
    svc.root_passwords.keep(root_passwords)
    svc.root_passwords.hashing().submit(passwords.burn, "")


# --------------------------------------------------------------------------- user management


def add_user(
    svc: TenantService, raw_tenant: str, username: str, access: str, password: str | None
) -> UserView:
    passwords.validate_username(username)
    passwords.validate_access(access)
    tenant = _live(svc, raw_tenant)
    generated = password is None
    password = passwords.validate_password(password) if password is not None else None
    password = password or passwords.generate_password()
    hashed = passwords.hash_password(password)
    with _tenant_db(svc, tenant) as conn:
        row = insert_user(conn, tenant, username, access, hashed)
    return UserView.of(row, password if generated else None)


def list_users(svc: TenantService, raw_tenant: str) -> list[UserView]:
    tenant = _live(svc, raw_tenant)
    with _tenant_db(svc, tenant) as conn:
        return [UserView.of(r) for r in users_db.list_users(conn)]


def set_password(
    svc: TenantService, raw_tenant: str, username: str, password: str | None
) -> UserView:
    passwords.validate_username(username)
    tenant = _live(svc, raw_tenant)
    generated = password is None
    password = passwords.validate_password(password) if password is not None else None
    password = password or passwords.generate_password()
    hashed = passwords.hash_password(password)
    with _tenant_db(svc, tenant) as conn:
        _check_users_table(conn, tenant)
        if not users_db.set_password(conn, username, hashed):
            raise NotFound(f"tenant {tenant.name!r} has no user {username!r}")
        row = users_db.find(conn, username)
    assert row is not None
    return UserView.of(row, password if generated else None)


def remove_user(svc: TenantService, raw_tenant: str, username: str) -> None:
    passwords.validate_username(username)
    tenant = _live(svc, raw_tenant)
    with _tenant_db(svc, tenant) as conn:
        if not users_db.remove(conn, username):
            raise NotFound(f"tenant {tenant.name!r} has no user {username!r}")


# --------------------------------------------------------------------------- login


@dataclass(frozen=True)
class LoginPolicy:
    max_failures: int
    window: int


def login(
    svc: TenantService, policy: LoginPolicy, raw_tenant: str, username: str, password: str
) -> Identity:
    """The user's identity, or LoginFailed: one answer, and one argon2 check's time, whether
    the tenant, the user or the password was wrong. LoginThrottled past the policy's failures."""
    # PostgreSQL text holds no NUL: such a name is counted under a stand-in, and never found.
    key = (
        raw_tenant.strip().casefold()[:200].replace("\x00", "\ufffd"),
        username[:200].replace("\x00", "\ufffd"),
    )
    with svc.hosts.pools().system() as reg:
        wait = logins_db.blocked_for(
            reg, *key, max_failures=policy.max_failures, window=policy.window
        )
    if wait:
        raise LoginThrottled(
            f"too many failed logins for this tenant and user; retry in {wait} s",
            retry_after=wait,
        )
    identity = _check(svc, raw_tenant, username, password)
    with svc.hosts.pools().system() as reg:
        if identity is None:
            logins_db.record_failure(reg, *key, window=policy.window)
            raise LoginFailed("login failed: unknown tenant or user, or wrong password")
        logins_db.clear_failures(reg, *key)
    return identity


def forget_old_failures(reg: psycopg.Connection[Any], policy: LoginPolicy) -> int:
    """Forget failed-login counts whose window has passed (``monk serve``: hourly, on its
    system-database session ``reg``): names that never existed leave no rows behind for long."""
    return logins_db.forget_old_failures(reg, window=policy.window)


class _Pace:
    """How long a check of a real tenant takes (a moving average): a login naming no live
    tenant waits as long, since it skips the tenant's connection and user lookup, which would
    otherwise tell a caller which tenant names exist."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds = 0.0

    def observe(self, seconds: float) -> None:
        with self._lock:
            self.seconds = seconds if not self.seconds else 0.8 * self.seconds + 0.2 * seconds

    def wait_since(self, started: float) -> None:
        left = self.seconds - (time.perf_counter() - started)
        if left > 0:
            time.sleep(min(left, 1.0))


_pace = _Pace()


def _check(svc: TenantService, raw_tenant: str, username: str, password: str) -> Identity | None:
    started = time.perf_counter()
    tenant: Tenant | None = None
    if "\x00" not in raw_tenant + username:
        with contextlib.suppress(InvalidName, NotFound):
            tenant = svc.get(raw_tenant)
    if tenant is None or tenant.status != TenantStatus.ACTIVE:
        passwords.burn(password)
        _pace.wait_since(started)
        return None
    try:
        return _check_user(svc, tenant, username, password)
    finally:
        _pace.observe(time.perf_counter() - started)


def _check_user(
    svc: TenantService, tenant: Tenant, username: str, password: str
) -> Identity | None:
    try:
        with _tenant_db(svc, tenant) as conn:
            row = users_db.find(conn, username) if users_db.has_password_column(conn) else None
            ok = passwords.verify(row.password_hash if row else None, password)
            if row is None or not ok or row.access == "deny":
                return None
            if row.password_hash and passwords.needs_rehash(row.password_hash):
                users_db.set_password(conn, row.auth, passwords.hash_password(password))
    except psycopg.OperationalError:
        # A tenant closed between the read and the connection: refused like any other.
        return None
    return _identity(tenant, row)


def _identity(tenant: Tenant, row: UserRow) -> Identity:
    return Identity(
        user_id=str(row.id),
        username=row.auth,
        tenant=tenant.name,
        tenant_id=str(tenant.id),
        database=tenant.database,
        access=row.access,
    )


def still_valid(svc: TenantService, identity: Identity) -> Identity:
    """For a refresh: the user still exists, with their current access (LoginFailed if not)."""
    state = svc_state(svc, UUID(identity.tenant_id))
    tenant = svc.get(state.name)
    with _tenant_db(svc, tenant) as conn:
        row = users_db.find_by_id(conn, UUID(identity.user_id))
    if row is None or row.access == "deny":
        raise LoginFailed("the token's user no longer exists or was denied access")
    return _identity(tenant, row)


# --------------------------------------------------------------------------- tenant state


def svc_state(svc: TenantService, tenant_id: UUID) -> TenantState:
    """The tenant's state from the system database; TenantDisabled or TenantGone unless active."""
    with svc.hosts.pools().system() as reg:
        state = logins_db.tenant_state(reg, tenant_id)
    return _admit(state)


def _admit(state: TenantState | None) -> TenantState:
    if state is None or state.status in (
        TenantStatus.TRASHED,
        TenantStatus.DELETING,
        TenantStatus.DELETED,
        "failed",
        TenantStatus.PROVISIONING,
    ):
        raise TenantGone("this tenant was deleted")
    if state.status == TenantStatus.DISABLED:
        raise TenantDisabled("this tenant is disabled")
    return state


class TenantStates:
    """Each process's copy of the tenants' states, trusted for ``ttl`` seconds per tenant.

    A change made by any process (another ``monk serve``, the CLI) is a row update in the
    system database; a copy older than ``ttl`` is read again (one indexed read by primary key),
    so a disable or trash reaches every process's tenant requests within ``ttl`` plus one
    read. Polling per tenant keeps it exact without a listener connection per process.

    ``refresh`` (``monk serve`` runs it every ``ttl / 2``) reads again, in one query, the copy
    of every tenant a request used within ``KEEP`` seconds, so that a request of a busy tenant
    finds its copy fresh instead of reading it itself; a copy is dated from before that query
    was sent, so it is never trusted beyond ``ttl`` after what it could have missed."""

    KEEP = 10.0

    def __init__(self, svc: TenantService, ttl: float) -> None:
        self._svc = svc
        self._ttl = ttl
        self._lock = threading.Lock()
        # tenant id -> (read at, state); the state None: no such tenant.
        self._cache: dict[UUID, tuple[float, TenantState | None]] = {}
        self._used: dict[UUID, float] = {}  # tenant id -> when a request last checked it

    def check(self, tenant_id: UUID) -> TenantState:
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(tenant_id)
            self._used[tenant_id] = now
        if cached is None or now - cached[0] >= self._ttl:
            with self._svc.hosts.pools().system() as reg:
                state = logins_db.tenant_state(reg, tenant_id)
            self._keep(now, {tenant_id: state})
        else:
            state = cached[1]
        return _admit(state)

    def refresh(self) -> int:
        """Read again the copies of the tenants used within ``KEEP`` seconds, in one query;
        how many."""
        now = time.monotonic()
        with self._lock:
            for tenant_id in [t for t, at in self._used.items() if now - at >= self.KEEP]:
                del self._used[tenant_id]
            ids = list(self._used)
        if not ids:
            return 0
        with self._svc.hosts.pools().system() as reg:
            found = logins_db.tenant_states(reg, ids)
        self._keep(now, {tenant_id: found.get(tenant_id) for tenant_id in ids})
        return len(ids)

    def _keep(self, read_at: float, states: dict[UUID, TenantState | None]) -> None:
        with self._lock:
            if len(self._cache) > 100_000:
                self._cache.clear()  # bounded: a copy is cheap to read again
                self._used.clear()
            for tenant_id, state in states.items():
                old = self._cache.get(tenant_id)
                if old is None or old[0] <= read_at:  # never a later read's copy replaced
                    self._cache[tenant_id] = (read_at, state)
