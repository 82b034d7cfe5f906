"""Tenant names: normalisation, identity, and the database and role names derived from them.

This module is the one place the tenant hash is computed. Identity is the NFC-normalised,
trimmed, case-folded name: ``Acme Corp`` and ``acme corp`` are one tenant; the display name is
kept as given (normalised and trimmed). The hash is the first 16 hex digits of SHA-256 over the
identity's UTF-8 bytes; the test vectors in tests/unit/test_tenant_names.py pin it.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

from monk.core.identifiers import validate_database_name
from monk.errors import InvalidName

MAX_NAME_CHARS = 128
# The highest CONNECTION LIMIT monk sets on a tenant's role (its own or the default).
MAX_TENANT_CONNECTION_LIMIT = 10_000
TENANT_DB_PREFIX = "tenant_"

Hasher = Callable[[str], str]


def stable_hex_16(identity: str) -> str:
    """16 hex digits of SHA-256 over the identity: deterministic across processes and versions."""
    return hashlib.sha256(identity.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class TenantName:
    display: str  # as given, NFC-normalised and trimmed
    key: str  # identity: display, case-folded (and NFC again: folding can denormalise)
    database: str  # tenant_<16 hex>

    @property
    def role(self) -> str:
        """The tenant's login role: named like its database (roles and databases are separate
        namespaces, and the name is already unique and valid)."""
        return self.database


def normalize(raw: str, *, hasher: Hasher = stable_hex_16) -> TenantName:
    """Validate and normalise a caller's tenant name; raises InvalidName with the reason."""
    if not isinstance(raw, str):
        raise InvalidName("tenant name must be a string")
    display = unicodedata.normalize("NFC", raw).strip()
    if not display:
        raise InvalidName("tenant name must not be empty")
    if len(display) > MAX_NAME_CHARS:
        raise InvalidName(
            f"tenant name is {len(display)} characters; at most {MAX_NAME_CHARS} are allowed"
        )
    for ch in display:
        category = unicodedata.category(ch)
        if category in ("Cc", "Cf", "Cs", "Co", "Cn") or category in ("Zl", "Zp"):
            raise InvalidName(
                f"tenant name contains a control or unassigned character (U+{ord(ch):04X})"
            )
    key = unicodedata.normalize("NFC", display.casefold())
    digest = hasher(key)
    database = validate_database_name(f"{TENANT_DB_PREFIX}{digest}")
    return TenantName(display=display, key=key, database=database)


def is_tenant_database(name: str) -> bool:
    suffix = name.removeprefix(TENANT_DB_PREFIX)
    return (
        name.startswith(TENANT_DB_PREFIX)
        and len(suffix) == 16
        and all(c in "0123456789abcdef" for c in suffix)
    )
