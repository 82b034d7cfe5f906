"""`monk serve` as a user runs it: a live uvicorn, a root token from `monk token`, SIGTERM."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from monk.adapters.embedded import EmbeddedServer
from monk.service import pool, role_pool
from monk.service.tenants import TenantService
from tests.conftest import MONK_BIN, free_port, settings_env
from tests.integration.conftest import Env
from tests.integration.test_events import Receiver
from tests.integration.test_role_pool import spare_roles

pytestmark = pytest.mark.slow


def test_serve_answers_and_stops_cleanly(env: Env) -> None:
    port = free_port()
    receiver = Receiver()
    hooks = json.dumps([{"url": receiver.url, "events": ["tenant.provisioned"]}])
    environ = settings_env(env.settings) | {"MONK_HOOKS": hooks, "MONK_POOL_ROLES": "2"}
    spare_roles_before = spare_roles(env)["registry"]
    proc = subprocess.Popen(
        [MONK_BIN, "serve", "--port", str(port), "--templates", env.template],
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            pytest.fail("monk serve did not answer /health within 60 s")
        token = subprocess.run(
            [MONK_BIN, "token", "--root"], env=environ, capture_output=True, text=True, check=True
        ).stdout.strip()
        listed = httpx.get(
            f"{base}/api/root/tenant", headers={"Authorization": f"Bearer {token}"}, timeout=10
        )
        assert listed.status_code == 200
        assert listed.json()["success"] is True
        assert httpx.get(f"{base}/api/root/tenant", timeout=10).status_code == 401
        # its refiller makes the spare roles a cold provision renames
        deadline = time.monotonic() + 30
        while len(spare_roles(env)["registry"] - spare_roles_before) < 2:
            if time.monotonic() > deadline:
                pytest.fail("monk serve made no spare roles within 30 s")
            time.sleep(0.2)
        made_roles = spare_roles(env)["registry"] - spare_roles_before
        # the server's own worker delivers the new tenant's event to the observer
        name = f"Served {uuid.uuid4().hex[:8]}"
        made = httpx.post(
            f"{base}/api/root/tenant",
            json={"name": name, "template": env.template},
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )
        assert made.status_code == 201, made.text
        assert len(made_roles - spare_roles(env)["registry"]) == 1  # one renamed in
        with psycopg.connect(made.json()["data"]["connection_url"], connect_timeout=5) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (made.json()["data"]["role"],)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if any(b["tenant"]["name"] == name for b in receiver.bodies()):
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"no tenant.provisioned event for {name!r} reached the webhook")
    finally:
        receiver.server.shutdown()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    # uvicorn shuts down gracefully, then re-raises the signal it caught (exit by SIGTERM).
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Application shutdown complete" in out
    assert f"http://127.0.0.1:{port}" in out
    assert "monk token --root" in out
    # a clean stop drops the spare roles whose passwords only it knew
    assert spare_roles(env) == {"registry": spare_roles_before, "server": spare_roles_before}


def test_keep_alive_answers_are_not_held_back_by_nagle(env: Env) -> None:
    """Issue 16 #4: monk serve's listening socket was made with proto 0, so asyncio never set
    TCP_NODELAY on its connections, and each answer's body (written after its headers) waited
    for the client's delayed ACK: ~40 ms a request on a keep-alive connection, back to back."""
    port = free_port()
    proc = _serve(port, settings_env(env.settings), env.template)
    try:
        _wait_until("monk serve answers", lambda: _answers(port))
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            for _ in range(3):
                assert client.get("/health").status_code == 200
            took = []
            for _ in range(21):
                t0 = time.perf_counter()
                assert client.get("/health").status_code == 200
                took.append(time.perf_counter() - t0)
        # Linux's delayed ACK is at least 40 ms: a median below 30 ms is no Nagle stall.
        assert sorted(took)[10] < 0.030, [round(t * 1000, 1) for t in took]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


def test_http_keep_alive_setting_is_how_long_an_idle_connection_stays_open(env: Env) -> None:
    """MONK_HTTP_KEEP_ALIVE: uvicorn's 5 s was fixed before; a load balancer that keeps its
    idle connections 60 s would then send requests on connections monk had just closed."""
    port = free_port()
    proc = _serve(port, settings_env(env.settings) | {"MONK_HTTP_KEEP_ALIVE": "2"}, env.template)
    try:
        _wait_until("monk serve answers", lambda: _answers(port))
        request = b"GET /health HTTP/1.1\r\nHost: monk\r\n\r\n"
        brief, long = (socket.create_connection(("127.0.0.1", port)) for _ in range(2))
        with brief, long:
            for sock in (brief, long):
                sock.sendall(request)
                assert _response(sock).startswith(b"HTTP/1.1 200")
            time.sleep(0.5)
            assert _still_open(brief)  # idle 0.5 s: kept
            time.sleep(3.0)
            assert not _still_open(long)  # idle 3.5 s: closed by monk (the default kept it)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


