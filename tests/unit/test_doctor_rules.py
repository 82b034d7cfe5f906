"""The doctor's pure rules: a tenant's real state against its status, and the warnings."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime

from monk.adapters.postgres.admin import DatabaseState, RoleState
from monk.adapters.registry import Tenant
from monk.core.reconcile import Snapshot, access_drift, behind_current, diagnose, warnings

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


def test_a_database_without_its_mark_lost_its_configure() -> None:
    mark = "monk:monk_main"
    assert access_drift(tenant(), database(), role(), ADMIN, 20, mark=mark) == []
    assert access_drift(tenant(), database(comment=None), role(), ADMIN, 20, mark=mark) == [
        "database lacks monk's mark: its configure did not commit"
    ]
    # Unchecked without a mark (monk tenant health reads the rest only).
    assert access_drift(tenant(), database(comment=None), role(), ADMIN, 20) == []


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


def _empty_snapshot(**changes: object) -> Snapshot:
    snap = Snapshot(
        tenants=(),
        crashed=frozenset(),
        queued_purges=frozenset(),
        databases=frozenset(),
        roles=frozenset(),
        template_leftovers=(),
        crashed_spares=(),
        spare_databases=frozenset(),
        spare_roles=frozenset(),
        spare_names=frozenset(),
    )
    return dataclasses.replace(snap, **changes)  # type: ignore[arg-type]


def test_tenants_behind_the_current_build_are_a_warning_per_key_with_their_names() -> None:
    at = {
        "Old Active": ("active", "v1"),
        "old disabled": ("disabled", "v1"),
        "Old Trashed": ("trashed", "v1"),  # follows when restored: not counted
        "Current": ("active", "v2"),
    }
    rows = tuple(
        dataclasses.replace(tenant(status), name=name, template_version=version)
        for name, (status, version) in at.items()
    )
    other = dataclasses.replace(tenant(), name="Other", template_key="crm", template_version="c")
    snap = _empty_snapshot(tenants=(*rows, other), current_versions={"basic": "v2", "crm": "c"})
    assert behind_current(snap.tenants, snap.current_versions) == {
        "basic": ["Old Active", "old disabled"]
    }
    [warned] = [w for w in warnings(snap) if w.kind == "behind_build"]
    assert warned.subject == "basic"
    assert warned.detail.startswith("2 tenant(s) of basic are not at its current build v2")
    assert warned.as_dict()["tenants"] == ["Old Active", "old disabled"]
    assert "monk template upgrade basic" in warned.repair
    assert not [p for p in diagnose(snap) if p.kind in ("behind_build", "drifted")]


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    database: str
    template_version: str | None
    drifted: bool | None
    differences: list[dict[str, str]]
    registry_version: str | None = "v2"


def test_a_drifted_tenant_is_a_problem_with_no_repair() -> None:
    texts = [f"column contact.c{i}: added (text)" for i in range(5)]
    checks = (
        Check("Drifted", "tenant_a", "v2", True, [{"text": t} for t in texts]),
        Check("Clean", "tenant_b", "v2", False, []),
        Check("Unknown", "tenant_c", "v2", None, []),
    )
    [problem] = diagnose(_empty_snapshot(drift_checks=checks))
    assert (problem.kind, problem.subject) == ("drifted", "tenant_a")
    assert texts[0] in problem.detail
    assert problem.detail.endswith("and 2 more")
    assert problem.repair.startswith("none: ")
    assert "tenants" not in problem.as_dict()
    [stale] = diagnose(
        _empty_snapshot(drift_checks=(dataclasses.replace(checks[0], registry_version="v3"),))
    )
    assert stale.detail.endswith("(checked at that build; the registry now records v3)")


def test_a_connection_budget_larger_than_the_servers_ordinary_slots_is_a_warning() -> None:
    server = {"superuser": True, "max_connections": 100, "superuser_reserved": 20, "reserved": 0}
    assert warnings(snapshot(reserves=server, own_connections=56)) == []  # the defaults
    assert warnings(snapshot(reserves=server, own_connections=80)) == []
    [big] = warnings(snapshot(reserves=server, own_connections=81, admin_role="monk_admin"))
    assert big.kind == "connection_budget_too_large"
    assert "81 connections" in big.detail
    assert "80 beside its reserves" in big.detail
    assert "MONK_HOST_CONNECTIONS" in big.repair
    # Reserves not read (an older snapshot): no guess.
    assert warnings(snapshot(own_connections=500)) == []


def test_a_crashed_purge_is_queued_then_failing_with_its_attempts_and_error() -> None:
    t = tenant("deleting")
    base = _empty_snapshot(tenants=(t,), crashed=frozenset({ROLE}), queued_purges=frozenset({ROLE}))
    [queued] = diagnose(base)
    assert queued.kind == "queued_purge"
    failing = dataclasses.replace(base, failing_purges={ROLE: (3, "database is locked")})
    [found] = diagnose(failing)
    assert found.kind == "failing_purge"
    assert found.subject == ROLE
    assert "3 attempts" in found.detail
    assert "database is locked" in found.detail
    [once] = diagnose(dataclasses.replace(base, failing_purges={ROLE: (1, "x")}))
    assert "1 attempt," in once.detail


def test_spare_roles_without_a_row_and_rows_without_their_role_are_problems() -> None:
    role_a, role_b = "monk_role_00000000000000aa", "monk_role_00000000000000bb"
    found = diagnose(
        snapshot(
            pooled_roles=frozenset({role_a}),
            pooled_role_rows=frozenset({role_b}),
            lost_role_rows=frozenset({role_b}),
        )
    )
    assert [(p.kind, p.subject) for p in found if "spare_role" in p.kind] == [
        ("orphan_spare_role", role_a),
        ("lost_spare_role", role_b),
    ]
    assert diagnose(snapshot(pooled_roles=frozenset({role_a}), pooled_role_rows={role_a})) == []


def test_a_dead_keyholders_spare_role_still_on_the_server_is_a_problem() -> None:
    role = "monk_role_00000000000000cc"
    found = diagnose(
        snapshot(
            pooled_roles=frozenset({role}),
            pooled_role_rows=frozenset({role}),
            dead_role_rows=frozenset({role}),
        )
    )
    assert [(p.kind, p.subject) for p in found] == [("dead_spare_role", role)]
    assert "drop the role" in found[0].repair
