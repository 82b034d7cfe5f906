"""The pure rules of hosts (monk.core.hosts): names, labels, versions, privileges, masking."""

from __future__ import annotations

import pytest

from monk.core import hosts as rules
from monk.errors import InvalidName, InvalidRequest


@pytest.mark.parametrize("name", ["pg", "pg-eu-2", "a" * 63, "x1"])
def test_good_host_names(name: str) -> None:
    assert rules.validate_host_name(name) == name


@pytest.mark.parametrize("name", ["", "Pg", "2pg", "pg_2", "pg 2", "a" * 64, "pg.eu", "-pg"])
def test_bad_host_names(name: str) -> None:
    with pytest.raises(InvalidName):
        rules.validate_host_name(name)


def test_labels_parse_and_refuse() -> None:
    assert rules.parse_labels(["zone=eu-1", "tier=gold", "note=a=b"]) == {
        "zone": "eu-1",
        "tier": "gold",
        "note": "a=b",
    }
    for bad in (["zone"], ["zone="], ["Zone=x"], ["zone=x", "zone=y"], ["z=\x01"]):
        with pytest.raises(InvalidRequest):
            rules.parse_labels(bad)


@pytest.mark.parametrize(
    ("num", "ok"),
    [(140012, False), (150000, True), (160004, True), (180006, True), (190000, False)],
)
def test_supported_majors(num: int, ok: bool) -> None:
    why = rules.unsupported_major(num)
    assert (why is None) == ok
    if why is not None:
        assert "15 to 18" in why


def test_missing_privileges() -> None:
    assert rules.missing_privileges(superuser=True, createdb=False, createrole=False) == []
    assert rules.missing_privileges(superuser=False, createdb=True, createrole=True) == []
    assert rules.missing_privileges(superuser=False, createdb=False, createrole=True) == [
        "CREATEDB"
    ]
    assert rules.missing_privileges(superuser=False, createdb=False, createrole=False) == [
        "CREATEDB",
        "CREATEROLE",
    ]


def test_capacity_bounds() -> None:
    assert rules.validate_capacity(None) is None
    assert rules.validate_capacity(0) == 0
    with pytest.raises(InvalidRequest):
        rules.validate_capacity(-1)


def test_without_secret_masks_plain_and_quoted_forms() -> None:
    secret = "p@ss w/rd"
    text = f"bad: {secret} and p%40ss%20w%2Frd and p%40ss%20w/rd"
    masked = rules.without_secret(text, secret)
    assert "ss w" not in masked
    assert "%40ss" not in masked
    assert rules.without_secret(text, None) == text
