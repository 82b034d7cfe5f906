"""The measurements of ``monk bench``, on one template, in one run, side by side.

Variants, each timed end to end from the caller's side:

    raw      CREATE DATABASE … TEMPLATE <template db> on an open autocommit connection (the floor)
    scratch  CREATE DATABASE (empty), then one connection to it that creates the same core tables,
             tables, indexes, triggers, registry rows and seed rows (psycopg pipeline mode, one
             transaction) and applies the template's migrations: what a migrations-per-tenant
             system does for every sign-up
    cold     TenantService.provision with no spare ready (registry, clone, role, grants, answer);
             its role is a spare role when one is ready, and its root user is written after
             the answer, as under monk serve (MONK_POOL_ROLES; service/root_users.py)
    warm     TenantService.provision served from the warm pool (one spare filled, untimed, just
             before each timed handout, so that no spare ever waits where a cold provision runs)

The latency rounds rotate the order of raw, cold and warm so that machine noise (checkpoints,
the other core) hits them alike; scratch rounds follow, apart (see ``_latencies``). Throughput
runs ``ops`` raw clones and ``ops`` cold provisions at each concurrency (threads, one connection
each for raw, the service's pools for monk), in the order raw, monk, monk, raw with half the
operations each time (drift weighs on both alike), errors counted, not raised. Deprovisioning is
measured last, on the tenants of the latency rounds
(timed: the purge request, which is the caller's answer, and the background drop).

Nothing is dropped while creation is measured (unless ``drop_each_round``, or the disk has no
room to keep it all): every DROP DATABASE forces a checkpoint and frees hundreds of files, and a
filesystem may make the creations of the next minutes pay for that (ext4 without a journal skips
every inode freed in the last 1–6 minutes, one by one, at each file creation: a clone measured
right after drops took 4–7 times as long as one measured before them). Dropping as we go would
make each sample depend on how many drops preceded it, and inflate every creation alike, raw and
monk, which hides the differences the bench is for.

Everything made carries the run's prefix (databases ``monkbench_<run>_…``, tenants
``bench <run> …``) and is removed in a ``finally`` (SIGINT ignored while cleaning), whatever
happened.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

import monk
from monk.adapters.postgres import admin
from monk.adapters.postgres.connection import ServerTarget, connect, open_connection
from monk.bench import stats
from monk.core.schema_compiler import compile_template, core_tables_ddl, seed_statements
from monk.errors import TenantNotFound
from monk.service import purge, role_pool, root_users
from monk.service.templates import TemplateService, resolve_source
from monk.service.tenants import TenantService
from monk.settings import Settings

log = logging.getLogger(__name__)

Conn = psycopg.Connection[Any]
Progress = Callable[[str, int, int], None]
"""(phase description, steps done, steps total): the CLI draws it; the runner only reports."""

VARIANTS = ("raw", "scratch", "cold", "warm")
_SETTLE_S = 5.0  # at most, before each latency sample, for root passwords being hashed
DB_PREFIX = "monkbench_"
WARM_UNAVAILABLE = "warm pool not available"


@dataclass(frozen=True)
class BenchConfig:
    template: str = "saas"
    iterations: int = 30
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16)
    drop_each_round: bool = False
    # Seconds each variant runs at each throughput level (in two slices, A-B-B-A): a level of
    # a fixed count lasted half a second on a tmpfs, and one lucky raw level decided the ratio.
    level_seconds: float = 4.0


def throughput_slices(level_seconds: float) -> tuple[int, float]:
    """How a level's time is cut: (slices per variant, seconds a slice), an even count of
    slices of about a second each. The variants alternate A-B-B-A-A-B-B-A, so that what the
    machine does meanwhile (other processes, a checkpoint, the filesystem slowing down as drops
    accumulate) weighs on both alike; slices much shorter would spend their time ramping up."""
    slices = max(2, 2 * round(level_seconds / 2))
    return slices, level_seconds / slices


def _abba(slices: int) -> list[str]:
    pairs = [("raw", "monk") if i % 2 == 0 else ("monk", "raw") for i in range(slices)]
    return [variant for pair in pairs for variant in pair]


def latency_databases(config: BenchConfig) -> int:
    """How many databases the latency rounds make: four a round (and the untimed first one)."""
    return (config.iterations + 1) * len(VARIANTS)


def throughput_estimate(config: BenchConfig, raw_p50_ms: float | None, cpus: int) -> int:
    """A generous guess at how many databases the throughput levels make, each variant running
    ``level_seconds`` per level: every core cloning back to back at the latency rounds' raw
    p50, half as fast again (a level runs for a time, not a count, so only a guess is known)."""
    per_second = 1.5 * max(cpus, 1) * 1000 / raw_p50_ms if raw_p50_ms else 100.0
    return int(per_second * 2 * config.level_seconds * len(config.concurrency)) + 1


@dataclass
class _Tally:
    ok: int = 0
    failed: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    def add(self, ok: int, failed: int, seconds: float, errors: list[str]) -> None:
        self.ok += ok
        self.failed += failed
        self.seconds += seconds
        self.errors += errors


@dataclass
class _Samples:
    ms: list[float] = field(default_factory=list)
    failures: int = 0
    errors: list[str] = field(default_factory=list)

    def fail(self, exc: BaseException) -> None:
        self.failures += 1
        if len(self.errors) < 3:
            self.errors.append(_describe(exc))

    def summary(self) -> dict[str, Any]:
        out = stats.summarize(self.ms, failures=self.failures)
        if self.errors:
            out["errors"] = list(self.errors)
        return out


def _describe(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _pool_api() -> Any | None:
    """The warm pool module, if this monk has one: ``fill(svc, key, count)`` tops the spares of
    ``key``'s current build up to ``count``, ``drain(svc, key=…)`` drops the ready ones."""
    try:
        from monk.service import pool
    except ImportError:
        return None
    needed = ("fill", "drain", "counts")
    return pool if all(callable(getattr(pool, n, None)) for n in needed) else None


