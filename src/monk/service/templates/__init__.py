"""Template builds: turn a template source into a closed template database, track and retire it.

``TemplateService`` is the one entry point, one method per operation, on the server's pooled
connections (``ServerPools``: the system database and the maintenance database). Its modules,
by concern:

    sources     where a key's source is, what it holds, its validated plan (no database)
    build       the build's steps, from the staging database to the swap (see its docstring)
    health      the checks of a staging build and ``check`` of the current one (a scratch clone)
    lifecycle   show, drop and prune builds
    recovery    what crashed builds and checks leave behind, and settling it

Their SQL is in the adapters: ``monk.adapters.registry.templates`` (the system database),
``monk.adapters.postgres.admin`` (server DDL) and ``monk.adapters.postgres.template_db``
(statements inside the database being built). A build also opens a connection of its own to
its staging database, and ``check`` one to its scratch clone.

No HTTP request builds a template implicitly: ``ensure_built`` is for ``monk serve``'s start-up
and the CLI; a provision of a key with no build raises TemplateNotBuilt.
"""

from __future__ import annotations

import contextlib
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg

from monk.adapters.postgres import admin
from monk.adapters.postgres.connection import ServerTarget
from monk.adapters.postgres.pools import ServerPools
from monk.adapters.postgres.template_db import clone_marker
from monk.adapters.registry import templates as builds
from monk.adapters.registry.templates import TemplateBuild
from monk.core.catalog import Catalog
from monk.core.template_names import validate_template_key
from monk.errors import InvalidState, MonkError, TemplateNotBuilt, Unavailable
from monk.service.templates import health, lifecycle, recovery, sources
from monk.service.templates.build import (
    BUILD_STEPS,
    BuildResult,
    Progress,
    build_locked,
    record_unreachable,
)
from monk.service.templates.health import CHECK_DB_PREFIX, OWNER_ROLE, HealthReport
from monk.service.templates.sources import (
    available_keys,
    builtin_source_dir,
    describe_source,
    path_labels,
    pending_migrations,
    resolve_source,
    source_folders,
    source_origin,
)
from monk.settings import Settings
from monk.templates.source import Migration, TemplateSource, find_source

Conn = psycopg.Connection[Any]

__all__ = [
    "BUILD_STEPS",
    "CHECK_DB_PREFIX",
    "OWNER_ROLE",
    "BuildResult",
    "HealthReport",
    "Progress",
    "TemplateBuild",
    "TemplateService",
    "available_keys",
    "builtin_source_dir",
    "clone_marker",
    "describe_source",
    "missing_build",
    "path_labels",
    "pending_migrations",
    "resolve_source",
    "source_folders",
    "source_origin",
]


def missing_build(reg: Conn, host: str, settings: Settings, key: str) -> MonkError:
    """The error of a provision of ``key`` when the key has no ready build on ``host``:
    TemplateNotBuilt naming the command that builds it, or TemplateNotFound if there is no
    source to build it from (``reg``: the system database)."""
    if find_source(key, source_folders(settings)) is None and (
        sources.recorded_source(reg, host, key) is None
    ):
        return sources.no_source(key)
    return TemplateNotBuilt(
        f"template {key!r} has no build yet: run `monk template build {key}` "
        f"(or POST /api/root/template/{key})",
        template=key,
    )


