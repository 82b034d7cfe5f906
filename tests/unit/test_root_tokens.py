"""Root and tenant tokens: verified tokens are remembered until they expire, never past it."""

from __future__ import annotations

import time

import jwt
import pytest

from monk.api.auth import (
    ALGORITHM,
    TENANT_AUDIENCE,
    issue_tenant_token,
    verify_root,
    verify_tenant,
)
from monk.errors import AuthError, TokenExpired, TokenInvalid

SECRET = "s" * 48


def root_token(exp: float, secret: str = SECRET) -> str:
    return jwt.encode({"sub": "root", "access": "root", "exp": exp}, secret, algorithm=ALGORITHM)


def test_a_remembered_root_token_is_refused_once_it_expires() -> None:
    token = root_token(int(time.time()) + 2)
    assert verify_root(token, SECRET)["access"] == "root"
    assert verify_root(token, SECRET)["access"] == "root"  # remembered
    time.sleep(max(jwt.decode(token, options={"verify_signature": False})["exp"] - time.time(), 0))
    time.sleep(0.05)
    with pytest.raises(AuthError, match="token expired"):
        verify_root(token, SECRET)


def test_a_remembered_token_is_not_valid_under_another_secret_or_audience() -> None:
    token = root_token(int(time.time()) + 600)
    verify_root(token, SECRET)
    with pytest.raises(AuthError, match="invalid token"):
        verify_root(token, "another secret, quite long enough")
    with pytest.raises(TokenInvalid):
        verify_tenant(token, SECRET)  # a root token has no tenant audience
    with pytest.raises(AuthError, match="invalid token"):
        verify_root(token[:-2] + ("AA" if token[-2:] != "AA" else "BB"), SECRET)


def test_a_remembered_tenant_token_expires_and_the_claims_given_out_are_copies() -> None:
    identity = {
        "user_id": "u1",
        "username": "root",
        "tenant": "acme",
        "tenant_id": "00000000-0000-0000-0000-000000000001",
        "db": "tenant_x",
        "access": "root",
    }
    token = issue_tenant_token(SECRET, identity, ttl_seconds=1)
    first = verify_tenant(token, SECRET)
    assert first["aud"] == TENANT_AUDIENCE
    first["access"] = "deny"  # a caller's change stays its own
    assert verify_tenant(token, SECRET)["access"] == "root"
    time.sleep(max(first["exp"] - time.time(), 0) + 0.05)
    with pytest.raises(TokenExpired):
        verify_tenant(token, SECRET)