class Bench:
    def __init__(
        self,
        settings: Settings,
        target: ServerTarget,
        config: BenchConfig,
        *,
        progress: Progress | None = None,
        embedded: bool = True,
    ) -> None:
        self.config = config
        self.target = target
        self.embedded = embedded
        self.run_id = secrets.token_hex(4)
        self._progress = progress or (lambda _phase, _done, _total: None)
        self._settings = _without_spares(settings, config.template)
        self._counter = 0
        self._lock = threading.Lock()
        self.notes: list[str] = []
        self._template_db = ""
        self._scratch_sql: list[tuple[sql.Composed, tuple[Any, ...]]] = []
        self._scratch_migrations: list[str] = []
        self._spares_before = 0
        # Whether creations are measured with nothing dropped in between (decided in run(), and
        # again before the throughput levels, whose count of databases is known only then).
        self._keep = not config.drop_each_round
        self._dropped_while_measuring = False
        # Tenants of the latency rounds, in order, to deprovision (timed or not) at the end.
        self._to_deprovision: list[tuple[str, bool]] = []

    # ------------------------------------------------------------------ names

    def _next(self) -> int:
        with self._lock:
            self._counter += 1
            return self._counter

    def db_name(self, variant: str) -> str:
        return f"{DB_PREFIX}{self.run_id}_{variant}_{self._next()}"

    def tenant_name(self, variant: str) -> str:
        return f"bench {self.run_id} {variant} {self._next()}"

    # ------------------------------------------------------------------ run

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        started_at = datetime.now(UTC).isoformat()
        key = self.config.template
        with TemplateService.open(self._settings, self.target) as templates:
            build = templates.ensure_built(key)
        # The source the build was made from, so that scratch builds the very same content.
        built_from = Path(build.source) if build.source else None
        if built_from is not None and not built_from.is_dir():
            built_from = None
        source = resolve_source(self._settings, key, built_from)
        compiled = compile_template(source.schemas)
        self._scratch_sql = [
            *((s, ()) for s in core_tables_ddl()),
            *((s, ()) for s in compiled.ddl()),
            *compiled.registry_inserts(),
            *seed_statements(compiled, source.data),
        ]
        self._scratch_migrations = [m.sql for m in source.migrations]
        self._template_db = build.database
        pool_api = _pool_api()
        if pool_api is None:
            self.notes.append(WARM_UNAVAILABLE)
        result: dict[str, Any] = {"monk_version": monk.__version__, "started_at": started_at}
        svc = TenantService(self._settings, self.target)
        # As monk serve does: a few root passwords hashed ahead, refilled in the background, so
        # a cold provision does not wait for argon2 unless they run out (throughput levels).
        svc.root_passwords.keep(4)
        # As monk serve does: a cold provision's root user is written after its answer (by
        # _provision, untimed, before the next sample; in the throughput levels, in the thread's
        # own wall time).
        svc.root_after_answer = True
        try:
            if pool_api is not None:
                self._empty_pool(svc, pool_api, build)
            with connect(self.target, autocommit=True, purpose="bench") as adm:
                result["server"] = self._server(adm)
                result["template"] = {
                    "key": key,
                    "version": build.version,
                    "database": build.database,
                    "size_bytes": admin.database_size(adm, build.database),
                    "tables": build.table_count,
                    "records": build.record_count,
                }
                size = result["template"]["size_bytes"]
                self._keep = self._keep and self._room_to_keep(
                    latency_databases(self.config) * size, "the latency rounds"
                )
                latency_keep = self._keep
                result |= self._latencies(adm, svc, pool_api)
                estimate = throughput_estimate(
                    self.config, result["raw"].get("p50_ms"), os.cpu_count() or 1
                )
                throughput_keep = self._keep and self._room_to_keep(
                    estimate * size, "the throughput levels"
                )
                self._dropped_while_measuring = not (latency_keep and throughput_keep)
                result["throughput"] = self._throughput(adm, svc, keep=throughput_keep)
                if self._keep:
                    answer, dropped = _Samples(), _Samples()
                    self._deprovision_all(svc, self._to_deprovision, answer, dropped)
                    result["deprovision"] = _deprovision_summary(answer, dropped)
        finally:
            with _sigint_ignored():
                leftovers = self.cleanup(svc, pool_api)
            svc.close()
        if leftovers:
            self.notes.append("left behind: " + ", ".join(leftovers))
        result["config"] = {
            "template": key,
            "iterations": self.config.iterations,
            "concurrency": list(self.config.concurrency),
            "level_seconds": self.config.level_seconds,
            "pool_size": self._settings.pool_size,
            "dropped_while_measuring": self._dropped_while_measuring or not self._keep,
            "databases_made": self._counter,  # one name each
        }
        result["machine"] = {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        }
        result["ratios"] = stats.ratios(result)
        result["targets"] = [t.as_dict() for t in stats.targets(result)]
        result["notes"] = list(self.notes)
        result["duration_s"] = round(time.monotonic() - started, 1)
        return _ordered(result)

    def _empty_pool(self, svc: TenantService, pool_api: Any, build: Any) -> None:
        """No spare of the template may wait where a cold provision runs: drop the ready ones
        (clean-up makes as many again at the end)."""
        with svc.hosts.pools().system() as reg:
            have = pool_api.counts(reg, self.target.name)
        self._spares_before = int(have.get((build.key, build.version), 0))
        if self._spares_before:
            dropped = pool_api.drain(svc, key=build.key)
            self.notes.append(
                f"dropped {dropped} spare(s) of {build.key} before the run, refilled after it"
            )

    def _room_to_keep(self, need: int, phase: str) -> bool:
        """Whether the server's disk can hold ``need`` more bytes until the end (with a
        gigabyte to spare; on a tmpfs, in memory as well); if not, or unknown, ``phase`` drops
        as it goes and says so."""
        if not self.embedded:
            return True  # its disk is not ours to see: --drop-each-round is the user's call
        free = _free_bytes(self._settings.data_dir)
        if free >= need + 2**30:
            return True
        self.notes.append(
            f"{phase} dropped while measuring: keeping their databases needs ~{_gib(need)}, "
            f"the disk has {_gib(free)} free (creations after drops can be slower)"
        )
        return False

    def _server(self, adm: Conn) -> dict[str, Any]:
        def show(setting: str) -> str:
            row = adm.execute(sql.SQL("SHOW {}").format(sql.Identifier(setting))).fetchone()
            return str(row[0]) if row else "unknown"

        return {
            "version": show("server_version"),
            "mode": "embedded" if self.embedded else "external",
            "durability": {
                name: show(name) for name in ("fsync", "synchronous_commit", "full_page_writes")
            },
            "scram_iterations": self._settings.scram_iterations,
        }

    # ------------------------------------------------------------------ latency rounds

    def _latencies(self, adm: Conn, svc: TenantService, pool_api: Any | None) -> dict[str, Any]:
        samples = {v: _Samples() for v in VARIANTS}
        answer, dropped = _Samples(), _Samples()
        cold_from_pool = warm_from_pool = cold_roles_from_pool = 0
        # Scratch has rounds of its own, after these: its DDL fills the server's shared
        # invalidation queue, which resets the catalog caches of every other session, and the
        # variant measured next would pay for rebuilding them (1-4 ms a provision, measured).
        variants = [v for v in VARIANTS if v != "scratch" and (v != "warm" or pool_api is not None)]
        rounds = self.config.iterations
        # One untimed round first: opens the service's pools, warms caches and the catalog.
        for i in range(rounds + 1):
            timed = i > 0
            self._progress("latency", i, 2 * rounds + 1)
            databases: list[str] = []
            tenants: list[str] = []
            order = variants[i % len(variants) :] + variants[: i % len(variants)]
            for variant in order:
                # As between a server's requests: the root passwords a cold provision took are
                # hashed again before the next sample, which would otherwise pay for them.
                svc.root_passwords.settle(_SETTLE_S)
                try:
                    if variant in ("raw", "scratch"):
                        name = self.db_name(variant)
                        databases.append(name)
                        ms = self._raw(adm, name) if variant == "raw" else self._scratch(adm, name)
                    else:
                        name = self.tenant_name(variant)
                        if variant == "warm":
                            pool_api.fill(svc, self.config.template, 1)  # type: ignore[union-attr]
                        else:
                            self._fill_roles(svc)
                        roles_before = len(svc.role_secrets)
                        ms, source = self._provision(svc, name)
                        tenants.append(name)
                        if timed and variant == "cold":
                            cold_roles_from_pool += roles_before - len(svc.role_secrets)
                        if timed and source == "pool":
                            if variant == "cold":
                                cold_from_pool += 1
                            else:
                                warm_from_pool += 1
                except Exception as exc:
                    if timed:
                        samples[variant].fail(exc)
                    log.warning("bench %s failed: %s", variant, _describe(exc))
                    continue
                if timed:
                    samples[variant].ms.append(ms)
            if self._keep:
                self._to_deprovision += [(name, timed) for name in tenants]
            else:
                self._deprovision_all(svc, [(name, timed) for name in tenants], answer, dropped)
                self._drop_databases(adm, databases)
        for i in range(rounds):
            self._progress("latency", rounds + 1 + i, 2 * rounds + 1)
            name = self.db_name("scratch")
            try:
                samples["scratch"].ms.append(self._scratch(adm, name))
            except Exception as exc:
                samples["scratch"].fail(exc)
                log.warning("bench scratch failed: %s", _describe(exc))
            if not self._keep:
                self._drop_databases(adm, [name])
        self._progress("latency", 2 * rounds + 1, 2 * rounds + 1)
        out: dict[str, Any] = {v: samples[v].summary() for v in VARIANTS}
        out["cold"]["from_pool"] = cold_from_pool
        out["cold"]["roles_from_pool"] = cold_roles_from_pool
        if cold_from_pool:
            self.notes.append(f"{cold_from_pool} cold provision(s) were served by a spare")
        if pool_api is None:
            out["warm"] = None
        else:
            out["warm"]["from_pool"] = warm_from_pool
            served = len(samples["warm"].ms)
            out["warm"]["all_from_pool"] = served > 0 and warm_from_pool == served
            if not out["warm"]["all_from_pool"]:
                self.notes.append(
                    f"only {warm_from_pool} of {len(samples['warm'].ms)} warm provisions "
                    "came from the pool"
                )
        if not self._keep:
            out["deprovision"] = _deprovision_summary(answer, dropped)
        return out

    def _deprovision_all(
        self,
        svc: TenantService,
        tenants: Sequence[tuple[str, bool]],
        answer: _Samples,
        dropped: _Samples,
    ) -> None:
        """Deprovision these (name, timed) tenants one by one, timing the timed ones."""
        for index, (name, timed) in enumerate(tenants):
            self._progress("deprovision", index, len(tenants))
            try:
                answer_ms, dropped_ms = self._deprovision(svc, name)
            except Exception as exc:
                if timed:
                    answer.fail(exc)
                log.warning("bench deprovision failed: %s", _describe(exc))
                continue
            if timed:
                answer.ms.append(answer_ms)
                dropped.ms.append(dropped_ms)
        self._progress("deprovision", len(tenants), len(tenants))

    def _fill_roles(self, svc: TenantService, count: int | None = None) -> None:
        """Untimed, before cold provisions: the spare roles a serving monk's refiller keeps
        (``MONK_POOL_ROLES``, or ``count``), made in its idle time."""
        try:
            role_pool.fill(svc, self._settings.pool_roles if count is None else count)
        except Exception as exc:
            log.warning("bench could not make spare roles: %s", _describe(exc))

    def _raw(self, adm: Conn, name: str) -> float:
        query = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(self._template_db)
        )
        t0 = time.perf_counter()
        adm.execute(query)
        return (time.perf_counter() - t0) * 1000

    def _scratch(self, adm: Conn, name: str) -> float:
        t0 = time.perf_counter()
        adm.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        with connect(self.target, name, purpose="bench-scratch") as db:
            with db.pipeline():
                for query, params in self._scratch_sql:
                    db.execute(query, params or None)
            for migration in self._scratch_migrations:
                db.execute(migration.encode())
            db.commit()
            ms = (time.perf_counter() - t0) * 1000
            # Untimed: what autovacuum would otherwise do in the background while the next
            # variants are measured (the template build ANALYZEs likewise, once).
            db.autocommit = True
            db.execute("ANALYZE")
        return ms

    def _provision(self, svc: TenantService, name: str) -> tuple[float, str]:
        t0 = time.perf_counter()
        view = svc.provision(name, template=self.config.template)
        ms = (time.perf_counter() - t0) * 1000
        if view.provisioned_from == "clone":
            root_users.write_pending(svc, view.tenant)
        return ms, str(view.as_dict().get("provisioned_from", "clone"))

    def _deprovision(self, svc: TenantService, name: str) -> tuple[float, float]:
        t0 = time.perf_counter()
        _view, op = purge.request_purge(svc, name, archive=False, forget=True)
        t1 = time.perf_counter()
        purge.work_queue(svc, only=op)
        t2 = time.perf_counter()
        return (t1 - t0) * 1000, (t2 - t0) * 1000

    # ------------------------------------------------------------------ throughput

    def _throughput(self, adm: Conn, svc: TenantService, *, keep: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        levels = self.config.concurrency
        slices, slice_seconds = throughput_slices(self.config.level_seconds)
        for index, c in enumerate(levels):
            self._progress("throughput", index, len(levels))
            totals = {v: _Tally() for v in ("raw", "monk")}
            roles_used = 0
            for variant in _abba(slices):
                if variant == "raw":
                    ok, failed, seconds, errors, names = self._parallel_raw(c, slice_seconds)
                    if not keep:
                        self._drop_databases(adm, names)
                else:
                    # Spare roles for as many provisions as the level's raw clones made in a
                    # slice (and a quarter more), as a serving monk's refiller keeps them
                    # ready in its idle time: untimed, like the latency rounds' top-ups.
                    expected = totals["raw"].ok or c * 4
                    self._fill_roles(svc, max(self._settings.pool_roles, expected * 5 // 4))
                    roles_before = len(svc.role_secrets)
                    ok, failed, seconds, errors, names = self._parallel(
                        c,
                        slice_seconds,
                        lambda: self.tenant_name("tmonk"),
                        lambda name: self._provision(svc, name),
                    )
                    roles_used += roles_before - len(svc.role_secrets)
                    if not keep:
                        self._purge_all(svc, names)
                totals[variant].add(ok, failed, seconds, errors)
            level: dict[str, Any] = {
                "ops": totals["raw"].ok + totals["monk"].ok,
                "seconds": self.config.level_seconds,
            }
            for variant, t in totals.items():
                level[f"{variant}_ops"] = t.ok
                level[f"{variant}_per_s"] = stats.throughput(t.ok, t.seconds)
                level[f"{variant}_failures"] = t.failed
                level[f"{variant}_seconds"] = round(t.seconds, 3)
                if t.errors:
                    level[f"{variant}_errors"] = t.errors[:3]
            level["monk_roles_from_pool"] = roles_used
            out[str(c)] = level
        self._progress("throughput", len(levels), len(levels))
        return out

    def _parallel_raw(
        self, threads: int, seconds: float
    ) -> tuple[int, int, float, list[str], list[str]]:
        """Raw clones from ``threads`` connections opened before the clock starts."""
        conns = [
            open_connection(self.target, autocommit=True, purpose="bench-raw")
            for _ in range(threads)
        ]
        try:
            local = threading.local()
            spare = iter(conns)
            spare_lock = threading.Lock()
            query = sql.SQL("CREATE DATABASE {} TEMPLATE {}")

            def clone(name: str) -> None:
                conn = getattr(local, "conn", None)
                if conn is None:
                    with spare_lock:
                        conn = local.conn = next(spare)
                conn.execute(query.format(sql.Identifier(name), sql.Identifier(self._template_db)))

            return self._parallel(threads, seconds, lambda: self.db_name("traw"), clone)
        finally:
            for conn in conns:
                conn.close()

    def _parallel(
        self,
        threads: int,
        seconds: float,
        new_name: Callable[[], str],
        work: Callable[[str], object],
    ) -> tuple[int, int, float, list[str], list[str]]:
        """Run ``work`` on new names from ``threads`` threads started together, each starting
        operations until ``seconds`` have passed; returns (successes, failures, wall seconds
        until the last operation ended, first errors, every name used). A KeyboardInterrupt
        stops starting operations, waits for the threads' current ones, and propagates."""
        names: list[str] = []
        lock = threading.Lock()
        stop = threading.Event()
        start = threading.Barrier(threads + 1)
        counts = {"ok": 0, "failed": 0}
        errors: list[str] = []
        deadline = [0.0]

        def worker() -> None:
            try:
                start.wait()
            except threading.BrokenBarrierError:
                return
            while not stop.is_set() and time.perf_counter() < deadline[0]:
                with lock:
                    name = new_name()
                    names.append(name)
                try:
                    work(name)
                except Exception as exc:
                    with lock:
                        counts["failed"] += 1
                        if len(errors) < 3:
                            errors.append(_describe(exc))
                else:
                    with lock:
                        counts["ok"] += 1

        pool = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
        for thread in pool:
            thread.start()
        try:
            t0 = time.perf_counter()
            deadline[0] = t0 + seconds
            start.wait()
            for thread in pool:
                thread.join()
            elapsed = time.perf_counter() - t0
        except BaseException:
            stop.set()
            start.abort()
            for thread in pool:
                thread.join()
            raise
        return counts["ok"], counts["failed"], elapsed, errors, names

    # ------------------------------------------------------------------ clean-up

    def _drop_databases(self, adm: Conn, names: Sequence[str]) -> list[str]:
        """Drop these databases (missing ones are fine); returns those that could not be."""
        failed = []
        for name in names:
            try:
                admin.drop_database(adm, name)
            except Exception as exc:
                log.warning("bench could not drop %s: %s", name, _describe(exc))
                failed.append(name)
        return failed

    def _purge_all(self, svc: TenantService, names: Sequence[str]) -> list[str]:
        """Purge (no archive, forget) every live tenant among ``names``; returns the failures."""
        failed = []
        for name in names:
            try:
                purge.request_purge(svc, name, archive=False, forget=True)
            except TenantNotFound:
                continue
            except Exception as exc:
                log.warning("bench could not purge %s: %s", name, _describe(exc))
                failed.append(name)
        try:
            purge.work_queue(svc)
        except Exception as exc:
            log.warning("bench purge queue failed: %s", _describe(exc))
            failed.append("purge queue")
        return failed

    def _run_tenants(self, svc: TenantService, *, exclude_status: str = "") -> list[str]:
        prefix = f"bench {self.run_id} "
        with svc.hosts.pools().system() as reg:
            rows = reg.execute(
                "SELECT name FROM tenants WHERE name LIKE %s AND status <> %s",
                (_like_prefix(prefix), exclude_status),
            ).fetchall()
        return [str(r[0]) for r in rows]

    def cleanup(self, svc: TenantService, pool_api: Any | None) -> list[str]:
        """Remove every tenant, database and spare of this run; returns what is left."""
        left: list[str] = []
        try:
            # A tenant interrupted while being deprovisioned is already queued ('deleting'):
            # the queue run of _purge_all finishes it. What still exists after is left behind.
            self._purge_all(svc, self._run_tenants(svc, exclude_status="deleting"))
            left += [f"tenant {t!r}" for t in self._run_tenants(svc)]
        except Exception as exc:
            left.append(f"tenants ({_describe(exc)})")
        try:
            role_pool.drop_own(svc)
        except Exception as exc:
            left.append(f"spare roles ({_describe(exc)})")
        if pool_api is not None:
            try:
                # The spares filled for warm handouts and not handed out; then the ones that
                # were there before the run, made again.
                pool_api.drain(svc, key=self.config.template)
                if self._spares_before:
                    pool_api.fill(svc, self.config.template, self._spares_before)
            except Exception as exc:
                left.append(f"spares ({_describe(exc)})")
        try:
            with connect(self.target, autocommit=True, purpose="bench-cleanup") as adm:
                pattern = _like_prefix(f"{DB_PREFIX}{self.run_id}_")
                left += self._drop_databases(adm, admin.list_databases(adm, pattern))
        except Exception as exc:
            left.append(f"databases ({_describe(exc)})")
        return sorted(set(left))


def _deprovision_summary(answer: _Samples, dropped: _Samples) -> dict[str, Any]:
    return {
        "answer": answer.summary(),
        "dropped": dropped.summary(),
        "meaning": "answer: request_purge returns (the caller's answer); dropped: until "
        "the background drop finished (request + queue work)",
    }


def _free_bytes(path: Path) -> int:
    """Free bytes on ``path``'s filesystem; on a tmpfs no more than the memory available
    (less 2 GiB for everything else), which is what its pages take. 0 when unknown."""
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return 0
    if _filesystem_type(path) == "tmpfs":
        available = _meminfo_bytes("MemAvailable")
        free = min(free, max(available - 2 * 2**30, 0)) if available is not None else 0
    return free


def _filesystem_type(path: Path) -> str:
    """The type of the filesystem ``path`` is on, from /proc/mounts ("" when unknown)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
        resolved = path.resolve()
    except OSError:
        return ""
    best, kind = -1, ""
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = Path(fields[1].replace("\\040", " "))
        if (resolved == point or point in resolved.parents) and len(point.parts) > best:
            best, kind = len(point.parts), fields[2]
    return kind


def _meminfo_bytes(field_name: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key == field_name:
                return int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB"


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _without_spares(settings: Settings, key: str) -> Settings:
    """These settings with no spares configured for ``key``: only the bench fills the pool, one
    spare right before each warm handout, so no spare waits where a cold provision runs."""
    spares = getattr(settings, "pool_spares", None)
    if not isinstance(spares, dict):
        return settings
    return settings.model_copy(update={"pool_spares": {**spares, key: 0}})


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Clean-up runs to the end even if Ctrl-C is pressed again (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


_ORDER = (
    "monk_version",
    "started_at",
    "duration_s",
    "server",
    "machine",
    "template",
    "config",
    "raw",
    "scratch",
    "cold",
    "warm",
    "deprovision",
    "throughput",
    "ratios",
    "targets",
    "notes",
)


def _ordered(result: dict[str, Any]) -> dict[str, Any]:
    return {k: result[k] for k in _ORDER if k in result} | {
        k: v for k, v in result.items() if k not in _ORDER
    }
