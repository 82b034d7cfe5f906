"""Root tokens: HS256 JWTs carrying ``access: "root"`` and an expiry (PyJWT)."""

from __future__ import annotations

import secrets
import time
from pathlib import Path
from typing import Any

import jwt

from monk.adapters import files
from monk.errors import AuthError, ConfigError, RootAccessRequired
from monk.settings import Settings

ALGORITHM = "HS256"
SECRET_FILE = "jwt_secret"  # noqa: S105 (a file name, not a secret)


def signing_secret(settings: Settings) -> str:
    """MONK_JWT_SECRET, else a secret generated once into the data dir (mode 0600, written
    atomically: a full disk or a crash never leaves an empty secret behind)."""
    if settings.jwt_secret is not None:
        return settings.jwt_secret.get_secret_value()
    path: Path = settings.data_dir / SECRET_FILE
    fix = (
        "delete it and monk generates a new one (every root token issued so far then stops "
        "working), or set MONK_JWT_SECRET"
    )
    secret = files.read_secret(path, fix=fix)
    if secret is not None:
        return secret
    try:
        files.write_private(path, secrets.token_urlsafe(48) + "\n", exclusive=True)
    except FileExistsError:
        pass  # another process wrote it first: that one counts
    except OSError as exc:
        raise ConfigError(
            f"MONK_DATA_DIR {settings.data_dir}: cannot store the JWT secret {path}: "
            f"{exc.strerror or exc}"
        ) from None
    secret = files.read_secret(path, fix=fix)
    assert secret is not None
    return secret


def issue_root_token(settings: Settings, *, ttl_seconds: int = 3600, subject: str = "root") -> str:
    now = int(time.time())
    claims = {"sub": subject, "access": "root", "iat": now, "exp": now + ttl_seconds}
    return jwt.encode(claims, signing_secret(settings), algorithm=ALGORITHM)


def verify_root(token: str, secret: str) -> dict[str, Any]:
    """The token's claims if it is a valid, unexpired root token; AuthError otherwise."""
    try:
        claims: dict[str, Any] = jwt.decode(
            token, secret, algorithms=[ALGORITHM], options={"require": ["exp"]}
        )
    except jwt.ExpiredSignatureError:
        raise AuthError("token expired") from None
    except jwt.InvalidTokenError as exc:
        raise AuthError(f"invalid token: {exc}") from None
    if claims.get("access") != "root":
        raise RootAccessRequired("root access required")
    return claims
