"""Rules of the fleet's hosts, pure: names, labels, which servers monk accepts."""

from __future__ import annotations

import re
from collections.abc import Iterable

from monk.errors import InvalidName, InvalidRequest

# PostgreSQL majors monk supports as hosts: its SQL (MERGE, pg_database's invalid-database
# marker, WITH (FORCE)) needs 15, and 18 is the newest it is tested on.
SUPPORTED_MAJORS = range(15, 19)

HOST_STATES = ("active", "draining")
MAX_CAPACITY = 1_000_000

_HOST_NAME = re.compile(r"[a-z][a-z0-9-]{0,62}")
_LABEL_KEY = re.compile(r"[a-z][a-z0-9_.-]{0,62}")
_MAX_LABEL_VALUE = 200


def validate_host_name(name: str) -> str:
    """A host's name: what the registry records as a tenant's host, and what users type."""
    if not _HOST_NAME.fullmatch(name):
        raise InvalidName(
            f"host name {name!r} must be 1 to 63 characters: lower-case letters, digits and "
            "'-', starting with a letter"
        )
    return name


def parse_labels(pairs: Iterable[str]) -> dict[str, str]:
    """``k=v`` pairs (``--label zone=eu-1``) as a dict; a key twice or a bad pair is refused."""
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise InvalidRequest(f"label {pair!r} is not key=value", field="labels")
        if validate_label(key, value) in labels:
            raise InvalidRequest(f"label {key!r} given twice", field="labels")
        labels[key] = value
    return labels


def validate_label(key: str, value: str) -> str:
    if not _LABEL_KEY.fullmatch(key):
        raise InvalidRequest(
            f"label key {key!r} must be lower-case letters, digits, '_', '.' or '-', starting "
            "with a letter (at most 63)",
            field="labels",
        )
    if not value or len(value) > _MAX_LABEL_VALUE or any(ord(c) < 0x20 for c in value):
        raise InvalidRequest(
            f"label {key!r} needs a value of 1 to {_MAX_LABEL_VALUE} printable characters",
            field="labels",
        )
    return key


def validate_capacity(capacity: int | None) -> int | None:
    if capacity is not None and not 0 <= capacity <= MAX_CAPACITY:
        raise InvalidRequest(
            f"capacity must be between 0 and {MAX_CAPACITY} tenants, not {capacity}",
            field="capacity",
        )
    return capacity


def unsupported_major(version_num: int) -> str | None:
    """Why a server of ``server_version_num`` cannot be a host, or None if it can."""
    major = version_num // 10000
    if major in SUPPORTED_MAJORS:
        return None
    return (
        f"PostgreSQL {major} is not supported: hosts run PostgreSQL "
        f"{SUPPORTED_MAJORS.start} to {SUPPORTED_MAJORS.stop - 1}"
    )


def missing_privileges(*, superuser: bool, createdb: bool, createrole: bool) -> list[str]:
    """The role attributes monk needs on a host that the admin role lacks."""
    if superuser:
        return []
    return [n for n, ok in (("CREATEDB", createdb), ("CREATEROLE", createrole)) if not ok]


def without_secret(text: str, secret: str | None) -> str:
    """``text`` with ``secret`` masked wherever it occurs (as is, or URL-quoted): the last
    guard on messages that quote what a server or a parser said about a URL."""
    if not secret:
        return text
    from urllib.parse import quote

    for form in {secret, quote(secret, safe=""), quote(secret)}:
        text = text.replace(form, "********")
    return text
