"""Issue 16 #4: short registry-only route bodies (a tenant read, a warm handout) run on the
event loop thread when the registry has an idle connection, and on the thread pool otherwise,
so a wait for a connection never holds the loop (``monk.api.inline``)."""

from __future__ import annotations

import contextlib
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from monk.api.app import create_app
from monk.api.auth import issue_root_token
from monk.api.runtime import Runtime
from tests.conftest import MONK_BIN, free_port, settings_env
from tests.integration.conftest import Env
from tests.integration.test_serve import _answers, _serve, _stop, _wait_until


def _other_threads_switches(pid: int) -> int:
    """Voluntary context switches of every thread of ``pid`` but its main one (uvicorn's
    event loop): how often a worker or background thread went to sleep."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        if task.name == str(pid):
            continue
        with contextlib.suppress(FileNotFoundError):
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
    return total


@pytest.mark.slow
def test_a_tenant_read_is_served_on_the_event_loop_thread(env: Env) -> None:
    """Before: each read woke an anyio worker thread (and the loop again when it was done):
    ~0.3-0.5 ms each after an idle pause on a 2-vCPU VM. Now a read wakes no other thread."""
    port = free_port()
    environ = settings_env(env.settings)
    proc = _serve(port, environ, env.template)
    try:
        _wait_until("monk serve answers", lambda: _answers(port))
        token = subprocess.run(
            [MONK_BIN, "token", "--root"], env=environ, capture_output=True, text=True, check=True
        ).stdout.strip()
        name = f"Inline {uuid.uuid4().hex[:8]}"
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers) as client:
            made = client.post(
                "/api/root/tenant", json={"name": name, "template": env.template}, timeout=60
            )
            assert made.status_code == 201, made.text
            time.sleep(1.0)  # what the provision left to do after its answer is done
            reads = 40
            for _ in range(3):  # the registry pool holds an idle connection
                assert client.get(f"/api/root/tenant/{name}").status_code == 200
            before = _other_threads_switches(proc.pid)
            for _ in range(reads):
                got = client.get(f"/api/root/tenant/{name}")
                assert got.status_code == 200, got.text
                assert got.json()["data"]["name"] == name
            woken = _other_threads_switches(proc.pid) - before
            client.delete(f"/api/root/tenant/{name}", params={"force": "true", "archive": "false"})
        # The background threads wake now and then (event delivery every second, the pools'
        # schedulers): a few, where a worker thread per read made at least one each.
        assert woken < reads // 2, woken
    finally:
        _stop(proc)


def test_a_read_that_must_wait_for_a_connection_waits_off_the_loop(env: Env) -> None:
    """Every registry connection of the app held: a tenant read waits for one on the thread
    pool (not on the event loop), so the requests that need no registry connection answer
    meanwhile, and /health within its bounded wait for the host list (the local server
    reachable, the hosts unknown, said so); once a connection is free the read answers."""
    settings = env.settings.model_copy(update={"pool_size": 2})
    auth = {"Authorization": f"Bearer {issue_root_token(settings, ttl_seconds=600)}"}
    name = f"Inline Wait {uuid.uuid4().hex[:8]}"
    with TestClient(create_app(settings)) as client:
        rt: Runtime = client.app.state.runtime  # type: ignore[attr-defined]
        made = client.post(
            "/api/root/tenant", json={"name": name, "template": env.template}, headers=auth
        )
        assert made.status_code == 201, made.text
        try:
            with contextlib.ExitStack() as held:
                # Hold them all (taking one may wait for a background worker's to be returned).
                for _ in range(settings.pool_size):
                    held.enter_context(rt.tenants.hosts.pools().system())
                assert not rt.registry_ready()
                with ThreadPoolExecutor(1) as side:
                    waiting = side.submit(
                        client.get, f"/api/root/tenant/{name}", headers=auth, timeout=60
                    )
                    time.sleep(0.3)
                    assert not waiting.done()  # it waits for a connection...
                    started = time.monotonic()
                    # ...not the loop
                    assert client.get("/openapi.json").status_code == 200
                    refused = client.get(f"/api/root/tenant/{name}")  # no token: no read
                    assert refused.status_code == 401, refused.text
                    assert time.monotonic() - started < 2
                    started = time.monotonic()
                    health = client.get("/health")
                    assert time.monotonic() - started < 5
                    assert health.status_code == 200, health.text
                    assert health.json()["data"]["database"] == "reachable"
                    assert "no free connection" in health.json()["data"]["error"]
                    assert not waiting.done()
                    held.close()  # the connections go back: the read gets one
                    answered = waiting.result(timeout=30)
            assert answered.status_code == 200, answered.text
            assert answered.json()["data"]["name"] == name
        finally:
            client.delete(
                f"/api/root/tenant/{name}",
                params={"force": "true", "archive": "false"},
                headers=auth,
            )


def test_an_idle_registry_connection_is_what_lets_a_read_run_inline(env: Env) -> None:
    """``Runtime.registry_ready``: true with an idle pooled connection and the server's breaker
    closed; false while every connection is in use."""
    settings = env.settings.model_copy(update={"pool_size": 1})
    with TestClient(create_app(settings)) as client:
        rt: Runtime = client.app.state.runtime  # type: ignore[attr-defined]
        pools = rt.tenants.hosts.pools()
        with pools.system():
            assert not rt.registry_ready()
        # the background workers use it too: idle again once they are done
        deadline = time.monotonic() + 10
        while not rt.registry_ready():
            assert time.monotonic() < deadline, "the registry's connection never came back"
            time.sleep(0.01)
