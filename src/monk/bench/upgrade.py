"""``monk bench --upgrade``: a fleet upgrade measured against a loop of fresh connections.

In one run, on a template of its own (a copy of the built-in ``basic``: two tables):

    provision  N tenants of build A (untimed)
    baseline   build B (a property added to a JSON Schema, and a migration file indexing it),
               then the step applied to each tenant one by one over a fresh connection (what
               a loop of ``psql -f`` does; it also updates ``monk.build``, so that the tenants
               stay upgradable), timed
    monk       for each parallelism level: one more build of the same shape, then
               ``monk template upgrade`` of the N tenants (the service's run: journal, canary
               none, per-tenant locks and rows, registry), timed end to end
    no-op      the same run once more at the best level: every tenant skipped, and the
               sessions opened on the tenant databases counted (pg_stat_database)

Everything made (tenants, builds) is removed at the end.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from monk.adapters import registry
from monk.adapters.postgres import admin, upgrade_db
from monk.adapters.postgres.connection import ServerTarget, connect, open_connection
from monk.adapters.registry import upgrade_runs
from monk.adapters.registry import upgrades as upgrade_steps
from monk.service import upgrades
from monk.service.templates import TemplateService, builtin_source_dir
from monk.service.tenants import TenantService
from monk.settings import Settings

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]


class UpgradeBench:
    def __init__(
        self,
        settings: Settings,
        target: ServerTarget,
        *,
        tenants: int = 200,
        levels: Sequence[int] = (1, 2, 4, 8),
        progress: Progress | None = None,
    ) -> None:
        self.run_id = secrets.token_hex(3)
        self.key = f"bench_up_{self.run_id}"
        self.settings = settings.model_copy(
            update={"pool_spares": {**settings.pool_spares, self.key: 0}}
        )
        self.target = target
        self.n = tenants
        self.levels = tuple(levels)
        self.progress = progress or (lambda phase, done, total: None)
        self.source = Path(tempfile.mkdtemp(prefix="monk-bench-up-")) / self.key
        self._migrations = 0

    def run(self) -> dict[str, Any]:
        shutil.copytree(builtin_source_dir("basic"), self.source)
        (self.source / "migrations").mkdir(exist_ok=True)
        with (
            TenantService(self.settings, self.target) as svc,
            TemplateService.open(self.settings, self.target) as templates,
        ):
            try:
                return self._measure(svc, templates)
            finally:
                self._cleanup(svc, templates)
                shutil.rmtree(self.source.parent, ignore_errors=True)

    def _next_build(self, templates: TemplateService) -> str:
        """One more build of the same shape, as issue 12 says: one additive schema change (a
        property added to ``contact.json``: the step's schema diff adds the column and its
        ``columns`` row) plus one migration file (an index over it)."""
        self._migrations += 1
        m = self._migrations
        schema_file = self.source / "schemas" / "contact.json"
        schema = json.loads(schema_file.read_text())
        schema["properties"][f"note{m}"] = {"type": "string", "maxLength": 200}
        schema_file.write_text(json.dumps(schema, indent=2) + "\n")
        (self.source / "migrations" / f"{m:04d}_note{m}_index.sql").write_text(
            f"CREATE INDEX contact_note{m} ON contact (note{m});\n"
        )
        return templates.build(self.key, source_dir=self.source).build.version

    def _measure(self, svc: TenantService, templates: TemplateService) -> dict[str, Any]:
        a = templates.build(self.key, source_dir=self.source).build.version
        names = [f"bench {self.run_id} up {i}" for i in range(self.n)]
        made = [0]

        def provision(name: str) -> str:
            database = svc.provision(name, template=self.key).tenant.database
            made[0] += 1
            self.progress("provision", made[0], self.n)
            return database

        with ThreadPoolExecutor(4) as threads:
            databases = list(threads.map(provision, names))
        result: dict[str, Any] = {
            "tenants": self.n,
            "template": "basic (2 tables); per build: a JSON Schema property added (ADD COLUMN)"
            " + a migration file (CREATE INDEX)",
        }
        b = self._next_build(templates)
        result["baseline"] = self._baseline(svc, databases, a, b)
        runs: list[dict[str, Any]] = []
        for level in self.levels:
            self._next_build(templates)
            started = time.perf_counter()
            phase = f"upgrade, {level} at once"
            run = upgrades.begin(svc, self.key, upgrades.UpgradeOptions(parallel=level))
            report = run.execute(
                lambda p, phase=phase: self.progress(phase, p.finished, p.total)  # type: ignore[misc]
            )
            seconds = time.perf_counter() - started
            runs.append(
                {
                    "parallel": level,
                    "seconds": round(seconds, 3),
                    "tenants_per_s": round(self.n / seconds, 1),
                    "counts": report.counts,
                }
            )
        result["monk"] = runs
        best = min(runs, key=lambda r: r["seconds"])
        result["best"] = best
        result["speedup_over_baseline"] = round(result["baseline"]["seconds"] / best["seconds"], 2)
        with connect(self.target, autocommit=True, purpose="bench") as adm:
            before = admin.sessions_opened(adm, databases)
            started = time.perf_counter()
            noop = upgrades.begin(
                svc, self.key, upgrades.UpgradeOptions(parallel=best["parallel"])
            ).execute()
            seconds = time.perf_counter() - started
            time.sleep(0.5)  # session statistics are flushed when a session ends
            after = admin.sessions_opened(adm, databases)
        result["noop"] = {
            "seconds": round(seconds, 3),
            "counts": noop.counts,
            "tenant_sessions_opened": after - before,
        }
        return result

    def _baseline(
        self, svc: TenantService, databases: Sequence[str], a: str, b: str
    ) -> dict[str, Any]:
        """The step A → B applied to each tenant in turn over a fresh connection."""
        pools = svc.hosts.pools()
        with pools.system() as reg:
            steps = upgrade_steps.path(reg, self.target.name, self.key, a, b)
        assert steps, "the bench's build recorded no upgrade step"
        started = time.perf_counter()
        for i, database in enumerate(databases):
            with open_connection(self.target, database, purpose="bench") as conn:
                for step in steps:
                    upgrade_db.apply_script(conn, step.script)
                upgrade_db.set_build(conn, b, steps[-1].level)
                conn.commit()
            self.progress("baseline: one by one, fresh connections", i + 1, len(databases))
        seconds = time.perf_counter() - started
        # Untimed: the registry learns where the loop brought them.
        with pools.system() as reg:
            for t in upgrade_runs.tenants_of_key(reg, self.target.name, self.key):
                upgrade_runs.record_done(
                    reg, None, t.id, from_version=a, version=b, level=steps[-1].level
                )
        return {"seconds": round(seconds, 3), "tenants_per_s": round(len(databases) / seconds, 1)}

    def _cleanup(self, svc: TenantService, templates: TemplateService) -> None:
        """The bench's own scratch, removed directly: registry rows in one statement, then
        each database and role dropped directly (1,000 purges through the queue took minutes:
        a journal entry, a lock, an archive check and a forced checkpoint each)."""
        tenants: list[Any] = []
        with contextlib.suppress(Exception), svc.hosts.pools().system() as reg:
            tenants = upgrade_runs.tenants_of_key(reg, self.target.name, self.key)
            with reg.transaction():
                for t in tenants:
                    registry.delete_row(reg, t.id)

        def drop(chunk: Sequence[Any]) -> None:
            with connect(self.target, autocommit=True, purpose="bench") as adm:
                for t in chunk:
                    try:
                        admin.drop_database(adm, t.database)
                        if t.role_name:
                            admin.drop_role(adm, t.role_name)
                    except Exception as exc:
                        log.warning("bench could not drop %s: %s", t.database, exc)

        # Each DROP DATABASE waits for a forced checkpoint (~0.1-1 s on a disk); drops waiting
        # together share one, so 16 connections drop ~16 databases per checkpoint.
        with contextlib.suppress(Exception), ThreadPoolExecutor(16) as threads:
            list(threads.map(drop, [tenants[i::16] for i in range(16)]))
        for build in templates.list_builds(self.key):
            if build.status in ("ready", "retired"):
                with contextlib.suppress(Exception):
                    templates.drop(self.key, build.version, force=True)
