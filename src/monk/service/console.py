"""What the web console needs of monk beyond the API's service calls: operator sign-in, and the
registry's counts and pages (read from the system database and the servers' statistics views
only: drawing a page never opens a tenant or template database)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from monk.adapters.registry import console as registry
from monk.adapters.registry import console_sessions as sessions_db
from monk.adapters.registry import logins as logins_db
from monk.adapters.registry.console import Overview, TenantRow
from monk.errors import LoginThrottled
from monk.service.tenant_auth import LoginPolicy
from monk.service.tenants import TenantService
from monk.settings import Settings

__all__ = ["Overview", "TenantRow"]

_hasher = PasswordHasher()
# Verified when the user is unknown, so that an unknown name costs what a wrong password does.
_DUMMY_HASH = _hasher.hash("monk-console-no-such-user")


# Failed console sign-ins are counted in login_failures beside tenant logins, under a key no
# tenant has (tenant keys are trimmed: none starts with a space).
CONSOLE_KEY = " console"


def check_operator(settings: Settings, user: str, password: str) -> bool:
    """Whether ``user`` is in MONK_CONSOLE_USERS and ``password`` matches its argon2 hash."""
    hashed = settings.console_users.get(user)
    try:
        return bool(_hasher.verify(hashed or _DUMMY_HASH, password)) and hashed is not None
    except (VerificationError, InvalidHashError):
        return False


def sign_in_operator(svc: TenantService, policy: LoginPolicy, user: str, password: str) -> bool:
    """``check_operator``, throttled as tenant logins are (MONK_LOGIN_MAX_FAILURES failures per
    MONK_LOGIN_FAILURE_WINDOW, counted across processes): LoginThrottled past them."""
    key = (CONSOLE_KEY, user[:200].replace("\x00", "\ufffd"))
    with svc.hosts.pools().system() as reg:
        wait = logins_db.blocked_for(
            reg, *key, max_failures=policy.max_failures, window=policy.window
        )
    if wait:
        raise LoginThrottled(
            f"too many failed sign-ins for this user; retry in {wait} s", retry_after=wait
        )
    ok = check_operator(svc.settings, user, password)
    with svc.hosts.pools().system() as reg:
        if ok:
            logins_db.clear_failures(reg, *key)
        else:
            logins_db.record_failure(reg, *key, window=policy.window)
    return ok


@dataclass(frozen=True)
class ConsoleSession:
    id: str
    user: str
    csrf: str
    expires: datetime


def _hash(sid: str) -> bytes:
    return hashlib.sha256(sid.encode()).digest()


def _csrf(sid: str) -> str:
    # Derived from the session id, which only the operator's browser holds (an HttpOnly,
    # SameSite=Strict cookie): nothing more to store, and another page cannot compute it.
    return hmac.new(sid.encode(), b"monk console csrf", hashlib.sha256).hexdigest()


def open_session(svc: TenantService, user: str) -> ConsoleSession:
    """A console session for ``user`` (MONK_CONSOLE_SESSION_TTL), shared by every process on the
    system database; only its id's hash is stored."""
    sid = secrets.token_urlsafe(32)
    with svc.hosts.pools().system() as reg:
        expires = sessions_db.open_session(reg, _hash(sid), user, svc.settings.console_session_ttl)
    return ConsoleSession(sid, user, _csrf(sid), expires)


def find_session(svc: TenantService, sid: str | None) -> ConsoleSession | None:
    """The session of this id, if it exists and has not expired."""
    if not sid or len(sid) > 100:
        return None
    with svc.hosts.pools().system() as reg:
        found = sessions_db.find(reg, _hash(sid))
    return ConsoleSession(sid, found[0], _csrf(sid), found[1]) if found else None


def close_session(svc: TenantService, sid: str) -> None:
    with svc.hosts.pools().system() as reg:
        sessions_db.close(reg, _hash(sid))


def csrf_ok(session: ConsoleSession, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(session.csrf, given)


def overview(svc: TenantService) -> Overview:
    with svc.hosts.pools().system() as reg:
        return registry.overview(reg)


def tenant_page(svc: TenantService, **filters: Any) -> tuple[list[TenantRow], int]:
    with svc.hosts.pools().system() as reg:
        return registry.tenant_page(reg, **filters)


def filter_choices(svc: TenantService) -> tuple[list[str], list[str]]:
    with svc.hosts.pools().system() as reg:
        return registry.filter_choices(reg)


@dataclass(frozen=True)
class TenantDetail:
    operations: list[dict[str, Any]]
    events: list[dict[str, Any]]
    size_bytes: int | None
    connections: int | None


def tenant_detail(svc: TenantService, raw_name: str) -> TenantDetail:
    """The tenant's history from the registry; its size and sessions from its server's
    statistics (the maintenance database of its host, never the tenant's own)."""
    tenant = svc.get(raw_name)
    with svc.hosts.pools().system() as reg:
        ops, events = registry.tenant_history(reg, tenant.name_key, tenant.id)
    with svc.hosts.pools(tenant.host).admin() as admin:
        size, sessions = registry.database_stats(admin, tenant.database)
    return TenantDetail(ops, events, size, sessions)


def operations_page(svc: TenantService, **filters: Any) -> list[dict[str, Any]]:
    with svc.hosts.pools().system() as reg:
        return registry.operations_page(reg, **filters)


def events_page(svc: TenantService, **filters: Any) -> list[dict[str, Any]]:
    with svc.hosts.pools().system() as reg:
        return registry.events_page(reg, **filters)


def builds(svc: TenantService) -> list[dict[str, Any]]:
    with svc.hosts.pools().system() as reg:
        return registry.builds(reg)
