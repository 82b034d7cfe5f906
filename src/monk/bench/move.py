"""``monk bench --move``: a tenant of ~50 MB moved between two servers, against a bare
``pg_dump | pg_restore`` of the same database measured in the same run.

    setup     a second embedded PostgreSQL 18 in a temp dir (TCP, password), added as a host;
              a tenant on this server, filled with ~SIZE MB (a table of 200-byte rows and its
              primary key)
    rounds    for each round, in turn this server -> the second and back (the bare copy
              first in even rounds, after the move in odd ones, the same way as the move):
                bare  pg_dump -Fc -Z0 | pg_restore (monk's own flags, the same binaries) of a
                      clone of the tenant's database made untimed on the source into a new
                      database on the destination, timed, dropped
                monk  ``monk tenant move`` to the destination: its recorded downtime (role
                      NOLOGIN committed -> LOGIN committed on the destination) and total time;
                      and the downtime a client sees: a prober connecting every 50 ms
                      (more often, its backends would slow the copy it measures) with the
                      tenant's own credentials, to the source and then to the destination,
                      from its first refused connection to its first accepted one

Everything made (tenant, host, second server, copies) is removed at the end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from monk.adapters.embedded import SUPERUSER, EmbeddedServer, bin_dir
from monk.adapters.postgres import admin
from monk.adapters.postgres.connection import ServerTarget, connect
from monk.service import hosts, moves, purge
from monk.service.templates import TemplateService, builtin_source_dir
from monk.service.tenants import TenantService
from monk.settings import Settings

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MoveBench:
    def __init__(
        self,
        settings: Settings,
        target: ServerTarget,
        *,
        size_mb: int = 50,
        rounds: int = 4,
        progress: Progress | None = None,
    ) -> None:
        self.run_id = secrets.token_hex(3)
        self.key = f"bench_mv_{self.run_id}"
        self.host = f"bench-mv-{self.run_id}"
        self.settings = settings.model_copy(
            update={"pool_spares": {**settings.pool_spares, self.key: 0}, "pool_roles": 0}
        )
        self.target = target
        self.size_mb = size_mb
        self.rounds = rounds
        self.progress = progress or (lambda phase, done, total: None)
        self.work = Path(tempfile.mkdtemp(prefix="monk-bench-mv-"))

    def run(self) -> dict[str, Any]:
        server = EmbeddedServer(self.work / "second", port=_free_port(), durable=True)
        server.ensure_running()
        try:
            password = server.password_file.read_text().strip()
            url = (
                f"postgresql://{SUPERUSER}:{quote(password, safe='')}@127.0.0.1:{server.port}"
                "/postgres"
            )
            with TenantService(self.settings, self.target) as svc:
                name = f"bench {self.run_id} move"
                try:
                    return self._measure(svc, url, name)
                finally:
                    self._cleanup(svc, name)
        finally:
            server.stop()
            shutil.rmtree(self.work, ignore_errors=True)

    def _measure(self, svc: TenantService, url: str, name: str) -> dict[str, Any]:
        source = self.work / self.key
        shutil.copytree(builtin_source_dir("basic"), source)
        with TemplateService.open(self.settings, self.target) as templates:
            templates.build(self.key, source_dir=source)
        hosts.add(svc, self.host, url)
        view = svc.provision(name, template=self.key)
        tenant_url = view.as_dict()["connection_url"]
        rows = self.size_mb * 1024 * 1024 // 260
        with psycopg.connect(tenant_url, autocommit=True) as conn:
            conn.execute("CREATE TABLE payload (id bigint PRIMARY KEY, body text NOT NULL)")
            conn.execute(
                "INSERT INTO payload SELECT g, repeat(md5(g::text), 6)"
                " FROM generate_series(1, %s) g",
                (rows,),
            )
            conn.execute("VACUUM ANALYZE payload")
        here = svc.hosts.local.name
        with svc.hosts.pools().admin() as adm:
            size = admin.database_size(adm, view.tenant.database) or 0
        result: dict[str, Any] = {
            "database_bytes": size,
            "rows": rows,
            "rounds": [],
        }
        where = here
        for i in range(self.rounds):
            to = self.host if where == here else here
            src_t, dst_t = svc.hosts.target(where), svc.hosts.target(to)
            # Bare copy and move take turns going first: neither gains from the other's
            # warm caches or pays for its checkpoints every time. Both go the same way (the
            # bare copy reads a clone of the tenant's database made untimed on the source),
            # so that each round compares restores into the same server.
            reference = self._reference(src_t, view.tenant.database)
            if i % 2 == 0:
                _settle(src_t, dst_t)
                bare = self._bare_copy(src_t, dst_t, reference)
            _settle(src_t, dst_t)
            urls = [_at(tenant_url, t) for t in (src_t, dst_t)]
            prober = _Prober(*urls)
            prober.start()
            moved = moves.move(svc, name, to)
            prober.stop()
            if i % 2 == 1:
                _settle(src_t, dst_t)
                bare = self._bare_copy(src_t, dst_t, reference)
            with connect(src_t, autocommit=True, purpose="bench") as adm:
                admin.drop_database(adm, reference)
            r = moved.result
            result["rounds"].append(
                {
                    "from": where,
                    "to": to,
                    "bare_copy_s": round(bare, 3),
                    "downtime_s": round(r["downtime_ms"] / 1000, 3),
                    "client_downtime_s": prober.downtime_s(),
                    "total_s": round(r["total_ms"] / 1000, 3),
                    "copy_s": round(r["copy_ms"] / 1000, 3),
                    "restore_s": round(r["restore_ms"] / 1000, 3),
                    "verify_s": round(r["verify_ms"] / 1000, 3),
                }
            )
            where = to
            self.progress("move rounds", i + 1, self.rounds)
        rounds = result["rounds"]

        def med(k: str) -> float:
            values = [r[k] for r in rounds if r[k] is not None]
            return round(statistics.median(values), 3) if values else float("nan")

        result["median"] = {
            k: med(k)
            for k in ("bare_copy_s", "downtime_s", "client_downtime_s", "total_s", "verify_s")
        }
        m = result["median"]
        result["downtime_over_bare"] = round(m["downtime_s"] / m["bare_copy_s"], 3)
        result["client_downtime_over_bare"] = round(m["client_downtime_s"] / m["bare_copy_s"], 3)
        return result

    def _reference(self, src: ServerTarget, database: str) -> str:
        """A clone of the tenant's ``database`` on ``src``, for the bare copy to read (the
        tenant's own may have moved away by then): made untimed, dropped after the round."""
        reference = f"monkbench_ref_{self.run_id}"
        with connect(src, autocommit=True, purpose="bench") as adm:
            admin.drop_database(adm, reference)
            admin.terminate_sessions(adm, database)
            admin.create_database(adm, reference, template=database)
        return reference

    def _bare_copy(self, src: ServerTarget, dst: ServerTarget, database: str) -> float:
        """``pg_dump -Fc -Z0 | pg_restore`` into a new database on ``dst`` by hand, timed."""
        copy = f"monkbench_copy_{self.run_id}"
        with connect(dst, autocommit=True, purpose="bench") as adm:
            admin.drop_database(adm, copy)
            admin.create_database(adm, copy, template="template0")
        (src_arg, src_env), (dst_arg, dst_env) = _conn_arg(src, database), _conn_arg(dst, copy)
        started = time.perf_counter()
        # The pipeline as one types it: pg_dump -Fc -Z0 | pg_restore (passwords in the
        # environment, not on the command line).
        dumper = subprocess.Popen(
            [str(bin_dir() / "pg_dump"), "-Fc", "-Z0", "--no-owner", src_arg],
            env=src_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert dumper.stdout is not None
        done = subprocess.run(
            [str(bin_dir() / "pg_restore"), "--no-owner", "--no-privileges", dst_arg],
            env=dst_env,
            stdin=dumper.stdout,
            capture_output=True,
            text=True,
            check=False,
        )
        dumper.stdout.close()
        dumper.wait()
        seconds = time.perf_counter() - started
        errors = [
            line
            for line in done.stderr.splitlines()
            if "error" in line
            and "transaction_timeout" not in line
            and "errors ignored" not in line
        ]
        if errors or dumper.returncode != 0:
            log.warning("bare copy: %s", errors[0] if errors else "pg_dump failed")
        with connect(dst, autocommit=True, purpose="bench") as adm:
            admin.drop_database(adm, copy)
        return seconds

    def _cleanup(self, svc: TenantService, name: str) -> None:
        # A round cut short leaves its reference clone or its bare copy (this server's: the
        # second one goes whole).
        with (
            contextlib.suppress(Exception),
            connect(self.target, autocommit=True, purpose="bench") as adm,
        ):
            for leftover in (f"monkbench_ref_{self.run_id}", f"monkbench_copy_{self.run_id}"):
                admin.drop_database(adm, leftover)
        with contextlib.suppress(Exception):
            t = svc.get(name)
            if t.host != svc.hosts.local.name:
                moves.move(svc, name, svc.hosts.local.name)
        with contextlib.suppress(Exception):
            _view, op = purge.request_purge(svc, name, archive=False, forget=True)
            purge.work_queue(svc, only=op)
        with contextlib.suppress(Exception):
            moves.work_drops(svc)
        with contextlib.suppress(Exception):
            hosts.remove(svc, self.host)
        with (
            contextlib.suppress(Exception),
            TemplateService.open(self.settings, self.target) as templates,
        ):
            templates.drop(self.key, None, force=True)


def _settle(*targets: ServerTarget) -> None:
    """A CHECKPOINT on each server before a timed copy: the drop of the copy before it forces
    one, which would otherwise write out that copy's pages during the next measurement."""
    for target in targets:
        with connect(target, autocommit=True, purpose="bench") as adm:
            adm.execute("CHECKPOINT")


def _conn_arg(target: ServerTarget, database: str) -> tuple[str, dict[str, str]]:
    params = conninfo_to_dict(target.conninfo)
    password = params.pop("password", None)
    params["dbname"] = database
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if password is not None:
        env["PGPASSWORD"] = str(password)
    return "--dbname=" + make_conninfo(**{k: str(v) for k, v in params.items()}), env


def _at(url: str, target: ServerTarget) -> str:
    """The tenant's URL (its role and password) pointed at ``target``'s address."""
    head, tail = url.split("@", 1)
    return f"{head}@{target.public_host}:{target.public_port}/{tail.split('/', 1)[1]}"


class _Prober(threading.Thread):
    """A client of the tenant connecting every 50 ms, source first, then destination (more
    often, its backends would slow the copy it measures): the
    time from its first refused connection to its first accepted one on the destination."""

    def __init__(self, source_url: str, dest_url: str) -> None:
        super().__init__(daemon=True)
        self.urls = (source_url, dest_url)
        self.first_refused: float | None = None
        self.first_accepted: float | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        source, dest = self.urls
        while not self._halt.is_set() and self.first_accepted is None:
            url = source if self.first_refused is None else dest
            try:
                with psycopg.connect(url, connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                if self.first_refused is not None:
                    self.first_accepted = time.perf_counter()
            except psycopg.Error:
                if self.first_refused is None:
                    self.first_refused = time.perf_counter()
            time.sleep(0.05)

    def stop(self) -> None:
        deadline = time.monotonic() + 5
        while self.first_accepted is None and time.monotonic() < deadline:
            time.sleep(0.01)
        self._halt.set()
        self.join(timeout=5)

    def downtime_s(self) -> float | None:
        if self.first_refused is None or self.first_accepted is None:
            return None
        return round(self.first_accepted - self.first_refused, 3)
