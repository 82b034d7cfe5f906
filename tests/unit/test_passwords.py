"""Tenant users' passwords and names (monk.core.passwords)."""

from __future__ import annotations

import pytest

from monk.core import passwords
from monk.errors import InvalidName, InvalidRequest


def test_a_hash_is_argon2id_with_monks_parameters_and_verifies_only_its_password() -> None:
    hashed = passwords.hash_password("s3cret")
    assert hashed.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert "s3cret" not in hashed
    assert passwords.verify(hashed, "s3cret")
    assert not passwords.verify(hashed, "s3cret ")
    assert not passwords.needs_rehash(hashed)


def test_no_hash_or_a_broken_one_never_verifies() -> None:
    assert not passwords.verify(None, "anything")
    assert not passwords.verify("not a hash", "anything")
    assert passwords.needs_rehash("not a hash")


def test_weaker_parameters_need_a_rehash() -> None:
    from argon2 import PasswordHasher

    weak = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash("pw")
    assert passwords.verify(weak, "pw")
    assert passwords.needs_rehash(weak)


@pytest.mark.parametrize("name", ["root", "alice_2", "a" * 63])
def test_user_names_accepted(name: str) -> None:
    assert passwords.validate_username(name) == name


@pytest.mark.parametrize("name", ["", "Root", "1abc", "a b", "a-b", "a" * 64, "é", "root\n"])
def test_user_names_refused(name: str) -> None:
    with pytest.raises(InvalidName):
        passwords.validate_username(name)


@pytest.mark.parametrize("password", ["", "x" * 1025, "a\x00b"])
def test_passwords_refused(password: str) -> None:
    with pytest.raises(InvalidRequest):
        passwords.validate_password(password)


def test_access_levels() -> None:
    assert passwords.validate_access("edit") == "edit"
    with pytest.raises(InvalidRequest):
        passwords.validate_access("admin")
