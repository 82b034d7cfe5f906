"""Request dependencies: the runtime, and root authentication."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from monk.api.auth import verify_root
from monk.api.runtime import Runtime
from monk.errors import AuthError

_bearer = HTTPBearer(auto_error=False, description="A root JWT from `monk token --root`.")


def runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


def require_root(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> dict[str, Any]:
    """401 without a valid token, 403 with a valid token that is not root."""
    if credentials is None:
        raise AuthError("authentication required: send Authorization: Bearer <root token>")
    return verify_root(credentials.credentials, runtime(request).secret)


RuntimeDep = Annotated[Runtime, Depends(runtime)]
Root = Annotated[dict[str, Any], Depends(require_root)]
