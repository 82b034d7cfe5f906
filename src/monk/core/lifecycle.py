"""The tenant lifecycle: the states a tenant row takes and which action may move it where.

Pure: no I/O. The service asks ``check`` before it acts and writes ``after``'s status; ``monk
doctor`` decides over ``SETTLED``; the CLI's and the API's status filters accept
``TenantStatus`` values only.

Each action is one change of the row's ``status`` (or of nothing: ``keeps``). ``None`` stands
for "no live tenant under the name": where ``provision`` starts, and what an undone
provisioning leaves (its row removed). A purge with ``forget`` also removes the row after
``finish_purge``. The schema's CHECK also admits ``failed``, which no code path writes (a
failed provision is undone and its row removed): it is not a status here, so a filter on it is
refused like any unknown value.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from monk.errors import InvalidRequest, InvalidState


class TenantStatus(StrEnum):
    """``tenants.status``. A ``StrEnum``: a member equals its value, so a row's plain ``str``
    compares with it directly (``row.status == TenantStatus.ACTIVE``, ``row.status in SETTLED``)."""

    PROVISIONING = "provisioning"  # intent recorded; clone, role, configuration under way
    ACTIVE = "active"  # open: connections allowed, the role can log in
    DISABLED = "disabled"  # closed: no new connections, sessions ended, role NOLOGIN
    TRASHED = "trashed"  # soft-deleted, closed like disabled
    DELETING = "deleting"  # a purge is queued or running
    DELETED = "deleted"  # purged: database and role dropped, row kept (with its archive)


class Action(StrEnum):
    """What can be done to a tenant (the value names it in messages and docs)."""

    PROVISION = "provision"  # record the intent
    HAND_OUT = "hand out"  # the fast warm handout: intent and activation in one transaction
    ACTIVATE = "activate"  # the provision's last step
    UNDO_PROVISION = "undo provision"  # a failed or crashed provision: every trace removed
    DISABLE = "disable"
    ENABLE = "enable"
    TRASH = "trash"
    RESTORE = "restore"  # out of the trash
    PURGE = "purge"  # queued: the worker finishes it
    FINISH_PURGE = "finish purge"  # archive, drop database and role
    RESTORE_ARCHIVE = "restore from archive"
    ARCHIVE = "archive"
    ROTATE_CREDENTIALS = "rotate credentials"
    SET_CONNECTION_LIMIT = "set connection limit"
    MARK_DELETED = "mark deleted"  # doctor: a settled tenant's database is missing or invalid


# Statuses in which a tenant rests between operations: no worker is at work on it.
SETTLED: frozenset[TenantStatus] = frozenset(
    {TenantStatus.ACTIVE, TenantStatus.DISABLED, TenantStatus.TRASHED}
)
# Statuses an operation passes through: a row left in one by a dead process is the doctor's.
IN_FLIGHT: frozenset[TenantStatus] = frozenset({TenantStatus.PROVISIONING, TenantStatus.DELETING})
# Statuses of a closed tenant: its database refuses connections and its role cannot log in.
CLOSED: frozenset[TenantStatus] = frozenset({TenantStatus.DISABLED, TenantStatus.TRASHED})


@dataclass(frozen=True)
class Transition:
    """``action`` is allowed from ``sources`` (in this order in messages) and leaves ``target``
    (None: no live row), or the status it found when ``keeps``."""

    sources: tuple[TenantStatus | None, ...]
    target: TenantStatus | None
    verb: str  # how a refusal names it: "cannot {verb} tenant …"
    keeps: bool = False


_S = TenantStatus
_LIVE_SETTLED = (_S.ACTIVE, _S.DISABLED, _S.TRASHED)

TRANSITIONS: dict[Action, Transition] = {
    Action.PROVISION: Transition((None,), _S.PROVISIONING, "provision"),
    Action.HAND_OUT: Transition((None,), _S.ACTIVE, "hand out"),
    Action.ACTIVATE: Transition((_S.PROVISIONING,), _S.ACTIVE, "activate"),
    Action.UNDO_PROVISION: Transition((_S.PROVISIONING,), None, "undo the provisioning of"),
    Action.DISABLE: Transition((_S.ACTIVE, _S.DISABLED), _S.DISABLED, "disable"),
    Action.ENABLE: Transition((_S.ACTIVE, _S.DISABLED), _S.ACTIVE, "enable"),
    # "delete": the CLI's ``tenant delete`` and HTTP DELETE trash a tenant
    Action.TRASH: Transition(_LIVE_SETTLED, _S.TRASHED, "delete"),
    Action.RESTORE: Transition((_S.TRASHED, _S.ACTIVE), _S.ACTIVE, "restore"),
    Action.PURGE: Transition(_LIVE_SETTLED, _S.DELETING, "purge"),
    Action.FINISH_PURGE: Transition((_S.DELETING,), _S.DELETED, "finish the purge of"),
    Action.RESTORE_ARCHIVE: Transition((_S.DELETED,), _S.ACTIVE, "restore from archive"),
    Action.ARCHIVE: Transition(_LIVE_SETTLED, None, "archive", keeps=True),
    Action.ROTATE_CREDENTIALS: Transition(
        (_S.ACTIVE, _S.DISABLED), None, "rotate credentials of", keeps=True
    ),
    Action.SET_CONNECTION_LIMIT: Transition(
        _LIVE_SETTLED, None, "change the connection limit of", keeps=True
    ),
    Action.MARK_DELETED: Transition(_LIVE_SETTLED, _S.DELETED, "mark deleted"),
}


def status_name(status: str | None) -> str:
    """How a message names a status (None: no live tenant)."""
    return "absent" if status is None else str(status)


def allowed(action: Action, status: str | None) -> bool:
    """Whether ``action`` may start from ``status`` (None: no live tenant)."""
    return status in TRANSITIONS[action].sources


def check(action: Action, status: str | None, *, tenant: str | None = None) -> None:
    """InvalidState unless ``action`` may start from ``status``; the message names the
    statuses it is allowed from. ``tenant``: the display name, for the message."""
    if allowed(action, status):
        return
    t = TRANSITIONS[action]
    who = f"tenant {tenant!r}" if tenant is not None else "the tenant"
    raise InvalidState(
        f"cannot {t.verb} {who}: it is {status_name(status)} "
        f"(allowed when {' or '.join(status_name(s) for s in t.sources)})",
        status=status,
        allowed=[status_name(s) for s in t.sources],
    )


def after(action: Action, status: str | None) -> TenantStatus | None:
    """The status ``action`` leaves, from ``status`` (checked; None: no live row)."""
    check(action, status)
    t = TRANSITIONS[action]
    if t.keeps:
        return None if status is None else TenantStatus(status)
    return t.target


def is_live(status: str | None) -> bool:
    """A live tenant holds its name and database: every status but ``deleted``."""
    return status is not None and status != TenantStatus.DELETED


def is_open(status: str | None) -> bool:
    """Whether the tenant's database accepts connections and its role logs in, as monk sets
    them (``active`` only)."""
    return status == TenantStatus.ACTIVE


def parse_status(value: str) -> TenantStatus:
    """A status given by a person or a client; InvalidRequest naming the allowed values."""
    try:
        return TenantStatus(value)
    except ValueError:
        raise InvalidRequest(
            f"unknown tenant status {value!r}: one of {', '.join(s.value for s in TenantStatus)}",
            field="status",
        ) from None


def parse_statuses(values: Iterable[str]) -> list[TenantStatus]:
    return [parse_status(v) for v in values]
