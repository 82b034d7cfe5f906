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
