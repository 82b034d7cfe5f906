"""Tenant users' passwords (argon2id through argon2-cffi) and login names. No I/O.

Parameters: RFC 9106's second recommendation is 64 MiB per hash, which on a small host makes
every login and every provision pay ~0.1-0.6 s of CPU and memory; OWASP's Password Storage
Cheat Sheet lists m=19 MiB, t=2, p=1 as an equivalent minimum for argon2id. monk uses that:
the same defence per guess at a fraction of the memory, and failed logins are rate-limited on
top (docs/tenant-api.md). Hashes are PHC strings, so the parameters can be raised later:
``needs_rehash`` tells a login to store the stronger hash.
"""

from __future__ import annotations

import functools
import re
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from monk.core.schema_compiler import USER_ACCESS_LEVELS
from monk.errors import InvalidName, InvalidRequest

TIME_COST = 2
MEMORY_KIB = 19 * 1024
PARALLELISM = 1

_hasher = PasswordHasher(time_cost=TIME_COST, memory_cost=MEMORY_KIB, parallelism=PARALLELISM)


@functools.cache
def _dummy_hash() -> str:
    """Verified when a login names no such tenant or user: it costs what a real check costs
    (made once, when first needed: a command that never logs anyone in never pays for it)."""
    return _hasher.hash(secrets.token_urlsafe(16))


USERNAME = re.compile(r"[a-z][a-z0-9_]{0,62}")
MAX_PASSWORD = 1024  # argon2 takes any length; a bound keeps a request from costing more


def generate_password() -> str:
    return secrets.token_urlsafe(18)


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify(password_hash: str | None, password: str) -> bool:
    """Whether ``password`` matches; a missing or unreadable hash costs a dummy check."""
    try:
        return (
            _hasher.verify(password_hash or _dummy_hash(), password) and password_hash is not None
        )
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def burn(password: str) -> None:
    """A check against the dummy hash: an unknown tenant or user takes as long as a real one."""
    verify(None, password)


def needs_rehash(password_hash: str) -> bool:
    try:
        return _hasher.check_needs_rehash(password_hash)
    except InvalidHashError:
        return True


def validate_username(raw: str) -> str:
    if not USERNAME.fullmatch(raw):
        raise InvalidName(
            f"user name {raw!r}: 1-63 characters, a lowercase letter first, then lowercase "
            "letters, digits or _"
        )
    return raw


def validate_access(raw: str) -> str:
    if raw not in USER_ACCESS_LEVELS:
        raise InvalidRequest(
            f"access {raw!r}: one of {', '.join(USER_ACCESS_LEVELS)}", field="access"
        )
    return raw


def validate_password(password: str) -> str:
    if not password or len(password) > MAX_PASSWORD or "\x00" in password:
        raise InvalidRequest(
            f"password: 1-{MAX_PASSWORD} characters, no NUL byte", field="password"
        )
    return password
