from __future__ import annotations

import re

import pytest

from monk.core.template_names import (
    MAX_TEMPLATE_KEY_BYTES,
    retired_db_name,
    staging_db_name,
    template_db_name,
    validate_template_key,
    validate_version,
)
from monk.errors import InvalidName

VERSION = "0123456789abcdef"
DB_NAME = re.compile(r"[A-Za-z0-9_]+")


@pytest.mark.parametrize(
    "key", ["basic", "crm", "a", "my_template_2", "x" * MAX_TEMPLATE_KEY_BYTES]
)
def test_valid_keys_are_returned(key: str) -> None:
    assert validate_template_key(key) == key


@pytest.mark.parametrize(
    "key",
    [
        "",
        "Basic",
        "2fast",
        "_hidden",
        "with-dash",
        "with space",
        "é",
        "x" * (MAX_TEMPLATE_KEY_BYTES + 1),
    ],
)
def test_invalid_keys_are_refused(key: str) -> None:
    with pytest.raises(InvalidName):
        validate_template_key(key)


def test_every_derived_name_of_the_longest_key_fits_postgres() -> None:
    key = "k" * MAX_TEMPLATE_KEY_BYTES
    for name in (
        template_db_name(key),
        staging_db_name(key, VERSION),
        retired_db_name(key, VERSION),
    ):
        assert len(name.encode()) <= 63
        assert DB_NAME.fullmatch(name)


def test_derived_names() -> None:
    assert template_db_name("basic") == "monk_template_basic"
    assert staging_db_name("basic", VERSION) == f"monk_staging_basic_{VERSION}"
    assert retired_db_name("basic", VERSION) == f"monk_retired_basic_{VERSION}"


def test_kinds_of_names_never_meet() -> None:
    names = {
        template_db_name("a_b"),
        staging_db_name("a_b", VERSION),
        retired_db_name("a_b", VERSION),
        template_db_name("a"),
        staging_db_name("a", VERSION),
    }
    assert len(names) == 5


@pytest.mark.parametrize(
    "version", ["", "0123456789ABCDEF", "0123456789abcde", "0123456789abcdef0", "g" * 16]
)
def test_bad_versions_are_refused(version: str) -> None:
    assert validate_version(VERSION) == VERSION
    with pytest.raises(InvalidName):
        staging_db_name("basic", version)
    with pytest.raises(InvalidName):
        retired_db_name("basic", version)


def test_derived_names_validate_the_key() -> None:
    with pytest.raises(InvalidName):
        template_db_name("Bad")
