"""The HTTP path's own cost: what a request does beyond the service call it wraps.

Through the real app (TestClient, lifespan and runtime included): the thread-pool hops a
request takes, and what the server starts only once the answer is sent."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio.to_thread
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.types import Message, Receive, Scope, Send

from monk.api.app import create_app
from monk.api.auth import issue_root_token
from monk.api.runtime import Runtime
from monk.service import pool
from monk.service.tenants import TenantService
from tests.integration.conftest import Env
from tests.integration.test_tenants import unique


class Recorded:
    """The app, with the end of every answer noted in ``events`` as it is sent."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.events: list[str] = []
        self.when_sent: Callable[[], None] = lambda: None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def noting(message: Message) -> None:
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                self.events.append("answer sent")
                self.when_sent()

        await self.app(scope, receive, noting)


@pytest.fixture(scope="module")
def served(env: Env) -> Iterator[tuple[TestClient, Recorded]]:
    recorded = Recorded(create_app(env.settings))
    token = issue_root_token(env.settings, ttl_seconds=600)
    with TestClient(recorded, headers={"Authorization": f"Bearer {token}"}) as client:
        yield client, recorded


def runtime(recorded: Recorded) -> Runtime:
    rt: Runtime = recorded.app.state.runtime
    return rt


@pytest.fixture
def hops(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the functions sent to the thread pool (Starlette's and FastAPI's go
    through ``anyio.to_thread.run_sync``)."""
    sent: list[str] = []
    original = anyio.to_thread.run_sync

    async def counting(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        sent.append(getattr(func, "__name__", repr(func)))
        return await original(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
    return sent


def test_a_cold_provision_takes_one_thread_pool_hop_and_a_tenant_read_none(
    env: Env, served: tuple[TestClient, Recorded], hops: list[str]
) -> None:
    """A cold provision: the service call's own hop, and no second one to validate the answer
    (FastAPI's for a sync route returning a model: two thread wake-ups more per request). A
    tenant read: none at all while the registry's pool has an idle connection (it runs on the
    event loop thread, ``monk.api.inline``); it took one before."""
    client, recorded = served
    rt = runtime(recorded)
    name = unique("Hops")
    created = client.post("/api/root/tenant", json={"name": name, "template": env.template})
    assert created.status_code == 201, created.text
    assert created.json()["data"]["provisioned_from"] == "clone"
    assert len(hops) == 1, hops
    inline = 0
    for _ in range(10):
        # The background workers share the pool: a read that finds every connection busy
        # takes the thread pool (test_api_inline.py), so wait for an idle one.
        _wait_for(rt.registry_ready)
        hops.clear()
        read = client.get(f"/api/root/tenant/{name}")
        assert read.status_code == 200, read.text
        assert read.json()["data"]["name"] == name
        assert read.json()["success"] is True
        inline += not hops
    assert inline >= 5, inline


def _wait_for(check: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout} s"
        time.sleep(0.005)


def test_a_warm_handout_takes_no_thread_pool_hop(
    env: Env, served: tuple[TestClient, Recorded], hops: list[str]
) -> None:
    """A provision that will be a local warm handout (a spare of the template known to this
    process) is one registry statement: it runs on the event loop thread too."""
    client, recorded = served
    rt = runtime(recorded)
    pool.drain(rt.tenants, key=env.template)
    assert pool.fill(rt.tenants, env.template, 1) == 1
    # Past the hosts' recheck interval: the prediction reads them (no fleet) on the loop.
    time.sleep(5.1)
    _wait_for(rt.registry_ready)
    hops.clear()
    answer = client.post(
        "/api/root/tenant", json={"name": unique("Warm Inline"), "template": env.template}
    )
    assert answer.status_code == 201, answer.text
    assert answer.json()["data"]["provisioned_from"] == "pool"
    assert hops == [], hops
    pool.drain(rt.tenants, key=env.template)


def test_a_handout_whose_spare_went_clones_on_the_thread_pool_not_the_loop(
    env: Env, svc: TenantService, served: tuple[TestClient, Recorded], hops: list[str]
) -> None:
    """The loop only ever runs the handout: a spare this process knows but that another
    process took meanwhile (here drained) makes the handout answer None, nothing written,
    and the provision that follows clones on the thread pool."""
    client, recorded = served
    rt = runtime(recorded)
    pool.drain(rt.tenants, key=env.template)
    assert pool.fill(rt.tenants, env.template, 1) == 1
    pool.drain(svc, key=env.template)  # another process's drain: this one still knows it
    assert rt.tenants.spare_secrets.has_for(env.template, rt.tenants.hosts.local.name)
    time.sleep(5.1)  # past the hosts' recheck interval, as above
    _wait_for(rt.registry_ready)
    hops.clear()
    answer = client.post(
        "/api/root/tenant", json={"name": unique("Spare Went"), "template": env.template}
    )
    assert answer.status_code == 201, answer.text
    assert answer.json()["data"]["provisioned_from"] == "clone"
    assert len(hops) == 1, hops
    assert "provision" in hops[0], hops
    pool.drain(rt.tenants, key=env.template)


def test_the_refiller_is_woken_only_once_the_provisions_answer_is_sent(
    env: Env, served: tuple[TestClient, Recorded], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A warm handout wakes the refiller (a clone, argon2): woken before the answer went out,
    it competed with it for the GIL and the machine's cores."""
    client, recorded = served
    rt = runtime(recorded)
    pool.drain(rt.tenants, key=env.template)
    assert pool.fill(rt.tenants, env.template, 1) == 1
    wake = rt.wake_refiller

    def noting_wake() -> None:
        recorded.events.append("refiller woken")
        wake()

    monkeypatch.setattr(rt, "wake_refiller", noting_wake)
    recorded.events.clear()
    answer = client.post(
        "/api/root/tenant", json={"name": unique("Warm"), "template": env.template}
    )
    assert answer.status_code == 201, answer.text
    assert answer.json()["data"]["provisioned_from"] == "pool"
    assert recorded.events == ["answer sent", "refiller woken"]
    pool.drain(rt.tenants, key=env.template)


def test_a_cold_provision_hashes_its_root_password_again_only_once_its_answer_is_sent(
    env: Env, served: tuple[TestClient, Recorded]
) -> None:
    """A cold provision takes a root password hashed ahead; the next one is hashed (~80 ms
    of argon2 on one of the cores) once the answer is out, not while it is being sent."""
    client, recorded = served
    rt = runtime(recorded)
    pool.drain(rt.tenants, key=env.template)
    hashing = rt.tenants.root_passwords
    assert hashing.settle(60)
    kept = hashing.outstanding()
    assert kept >= 1  # monk serve keeps some (tenant_auth.warm_up)
    at_answer: list[int] = []
    recorded.when_sent = lambda: at_answer.append(hashing.outstanding())
    try:
        answer = client.post(
            "/api/root/tenant", json={"name": unique("Cold"), "template": env.template}
        )
    finally:
        recorded.when_sent = lambda: None
    assert answer.status_code == 201, answer.text
    assert answer.json()["data"]["provisioned_from"] == "clone"
    # taken, and not yet being made again while the answer went out; made again right after
    assert at_answer == [kept - 1]
    assert hashing.outstanding() == kept
    assert hashing.settle(60)
