"""The doctor's pure rules: a tenant's real state against its status, and the warnings."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime

from monk.adapters.postgres.admin import DatabaseState, RoleState
from monk.adapters.registry import Tenant
from monk.core.reconcile import Snapshot, access_drift, warnings

ROLE = "tenant_0123456789abcdef"
ADMIN = "monk"


def tenant(status: str = "active", limit: int | None = None) -> Tenant:
    now = datetime.now(UTC)
    return Tenant(
        id=uuid.uuid4(), name="Acme", name_key="acme", database=ROLE, host="localhost",
        is_active=status == "active", tenant_type="normal", status=status, template_key="basic",
        template_version="v", role_name=ROLE, step="active", migration_level=0,
        idempotency_key=None, access_read=[], access_edit=[], access_full=[], access_deny=[],
        archive_path=None, archive_size=None, archive_sha256=None, archived_at=None,
        archive_server_version=None, created_at=now, updated_at=now, trashed_at=None,
        deleted_at=None, connection_limit=limit,
    )  # fmt: skip


def database(**changes: object) -> DatabaseState:
    """What configure_tenant_database leaves on an active tenant."""
    grants = frozenset(
        {(ROLE, "CREATE"), (ROLE, "TEMPORARY"), (ROLE, "CONNECT"), (ADMIN, "CONNECT")}
    )
    state = DatabaseState(ROLE, True, -1, False, ROLE, "monk:monk_main", grants)
    return dataclasses.replace(state, **changes)  # type: ignore[arg-type]


def role(login: bool = True, limit: int = 20) -> RoleState:
    return RoleState(ROLE, login, limit, "monk:monk_main")


def test_what_monk_set_is_no_drift() -> None:
    assert access_drift(tenant(), database(), role(), ADMIN, 20) == []
    closed = database(allow_connections=False)
    assert access_drift(tenant("disabled"), closed, role(login=False), ADMIN, 20) == []


def test_each_difference_is_named() -> None:
    opened = database(grants=database().grants | {("PUBLIC", "CONNECT")})
    assert access_drift(tenant(), opened, role(), ADMIN, 20) == [
        "grants monk did not set: PUBLIC CONNECT"
    ]
    drift = access_drift(
        tenant(), database(allow_connections=False), role(login=False, limit=-1), ADMIN, 20
    )
    assert drift == [
        "database refuses connections while active",
        "role cannot log in while active",
        "role connection limit -1, not 20",
    ]
    assert access_drift(tenant(limit=5), database(), role(), ADMIN, 5) == [
        "role connection limit 20, not 5"
    ]
    assert (
        "database owned by postgres"
        in access_drift(tenant(), database(owner="postgres"), role(), ADMIN, 20)[0]
    )
    # an invalid database is its own problem, not drift
    assert access_drift(tenant(), database(connection_limit=-2), role(), ADMIN, 20) == []


def snapshot(**changes: object) -> Snapshot:
    empty = Snapshot((), frozenset(), frozenset(), frozenset(), frozenset(), (), (), frozenset(),
                     frozenset(), frozenset())  # fmt: skip
    return dataclasses.replace(empty, **changes)  # type: ignore[arg-type]


def test_warnings_for_a_server_monk_may_not_own() -> None:
    assert warnings(snapshot()) == []
    [public] = warnings(snapshot(public_databases=("postgres", "template1")))
    assert public.kind == "open_to_public"
    assert public.subject == "postgres, template1"
    reserves = {"superuser": False, "may_use_reserved": False, "reserved": 0}
    [lockout] = warnings(snapshot(reserves=reserves, admin_role="monk_admin"))
    assert lockout.kind == "no_reserved_connections"
    assert "not granted" in lockout.detail
    ok = {"superuser": False, "may_use_reserved": True, "reserved": 10}
    assert warnings(snapshot(reserves=ok)) == []
    assert warnings(snapshot(reserves={"superuser": True})) == []
