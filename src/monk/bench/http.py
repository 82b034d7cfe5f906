"""``monk bench --http``: what the HTTP API adds to the service calls it wraps.

One run, one template, three calls, each measured side by side:

    raw        CREATE DATABASE … TEMPLATE on an open autocommit connection (the floor of cold)
    in process the very service call the route makes (``TenantService.provision`` for
               ``POST /api/root/tenant``, ``TenantService.get`` + ``view`` for
               ``GET /api/root/tenant/{name}``), from this process
    http_lean  the route, through a real ``monk serve`` (uvicorn, started by the bench as a
               user starts it), from one keep-alive ``http.client`` connection on the same
               machine: what the API adds, the targets' figure
    http       the same from one keep-alive httpx client: httpx's own Python costs ~0.3-1 ms a
               request, which is the client's, not the API's

Calls: ``cold`` (no spare of the template ready for its caller), ``warm`` (a spare ready: the
server's refiller keeps one, configured by the bench; in process, the bench makes its own
first), ``get`` (a tenant of the run). Before every timed call the bench waits until no spare
is being cloned and the server's spare is ready, then ``settle`` seconds (the root passwords
hashed ahead, the server's spare roles): what runs in the background never overlaps a sample,
and every way of a call starts from the same pause. Rounds alternate the order of the ways.
Then ``get_back_to_back``: ten reads a round more of each way, alternating, with no pause.

``floor``: the same uvicorn serving two apps that do no I/O (``monk.bench.http_floor``: a bare
ASGI callable, and a FastAPI route of monk's shape), read from ``http.client`` after the same
pause and back to back: what serving HTTP on this stack costs before any monk code runs.

The server's stdout (uvicorn's log) goes to a file whose path is in the result's notes if the
server fails. Everything made is removed at the end (the server stopped first).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import psycopg
from psycopg import sql

import monk
from monk.adapters.postgres import admin
from monk.adapters.postgres.connection import ServerTarget, connect
from monk.bench import stats
from monk.service import pool, purge, role_pool, root_users, tenant_auth
from monk.service.templates import TemplateService
from monk.service.tenants import TenantService
from monk.settings import Settings

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
CALLS = ("cold", "warm", "get")
WAYS = ("in_process", "http_lean", "http")
FLOORS = ("asgi", "fastapi")
VARIANTS = (
    "raw",
    *(f"{c}_{w}" for c in CALLS for w in WAYS),
    *(f"get_{w}_back_to_back" for w in WAYS),
    *(f"floor_{f}{b}" for f in FLOORS for b in ("", "_back_to_back")),
)
DB_PREFIX = "monkbench_"
KEEP_ALIVE_S = 600


@dataclass(frozen=True)
class HttpBenchConfig:
    template: str = "saas"
    iterations: int = 30
    # What the background needs after a call (a root password hashed ahead: ~45 ms of argon2)
    settle_seconds: float = 0.1
    start_timeout: float = 120.0


@dataclass
class _Samples:
    ms: list[float] = field(default_factory=list)
    failures: int = 0
    errors: list[str] = field(default_factory=list)

    def add(self, timed: bool, fn: Callable[[], object]) -> object | None:
        t0 = time.perf_counter()
        try:
            out = fn()
        except Exception as exc:
            if timed:
                self.failures += 1
                if len(self.errors) < 3:
                    self.errors.append(_describe(exc))
            log.warning("bench call failed: %s", _describe(exc))
            return None
        if timed:
            self.ms.append((time.perf_counter() - t0) * 1000)
        return out

    def summary(self) -> dict[str, Any]:
        out = stats.summarize(self.ms, failures=self.failures)
        if self.errors:
            out["errors"] = list(self.errors)
        return out


def _describe(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def monk_command() -> list[str]:
    """This monk, as a command: the interpreter running it, so the served code is this code."""
    return [sys.executable, "-m", "monk"]


def _lean(port: int) -> http.client.HTTPConnection:
    """The lean keep-alive client: stdlib, no Python of its own beyond the request."""
    return http.client.HTTPConnection("127.0.0.1", port, timeout=120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class HttpFailed(Exception):
    """The served monk did not start, or answered a call with an error."""


class HttpBench:
    def __init__(
        self,
        settings: Settings,
        target: ServerTarget,
        config: HttpBenchConfig,
        *,
        progress: Progress | None = None,
    ) -> None:
        self.settings = settings
        self.target = target
        self.config = config
        self.run_id = secrets.token_hex(4)
        self._progress = progress or (lambda _phase, _done, _total: None)
        self._counter = 0
        self.notes: list[str] = []
        self._template_db = ""
        self._spares_before = 0
        self._ready_baseline = 0
        self._server_spares = 0
        # Timed provisions a spare served, per variant (warm: all of them; cold: none).
        self._from_pool: dict[str, int] = {}

    def _name(self, kind: str) -> str:
        self._counter += 1
        return f"bench {self.run_id} {kind} {self._counter}"

    def _db_name(self) -> str:
        self._counter += 1
        return f"{DB_PREFIX}{self.run_id}_raw_{self._counter}"

    # ------------------------------------------------------------------ run

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        result: dict[str, Any] = {
            "monk_version": monk.__version__,
            "started_at": datetime.now(UTC).isoformat(),
        }
        key = self.config.template
        with TemplateService.open(self.settings, self.target) as templates:
            build = templates.ensure_built(key)
        self._template_db = build.database
        result["template"] = {"key": key, "version": build.version, "database": build.database}
        svc = TenantService(self.settings, self.target)
        svc.root_after_answer = True  # as the served monk: root users written after the answer
        tenants: list[str] = []
        databases: list[str] = []
        try:
            self._spares_before = pool.drain(svc, key=key)
            with svc.hosts.pools().system() as reg:
                self._ready_baseline = sum(
                    1 for r in pool.spare_rows(reg, self.target.name) if r.status == "ready"
                )
            # As monk serve does (Runtime.start): generated root passwords hashed ahead.
            tenant_auth.warm_up(svc, 4)
            samples = {n: _Samples() for n in VARIANTS}
            with connect(self.target, autocommit=True, purpose="bench") as adm:
                # Two servers in turn: a served monk hands out its own spare first, so its cold
                # provisions are measured with no spare configured, its warm ones with one.
                for phase, calls in (("warm", ("warm", "get")), ("cold", ("cold",))):
                    spares = 1 if phase == "warm" else 0
                    with self._served(spares) as client:
                        self._rounds(phase, calls, svc, adm, client, samples, tenants, databases)
                    pool.drain(svc, key=key)
            for floor in FLOORS:
                with self._floor_served(floor) as lean:
                    self._floor_rounds(floor, lean, samples)
        finally:
            leftovers = self._cleanup(svc, tenants, databases)
            svc.close()
        if leftovers:
            self.notes.append("left behind: " + ", ".join(leftovers))
        result["raw"] = samples["raw"].summary()
        for call in (*CALLS, "get_back_to_back"):
            suffix = "_back_to_back" if call == "get_back_to_back" else ""
            base = "get" if suffix else call
            ways = {w: samples[f"{base}_{w}{suffix}"].summary() for w in WAYS}
            inproc = ways["in_process"]["p50_ms"]
            result[call] = {
                **ways,
                "http_lean_adds_p50_ms": _minus(ways["http_lean"]["p50_ms"], inproc),
                "http_adds_p50_ms": _minus(ways["http"]["p50_ms"], inproc),
                "http_lean_over_in_process": stats.ratio(ways["http_lean"]["p50_ms"], inproc),
            }
            if call in ("cold", "warm"):
                for w in WAYS:
                    ways[w]["from_pool"] = self._from_pool.get(f"{call}_{w}", 0)
        for way in ("http_lean", "http"):
            result["cold"][f"{way}_over_raw"] = stats.ratio(
                result["cold"][way]["p50_ms"], result["raw"]["p50_ms"]
            )
        result["cold"]["in_process_over_raw"] = stats.ratio(
            result["cold"]["in_process"]["p50_ms"], result["raw"]["p50_ms"]
        )
        result["floor"] = {
            f: {
                "after_pause": samples[f"floor_{f}"].summary(),
                "back_to_back": samples[f"floor_{f}_back_to_back"].summary(),
            }
            for f in FLOORS
        }
        result["config"] = {
            "template": key,
            "iterations": self.config.iterations,
            "settle_seconds": self.config.settle_seconds,
        }
        result["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
        result["targets"] = [t.as_dict() for t in http_targets(result)]
        result["notes"] = list(self.notes)
        result["duration_s"] = round(time.monotonic() - started, 1)
        return result

    # ------------------------------------------------------------------ the served monk

    @contextlib.contextmanager
    def _served(self, spares: int) -> Iterator[_Clients]:
        """A real ``monk serve`` on a free port, keeping ``spares`` of the template, and two
        keep-alive clients holding a root token; stopped (SIGTERM) on the way out."""
        key = self.config.template
        environ = dict(os.environ)
        # Only the measured template's spares: other keys' refills would be background noise.
        environ["MONK_POOL_SPARES"] = json.dumps({key: spares})
        # The clients' connections stay open across the waits between samples (a spare
        # refilled, the pause): no sample pays for a new connection.
        environ["MONK_HTTP_KEEP_ALIVE"] = str(KEEP_ALIVE_S)
        self._server_spares = spares
        command = [*monk_command(), "serve", "--host", "127.0.0.1", "--port", "{port}"]
        with self._process(
            "monk serve", [*command, "--templates", key], environ, "/health"
        ) as port:
            token = subprocess.run(
                [*monk_command(), "token", "--root"],
                env=environ,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            headers = {"Authorization": f"Bearer {token}"}
            with (
                contextlib.closing(_lean(port)) as lean,
                httpx.Client(
                    base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=120
                ) as client,
            ):
                yield _Clients(client, lean, headers)

    @contextlib.contextmanager
    def _floor_served(self, floor: str) -> Iterator[_Clients]:
        """One of ``monk.bench.http_floor``'s apps under uvicorn, configured as ``monk serve``
        configures it (uvicorn's defaults: uvloop, httptools, the access log at info)."""
        app = f"monk.bench.http_floor:{floor}_app"
        command = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1"]
        command += ["--port", "{port}", "--log-level", "info"]
        command += ["--timeout-keep-alive", str(KEEP_ALIVE_S)]
        served = self._process(f"uvicorn {app}", command, dict(os.environ), "/floor/ready")
        with served as port, contextlib.closing(_lean(port)) as lean:
            yield _Clients(None, lean, {"Authorization": "Bearer floor"})

    @contextlib.contextmanager
    def _process(
        self, label: str, command: list[str], environ: dict[str, str], ready: str
    ) -> Iterator[int]:
        """``command`` (``{port}`` replaced by a free port) started, answering 200 on
        ``ready``; its port; stopped (SIGTERM) on the way out. Its output goes to a file named
        in the notes if it fails."""
        port = _free_port()
        logfile = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed below)
            prefix="monk-bench-serve-", suffix=".log", delete=False
        )
        proc = subprocess.Popen(
            [part.replace("{port}", str(port)) for part in command],
            env=environ,
            stdout=logfile,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        failed = True
        try:
            self._wait_started(label, proc, f"http://127.0.0.1:{port}{ready}", Path(logfile.name))
            yield port
            failed = False
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            logfile.close()
            if failed:
                self.notes.append(f"the log of {label}: {logfile.name}")
            else:
                Path(logfile.name).unlink(missing_ok=True)

    def _wait_started(
        self, label: str, proc: subprocess.Popen[bytes], url: str, logfile: Path
    ) -> None:
        deadline = time.monotonic() + self.config.start_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = logfile.read_text(errors="replace").strip().splitlines()[-5:]
                raise HttpFailed(f"{label} exited {proc.returncode}: " + " | ".join(tail))
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        raise HttpFailed(f"{label} did not answer within {self.config.start_timeout:g} s")

    def _quiet(self, svc: TenantService) -> None:
        """Wait until nothing is being cloned and the server's spare is ready, then settle."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with svc.hosts.pools().system() as reg:
                rows = pool.spare_rows(reg, self.target.name)
            ready = sum(1 for r in rows if r.status == "ready")
            enough = ready >= self._ready_baseline + self._server_spares
            if enough and all(r.status == "ready" for r in rows):
                break
            time.sleep(0.005)
        else:
            self.notes.append("the served monk's spare was not ready within 60 s")
        # This process's root passwords, hashed again after its cold provisions (the served
        # monk's are covered by the settling time), and their root users written, as the
        # served monk does after its answers.
        svc.root_passwords.settle(60)
        root_users.write_all_pending(svc)
        time.sleep(self.config.settle_seconds)

    # ------------------------------------------------------------------ rounds

    def _rounds(
        self,
        phase: str,
        calls: tuple[str, ...],
        svc: TenantService,
        adm: psycopg.Connection[Any],
        clients: _Clients,
        samples: dict[str, _Samples],
        tenants: list[str],
        databases: list[str],
    ) -> None:
        key = self.config.template
        client = clients.httpx
        clone = sql.SQL("CREATE DATABASE {} TEMPLATE {}")
        rounds = self.config.iterations

        def raw() -> None:
            name = self._db_name()
            databases.append(name)
            adm.execute(clone.format(sql.Identifier(name), sql.Identifier(self._template_db)))

        def provision_in_process() -> str:
            name = self._name("p")
            tenants.append(name)
            view = svc.provision(name, template=key)
            return str(view.provisioned_from or "clone")

        def provision_http() -> str:
            name = self._name("h")
            tenants.append(name)
            assert client is not None
            answer = client.post("/api/root/tenant", json={"name": name, "template": key})
            _ok(answer)
            return str(answer.json()["data"].get("provisioned_from") or "clone")

        def provision_http_lean() -> str:
            name = self._name("l")
            tenants.append(name)
            body = json.dumps({"name": name, "template": key}).encode()
            answer = json.loads(clients.request("POST", "/api/root/tenant", body))
            return str(answer["data"].get("provisioned_from") or "clone")

        def get_in_process() -> object:
            return svc.view(svc.get(tenants[-1])).as_dict()

        def get_http() -> object:
            assert client is not None
            return _ok(client.get(f"/api/root/tenant/{tenants[-1]}"))

        def get_http_lean() -> object:
            return clients.request("GET", f"/api/root/tenant/{quote(tenants[-1])}")

        steps: dict[str, Callable[[], object]] = {
            "raw": raw,
            "get_in_process": get_in_process,
            "get_http": get_http,
            "get_http_lean": get_http_lean,
        }
        for call in ("cold", "warm"):
            steps[f"{call}_in_process"] = provision_in_process
            steps[f"{call}_http"] = provision_http
            steps[f"{call}_http_lean"] = provision_http_lean
        # One untimed round first: pools opened, caches and the catalog warm on both sides.
        for i in range(rounds + 1):
            self._progress(phase, i, rounds + 1)
            order = ["raw"]
            for call in calls:
                ways = [f"{call}_{w}" for w in WAYS]
                order += ways[i % 3 :] + ways[: i % 3]  # each way first in turn
            for variant in order:
                if variant == "cold_in_process":
                    # the spare roles a serving monk keeps ready (the server has its own)
                    role_pool.fill(svc, self.settings.pool_roles)
                if variant == "warm_in_process":
                    # this process's own spare (the server's waits for its own handout),
                    # made before the pause every way of every call starts from
                    self._own_spare(svc)
                self._quiet(svc)
                source = samples[variant].add(i > 0, steps[variant])
                if i > 0 and source == "pool":
                    self._from_pool[variant] = self._from_pool.get(variant, 0) + 1
        if "get" in calls:
            # Back to back, as a busy client sends them on one keep-alive connection (the
            # spaced rounds above never showed the 40 ms a Nagle stall added to each of these).
            for _ in range(10 * rounds):
                for way in WAYS:
                    samples[f"get_{way}_back_to_back"].add(True, steps[f"get_{way}"])
        self._progress(phase, rounds + 1, rounds + 1)

    def _floor_rounds(self, floor: str, clients: _Clients, samples: dict[str, _Samples]) -> None:
        """The floor app read as monk's routes are: after the pause, then back to back."""
        rounds = self.config.iterations

        def read() -> object:
            return clients.request("GET", "/floor/tenant")

        for _ in range(3):
            read()  # untimed: the connection opened, the app's first call made
        for i in range(rounds):
            self._progress(f"floor {floor}", i, rounds)
            time.sleep(self.config.settle_seconds)
            samples[f"floor_{floor}"].add(True, read)
        for _ in range(10 * rounds):
            samples[f"floor_{floor}_back_to_back"].add(True, read)
        self._progress(f"floor {floor}", rounds, rounds)

    def _own_spare(self, svc: TenantService) -> None:
        key = self.config.template
        with svc.hosts.pools().system() as reg:
            counts = pool.counts(reg, self.target.name)
        have = sum(n for (k, _version), n in counts.items() if k == key)
        pool.fill(svc, key, have + 1)

    # ------------------------------------------------------------------ clean-up

    def _cleanup(self, svc: TenantService, tenants: list[str], databases: list[str]) -> list[str]:
        left: list[str] = []
        for name in tenants:
            try:
                purge.request_purge(svc, name, archive=False, forget=True)
            except Exception as exc:
                if type(exc).__name__ != "TenantNotFound":
                    left.append(f"tenant {name!r} ({_describe(exc)})")
        try:
            purge.work_queue(svc)
        except Exception as exc:
            left.append(f"purge queue ({_describe(exc)})")
        with contextlib.suppress(Exception):
            role_pool.drop_own(svc)
        try:
            pool.drain(svc, key=self.config.template)
            if self._spares_before:
                pool.fill(svc, self.config.template, self._spares_before)
        except Exception as exc:
            left.append(f"spares ({_describe(exc)})")
        try:
            with connect(self.target, autocommit=True, purpose="bench-cleanup") as adm:
                for name in databases:
                    admin.drop_database(adm, name)
        except Exception as exc:
            left.append(f"databases ({_describe(exc)})")
        return left


@dataclass
class _Clients:
    """A served app's keep-alive clients: httpx (monk's only), and a lean ``http.client``."""

    httpx: httpx.Client | None
    lean: http.client.HTTPConnection
    headers: dict[str, str]

    def request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        headers = self.headers
        if body is not None:
            headers = headers | {"Content-Type": "application/json"}
        self.lean.request(method, path, body=body, headers=headers)
        answer = self.lean.getresponse()
        data = answer.read()
        if answer.status >= 400:
            raise HttpFailed(f"{method} {answer.status}: {data.decode(errors='replace')}")
        return data


def _ok(response: httpx.Response) -> object:
    if response.status_code >= 400:
        raise HttpFailed(f"{response.request.method} {response.status_code}: {response.text}")
    return response.content


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)


