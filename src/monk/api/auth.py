"""Root tokens: HS256 JWTs carrying ``access: "root"`` and an expiry (PyJWT)."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import Any

import jwt

from monk.errors import AuthError, ConfigError, RootAccessRequired
from monk.settings import Settings

ALGORITHM = "HS256"
SECRET_FILE = "jwt_secret"  # noqa: S105 (a file name, not a secret)


def signing_secret(settings: Settings) -> str:
    """MONK_JWT_SECRET, else a secret generated once into the data dir (mode 0600)."""
    if settings.jwt_secret is not None:
        return settings.jwt_secret.get_secret_value()
    path: Path = settings.data_dir / SECRET_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()  # another process wrote it first
    except OSError as exc:
        raise ConfigError(
            f"MONK_DATA_DIR {settings.data_dir}: cannot store the JWT secret: {exc}"
        ) from None
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(48) + "\n")
    return path.read_text().strip()


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
