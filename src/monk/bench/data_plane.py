"""``monk bench --data-plane``: many tenant databases served through one connection budget.

On a dedicated embedded server (``max_connections`` 100, in a temporary directory, removed at
the end): T tenants of the built-in ``basic`` template, a real ``monk serve`` (uvicorn), each
tenant's ``root`` logged in over HTTP, then C client threads with keep-alive httpx clients send
a fixed count of requests (half reads ``GET /api/data/account``, half writes ``POST``), each to
a random tenant; the same load against a single tenant, interleaved (many, single, single,
many) so that a change of the machine's load touches both alike; the highest count of server
connections is sampled from ``pg_stat_activity`` throughout. Then, with ``monk serve``
stopped, the naive designs on the same server and load (direct SQL, no HTTP): a pool per
tenant (psycopg_pool's default of 4 connections kept per pool, as a pooler keeps one per
database and user) and a connection per request.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg

from monk.bench.stats import percentile
from monk.service.server import Server
from monk.settings import Settings

Progress = Callable[[str, int, int], None]

MODEL = "account"
TEMPLATE = "basic"


@dataclass(frozen=True)
class DataPlaneConfig:
    tenants: int = 300
    clients: int = 64
    requests: int = 10_000
    naive_requests: int = 3_000
    host_connections: int = 40  # MONK_HOST_CONNECTIONS of the monk serve measured


@dataclass
class _Load:
    """What one load run saw."""

    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    # CPU seconds spent meanwhile by: the bench's clients, monk serve, the PostgreSQL server.
    cpu: Counter[str] = field(default_factory=Counter)

    def merge(self, other: _Load) -> None:
        self.latencies += other.latencies
        self.errors.update(other.errors)
        self.seconds += other.seconds
        self.cpu.update(other.cpu)

    def cpu_per_request(self) -> dict[str, float]:
        """Milliseconds of CPU per request, by where they were spent."""
        done = len(self.latencies) + sum(self.errors.values())
        return {k: round(1000 * v / done, 2) for k, v in self.cpu.items()} if done else {}

    def summary(self) -> dict[str, Any]:
        done = len(self.latencies) + sum(self.errors.values())
        ms = sorted(x * 1000 for x in self.latencies)
        return {
            "requests": done,
            "ok": len(self.latencies),
            "errors": sum(self.errors.values()),
            "error_kinds": dict(self.errors.most_common()),
            "p50_ms": round(percentile(ms, 50), 2) if ms else None,
            "p99_ms": round(percentile(ms, 99), 2) if ms else None,
            "requests_per_s": round(done / self.seconds, 1) if self.seconds else None,
        }


class _Sampler:
    """The server's connections, from ``pg_stat_activity`` every ``every`` seconds, on a
    connection of its own (the superuser's reserved slots: the sampler never takes a slot the
    load needs, and is not counted)."""

    def __init__(self, conninfo: str, every: float = 0.02) -> None:
        self._conninfo = conninfo
        self._every = every
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.max_clients = 0
        self.max_data = 0

    def reset(self) -> None:
        self.max_clients = self.max_data = 0

    def __enter__(self) -> _Sampler:
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        with psycopg.connect(self._conninfo, dbname="postgres", autocommit=True) as conn:
            while not self._stop.is_set():
                row = conn.execute(
                    "SELECT count(*) FILTER (WHERE backend_type = 'client backend'"
                    "   AND pid <> pg_backend_pid()),"
                    " count(*) FILTER (WHERE application_name = 'monk:data')"
                    " FROM pg_stat_activity"
                ).fetchone()
                assert row is not None
                self.max_clients = max(self.max_clients, int(row[0]))
                self.max_data = max(self.max_data, int(row[1]))
                self._stop.wait(self._every)


def _cpu_seconds(pid: int, *, children: bool = False) -> float:
    """User and system CPU of process ``pid`` (Linux /proc; 0 where unreadable); with
    ``children``, also of its children: the exited ones (reaped: cutime, cstime) and the
    running ones (a PostgreSQL server's backends are its postmaster's children)."""
    tick = os.sysconf("SC_CLK_TCK")

    def fields(p: int | str) -> list[str]:
        with open(f"/proc/{p}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()

    try:
        own = fields(pid)
    except OSError:
        return 0.0
    total = int(own[11]) + int(own[12])
    if children:
        total += int(own[13]) + int(own[14])
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with suppress(OSError, IndexError, ValueError):
                    child = fields(entry)
                    if int(child[1]) == pid:
                        total += int(child[11]) + int(child[12])
    return total / tick


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _record() -> dict[str, Any]:
    tag = uuid.uuid4().hex[:12]
    return {"name": f"bench {tag}", "email": f"b{tag}@example.com", "account_type": "trial"}


def _kind(status: int, body: str) -> str:
    try:
        code = json.loads(body).get("error_code")
    except (ValueError, AttributeError):
        code = None
    return f"{status} {code}" if code else f"HTTP {status}"


def _pg_kind(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    for known in (
        "too many clients already",
        "remaining connection slots are reserved",
        "too many connections for role",
    ):
        if known in text:
            return known
    return text[:120]


class DataPlaneBench:
    def __init__(
        self,
        config: DataPlaneConfig,
        *,
        monk_bin: Path | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.config = config
        self.monk_bin = monk_bin or Path(sys.executable).with_name("monk")
        self.progress = progress or (lambda phase, done, total: None)
        self._serve_pid: int | None = None

    # ------------------------------------------------------------------ the run

    def run(self) -> dict[str, Any]:
        cfg = self.config
        work = Path(tempfile.mkdtemp(prefix="monk-bench-data-"))
        settings = Settings(
            database_url=None,
            data_dir=work / "monk",
            embedded_port=_free_port(),
            embedded_durable=False,
            pool_spares={},
            pool_roles=0,
            host_connections=cfg.host_connections,
            _env_file=None,  # type: ignore[call-arg]
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("MONK_")} | {
            "MONK_DATA_DIR": str(settings.data_dir),
            "MONK_EMBEDDED_PORT": str(settings.embedded_port),
            "MONK_EMBEDDED_DURABLE": "false",
            "MONK_POOL_SPARES": "{}",
            "MONK_POOL_ROLES": "0",
            "MONK_HOST_CONNECTIONS": str(cfg.host_connections),
        }
        server = Server.from_settings(settings)
        try:
            target, _ = server.init()
            with psycopg.connect(target.conninfo, dbname="postgres", autocommit=True) as c:

                def show(name: str) -> str:
                    row = c.execute(f"SHOW {name}").fetchone()
                    return str(row[0]) if row else ""

                about = {
                    "version": show("server_version"),
                    "max_connections": int(show("max_connections")),
                    "superuser_reserved_connections": int(show("superuser_reserved_connections")),
                }
            started = time.perf_counter()
            tenants = self._provision(work, env)
            setup = {"provision_seconds": round(time.perf_counter() - started, 1)}
            with _Sampler(target.conninfo) as sampler:
                with self._serve(env) as base:
                    started = time.perf_counter()
                    tokens = self._login(base, tenants)
                    setup["login_seconds"] = round(time.perf_counter() - started, 1)
                    many, single = _Load(), _Load()
                    sampler.reset()
                    # Every client's connection opened, every tenant's models cached once.
                    self._load(
                        base, tokens, max(2 * cfg.clients, cfg.tenants), "warm-up", sweep=True
                    )
                    maxima: dict[str, tuple[int, int]] = {}
                    postmaster = self._postmaster(server)
                    for label in ("many", "single", "single", "many"):
                        sampler.reset()
                        picked = tokens if label == "many" else tokens[:1]
                        before = self._cpu(postmaster)
                        run = self._load(base, picked, cfg.requests // 2, label)
                        run.cpu = self._cpu(postmaster) - before
                        (many if label == "many" else single).merge(run)
                        old = maxima.get(label, (0, 0))
                        maxima[label] = (
                            max(old[0], sampler.max_clients),
                            max(old[1], sampler.max_data),
                        )
                naive = {}
                for design in ("pool_per_tenant", "connection_per_request"):
                    sampler.reset()
                    run = self._naive(tenants, design)
                    naive[design] = run.summary() | {"max_server_connections": sampler.max_clients}
            out_many = many.summary() | {
                "max_server_connections": maxima["many"][0],
                "max_data_connections": maxima["many"][1],
                "cpu_ms_per_request": many.cpu_per_request(),
            }
            out_single = single.summary() | {
                "max_server_connections": maxima["single"][0],
                "max_data_connections": maxima["single"][1],
                "cpu_ms_per_request": single.cpu_per_request(),
            }
            ratio = None
            if out_many["requests_per_s"] and out_single["requests_per_s"]:
                ratio = round(out_many["requests_per_s"] / out_single["requests_per_s"], 3)
            return {
                "tenants": cfg.tenants,
                "clients": cfg.clients,
                "requests": cfg.requests,
                "host_connections": cfg.host_connections,
                "server": about,
                "setup": setup,
                "many_tenants": out_many,
                "single_tenant": out_single,
                "ratio": ratio,
                "naive": naive,
            }
        finally:
            if server.embedded is not None:
                with suppress(Exception):
                    server.embedded.stop()
            shutil.rmtree(work, ignore_errors=True)

    # ------------------------------------------------------------------ steps

    @staticmethod
    def _postmaster(server: Server) -> int | None:
        assert server.embedded is not None
        with suppress(OSError, ValueError, IndexError):
            return int((server.embedded.pgdata / "postmaster.pid").read_text().split()[0])
        return None

    def _cpu(self, postmaster: int | None) -> Counter[str]:
        """CPU seconds so far of this process (the clients), monk serve and the server."""
        mine = os.times()
        return Counter(
            {
                "clients": mine.user + mine.system,
                "monk_serve": _cpu_seconds(self._serve_pid) if self._serve_pid else 0.0,
                "postgres": _cpu_seconds(postmaster, children=True) if postmaster else 0.0,
            }
        )

    def _monk(self, env: dict[str, str], *args: str, timeout: float) -> str:
        done = subprocess.run(
            [str(self.monk_bin), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"monk {args[0]} {args[1] if len(args) > 1 else ''}: {tail}")
        return done.stdout

    def _provision(self, work: Path, env: dict[str, str]) -> list[dict[str, Any]]:
        """The tenants, through ``monk tenant create --from`` (cold clones, root users)."""
        names = work / "tenants.txt"
        names.write_text("".join(f"bench-{i:05d}\n" for i in range(self.config.tenants)))
        self.progress("provision", 0, 1)
        out = self._monk(
            env,
            "tenant",
            "create",
            "--from",
            str(names),
            "--template",
            TEMPLATE,
            "--parallel",
            "4",
            "--json",
            timeout=60 + 2.0 * self.config.tenants,
        )
        self.progress("provision", 1, 1)
        made = [r for r in json.loads(out)["results"] if r.get("ok")]
        if len(made) != self.config.tenants:
            raise RuntimeError(f"only {len(made)} of {self.config.tenants} tenants provisioned")
        return made

    @contextmanager
    def _serve(self, env: dict[str, str]) -> Iterator[str]:
        port = _free_port()
        proc = subprocess.Popen(
            [str(self.monk_bin), "serve", "--port", str(port), "--templates", TEMPLATE],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}"
        self._serve_pid = proc.pid
        try:
            deadline = time.monotonic() + 120
            while True:
                with suppress(httpx.TransportError):
                    if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("monk serve did not start")
                time.sleep(0.2)
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _login(self, base: str, tenants: list[dict[str, Any]]) -> list[str]:
        """Each tenant's ``root`` logged in over HTTP (argon2: ~80 ms of CPU each)."""
        tokens: list[str] = [""] * len(tenants)
        counter = iter(range(len(tenants)))
        lock = threading.Lock()
        done = [0]

        def worker() -> None:
            with httpx.Client(base_url=base, timeout=60) as client:
                while True:
                    with lock:
                        i = next(counter, None)
                    if i is None:
                        return
                    r = client.post(
                        "/auth/login",
                        json={
                            "tenant": tenants[i]["name"],
                            "username": "root",
                            "password": tenants[i]["root_password"],
                        },
                    )
                    if r.status_code != 200:
                        raise RuntimeError(f"login failed: {_kind(r.status_code, r.text)}")
                    tokens[i] = r.json()["data"]["token"]
                    with lock:
                        done[0] += 1
                        self.progress("login", done[0], len(tenants))

        self._threads(worker, min(8, len(tenants)))
        return tokens

    def _load(
        self, base: str, tokens: list[str], count: int, label: str, *, sweep: bool = False
    ) -> _Load:
        """``count`` requests by the configured clients, each to a random one of ``tokens``
        (``sweep``: to each in turn, so that every one is reached)."""
        load = _Load()
        left = [count]

        def worker(seed: int) -> None:
            rng = random.Random(seed)  # noqa: S311 (a load pattern, not a secret)
            mine = _Load()
            with httpx.Client(base_url=base, timeout=60) as client:
                while True:
                    with load.lock:
                        if left[0] <= 0:
                            break
                        left[0] -= 1
                        n = left[0]
                    token = tokens[n % len(tokens)] if sweep else rng.choice(tokens)
                    headers = {"Authorization": f"Bearer {token}"}
                    started = time.perf_counter()
                    try:
                        if rng.random() < 0.5:
                            r = client.get(f"/api/data/{MODEL}?limit=10", headers=headers)
                        else:
                            r = client.post(f"/api/data/{MODEL}", json=[_record()], headers=headers)
                    except httpx.HTTPError as exc:
                        mine.errors[type(exc).__name__] += 1
                        continue
                    if r.status_code >= 400:
                        mine.errors[_kind(r.status_code, r.text)] += 1
                    else:
                        mine.latencies.append(time.perf_counter() - started)
            with load.lock:
                load.latencies += mine.latencies
                load.errors.update(mine.errors)

        started = time.perf_counter()
        self._threads(worker, self.config.clients, seeded=True)
        load.seconds = time.perf_counter() - started
        self.progress(label, count, count)
        return load

    def _naive(self, tenants: list[dict[str, Any]], design: str) -> _Load:
        """The same mix in SQL, straight to the tenants' databases as their own roles: a pool
        per tenant keeping 4 connections open (psycopg_pool's default min_size), or a new
        connection per request."""
        load = _Load()
        left = [self.config.naive_requests]
        pools: dict[int, list[psycopg.Connection[Any]]] = {}
        opened: dict[int, threading.Lock] = {i: threading.Lock() for i in range(len(tenants))}
        urls = [t["connection_url"] for t in tenants]

        def statement(conn: psycopg.Connection[Any], rng: random.Random) -> None:
            if rng.random() < 0.5:
                conn.execute(f"SELECT * FROM {MODEL} LIMIT 10").fetchall()
            else:
                rec = _record()
                conn.execute(
                    f"INSERT INTO {MODEL} (name, email, account_type) VALUES (%s, %s, %s)",
                    (rec["name"], rec["email"], rec["account_type"]),
                )

        def worker(seed: int) -> None:
            rng = random.Random(seed)  # noqa: S311 (a load pattern, not a secret)
            mine = _Load()
            while True:
                with load.lock:
                    if left[0] <= 0:
                        break
                    left[0] -= 1
                i = rng.randrange(len(tenants))
                started = time.perf_counter()
                try:
                    if design == "connection_per_request":
                        with psycopg.connect(urls[i], autocommit=True, connect_timeout=10) as c:
                            statement(c, rng)
                    else:
                        with opened[i]:
                            if i not in pools:
                                # A pool opens its min_size connections; one that fails
                                # fails the request (a pool would retry it, and fail again).
                                conns: list[psycopg.Connection[Any]] = []
                                try:
                                    for _ in range(4):
                                        conns.append(
                                            psycopg.connect(
                                                urls[i], autocommit=True, connect_timeout=10
                                            )
                                        )
                                except BaseException:
                                    for c in conns:
                                        c.close()
                                    raise
                                pools[i] = conns
                            conn = pools[i].pop() if pools[i] else None
                        if conn is None:
                            mine.errors["pool of the tenant busy"] += 1
                            continue
                        try:
                            statement(conn, rng)
                        finally:
                            with opened[i]:
                                pools[i].append(conn)
                except psycopg.Error as exc:
                    mine.errors[_pg_kind(exc)] += 1
                    continue
                mine.latencies.append(time.perf_counter() - started)
            with load.lock:
                load.latencies += mine.latencies
                load.errors.update(mine.errors)

        started = time.perf_counter()
        try:
            self._threads(worker, self.config.clients, seeded=True)
        finally:
            load.seconds = time.perf_counter() - started
            for conns in pools.values():
                for c in conns:
                    with suppress(Exception):
                        c.close()
        self.progress(design, 1, 1)
        return load

    @staticmethod
    def _threads(work: Callable[..., None], count: int, *, seeded: bool = False) -> None:
        errors: list[BaseException] = []

        def run(n: int) -> None:
            try:
                work(n) if seeded else work()
            except BaseException as exc:  # reported after the others finish
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
