"""The tenant lifecycle's transition table, without a database: every action from every state."""

from __future__ import annotations

import pytest

from monk.core import lifecycle
from monk.core.lifecycle import Action, TenantStatus
from monk.errors import InvalidRequest, InvalidState, status_and_exit

A, S = Action, TenantStatus

# What docs/tenants.md promises, written out once more by hand: the table must agree with it.
EXPECTED: dict[Action, tuple[tuple[TenantStatus | None, ...], TenantStatus | str | None]] = {
    A.PROVISION: ((None,), S.PROVISIONING),
    A.HAND_OUT: ((None,), S.ACTIVE),
    A.ACTIVATE: ((S.PROVISIONING,), S.ACTIVE),
    A.UNDO_PROVISION: ((S.PROVISIONING,), None),
    A.DISABLE: ((S.ACTIVE, S.DISABLED), S.DISABLED),
    A.ENABLE: ((S.ACTIVE, S.DISABLED), S.ACTIVE),
    A.TRASH: ((S.ACTIVE, S.DISABLED, S.TRASHED), S.TRASHED),
    A.RESTORE: ((S.TRASHED, S.ACTIVE), S.ACTIVE),
    A.PURGE: ((S.ACTIVE, S.DISABLED, S.TRASHED), S.DELETING),
    A.FINISH_PURGE: ((S.DELETING,), S.DELETED),
    A.RESTORE_ARCHIVE: ((S.DELETED,), S.ACTIVE),
    A.ARCHIVE: ((S.ACTIVE, S.DISABLED, S.TRASHED), "unchanged"),
    A.ROTATE_CREDENTIALS: ((S.ACTIVE, S.DISABLED), "unchanged"),
    A.SET_CONNECTION_LIMIT: ((S.ACTIVE, S.DISABLED, S.TRASHED), "unchanged"),
    A.MARK_DELETED: ((S.ACTIVE, S.DISABLED, S.TRASHED), S.DELETED),
}
EVERY_STATE: list[TenantStatus | None] = [None, *TenantStatus]


def test_the_statuses_are_the_registrys() -> None:
    assert [s.value for s in TenantStatus] == [
        "provisioning", "active", "disabled", "trashed", "deleting", "deleted"
    ]  # fmt: skip
    assert set(lifecycle.TRANSITIONS) == set(Action) == set(EXPECTED)


@pytest.mark.parametrize(
    ("action", "source"),
    [(a, s) for a, (sources, _) in EXPECTED.items() for s in sources],
    ids=str,
)
def test_each_allowed_transition(action: Action, source: TenantStatus | None) -> None:
    _, target = EXPECTED[action]
    assert lifecycle.allowed(action, source)
    lifecycle.check(action, source, tenant="Acme")
    assert lifecycle.after(action, source) == (source if target == "unchanged" else target)
    if source is not None:  # a row's plain str is as good as the member
        assert lifecycle.after(action, str(source.value)) == lifecycle.after(action, source)


@pytest.mark.parametrize(
    ("action", "source"),
    [(a, s) for a, (sources, _) in EXPECTED.items() for s in EVERY_STATE if s not in sources],
    ids=str,
)
def test_every_other_state_is_refused_naming_the_allowed(
    action: Action, source: TenantStatus | None
) -> None:
    sources, _ = EXPECTED[action]
    assert not lifecycle.allowed(action, source)
    with pytest.raises(InvalidState) as caught:
        lifecycle.check(action, source, tenant="Acme")
    message = caught.value.message
    named = " or ".join("absent" if s is None else s.value for s in sources)
    assert message.startswith(f"cannot {lifecycle.TRANSITIONS[action].verb} tenant 'Acme': ")
    assert f"it is {'absent' if source is None else source.value} " in message
    assert message.endswith(f"(allowed when {named})")
    assert status_and_exit(caught.value) == (409, 4)
    with pytest.raises(InvalidState):
        lifecycle.after(action, source)


def test_the_messages_the_service_always_gave() -> None:
    with pytest.raises(InvalidState, match=r"^cannot disable tenant 'Acme': it is trashed "
                       r"\(allowed when active or disabled\)$"):  # fmt: skip
        lifecycle.check(A.DISABLE, "trashed", tenant="Acme")
    with pytest.raises(InvalidState, match=r"^cannot delete tenant 'Acme': it is deleting "):
        lifecycle.check(A.TRASH, "deleting", tenant="Acme")
    with pytest.raises(InvalidState, match=r"^cannot change the connection limit of tenant "):
        lifecycle.check(A.SET_CONNECTION_LIMIT, "provisioning", tenant="Acme")
    with pytest.raises(InvalidState, match=r"^cannot purge the tenant: it is deleted "):
        lifecycle.check(A.PURGE, "deleted")


def test_a_status_the_enum_does_not_know_is_refused_by_every_action() -> None:
    # 'failed': the schema's CHECK admits it, no code writes it
    for action in Action:
        with pytest.raises(InvalidState, match="it is failed "):
            lifecycle.check(action, "failed")


def test_the_groups() -> None:
    assert {S.ACTIVE, S.DISABLED, S.TRASHED} == lifecycle.SETTLED
    assert {S.PROVISIONING, S.DELETING} == lifecycle.IN_FLIGHT
    assert {S.DISABLED, S.TRASHED} == lifecycle.CLOSED
    assert "active" in lifecycle.SETTLED
    assert "deleting" not in lifecycle.SETTLED
    # every settled state has a way out to purge; every in-flight one a way to finish
    assert all(lifecycle.allowed(A.PURGE, s) for s in lifecycle.SETTLED)
    assert lifecycle.allowed(A.ACTIVATE, "provisioning")
    assert lifecycle.allowed(A.FINISH_PURGE, "deleting")
    assert [s for s in EVERY_STATE if lifecycle.is_live(s)] == [
        S.PROVISIONING, S.ACTIVE, S.DISABLED, S.TRASHED, S.DELETING
    ]  # fmt: skip
    assert [s for s in EVERY_STATE if lifecycle.is_open(s)] == [S.ACTIVE]


def test_parse_status_names_the_allowed_values() -> None:
    assert lifecycle.parse_status("trashed") is S.TRASHED
    assert lifecycle.parse_statuses(["active", "deleted"]) == [S.ACTIVE, S.DELETED]
    for bad in ("bogus", "Active", "failed", ""):
        with pytest.raises(InvalidRequest) as caught:
            lifecycle.parse_status(bad)
        assert caught.value.message == (
            f"unknown tenant status {bad!r}: one of provisioning, active, disabled, trashed, "
            "deleting, deleted"
        )
        assert status_and_exit(caught.value) == (422, 2)
