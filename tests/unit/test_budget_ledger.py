"""The connection budget's decisions (monk.core.budget), without a database."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from monk.core.budget import Grant, Ledger


def serve(ledger: Ledger, ticket: int, database: str) -> list[Grant]:
    ledger.request(ticket, database)
    return ledger.grants()


def test_a_free_slot_opens_and_an_idle_connection_of_the_database_is_reused() -> None:
    ledger = Ledger(host_cap=2, tenant_cap=2)
    assert serve(ledger, 1, "a") == [Grant(1, "a")]
    assert ledger.release("a", 1)
    assert serve(ledger, 2, "a") == [Grant(2, "a", reuse=1)]
    assert ledger.open == 1


def test_a_full_host_closes_the_least_recently_used_idle_connection() -> None:
    ledger = Ledger(host_cap=2, tenant_cap=2)
    serve(ledger, 1, "a")
    serve(ledger, 2, "b")
    ledger.release("a", 1)  # a is the older idle one
    ledger.release("b", 2)
    assert serve(ledger, 3, "c") == [Grant(3, "c", evict=1)]
    assert ledger.open == 2
    assert list(ledger.idle.items()) == [(2, "b")]


def test_a_busy_tenants_idle_connections_outlive_the_colder_ones_of_other_tenants() -> None:
    """Least recently used, not "a database with two idle ones gives one up first": that rule
    closed a hot tenant's second connection while connections nobody had used
    for long stayed, and the hot tenant opened it again on its next request, over and over
    (with it, the single-tenant load of ``monk bench --data-plane`` measured 5-8 % slower)."""
    ledger = Ledger(host_cap=5, tenant_cap=2)
    for ticket, db in [(1, "a"), (2, "b"), (3, "c"), (4, "hot"), (5, "hot")]:
        serve(ledger, ticket, db)
    for ticket, db in [(1, "a"), (2, "b"), (3, "c"), (4, "hot"), (5, "hot")]:
        ledger.release(db, ticket)
    assert serve(ledger, 6, "x") == [Grant(6, "x", evict=1)]  # the cold ones, oldest first
    assert serve(ledger, 7, "y") == [Grant(7, "y", evict=2)]
    assert list(ledger.idle.values()) == ["c", "hot", "hot"]  # the hot tenant keeps both


def test_a_reused_connection_counts_as_most_recently_used() -> None:
    ledger = Ledger(host_cap=2, tenant_cap=2)
    serve(ledger, 1, "a")
    serve(ledger, 2, "b")
    ledger.release("a", 1)
    ledger.release("b", 2)
    serve(ledger, 3, "a")  # reuses 1
    ledger.release("a", 1)
    assert serve(ledger, 4, "c") == [Grant(4, "c", evict=2)]


def test_with_nothing_idle_requests_wait_and_are_served_first_come_first_served() -> None:
    ledger = Ledger(host_cap=1, tenant_cap=4)
    serve(ledger, 1, "a")
    for ticket, db in [(2, "b"), (3, "c"), (4, "d")]:
        assert serve(ledger, ticket, db) == []
    assert ledger.waiting == 3
    served = []
    holder, key = "a", 1
    while ledger.waiting:
        ledger.release(holder, key)
        (grant,) = ledger.grants()
        served.append(grant.database)
        holder, key = grant.database, grant.ticket
    assert served == ["b", "c", "d"]


def test_a_tenant_at_its_cap_waits_without_holding_up_the_others() -> None:
    ledger = Ledger(host_cap=4, tenant_cap=2)
    assert len(serve(ledger, 1, "greedy")) == 1
    assert len(serve(ledger, 2, "greedy")) == 1
    assert serve(ledger, 3, "greedy") == []  # at its cap: queued
    assert serve(ledger, 4, "other") == [Grant(4, "other")]  # served past it
    assert ledger.busy["greedy"] == 2
    ledger.release("greedy", 1)
    assert ledger.grants() == [Grant(3, "greedy", reuse=1)]


def test_a_waiting_request_is_withdrawn_when_its_wait_runs_out() -> None:
    ledger = Ledger(host_cap=1, tenant_cap=1)
    serve(ledger, 1, "a")
    serve(ledger, 2, "b")
    assert ledger.cancel(2)
    ledger.release("a", 1)
    assert ledger.grants() == []
    assert not ledger.cancel(2)


def test_a_broken_connection_frees_its_slot() -> None:
    ledger = Ledger(host_cap=1, tenant_cap=1)
    serve(ledger, 1, "a")
    serve(ledger, 2, "b")
    assert not ledger.release("a", None)
    assert ledger.grants() == [Grant(2, "b")]
    assert ledger.open == 1


def test_evicting_a_database_takes_its_idle_connections_and_dooms_its_busy_ones() -> None:
    ledger = Ledger(host_cap=4, tenant_cap=4)
    for ticket in (1, 2, 3):
        serve(ledger, ticket, "a")
    serve(ledger, 4, "b")
    ledger.release("a", 1)
    ledger.release("a", 2)
    ledger.release("b", 4)
    assert sorted(ledger.evict("a")) == [1, 2]
    assert ledger.open == 2
    assert not ledger.release("a", 3)  # in use during the evict: closed as it comes back
    assert ledger.open == 1
    assert list(ledger.idle.items()) == [(4, "b")]
    assert serve(ledger, 5, "a") == [Grant(5, "a")]  # the database may be used again later
    assert ledger.release("a", 5)


def test_the_caps_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Ledger(host_cap=0, tenant_cap=1)


# One step of a random run: a request of a database, the release of the oldest busy
# connection (kept, or broken), an evict, or a withdrawn wait.
_steps = st.lists(
    st.one_of(
        st.tuples(st.just("request"), st.integers(0, 5)),
        st.tuples(st.just("release"), st.booleans()),
        st.tuples(st.just("evict"), st.integers(0, 5)),
        st.tuples(st.just("cancel"), st.integers(0, 50)),
    ),
    max_size=80,
)


@given(host_cap=st.integers(1, 4), tenant_cap=st.integers(1, 3), steps=_steps)
def test_any_run_keeps_the_caps_the_count_and_the_order(
    host_cap: int, tenant_cap: int, steps: list[tuple[str, object]]
) -> None:
    ledger = Ledger(host_cap=host_cap, tenant_cap=tenant_cap)
    in_use: list[tuple[str, int]] = []  # (database, key), oldest first
    ticket = 0
    for kind, arg in steps:
        if kind == "request":
            ledger.request(ticket, f"db{arg}")
            ticket += 1
        elif kind == "release" and in_use:
            database, key = in_use.pop(0)
            ledger.release(database, key if arg else None)
        elif kind == "evict":
            ledger.evict(f"db{arg}")
        elif kind == "cancel":
            ledger.cancel(int(str(arg)))
        granted = ledger.grants()
        for grant in granted:
            key = grant.reuse if grant.reuse is not None else grant.ticket
            in_use.append((grant.database, key))
        # The caps, and every slot accounted for: idle, or in use (opening included).
        assert ledger.open <= host_cap
        assert all(n <= tenant_cap for n in ledger.busy.values())
        assert ledger.open == len(ledger.idle) + sum(ledger.busy.values())
        assert sum(ledger.busy.values()) == len(in_use)
        # Nobody waits who could be served: a request still queued is at its tenant's cap,
        # or nothing is left (no free slot, nothing idle to close).
        for database in ledger.queue.values():
            assert ledger.busy[database] >= tenant_cap or (
                ledger.open >= host_cap and not ledger.idle
            )
        # First come, first served: the grants of one pass go out in arrival order.
        assert [g.ticket for g in granted] == sorted(g.ticket for g in granted)
