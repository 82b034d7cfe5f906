"""Tenant users and their logins: ``/auth/login``, ``/auth/refresh``, ``/api/whoami`` and the
root routes ``/api/root/tenant/{name}/user``."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Depends, status
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials

from monk.api.auth import issue_tenant_token, verify_tenant
from monk.api.deps import Root, RuntimeDep, TenantUser, tenant_bearer
from monk.api.envelope import CHANGE, READ_ONE, Ok, responses
from monk.api.models import (
    LoginIn,
    LoginOut,
    LoginUser,
    PasswordChange,
    UserCreate,
    UserOut,
    WhoAmI,
)
from monk.api.runtime import Runtime
from monk.errors import PasswordMissing, TenantMissing, TokenRequired, UsernameMissing
from monk.service import tenant_auth
from monk.service.tenant_auth import Identity

auth_router = APIRouter(prefix="/auth", tags=["tenant auth"])
tenant_router = APIRouter(prefix="/api", tags=["tenant api"])
users_router = APIRouter(prefix="/api/root/tenant/{name}/user", tags=["tenant users"])

_LOGIN = responses(400, 401, 422, 429, 500, 503)
_TENANT = responses(401, 403, 410, 500, 503)


def _token(rt: Runtime, identity: Identity) -> LoginOut:
    ttl = rt.settings.tenant_token_ttl
    claims = {
        "user_id": identity.user_id,
        "username": identity.username,
        "tenant": identity.tenant,
        "tenant_id": identity.tenant_id,
        "db": identity.database,
        "access": identity.access,
    }
    user = LoginUser(
        id=identity.user_id,
        username=identity.username,
        tenant=identity.tenant,
        tenant_id=identity.tenant_id,
        access=identity.access,
    )
    return LoginOut(
        token=issue_tenant_token(rt.secret, claims, ttl_seconds=ttl), expires_in=ttl, user=user
    )


@auth_router.post("/login", summary="Log a tenant user in", responses=_LOGIN)
async def login(rt: RuntimeDep, body: LoginIn) -> Ok[LoginOut]:
    if not body.tenant:
        raise TenantMissing("tenant is required")
    if not body.username:
        raise UsernameMissing("username is required")
    if not body.password:
        raise PasswordMissing("password is required")
    tenant, username, password = body.tenant, body.username, body.password
    # argon2 and the database calls block: off the event loop.
    identity = await run_in_threadpool(
        tenant_auth.login, rt.tenants, rt.login_policy, tenant, username, password
    )
    return Ok(data=_token(rt, identity))


@auth_router.post(
    "/refresh", summary="A new token for an unexpired tenant token", responses=_TENANT
)
def refresh(
    rt: RuntimeDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(tenant_bearer)],
) -> Ok[LoginOut]:
    if credentials is None:
        raise TokenRequired("authentication required: send Authorization: Bearer <tenant token>")
    claims = verify_tenant(credentials.credentials, rt.secret)
    old = Identity(
        user_id=str(claims["user_id"]),
        username=str(claims["username"]),
        tenant=str(claims["tenant"]),
        tenant_id=str(claims["tenant_id"]),
        database=str(claims["db"]),
        access=str(claims["access"]),
    )
    return Ok(data=_token(rt, tenant_auth.still_valid(rt.tenants, old)))


@tenant_router.get("/whoami", summary="The token's user and tenant", responses=_TENANT)
def whoami(who: TenantUser) -> Ok[WhoAmI]:
    c = who.claims
    return Ok(
        data=WhoAmI(
            user_id=str(c["user_id"]),
            username=str(c["username"]),
            tenant=who.state.name,
            tenant_id=str(who.state.id),
            database=who.state.database,
            access=str(c["access"]),
            tenant_status=who.state.status,
        )
    )


def _user(view: tenant_auth.UserView) -> UserOut:
    return UserOut.model_validate(asdict(view))


@users_router.get("", summary="The tenant's users", responses=READ_ONE)
def list_users(rt: RuntimeDep, _: Root, name: str) -> Ok[list[UserOut]]:
    return Ok(data=[_user(u) for u in tenant_auth.list_users(rt.tenants, name)])


@users_router.post(
    "", status_code=status.HTTP_201_CREATED, summary="Add a tenant user", responses=CHANGE
)
def add_user(rt: RuntimeDep, _: Root, name: str, body: UserCreate) -> Ok[UserOut]:
    view = tenant_auth.add_user(rt.tenants, name, body.username, body.access, body.password)
    return Ok(data=_user(view))


@users_router.put("/{username}", summary="Set a tenant user's password", responses=CHANGE)
def set_password(
    rt: RuntimeDep, _: Root, name: str, username: str, body: PasswordChange
) -> Ok[UserOut]:
    return Ok(data=_user(tenant_auth.set_password(rt.tenants, name, username, body.password)))


@users_router.delete("/{username}", summary="Remove a tenant user", responses=CHANGE)
def remove_user(rt: RuntimeDep, _: Root, name: str, username: str) -> Ok[dict[str, str]]:
    tenant_auth.remove_user(rt.tenants, name, username)
    return Ok(data={"username": username, "status": "removed"})
