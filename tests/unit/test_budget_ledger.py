"""The connection budget's decisions (monk.core.budget), without a database."""

from __future__ import annotations

import pytest

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
