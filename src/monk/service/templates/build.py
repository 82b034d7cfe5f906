"""A build: turn a validated plan into a closed template database and swap it in.

A build of key ``K`` at version ``V`` (the content hash of the source and the compiler):

    validate     load the source and its parents, compile schemas, validate seed records
    journal      a ``template_builds`` row (status building) and an ``operations`` row
    create       database ``monk_staging_K_V``, owned by the admin role
    extensions   ``CREATE EXTENSION`` of each one template.json names, as the admin role (an
                 extension the server lacks fails the build before its journal row, by name)
    core_tables  users, schemas, columns (as ``pg_database_owner``, which owns every object
                 inside a template: in each clone that is whoever owns the database, i.e. the
                 tenant's role, with no per-tenant ownership change)
    tables       one table per schema, its indexes and updated_at trigger
    registry     the ``schemas`` and ``columns`` rows
    seed         the seed records
    migrations   ``migrations/NNNN_*.sql`` in order, each in its own transaction
    sync         the ``columns`` rows of registered tables follow the catalog (what migrations
                 added, dropped or altered: ``template_db.SYNC_COLUMNS``)
    health       tables match their ``columns`` rows, row counts, constraints valid, ownership;
                 then ANALYZE, so that clones start with planner statistics
    close        REVOKE CONNECT FROM PUBLIC; ALLOW_CONNECTIONS false, IS_TEMPLATE true; no session
    swap         in ONE transaction: ``monk_template_K`` → ``monk_retired_K_<old version>`` and
                 staging → ``monk_template_K``; then the registry marks old retired, new current
                 and records the upgrade step from the old build (``steps``), computed before
                 the journal: a change it cannot apply fails the build before anything is made

Clones in flight hold a lock on their source database, so the renames wait for them; a clone that
starts during the swap waits for the renaming transaction and then clones whatever is named
``monk_template_K`` when it commits (the new build). The build version is also written inside
the template (``COMMENT ON SCHEMA public``, copied by every clone: see ``clone_marker``), so the
tenant side can tell which build a clone really came from.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import psycopg

import monk
from monk.adapters.postgres import admin, bulk_seed, template_db
from monk.adapters.postgres import catalog as catalog_reader
from monk.adapters.postgres.connection import ServerTarget, connect, translate
from monk.adapters.registry import templates as builds
from monk.adapters.registry import upgrades
from monk.adapters.registry.templates import NewBuild, TemplateBuild
from monk.core.schema_compiler import COMPILER_VERSION, core_tables_ddl
from monk.core.template_names import (
    BUILD_STEPS,
    CREATE_STEP,
    retired_db_name,
    staging_db_name,
    template_db_name,
)
from monk.errors import DatabaseExists, InvalidTemplateSource, MonkError, OperationFailed
from monk.service.templates import recovery, steps
from monk.service.templates.health import OWNER_ROLE, expected_counts, inspect
from monk.service.templates.sources import Plan
from monk.service.templates.steps import migration_level
from monk.settings import Settings
from monk.templates.source import TemplateSource

log = logging.getLogger(__name__)

Conn = psycopg.Connection[Any]

__all__ = [
    "BUILD_STEPS",
    "BuildResult",
    "Progress",
    "build_locked",
    "pg_message",
    "record_unreachable",
]

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BuildResult:
    build: TemplateBuild
    built: bool
    """False when the current build already had this version (and ``force`` was not given)."""


def build_locked(
    reg: Conn,
    adm: Conn,
    target: ServerTarget,
    settings: Settings,
    plan: Plan,
    *,
    force: bool,
    report: Progress,
    same_server: bool = True,
) -> BuildResult:
    """With the key's lock held on ``reg``: settle a crashed build of the key, then build
    ``plan`` unless the current build already has its version (and not ``force``)."""
    key = plan.source.key
    recovery.recover_key(reg, adm, target, key)
    current = builds.current_build(reg, key, target.name)
    if current is not None and not admin.database_exists(adm, current.database):
        log.warning("current build of %s lost its database %s", key, current.database)
        builds.mark_dropped(reg, current.id, error="its database disappeared")
        current = None
    if current is not None and current.version == plan.version and not force:
        report("up_to_date")
        return BuildResult(current, built=False)
    if current is None and admin.database_exists(adm, template_db_name(key)):
        raise DatabaseExists(
            f"database {template_db_name(key)} exists but is not a build registered in "
            f"{settings.system_db_name}; drop it or choose another template key",
            database=template_db_name(key),
        )
    return BuildResult(
        _build(reg, adm, target, settings, plan, current, report, same_server), built=True
    )


class _Builder:
    """State of one build in progress, so a failure knows what to undo."""

    def __init__(self, reg: Conn, build_id: UUID, op_id: UUID, staging: str) -> None:
        self.reg = reg
        self.build_id = build_id
        self.op_id = op_id
        self.staging = staging

    def step(self, name: str, settings: Settings, report: Progress) -> None:
        report(name)
        builds.set_build_step(self.reg, self.op_id, name)
        _checkpoint(settings, name)


def _checkpoint(settings: Settings, step: str) -> None:
    """Test hook (MONK_FAULT_PAUSE_AT=template_build:<step>): stop so a test can kill -9 us."""
    if settings.fault_pause_at == f"template_build:{step}":
        sys.stderr.write(f"monk: paused at template_build:{step}\n")
        sys.stderr.flush()
        time.sleep(3600)


def _build(
    reg: Conn,
    adm: Conn,
    target: ServerTarget,
    settings: Settings,
    plan: Plan,
    current: TemplateBuild | None,
    report: Progress,
    same_server: bool = True,
) -> TemplateBuild:
    started = time.monotonic()
    source, key = plan.source, plan.source.key
    staging = staging_db_name(key, plan.version)
    missing = admin.missing_extensions(adm, source.extensions)
    if missing:
        raise InvalidTemplateSource(
            f"template {key!r} ({source.path}): template.json: the PostgreSQL server "
            f"{target.name} has no extension {', '.join(map(repr, missing))}; install it "
            'there (e.g. the server\'s contrib package) or remove it from "extensions"',
            file="template.json",
        )
    step = None
    if current is not None and current.version != plan.version:
        step = steps.upgrade_step(reg, current, plan)
    report("journal")
    build_id, op_id = builds.start_build(reg, _new_build(plan, target, staging))
    b = _Builder(reg, build_id, op_id, staging)
    try:
        b.step(CREATE_STEP, settings, report)
        # From template0, which no one can connect to: a session on template1 (any tenant
        # may open one on a server monk does not own) would make CREATE DATABASE fail.
        admin.create_database(adm, staging, template="template0")
        with connect(target, staging, purpose="template-build") as db:
            _fill(db, b, settings, plan, report)
            b.step("health", settings, report)
            # Migrations and bulk seeds add rows the records alone do not predict.
            exact = not plan.source.migrations and not plan.source.bulk
            expected = expected_counts(plan) if exact else None
            health = inspect(db, staging, expected)
            catalog_ms = 0.0
            if health.ok:
                # What drift compares tenants with: read once, before the template is closed.
                catalog_started = time.monotonic()
                catalog = catalog_reader.read_catalog(db)
                builds.record_catalog(reg, build_id, catalog.as_dict(), catalog.fingerprint())
                catalog_ms = round((time.monotonic() - catalog_started) * 1000, 1)
            db.commit()
            if health.ok:
                # Clones copy the statistics: every tenant plans with them from its first query,
                # and autovacuum has no analyze to run on the closed template. Not VACUUM: its
                # visibility and free-space maps are two more files per table, and creating
                # files is most of what a clone costs.
                template_db.reset_role(db)
                template_db.analyze(db)
                db.commit()
        if not health.ok:
            raise OperationFailed(
                f"template {key!r} failed its health checks: {'; '.join(health.problems)}",
                step="health",
            )
        b.step("close", settings, report)
        admin.revoke_all_from_public(adm, staging)
        admin.close_database(adm, staging, as_template=True)
        stats: dict[str, Any] = {
            "table_count": health.table_count,
            "record_count": health.record_count,
            "size_bytes": admin.database_size(adm, staging),
            "server_version": admin.server_version(adm),
            "migration_level": migration_level(source),
            "catalog_ms": catalog_ms,
        }
        b.step("swap", settings, report)
        if current is not None:
            _free_retired_name(reg, adm, target, current)
        builds.set_build_result(reg, b.op_id, stats)
        _checkpoint(settings, "swap_renames")
        # The renames and the registry change commit together (ALTER DATABASE … RENAME runs in a
        # transaction on the system database's connection): whoever reads the registry knows
        # which build the name monk_template_<key> stands for. On another host the renames
        # commit there first, then the registry: a crash between them is finished by the next
        # build's recovery (journal step swap, staging name gone), as on one server.
        ddl = reg if same_server else adm
        # One connection: the inner block is a savepoint. Two: the remote commits first.
        with reg.transaction(), ddl.transaction():
            if current is not None:
                admin.terminate_sessions(ddl, current.database)
                admin.rename_database(ddl, current.database, retired_db_name(key, current.version))
            admin.rename_database(ddl, staging, template_db_name(key))
            _checkpoint(settings, "swap_registry")
            stats["duration_ms"] = int((time.monotonic() - started) * 1000)
            builds.finish_swap(reg, key, target.name, build_id, b.op_id, stats)
            if step is not None:
                upgrades.record_step(reg, target.name, key, step)
    except BaseException as exc:
        _undo(reg, adm, b, exc)
        if (known := translate(exc)) is not None:
            raise known from exc
        if isinstance(exc, psycopg.Error):
            raise OperationFailed(
                f"building template {key!r} failed: {pg_message(exc)}",
                step=builds.operation_step(reg, b.op_id) or "build",
            ) from None
        raise
    built = builds.get(reg, build_id)
    log.info("built template %s version %s in %s ms", key, built.version, built.duration_ms)
    return built


def _new_build(plan: Plan, target: ServerTarget, staging: str) -> NewBuild:
    source = plan.source
    compiled_schemas, manifest = steps.recorded_for_successor(plan)
    return NewBuild(
        key=source.key,
        version=plan.version,
        database=staging,
        host=target.name,
        description=source.description,
        version_label=source.version_label or None,
        parent_key=source.extends,
        source=str(source.path),
        database_settings=source.database_settings,
        monk_version=monk.__version__,
        compiler_version=COMPILER_VERSION,
        compiled_schemas=compiled_schemas,
        migration_manifest=manifest,
        clone_strategy=source.clone_strategy,
    )


def record_unreachable(reg: Conn, target: ServerTarget, plan: Plan, exc: MonkError) -> None:
    """A host the build could not reach: a failed build row on it says why (its state in the
    registry, as a build that failed a step), nothing was made there."""
    staging = staging_db_name(plan.source.key, plan.version)
    build_id, op_id = builds.start_build(reg, _new_build(plan, target, staging))
    builds.mark_failed(reg, build_id, op_id, str(exc), str(exc))


def _fill(db: Conn, b: _Builder, settings: Settings, plan: Plan, report: Progress) -> None:
    """Everything inside the staging database, as the owner role; one transaction per step."""
    source = plan.source
    b.step("extensions", settings, report)
    for extension in source.extensions:
        try:
            admin.create_extension(db, extension)
        except psycopg.Error as exc:
            raise _refused(source, f"template.json: extension {extension!r}", exc) from None
    db.commit()
    # pg_database_owner owns the public schema (PostgreSQL 15+), so it may create in it.
    template_db.set_role(db, OWNER_ROLE)
    db.commit()
    b.step("core_tables", settings, report)
    for statement in core_tables_ddl():
        db.execute(statement)
    db.commit()
    b.step("tables", settings, report)
    for table in plan.compiled.tables:
        try:
            for statement in (table.create, *table.indexes, table.trigger):
                db.execute(statement)
        except psycopg.Error as exc:
            raise _refused(source, f"schemas/{table.name}.json", exc) from None
    db.commit()
    b.step("registry", settings, report)
    for query, params in plan.compiled.registry_inserts():
        db.execute(query, params)
    db.commit()
    b.step("seed", settings, report)
    for (query, params), (table_name, index) in zip(plan.seeds, plan.seed_origins, strict=True):
        try:
            db.execute(query, params)
        except psycopg.Error as exc:
            raise _refused(source, f"data/{table_name}.json: record {index}", exc) from None
    db.commit()
    if source.bulk:
        b.step("bulk_seed", settings, report)
        _load_bulk(db, source, {t.name for t in plan.compiled.tables}, report)
        db.commit()
    b.step("migrations", settings, report)
    for migration in source.migrations:
        try:
            with db.transaction():
                db.execute(migration.sql.encode())
        except psycopg.Error as exc:
            raise _refused(source, f"{migration.template}/{migration.path}", exc) from None
    b.step("sync", settings, report)
    template_db.sync_columns(db)
    template_db.reset_role(db)
    template_db.write_marker(db, source.key, plan.version)
    template_db.write_build_record(db, source.key, plan.version, migration_level(source))
    db.commit()


def _load_bulk(db: Conn, source: TemplateSource, tables: set[str], report: Progress) -> None:
    """The seed/ files, with COPY in 1 MB chunks; progress every tenth of each file."""
    for table, path in sorted(source.bulk.items()):
        where = f"seed/{path.name}"
        if table not in tables:
            raise InvalidTemplateSource(
                f"template {source.key!r} ({source.path}): {where}: there is no schema "
                f"schemas/{table}.json for these rows",
                file=where,
            )
        shown = -1

        def progress(sent: int, total: int, where: str = where) -> None:
            nonlocal shown
            tenth = sent * 10 // max(total, 1)
            if tenth != shown:
                shown = tenth
                report(f"bulk seed {where}: {sent / 2**20:.0f} of {total / 2**20:.0f} MB")

        try:
            rows = bulk_seed.load(db, table, path, progress)
        except psycopg.Error as exc:
            raise _refused(source, where, exc) from None
        log.info("template %s: %d rows from %s", source.key, rows, where)


def pg_message(exc: psycopg.Error) -> str:
    diag = exc.diag
    message = diag.message_primary or str(exc).strip()
    if diag.message_detail:
        message += f" ({diag.message_detail})"
    return message


def _refused(source: TemplateSource, where: str, exc: psycopg.Error) -> InvalidTemplateSource:
    return InvalidTemplateSource(
        f"template {source.key!r} ({source.path}): {where}: PostgreSQL refused it: "
        f"{pg_message(exc)}",
        file=where,
    )


def _undo(reg: Conn, adm: Conn, b: _Builder, exc: BaseException) -> None:
    """Undo a failed build: its staging database dropped, its row marked failed; the current
    build is untouched."""
    error = str(exc) if isinstance(exc, MonkError) else f"{type(exc).__name__}: {exc}"
    if isinstance(exc, psycopg.Error):
        error = pg_message(exc)
    try:
        admin.drop_database(adm, b.staging)
        builds.mark_failed(reg, b.build_id, b.op_id, error, error)
    except (MonkError, psycopg.Error):
        # The server went away: the row stays 'building' and the next build cleans up.
        log.exception("could not undo the failed build of %s", b.staging)


def _free_retired_name(reg: Conn, adm: Conn, target: ServerTarget, current: TemplateBuild) -> None:
    """An earlier build of the current version may still sit, retired, under the name the
    current build is about to take (a forced rebuild, or A → B → A): same version, same
    content; drop it."""
    name = retired_db_name(current.key, current.version)
    rows = builds.builds_named(reg, target.name, name)
    if not admin.database_exists(adm, name):
        for row in rows:
            builds.mark_dropped(reg, row.id, error="its database disappeared")
        return
    if not rows:
        raise DatabaseExists(
            f"database {name} exists but is not a build registered here; drop it first",
            database=name,
        )
    admin.drop_database(adm, name)
    for row in rows:
        builds.mark_dropped(reg, row.id)
