"""Template keys and the database names derived from them.

A template key (``basic``, ``crm``) names a template source and, through the functions here, every
database a build of it occupies:

    monk_template_<key>                 the current build, the one tenants are cloned from
    monk_staging_<key>_<version>        a build in progress (renamed to the above when ready)
    monk_retired_<key>_<version>        an earlier build kept after a rebuild

``<version>`` is the 16-hex content hash of the source (see ``monk.templates.source``). The three
prefixes differ, so a derived name never equals another kind's name, and the version has a fixed
length, so each name maps back to exactly one key. PostgreSQL silently truncates identifiers longer
than 63 bytes, which would merge distinct names; keys are therefore capped so that the longest
derived name fits, instead of hashing or truncating names later.
"""

from __future__ import annotations

import re

from monk.core.identifiers import MAX_IDENTIFIER_BYTES
from monk.errors import InvalidName

VERSION_HEX_LENGTH = 16

TEMPLATE_DB_PREFIX = "monk_template_"
STAGING_DB_PREFIX = "monk_staging_"
RETIRED_DB_PREFIX = "monk_retired_"

# The longest derived name is <prefix><key>_<version>; a key must leave room for it.
MAX_TEMPLATE_KEY_BYTES = (
    MAX_IDENTIFIER_BYTES
    - max(len(STAGING_DB_PREFIX), len(RETIRED_DB_PREFIX))
    - 1
    - VERSION_HEX_LENGTH
)

_KEY_RE = re.compile(r"[a-z][a-z0-9_]*")
_VERSION_RE = re.compile(rf"[0-9a-f]{{{VERSION_HEX_LENGTH}}}")


def validate_template_key(key: str) -> str:
    """Return ``key`` if it is a valid template key, else raise ``InvalidName``.

    Lower-case ASCII only, so the derived database names never need case-sensitive quoting and
    match the spec's ``[A-Za-z0-9_]+`` rule for database names.
    """
    if not _KEY_RE.fullmatch(key):
        raise InvalidName(
            f"template key {key!r} must start with a lower-case letter and contain only "
            "a-z, 0-9 and _",
            name=key,
        )
    if len(key) > MAX_TEMPLATE_KEY_BYTES:
        raise InvalidName(
            f"template key {key!r} is {len(key)} characters long; at most "
            f"{MAX_TEMPLATE_KEY_BYTES} are allowed so that its database names fit PostgreSQL's "
            f"{MAX_IDENTIFIER_BYTES}-byte limit",
            name=key,
        )
    return key


def validate_version(version: str) -> str:
    """Return ``version`` if it is a content-hash version (16 lower-case hex digits)."""
    if not _VERSION_RE.fullmatch(version):
        raise InvalidName(
            f"template version {version!r} must be {VERSION_HEX_LENGTH} lower-case hex digits",
            name=version,
        )
    return version


def template_db_name(key: str) -> str:
    """The database tenants of template ``key`` are cloned from."""
    return TEMPLATE_DB_PREFIX + validate_template_key(key)


def staging_db_name(key: str, version: str) -> str:
    """The database a build of ``key`` at ``version`` is made in before it is swapped in."""
    return f"{STAGING_DB_PREFIX}{validate_template_key(key)}_{validate_version(version)}"


def retired_db_name(key: str, version: str) -> str:
    """The name an earlier build of ``key`` at ``version`` keeps after a rebuild replaced it."""
    return f"{RETIRED_DB_PREFIX}{validate_template_key(key)}_{validate_version(version)}"


CREATE_STEP = "create"
"""The build step that creates the staging database (the journal and progress name)."""

BUILD_STEPS = (
    "validate",
    "journal",
    CREATE_STEP,
    "extensions",
    "core_tables",
    "tables",
    "registry",
    "seed",
    "bulk_seed",
    "migrations",
    "sync",
    "health",
    "close",
    "swap",
)
"""The steps a build reports to its ``progress`` callback, in order (``up_to_date`` instead of
all after ``validate`` when the current build already has the source's version)."""


def has_tenant_users(compiler_version: str | None) -> bool:
    """Whether a build of this template compiler version has tenant users' passwords
    (``users.password_hash``, added by compiler version 3: ``schema_compiler.CORE_UPGRADES``)."""
    return bool(compiler_version and compiler_version.isdigit() and int(compiler_version) >= 3)
