"""Validation of the PostgreSQL object names monk creates (databases, roles, schemas).

The server silently truncates identifiers longer than 63 bytes (NAMEDATALEN - 1), so two long
names could become one object: every name is checked here before any SQL is issued.
"""

from __future__ import annotations

import re

from monk.errors import InvalidName

MAX_IDENTIFIER_BYTES = 63
_SAFE = re.compile(r"[A-Za-z0-9_]+")


def validate_identifier(value: str, *, what: str) -> str:
    """Return ``value`` if it is ``[A-Za-z0-9_]+`` and at most 63 bytes, else raise InvalidName."""
    if not value:
        raise InvalidName(f"{what} must not be empty")
    if not _SAFE.fullmatch(value):
        raise InvalidName(f"{what} {value!r} may contain only letters, digits and '_'")
    if len(value.encode()) > MAX_IDENTIFIER_BYTES:
        raise InvalidName(
            f"{what} {value!r} is {len(value.encode())} bytes; PostgreSQL allows "
            f"{MAX_IDENTIFIER_BYTES}"
        )
    return value


def validate_database_name(value: str) -> str:
    return validate_identifier(value, what="database name")


def validate_role_name(value: str) -> str:
    return validate_identifier(value, what="role name")
