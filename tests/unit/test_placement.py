"""Placement (issue 13, item 3): the pure choice of a host for a new tenant."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from monk.core.placement import Candidate, choose


def host(name: str, tenants: int = 0, capacity: int | None = None, **kw: object) -> Candidate:
    return Candidate(
        name=name,
        state=str(kw.get("state", "active")),
        capacity=capacity,
        tenants=tenants,
        labels=dict(kw.get("labels", {})),  # type: ignore[call-overload]
        has_template=bool(kw.get("has_template", True)),
        down=None if kw.get("down") is None else str(kw["down"]),
    )


def test_the_most_free_capacity_wins() -> None:
    hosts = [host("a", 5, 10), host("b", 2, 10), host("c", 50, 100)]
    assert choose(hosts).host == "c"  # 50 free
    assert choose([host("a", 5, 10), host("b", 2, 10)]).host == "b"


def test_no_capacity_is_unlimited_and_ties_are_deterministic() -> None:
    assert choose([host("a", 0, 1000), host("b", 10)]).host == "b"
    # Two unlimited: fewer tenants, then the name.
    assert choose([host("b", 3), host("a", 4)]).host == "b"
    assert choose([host("b", 3), host("a", 3)]).host == "a"
    assert choose([host("b", 0, 10), host("a", 0, 10)]).host == "a"


def test_a_host_known_down_is_skipped_and_named() -> None:
    hosts = [host("a", 0, down="connection refused"), host("b", 7)]
    assert choose(hosts).host == "b"
    none = choose([host("a", 0, down="connection refused")])
    assert none.host is None
    assert none.reason == "a is unavailable (connection refused)"


def test_draining_full_and_template_less_hosts_are_skipped() -> None:
    hosts = [
        host("a", 0, None, state="draining"),
        host("b", 10, 10),
        host("c", 0, 5, has_template=False),
        host("d", 4, 5),
    ]
    assert choose(hosts).host == "d"
    none = choose(hosts[:3])
    assert none.host is None
    assert "a is draining" in none.reason
    assert "b is full (10/10)" in none.reason
    assert "c has no ready build" in none.reason


def test_labels_restrict() -> None:
    hosts = [
        host("a", 0, labels={"zone": "eu"}),
        host("b", 0, 100, labels={"zone": "us", "tier": "gold"}),
        host("c", 0, 10, labels={"zone": "us"}),
    ]
    assert choose(hosts, labels={"zone": "us"}).host == "b"
    assert choose(hosts, labels={"zone": "us", "tier": "gold"}).host == "b"
    assert choose(hosts, labels={"zone": "eu"}).host == "a"
    none = choose(hosts, labels={"zone": "ap"})
    assert none.host is None
    assert "lacks label zone=ap" in none.reason


def test_a_pinned_host_is_chosen_only_if_eligible() -> None:
    hosts = [host("a", 0), host("b", 0, 1), host("c", 1, 1)]
    assert choose(hosts, pinned="b").host == "b"
    assert choose(hosts, pinned="c").reason == "c is full (1/1)"
    assert choose(hosts, pinned="zz").reason == "host 'zz' is not registered"
    assert choose(hosts, pinned="a", labels={"zone": "x"}).host is None


def test_placing_one_by_one_spreads_by_capacity() -> None:
    counts = {"a": 0, "b": 0, "c": 0}
    capacity = {"a": 10, "b": 20, "c": 30}
    for _ in range(30):
        chosen = choose([host(n, counts[n], capacity[n]) for n in counts]).host
        assert chosen is not None
        counts[chosen] += 1
    # The most free first: c until it has b's free room, then b and c in turn, then all
    # three: 30 tenants leave 10 free on each.
    assert counts == {"a": 0, "b": 10, "c": 20}


@given(
    st.lists(
        st.tuples(st.integers(0, 20), st.one_of(st.none(), st.integers(0, 20)), st.booleans()),
        min_size=1,
        max_size=6,
    )
)
def test_the_choice_is_eligible_maximal_and_order_free(
    rows: list[tuple[int, int | None, bool]],
) -> None:
    hosts = [
        host(f"h{i}", t, c, state="active" if ok else "draining")
        for i, (t, c, ok) in enumerate(rows)
    ]
    chosen = choose(hosts)
    assert choose(list(reversed(hosts))).host == chosen.host
    eligible = [
        h for h in hosts if h.state == "active" and (h.capacity is None or h.tenants < h.capacity)
    ]
    if not eligible:
        assert chosen.host is None
        return
    best = next(h for h in hosts if h.name == chosen.host)
    assert best in eligible
    assert all(best.free >= h.free for h in eligible)
    assert Counter(h.name for h in hosts)[best.name] == 1
