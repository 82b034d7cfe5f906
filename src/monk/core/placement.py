"""Placement: which host a new tenant goes to. Pure: hosts in, a choice (or why none) out.

Eligible: an active host (not draining), not known to be down, below its capacity, with every label
asked for, and with a ready build of the template. Among them the one with the most free capacity
(no capacity: unlimited, before any finite one), ties broken by the fewest tenants, then by name:
the same inputs always give the same host. A pinned host (``"host": NAME``, ``--host``) is chosen
only if it is eligible, and the answer says why not otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Candidate:
    name: str
    state: str  # 'active' or 'draining'
    capacity: int | None  # None: no limit
    tenants: int  # live tenants recorded on it
    labels: Mapping[str, str] = field(default_factory=dict)
    has_template: bool = True  # a ready build of the template asked for
    down: str | None = None  # why it cannot be reached now (its breaker open), or None

    @property
    def free(self) -> float:
        return float("inf") if self.capacity is None else self.capacity - self.tenants


@dataclass(frozen=True)
class Choice:
    host: str | None  # None: no eligible host
    reason: str = ""  # why none (or why the pinned one is not), for the error message


def why_not(host: Candidate, labels: Mapping[str, str]) -> str | None:
    """Why ``host`` cannot take a new tenant, or None if it can."""
    if host.state != "active":
        return f"{host.name} is {host.state}"
    if host.down is not None:
        return f"{host.name} is unavailable ({host.down})"
    if host.capacity is not None and host.tenants >= host.capacity:
        return f"{host.name} is full ({host.tenants}/{host.capacity})"
    wrong = [f"{k}={v}" for k, v in sorted(labels.items()) if host.labels.get(k) != v]
    if wrong:
        return f"{host.name} lacks label {', '.join(wrong)}"
    if not host.has_template:
        return f"{host.name} has no ready build of the template"
    return None


def choose(
    hosts: Sequence[Candidate],
    *,
    pinned: str | None = None,
    labels: Mapping[str, str] | None = None,
) -> Choice:
    """The host a new tenant goes to (see the module's docstring)."""
    wanted = dict(labels or {})
    if pinned is not None:
        match = next((h for h in hosts if h.name == pinned), None)
        if match is None:
            return Choice(None, f"host {pinned!r} is not registered")
        reason = why_not(match, wanted)
        return Choice(None, reason) if reason else Choice(pinned)
    if not hosts:
        return Choice(None, "no hosts")
    reasons = {h.name: why_not(h, wanted) for h in hosts}
    eligible = [h for h in hosts if reasons[h.name] is None]
    if not eligible:
        return Choice(None, "; ".join(r for r in reasons.values() if r))
    best = min(eligible, key=lambda h: (-h.free, h.tenants, h.name))
    return Choice(best.name)
