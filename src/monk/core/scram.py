"""SCRAM-SHA-256 password verifiers (RFC 5802/7677), computed client-side.

``CREATE ROLE … PASSWORD '<verifier>'`` stores the verifier as is, so the plaintext password
never reaches the server, its logs or pg_stat_statements.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

ITERATIONS = 4096  # PostgreSQL's default scram_iterations


def generate_password(nbytes: int = 24) -> str:
    return secrets.token_urlsafe(nbytes)


def verifier(password: str, *, salt: bytes | None = None, iterations: int = ITERATIONS) -> str:
    # PostgreSQL applies SASLprep to the password; URL-safe ASCII passwords are unchanged by it.
    salt = salt if salt is not None else secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode("ascii")

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def client_keys(password: str, stored: str) -> tuple[str, str] | None:
    """The (ClientKey, ServerKey) of ``password`` under the verifier ``stored`` (as
    pg_authid holds it), base64: what libpq 18's ``scram_client_key``/``scram_server_key`` take
    to log in without the password's PBKDF2. None when ``stored`` is not a SCRAM-SHA-256
    verifier or the password does not match it."""
    try:
        mechanism, rest = stored.split("$", 1)
        iterations_salt, keys = rest.split("$", 1)
        iterations, salt = iterations_salt.split(":", 1)
        stored_key, server_key = keys.split(":", 1)
        if mechanism != "SCRAM-SHA-256":
            return None
        salted = hashlib.pbkdf2_hmac(
            "sha256", password.encode("utf-8"), base64.b64decode(salt), int(iterations)
        )
    except ValueError:
        return None
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    if base64.b64encode(hashlib.sha256(client_key).digest()).decode("ascii") != stored_key:
        return None
    server = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    if base64.b64encode(server).decode("ascii") != server_key:
        return None
    return base64.b64encode(client_key).decode("ascii"), server_key
