"""Request dependencies: the runtime, root authentication, tenant authentication."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any
from uuid import UUID

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from monk.api.auth import verify_root, verify_tenant
from monk.api.runtime import Runtime
from monk.errors import AuthError, TokenInvalid, TokenRequired
from monk.service.tenant_auth import TenantState

_bearer = HTTPBearer(auto_error=False, description="A root JWT from `monk token --root`.")


# `async def` where no I/O is done (the runtime, a root token's HMAC): FastAPI runs a sync
# dependency on its thread pool; these two hops were 30 -> 17.5 context switches a root read.
async def runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


async def require_root(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> dict[str, Any]:
    """401 without a valid token, 403 with a valid token that is not root."""
    if credentials is None:
        raise AuthError("authentication required: send Authorization: Bearer <root token>")
    rt: Runtime = request.app.state.runtime
    return verify_root(credentials.credentials, rt.secret)


RuntimeDep = Annotated[Runtime, Depends(runtime)]
Root = Annotated[dict[str, Any], Depends(require_root)]


tenant_bearer = HTTPBearer(
    auto_error=False, description="A tenant JWT from `POST /auth/login`.", scheme_name="tenant"
)


@dataclass(frozen=True)
class TenantPrincipal:
    """Who a tenant request is from, and the tenant as the system database has it now (its
    database and host: what the data routes connect to)."""

    claims: dict[str, Any]
    state: TenantState

    @property
    def access(self) -> str:
        return str(self.claims["access"])

    @property
    def user_id(self) -> str:
        return str(self.claims["user_id"])


def require_tenant(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(tenant_bearer)],
) -> TenantPrincipal:
    """401 without a valid tenant token (a root token included); 403 TENANT_DISABLED, 410
    TENANT_GONE when the tenant's state says so now (within MONK_TENANT_STATE_TTL_MS)."""
    if credentials is None:
        raise TokenRequired("authentication required: send Authorization: Bearer <tenant token>")
    rt: Runtime = request.app.state.runtime
    claims = verify_tenant(credentials.credentials, rt.secret)
    try:
        tenant_id = UUID(str(claims["tenant_id"]))
    except ValueError:
        raise TokenInvalid("invalid token: tenant_id is not a UUID") from None
    return TenantPrincipal(claims, rt.tenant_states.check(tenant_id))


TenantUser = Annotated[TenantPrincipal, Depends(require_tenant)]