def _response(sock: socket.socket) -> bytes:
    """One whole response (headers and body may come in two segments)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE)[1])  # type: ignore[index]
    while len(body) < length:
        body += sock.recv(65536)
    return data


def _still_open(sock: socket.socket) -> bool:
    """No end of stream from the server: a peek finds nothing to read yet."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True


def _serve(port: int, environ: dict[str, str], template: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [MONK_BIN, "serve", "--port", str(port), "--templates", template],
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_until(what: str, check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        time.sleep(0.2)


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def _keyholders(env: Env) -> tuple[dict[str, str], dict[str, str]]:
    """(ready spare -> keyholder, spare role -> keyholder), roles only if the server has them."""
    with psycopg.connect(env.target.conninfo, dbname=env.settings.system_db_name) as conn:
        spares = conn.execute(
            "SELECT database, keyholder FROM spares WHERE status = 'ready'"
        ).fetchall()
        roles = conn.execute(
            "SELECT role, keyholder FROM spare_roles WHERE role IN (SELECT rolname FROM pg_roles)"
        ).fetchall()
    return {str(d): str(k) for d, k in spares}, {str(r): str(k) for r, k in roles}


def _stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    return out


def test_a_second_serve_never_takes_over_a_live_servers_spares(env: Env) -> None:
    """Issue 10 #16: a second `monk serve` on a busy port is refused before it touches
    anything; one on another port (same system database) leaves the live server's spares and
    spare roles alone; those of a server killed with -9 are adopted and dropped."""
    environ = settings_env(env.settings) | {
        "MONK_POOL_ROLES": "2",
        "MONK_POOL_SPARES": json.dumps({env.template: 1}),
    }
    port = free_port()
    procs: list[subprocess.Popen[str]] = []
    try:
        first = _serve(port, environ, env.template)
        procs.append(first)
        _wait_until("first server answers", lambda: _answers(port))
        _wait_until(
            "first server made a spare and 2 spare roles",
            lambda: all(len(m) >= n for m, n in zip(_keyholders(env), (1, 2), strict=True)),
        )
        spares, roles = before = _keyholders(env)
        (first_id,) = set(spares.values())
        assert set(roles.values()) == {first_id}

        started = time.monotonic()
        second = subprocess.run(
            [MONK_BIN, "serve", "--port", str(port), "--templates", env.template],
            env=environ,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        took = time.monotonic() - started
        assert second.returncode == 6, (second.stdout, second.stderr)
        assert len(second.stderr.strip().splitlines()) == 1, second.stderr
        assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in second.stderr
        assert "monk serving" not in second.stdout
        assert took < 15, took  # no database work before the refusal
        assert _keyholders(env) == before

        other_port = free_port()
        third = _serve(other_port, environ, env.template)
        procs.append(third)
        _wait_until("third server answers", lambda: _answers(other_port))
        _wait_until(
            "third server made its own 2 spare roles",
            lambda: len(_keyholders(env)[1]) >= 4,
        )
        spares, roles = _keyholders(env)
        assert spares == before[0]  # still the first's: not adopted
        assert {r: k for r, k in roles.items() if k == first_id} == before[1]  # not dropped
        _stop(third)
        assert _keyholders(env) == before  # the third dropped only its own

        first.kill()  # -9: its keyholder lock goes with its session
        first.wait(timeout=30)
        fourth_port = free_port()
        fourth = _serve(fourth_port, environ, env.template)
        procs.append(fourth)
        _wait_until("fourth server answers", lambda: _answers(fourth_port))
        _wait_until(
            "fourth server adopted the dead server's spare and dropped its spare roles",
            lambda: first_id not in {*_keyholders(env)[0].values(), *_keyholders(env)[1].values()},
        )
        assert set(_keyholders(env)[0]) == set(before[0])  # the same spare, adopted
        assert not set(before[1]) & spare_roles(env)["server"]
    finally:
        for proc in procs:
            if proc.poll() is None:
                _stop(proc)
        with TenantService(env.settings, env.target) as svc:
            pool.drain(svc)
            role_pool.drain(svc)


def _wait_health(base: str, ok: Callable[[dict[str, Any]], bool], within: float) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            answer = httpx.get(f"{base}/health", timeout=2)
            if answer.status_code == 200 and ok(answer.json()["data"]):
                return dict(answer.json()["data"])
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"/health did not become ready within {within} s")


def _serve_on_own_server(
    data_dir: Path, *, durable: bool
) -> tuple[subprocess.Popen[str], dict[str, str], int, str]:
    """A real `monk serve` on an embedded server of its own in ``data_dir`` (the tests that use
    it kill or starve that server): the process, its environment, the server's port, its URL."""
    pg_port, port = free_port(), free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MONK_")} | {
        "MONK_DATA_DIR": str(data_dir),
        "MONK_EMBEDDED_PORT": str(pg_port),
        "MONK_EMBEDDED_DURABLE": "true" if durable else "false",
        "MONK_POOL_SPARES": "{}",
        "MONK_POOL_ROLES": "0",
    }
    proc = subprocess.Popen(
        [MONK_BIN, "serve", "--port", str(port), "--templates", "empty"],
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return proc, environ, pg_port, f"http://127.0.0.1:{port}"


def test_serve_restarts_its_embedded_server_after_kill9(tmp_path: Path) -> None:
    # Its own embedded server (in CI's external-server pass too): this test kills it.
    data_dir = tmp_path / "monk-data"
    proc, environ, pg_port, base = _serve_on_own_server(data_dir, durable=False)
    try:
        assert _wait_health(base, lambda h: True, 120)["server_restarts"] == 0
        pidfile = data_dir / "pgdata" / "postmaster.pid"
        killed = int(pidfile.read_text().split()[0])
        os.kill(killed, signal.SIGKILL)
        started = time.monotonic()
        health = _wait_health(base, lambda h: h["server_restarts"] == 1, 15)
        assert time.monotonic() - started < 10
        assert f"pid {killed}" in health["last_restart_reason"]
        assert health["last_restart_at"]
        assert int(pidfile.read_text().split()[0]) != killed
        token = subprocess.run(
            [MONK_BIN, "token", "--root"], env=environ, capture_output=True, text=True, check=True
        ).stdout.strip()
        deadline = time.monotonic() + 10
        while True:  # the pools drop the connections the old server took with it
            listed = httpx.get(
                f"{base}/api/root/tenant", headers={"Authorization": f"Bearer {token}"}, timeout=10
            )
            if listed.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert listed.status_code == 200, listed.text
        metrics = httpx.get(f"{base}/metrics", timeout=10).text
        assert 'monk_embedded_server_restarts_total{result="ok"} 1.0' in metrics
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        EmbeddedServer(data_dir, port=pg_port).stop()
    assert "embedded server restarted" in out


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_serve_restarts_its_embedded_server_after_a_full_disk_panic(tmp_path: Path) -> None:
    # A really full filesystem: the WAL writer PANICs, recovery cannot write either and the
    # postmaster exits; restarts fail (backing off) until there is room again.
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160m", "tmpfs", str(disk)], check=True)
    data_dir = disk / "monk-data"
    proc, _environ, pg_port, base = _serve_on_own_server(data_dir, durable=True)
    server = EmbeddedServer(data_dir, port=pg_port)
    filler = disk / "filler"
    try:
        _wait_health(base, lambda h: True, 120)
        target = server.target(name="t", connect_timeout=5, statement_timeout_ms=30_000)
        conn = psycopg.connect(target.url("postgres"), autocommit=True)
        with filler.open("wb") as fh, contextlib.suppress(OSError):
            while True:
                fh.write(b"\0" * (1 << 20))
                fh.flush()
        with pytest.raises(psycopg.OperationalError):
            _emit_wal_until_it_fails(conn)
        conn.close()
        deadline = time.monotonic() + 10
        while httpx.get(f"{base}/health", timeout=10).status_code != 503:
            assert time.monotonic() < deadline, "/health still answers 200 on a full disk"
            time.sleep(0.2)
        time.sleep(3)  # restarts fail meanwhile: the first at once, the next after 1 s, 2 s
        filler.unlink()
        health = _wait_health(base, lambda h: h["server_restarts"] == 1, 30)
        assert "PANIC" in health["last_restart_reason"]
        assert "No space left on device" in health["last_restart_reason"]
        metrics = httpx.get(f"{base}/metrics", timeout=30).text
        assert 'monk_embedded_server_restarts_total{result="ok"} 1.0' in metrics
        assert re.search(r'monk_embedded_server_restarts_total\{result="failed"\} [1-9]', metrics)
    finally:
        filler.unlink(missing_ok=True)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        server.stop()
        subprocess.run(["umount", "-l", str(disk)], check=False)
    assert "embedded server restart failed" in out
    assert "embedded server restarted" in out


def _emit_wal_until_it_fails(conn: psycopg.Connection[Any]) -> None:
    """WAL with no data file behind it, until a new segment is needed on the full disk."""
    for _ in range(200):
        conn.execute("SELECT pg_logical_emit_message(false, 'monk', repeat('x', 1000000))")