def http_targets(result: dict[str, Any]) -> list[stats.Target]:
    """The issue's targets for the HTTP path, on the lean client (what the API adds, not the
    client library): ≤ 1 ms added at p50 to each call (a read also back to back), a warm
    provision ≤ 3 ms p50 over HTTP, a cold one ≤ 1.15× the raw clone."""
    out = []
    floor = result.get("floor", {}).get("fastapi", {})
    for call, label in (
        ("cold", "cold"),
        ("warm", "warm"),
        ("get", "get"),
        ("get_back_to_back", "get back to back"),
    ):
        added = result[call]["http_lean_adds_p50_ms"]
        # what a FastAPI route doing nothing takes here, read the same way: the stack's part
        under = floor.get("back_to_back" if call == "get_back_to_back" else "after_pause", {})
        beside = "" if under.get("p50_ms") is None else f" (the stack's floor: {under['p50_ms']:g})"
        out.append(
            stats.Target(
                f"{label}: HTTP adds (p50)",
                "≤ 1 ms",
                "n/a" if added is None else f"{added:g} ms{beside}",
                None if added is None else added <= 1,
            )
        )
    warm = result["warm"]["http_lean"]["p50_ms"]
    out.append(
        stats.Target(
            "warm over HTTP (p50)",
            "≤ 3 ms",
            "n/a" if warm is None else f"{warm:g} ms",
            None if warm is None else warm <= 3,
        )
    )
    cold = result["cold"]["http_lean_over_raw"]
    out.append(
        stats.Target(
            "cold over HTTP / raw (p50)",
            "≤ 1.15",
            "n/a" if cold is None else f"{cold:g}",
            None if cold is None else cold <= 1.15,
        )
    )
    return out