class TemplateService:
    """The template builds of one server, on its pooled connections."""

    def __init__(self, settings: Settings, pools: ServerPools, *, owns_pools: bool = False) -> None:
        self.settings = settings
        self.pools = pools
        self._owns_pools = owns_pools

    @classmethod
    def open(cls, settings: Settings, target: ServerTarget) -> TemplateService:
        """A service with pools of its own (the CLI's): ``close`` closes them."""
        pools = ServerPools(target, settings.system_db_name, max_size=2)
        return cls(settings, pools, owns_pools=True)

    def close(self) -> None:
        if self._owns_pools:
            self.pools.close()

    def __enter__(self) -> TemplateService:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def target(self) -> ServerTarget:
        return self.pools.target

    @property
    def lock_host(self) -> str | None:
        """Whose key locks this service takes: None for the local host (the locks every other
        module takes), the host's name for another host (its builds run beside the local's)."""
        return None if self.pools.keeps_registry else self.target.name

    # ------------------------------------------------------------------------ build

    def build(
        self,
        key: str,
        *,
        force: bool = False,
        source_dir: Path | None = None,
        progress: Progress | None = None,
        recorded_anywhere: bool = False,
    ) -> BuildResult:
        """Build ``key`` (see ``monk.service.templates.build``); a no-op when the current build
        already has the source's version, unless ``force``. Bad input raises
        InvalidTemplateSource before any database exists; a failing step drops the staging
        database, marks the build failed and raises InvalidTemplateSource or OperationFailed
        naming the step; the current build is untouched until the swap. Without
        ``source_dir``, a key no configured folder has is rebuilt from the folder its builds
        were made from (by ``--source``: from anywhere if ``recorded_anywhere``, the CLI;
        else only inside a configured folder)."""
        report = progress or (lambda step: None)
        report("validate")
        if source_dir is None:
            with self.pools.system() as reg:
                source_dir = sources.rebuild_source(
                    reg, self.target.name, self.settings, key, anywhere=recorded_anywhere
                )
        plan = sources.plan(sources.resolve_source(self.settings, key, source_dir))
        with (
            self.pools.system() as reg,
            builds.key_lock(reg, key, self.lock_host),
            contextlib.ExitStack() as stack,
        ):
            try:
                adm = stack.enter_context(self.pools.admin())
            except Unavailable as exc:
                if not self.pools.keeps_registry:
                    # Another host, down or refusing: its state in the registry says so.
                    record_unreachable(reg, self.target, plan, exc)
                raise
            return build_locked(
                reg,
                adm,
                self.target,
                self.settings,
                plan,
                force=force,
                report=report,
                same_server=self.pools.keeps_registry,
            )

    def ensure_built(self, key: str) -> TemplateBuild:
        """The current build of ``key``, building it first if there is none (``monk serve``'s
        start-up and the CLI; never inside an HTTP request). Safe to call from several
        processes at once: they wait for one another on the key's lock, and the later ones
        find the build the first one made."""
        build = self.current_build(key)
        if build is not None:
            return build
        return self.build(key).build

    # ------------------------------------------------------------------------ reads

    def current_build(self, key: str) -> TemplateBuild | None:
        """The ready build tenants of ``key`` are cloned from, if there is one."""
        with self.pools.system() as reg:
            return builds.current_build(reg, validate_template_key(key), self.target.name)

    def require_built(self, key: str) -> TemplateBuild:
        """The current build of ``key``; TemplateNotBuilt (naming the command) if none."""
        with self.pools.system() as reg:
            build = builds.current_build(reg, validate_template_key(key), self.target.name)
            if build is None:
                raise missing_build(reg, self.target.name, self.settings, key)
        return build

    def list_builds(
        self, key: str | None = None, *, everything: bool = False
    ) -> list[TemplateBuild]:
        """Builds on this server, newest first per key; dropped ones only with ``everything``."""
        with self.pools.system() as reg:
            return builds.list_builds(reg, self.target.name, key, everything=everything)

    def show(self, key: str, version: str | None = None) -> TemplateBuild:
        """The current build of ``key``, or its latest build of ``version``."""
        validate_template_key(key)
        with self.pools.system() as reg:
            return lifecycle.show(reg, self.target.name, key, version)

    # ------------------------------------------------------------------------ health

    def check(self, key: str) -> HealthReport:
        """Re-run the health checks on the current build of ``key``, in a scratch clone (see
        ``monk.service.templates.health.check``)."""
        validate_template_key(key)
        with (
            self.pools.system() as reg,
            builds.key_lock(reg, key, self.lock_host),
            self.pools.admin() as adm,
        ):
            return health.check(reg, adm, self.target, self.settings, key)

    def build_catalog(self, key: str, version: str) -> tuple[TemplateBuild, Catalog] | None:
        """The catalog of ``key``'s build ``version`` (what drift compares tenants with): the
        one the build recorded, else read now from a scratch clone of it and recorded; None
        when it recorded none and its database is gone."""
        host = self.target.name
        with self.pools.system() as reg:
            for build in builds.builds_of_version(reg, key, host, version):
                if (found := builds.build_catalog(reg, build.id)) is not None:
                    return build, Catalog.from_dict(found)
            with builds.key_lock(reg, key, self.lock_host), self.pools.admin() as adm:
                # Under the lock: nobody drops it while it is cloned.
                for build in builds.live_builds_of_version(reg, key, host, version):
                    if not admin.database_exists(adm, build.database):
                        continue
                    catalog = health.read_build_catalog(reg, adm, self.target, self.settings, build)
                    builds.record_catalog(reg, build.id, catalog.as_dict(), catalog.fingerprint())
                    return builds.get(reg, build.id), catalog
        return None

    # ------------------------------------------------------------------------ lifecycle

    def drop(self, key: str, version: str | None = None, *, force: bool = False) -> TemplateBuild:
        """Remove a build (default: the current one) and its database. Refuses, unless
        ``force``, the current build and a build whose version live tenants record."""
        validate_template_key(key)
        with (
            self.pools.system() as reg,
            builds.key_lock(reg, key, self.lock_host),
            self.pools.admin() as adm,
        ):
            return lifecycle.drop(reg, adm, self.target, key, version, force=force)

    def prune(
        self,
        key: str | None = None,
        *,
        retired_before: datetime | None = None,
        wait: bool = True,
    ) -> list[TemplateBuild]:
        """Remove the retired builds (of ``key``, or of every key; retired before
        ``retired_before`` if given) that no tenant, archive or spare needs, and forget failed
        builds but the latest of each key. Without ``wait`` (``monk serve``'s schedule), a key
        whose lock someone holds (a build, a check) is left for the next time. A build whose
        database is busy is kept and the others still go; ``InvalidState`` then names it."""
        dropped: list[TemplateBuild] = []
        kept: list[str] = []
        with self.pools.system() as reg, self.pools.admin() as adm:
            for k in builds.keys_in_status(reg, self.target.name, ["retired", "failed"], key):
                lock = (
                    builds.key_lock(reg, k, self.lock_host)
                    if wait
                    else builds.key_lock_if_free(reg, k, self.lock_host)
                )
                with lock as taken:
                    if taken is False:
                        continue
                    dropped += lifecycle.prune_key(
                        reg, adm, self.target, k, retired_before=retired_before, kept=kept
                    )
        if kept:
            raise InvalidState(
                f"pruned {len(dropped)} build(s); {len(kept)} kept for the next prune, their "
                f"database busy: " + "; ".join(kept)
            )
        return dropped

    # ------------------------------------------------------------------------ sources

    def available_keys(self) -> list[str]:
        return available_keys(self.settings)

    def resolve_source(self, key: str, source_dir: Path | None = None) -> TemplateSource:
        return resolve_source(self.settings, key, source_dir)

    def describe_source(self, key: str, source_dir: Path | None = None) -> dict[str, Any]:
        return describe_source(self.settings, key, source_dir)

    def recorded_source(self, key: str) -> Path | None:
        """The folder the current build of ``key`` (else its newest build) was read from."""
        with self.pools.system() as reg:
            return sources.recorded_source(reg, self.target.name, key)

    def pending_migrations(self, build: TemplateBuild) -> list[Migration]:
        return pending_migrations(build, self.settings)

    # ------------------------------------------------------------------------ recovery

    def find_leftovers(self) -> list[str]:
        """What interrupted builds and checks left behind (see ``recovery``)."""
        with self.pools.system() as reg, self.pools.admin() as adm:
            return recovery.find_leftovers(reg, adm, self.target, self.settings, self.lock_host)

    def cleanup_leftovers(self) -> list[str]:
        """Settle what ``find_leftovers`` reports; builds and checks running now are left alone."""
        with self.pools.system() as reg, self.pools.admin() as adm:
            return recovery.cleanup_leftovers(reg, adm, self.target, self.settings, self.lock_host)
