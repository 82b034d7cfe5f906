"""Template builds: turn a template source into a closed template database, track and retire it.

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
    health       tables match their ``columns`` rows, row counts, constraints valid, ownership;
                 then ANALYZE, so that clones start with planner statistics
    close        REVOKE CONNECT FROM PUBLIC; ALLOW_CONNECTIONS false, IS_TEMPLATE true; no session
    swap         in ONE transaction: ``monk_template_K`` → ``monk_retired_K_<old version>`` and
                 staging → ``monk_template_K``; then the registry marks old retired, new current

Clones in flight hold a lock on their source database, so the renames wait for them; a clone that
starts during the swap waits for the renaming transaction and then clones whatever is named
``monk_template_K`` when it commits (the new build). The build version is also written inside
the template (``COMMENT ON SCHEMA public``, copied by every clone: see ``clone_marker``), so the
tenant side can tell which build a clone really came from.

Concurrency and crashes: every build, check, drop and prune of a key holds a session advisory
lock on the key in the system database. A ``building`` row whose key lock nobody holds belongs to
a dead process; the next build of the key (and ``cleanup_leftovers``, run by ``monk doctor``)
drops its staging database and marks it failed, or, when the process died after the renames
committed but before the registry caught up (journal step ``swap``, staging name gone), finishes
the registry update. Advisory locks live in the system database, so they serialise the monk
processes of one installation; database names are cluster-wide, so two installations sharing a
server must not use the same template keys.

``check`` never opens the template: it clones the current build into a scratch database
``monk_check_K_<hex>``, runs the health checks there, and drops it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import secrets
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

import monk
from monk.adapters import registry
from monk.adapters.postgres import admin
from monk.adapters.postgres.connection import ServerTarget, connect, translate
from monk.core.identifiers import MAX_IDENTIFIER_BYTES
from monk.core.schema_compiler import (
    COMPILER_VERSION,
    CORE_TABLES,
    SYSTEM_COLUMNS,
    CompiledTemplate,
    Statement,
    compile_template,
    core_tables_ddl,
    seed_statements,
)
from monk.core.template_names import (
    STAGING_DB_PREFIX,
    retired_db_name,
    staging_db_name,
    template_db_name,
    validate_template_key,
    validate_version,
)
from monk.errors import (
    DatabaseExists,
    InvalidTemplateSource,
    MonkError,
    OperationFailed,
    TemplateInUse,
    TemplateNotFound,
)
from monk.settings import Settings
from monk.templates.source import (
    TEMPLATE_FILE,
    Migration,
    TemplateSource,
    builtin_sources_dir,
    content_hash,
    find_source,
    load_source,
    resolve_parents,
)

log = logging.getLogger(__name__)

Conn = psycopg.Connection[Any]

OWNER_ROLE = "pg_database_owner"
"""Owner of every object inside a template (not of the template database itself): the built-in
role whose only member is the owner of the current database. A tenant's role owns its clone,
and so owns every object in it, without reassigning anything."""

CHECK_DB_PREFIX = "monk_check_"
_MARKER_PREFIX = "monk template "

BUILD_STEPS = (
    "validate",
    "journal",
    "create",
    "extensions",
    "core_tables",
    "tables",
    "registry",
    "seed",
    "migrations",
    "health",
    "close",
    "swap",
)
"""The steps a build reports to its ``progress`` callback, in order (``up_to_date`` instead of
all after ``validate`` when the current build already has the source's version)."""

Progress = Callable[[str], None]


# ---------------------------------------------------------------------------- data


@dataclass(frozen=True)
class TemplateBuild:
    """One row of ``template_builds``."""

    id: UUID
    key: str
    version: str
    database: str
    host: str
    status: str
    is_current: bool
    description: str | None
    version_label: str | None
    parent_key: str | None
    source: str | None
    migration_level: int
    database_settings: dict[str, str]
    table_count: int | None
    record_count: int | None
    size_bytes: int | None
    duration_ms: int | None
    monk_version: str | None
    compiler_version: str | None
    server_version: str | None
    error: str | None
    created_at: datetime
    built_at: datetime | None
    retired_at: datetime | None
    dropped_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name, value in out.items():
            if isinstance(value, datetime):
                out[name] = value.isoformat()
            elif isinstance(value, UUID):
                out[name] = str(value)
        return out


@dataclass(frozen=True)
class BuildResult:
    build: TemplateBuild
    built: bool
    """False when the current build already had this version (and ``force`` was not given)."""


@dataclass(frozen=True)
class HealthReport:
    """What the health checks found in one database (a staging build or a scratch clone)."""

    database: str
    table_count: int
    record_count: int
    counts: dict[str, int]
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"ok": self.ok}


_BUILD_COLUMNS = registry.rendered(
    sql.SQL(", ").join(sql.Identifier(f.name) for f in dataclasses.fields(TemplateBuild))
)


# ---------------------------------------------------------------------------- sources


def source_folders(settings: Settings) -> list[Path]:
    """Where sources are looked up by key: the built-ins first, then ``MONK_TEMPLATE_PATH``."""
    return [builtin_sources_dir(), *settings.template_path]


def builtin_source_dir(key: str) -> Path:
    """The folder of the built-in source ``key`` (``empty``, ``basic``, ``crm``)."""
    path = builtin_sources_dir() / validate_template_key(key)
    if not (path / TEMPLATE_FILE).is_file():
        raise TemplateNotFound(f"there is no built-in template source {key!r}", template=key)
    return path


def available_keys(settings: Settings) -> list[str]:
    """Every key a source folder provides (a key found twice counts once), sorted."""
    keys: set[str] = set()
    for folder in source_folders(settings):
        if folder.is_dir():
            keys.update(
                entry.name
                for entry in folder.iterdir()
                if (entry / TEMPLATE_FILE).is_file() and not entry.name.startswith(".")
            )
    return sorted(keys)


def resolve_source(settings: Settings, key: str, source_dir: Path | None = None) -> TemplateSource:
    """Load the source of ``key`` (from ``source_dir`` if given) merged with its parents.

    Parents are looked up in the source folders, then next to ``source_dir``. An unknown key
    raises TemplateNotFound; anything wrong in the files InvalidTemplateSource naming the file.
    """
    validate_template_key(key)
    folders = source_folders(settings)
    if source_dir is None:
        path = find_source(key, folders)
        if path is None:
            raise _no_source(key)
    else:
        path = source_dir.resolve()
        folders = [*folders, path.parent]
    source = load_source(path, key)
    return resolve_parents(source, lambda parent: find_source(parent, folders))


def _no_source(key: str) -> TemplateNotFound:
    # No folder names: this message reaches HTTP clients, who must not learn server paths.
    return TemplateNotFound(
        f"no template source {key!r}: it is neither built in nor in a folder of "
        f"MONK_TEMPLATE_PATH ('monk template sources' lists them); a folder elsewhere is built "
        f"with 'monk template build {key} --source DIR'",
        template=key,
    )


def source_origin(settings: Settings, source: str | None) -> str | None:
    """Where a build's recorded source folder is, without the path (what HTTP answers show):
    ``builtin``, ``MONK_TEMPLATE_PATH``, or ``--source`` (a folder given to the CLI)."""
    if source is None:
        return None
    path = Path(source)
    if _inside(path, [builtin_sources_dir()]):
        return "builtin"
    if _inside(path, settings.template_path):
        return "MONK_TEMPLATE_PATH"
    return "--source"


def _inside(path: Path, folders: Sequence[Path]) -> bool:
    resolved = path.resolve()
    return any(resolved.is_relative_to(folder.resolve()) for folder in folders)


def path_labels(settings: Settings) -> dict[str, str]:
    """The server folders monk knows, each with the name it is shown by instead (see
    ``monk.core.redact``): sources, data and archive folders."""
    labels = {str(settings.data_dir): "<MONK_DATA_DIR>", str(settings.archives): "<archives>"}
    labels |= {str(folder): "<MONK_TEMPLATE_PATH>" for folder in settings.template_path}
    labels[str(builtin_sources_dir())] = "<builtin>"
    return labels | {str(Path(k).resolve()): v for k, v in labels.items()}


def recorded_source(target: ServerTarget, settings: Settings, key: str) -> Path | None:
    """The folder the current build of ``key`` (else its newest build) was read from."""
    builds = list_builds(target, settings, key, everything=True)
    # Stable sort: the current build first, then newest first as listed.
    for build in sorted(builds, key=lambda b: not b.is_current):
        if build.source:
            return Path(build.source)
    return None


def rebuild_source(
    target: ServerTarget, settings: Settings, key: str, *, anywhere: bool
) -> Path | None:
    """The folder a build of ``key`` without ``--source`` reads: None when a configured folder
    (built-in, MONK_TEMPLATE_PATH) has the key; else the folder its builds were made from (by
    ``--source``), if ``anywhere`` (the CLI, run by the operator who chose that folder) or if
    it lies inside a configured folder (the HTTP API reads no other). TemplateNotFound says how
    to rebuild otherwise, naming no path."""
    if find_source(validate_template_key(key), source_folders(settings)) is not None:
        return None
    recorded = recorded_source(target, settings, key)
    if recorded is None:
        raise _no_source(key)
    if not (anywhere or _inside(recorded, source_folders(settings))):
        raise TemplateNotFound(
            f"template {key!r} was built from a folder given to 'monk template build {key} "
            "--source DIR', which the HTTP API does not read: rebuild it with that command, or "
            "add the folder that holds it to MONK_TEMPLATE_PATH",
            template=key,
        )
    if not (recorded / TEMPLATE_FILE).is_file():
        raise TemplateNotFound(
            f"the folder template {key!r} was last built from is gone; rebuild it with "
            f"'monk template build {key} --source DIR'",
            template=key,
        )
    return recorded


@dataclass(frozen=True)
class _Plan:
    """A validated source, ready to execute: nothing wrong with it can be seen without a DB."""

    source: TemplateSource
    version: str
    compiled: CompiledTemplate
    seeds: list[Statement]
    seed_origins: list[tuple[str, int]]  # (table, record index) of each seed statement


def _plan(source: TemplateSource) -> _Plan:
    try:
        compiled = compile_template(source.schemas)
        seeds = seed_statements(compiled, source.data)
    except InvalidTemplateSource as exc:
        raise InvalidTemplateSource(
            f"template {source.key!r} ({source.path}): {exc.message}", **exc.details
        ) from None
    # seed_statements emits the records table by table in creation order.
    origins = [
        (table.name, index)
        for table in compiled.tables
        for index in range(len(source.data.get(table.name, ())))
    ]
    assert len(origins) == len(seeds)
    return _Plan(source, content_hash(source), compiled, seeds, origins)


def pending_migrations(build: TemplateBuild, settings: Settings) -> list[Migration]:
    """Migrations of the build's source newer than the build (for tenants cloned from it).

    The source is read again from where the build read it (or found by key if that folder is
    gone); a source that no longer loads raises InvalidTemplateSource.
    """
    path = Path(build.source) if build.source else None
    if path is not None and not (path / TEMPLATE_FILE).is_file():
        path = None
    source = resolve_source(settings, build.key, path)
    return [m for m in source.migrations if m.number > build.migration_level]


# ---------------------------------------------------------------------------- registry reads


def _system(target: ServerTarget, settings: Settings, purpose: str) -> Any:
    return connect(target, settings.system_db_name, autocommit=True, purpose=purpose)


def _fetch(conn: Conn, where: str, params: Sequence[Any]) -> list[TemplateBuild]:
    query = sql.SQL("SELECT {} FROM template_builds WHERE ").format(_BUILD_COLUMNS) + sql.SQL(
        where  # constant SQL written in this module
    )
    with conn.cursor(row_factory=class_row(TemplateBuild)) as cur:
        cur.execute(query, params)
        return cur.fetchall()


def current_build(conn: Conn, key: str, host: str) -> TemplateBuild | None:
    """The ready build tenants of ``key`` on ``host`` are cloned from; ``conn``: system DB."""
    rows = _fetch(conn, "key = %s AND host = %s AND is_current", (key, host))
    return rows[0] if rows else None


def current_builds(conn: Conn, host: str) -> list[TemplateBuild]:
    """The current build of every key on ``host``."""
    return _fetch(conn, "host = %s AND is_current", (host,))


def settings_by_build(conn: Conn, host: str) -> dict[tuple[str, str], dict[str, str]]:
    """The database settings each build (key, version) on ``host`` gives its clones."""
    return {
        (b.key, b.version): dict(b.database_settings) for b in _fetch(conn, "host = %s", (host,))
    }


def current_build_id(conn: Conn, key: str, host: str) -> UUID | None:
    """``current_build``'s id alone: what a provision checks after each clone (reading the
    whole row costs the client ~0.3 ms of CPU, its timestamps and JSON parsed)."""
    row = conn.execute(
        "SELECT id FROM template_builds WHERE key = %s AND host = %s AND is_current",
        (key, host),
        prepare=True,
    ).fetchone()
    return UUID(str(row[0])) if row else None


def _get(conn: Conn, build_id: UUID) -> TemplateBuild:
    return _fetch(conn, "id = %s", (build_id,))[0]


def list_builds(
    target: ServerTarget, settings: Settings, key: str | None = None, *, everything: bool = False
) -> list[TemplateBuild]:
    """Builds on this host, newest first per key; dropped ones only with ``everything``."""
    where = "host = %s AND (%s OR status <> 'dropped') AND (%s::text IS NULL OR key = %s)"
    where += " ORDER BY key, created_at DESC"
    with _system(target, settings, "template-list") as reg:
        return _fetch(reg, where, (target.name, everything, key, key))


def show(
    target: ServerTarget, settings: Settings, key: str, version: str | None = None
) -> TemplateBuild:
    """The current build of ``key``, or its latest build of ``version``."""
    validate_template_key(key)
    with _system(target, settings, "template-show") as reg:
        if version is None:
            build = current_build(reg, key, target.name)
            if build is None:
                raise TemplateNotFound(f"template {key!r} has no current build", template=key)
            return build
        rows = _fetch(
            reg,
            "key = %s AND host = %s AND version = %s ORDER BY is_current DESC, created_at DESC",
            (key, target.name, validate_version(version)),
        )
    if not rows:
        raise TemplateNotFound(f"template {key!r} has no build {version}", template=key)
    return rows[0]


def clone_marker(conn: Conn) -> tuple[str, str] | None:
    """(key, version) of the build the connected database was cloned from, read from the
    comment every build writes on schema ``public``; None if there is none."""
    row = conn.execute("SELECT obj_description('public'::regnamespace, 'pg_namespace')").fetchone()
    text = str(row[0]) if row and row[0] else ""
    parts = text.removeprefix(_MARKER_PREFIX).split(" ") if text.startswith(_MARKER_PREFIX) else []
    return (parts[0], parts[1]) if len(parts) == 2 else None


# ---------------------------------------------------------------------------- locking


def _lock_id(key: str) -> int:
    raw = int.from_bytes(hashlib.sha256(f"monk.template:{key}".encode()).digest()[:8], "big")
    return raw - (1 << 64) if raw >= (1 << 63) else raw


def _try_lock(reg: Conn, key: str) -> bool:
    row = reg.execute("SELECT pg_try_advisory_lock(%s)", (_lock_id(key),)).fetchone()
    return bool(row and row[0])


def _unlock(reg: Conn, key: str) -> None:
    reg.execute("SELECT pg_advisory_unlock(%s)", (_lock_id(key),))


@contextlib.contextmanager
def _key_lock(reg: Conn, key: str) -> Iterator[None]:
    """Hold the key's session advisory lock (waiting for another build as long as it takes)."""
    reg.execute("SET statement_timeout = 0")
    try:
        reg.execute("SELECT pg_advisory_lock(%s)", (_lock_id(key),))
    finally:
        reg.execute("RESET statement_timeout")
    try:
        yield
    finally:
        with contextlib.suppress(psycopg.Error):
            _unlock(reg, key)


# ---------------------------------------------------------------------------- build


def ensure_built(target: ServerTarget, settings: Settings, key: str) -> TemplateBuild:
    """The current build of ``key``, building it first if there is none. Safe to call from
    several processes at once: they wait for one another on the key's lock, and the later ones
    find the build the first one made."""
    with _system(target, settings, "template-ensure") as reg:
        build = current_build(reg, key, target.name)
    if build is not None:
        return build
    return build_template(target, settings, key).build


def build_template(
    target: ServerTarget,
    settings: Settings,
    key: str,
    *,
    force: bool = False,
    source_dir: Path | None = None,
    progress: Progress | None = None,
    recorded_anywhere: bool = False,
) -> BuildResult:
    """Build ``key`` (see the module docstring); a no-op when the current build already has the
    source's version, unless ``force``. Bad input raises InvalidTemplateSource before any
    database exists; a failing step drops the staging database, marks the build failed and
    raises InvalidTemplateSource or OperationFailed naming the step; the current build is
    untouched until the swap. Without ``source_dir``, a key no configured folder has is
    rebuilt from the folder its builds were made from (see ``rebuild_source``)."""
    report = progress or (lambda step: None)
    report("validate")
    if source_dir is None:
        source_dir = rebuild_source(target, settings, key, anywhere=recorded_anywhere)
    plan = _plan(resolve_source(settings, key, source_dir))
    with (
        _system(target, settings, "template-build") as reg,
        _key_lock(reg, key),
        connect(target, autocommit=True, purpose="template-build") as adm,
    ):
        _recover_key(reg, adm, target, key)
        current = current_build(reg, key, target.name)
        if current is not None and not admin.database_exists(adm, current.database):
            log.warning("current build of %s lost its database %s", key, current.database)
            _mark_dropped(reg, current.id, error="its database disappeared")
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
        return BuildResult(_build(reg, adm, target, settings, plan, current, report), built=True)


def build(
    target: ServerTarget,
    settings: Settings,
    key: str,
    *,
    force: bool = False,
    source_dir: Path | None = None,
    progress: Progress | None = None,
) -> TemplateBuild:
    """``build_template`` returning just the (new or already current) build."""
    return build_template(
        target, settings, key, force=force, source_dir=source_dir, progress=progress
    ).build


class _Builder:
    """State of one build in progress, so a failure knows what to undo."""

    def __init__(self, reg: Conn, build_id: UUID, op_id: UUID, staging: str) -> None:
        self.reg = reg
        self.build_id = build_id
        self.op_id = op_id
        self.staging = staging

    def step(self, name: str, settings: Settings, report: Progress) -> None:
        report(name)
        self.reg.execute(
            "UPDATE operations SET step = %s, updated_at = now() WHERE id = %s", (name, self.op_id)
        )
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
    plan: _Plan,
    current: TemplateBuild | None,
    report: Progress,
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
    report("journal")
    with reg.transaction():
        row = reg.execute(
            "INSERT INTO template_builds (key, version, database, host, description,"
            " version_label, parent_key, source, database_settings, monk_version,"
            " compiler_version) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
            (
                key,
                plan.version,
                staging,
                target.name,
                source.description,
                source.version_label or None,
                source.extends,
                str(source.path),
                Jsonb(dict(source.database_settings)),
                monk.__version__,
                COMPILER_VERSION,
            ),
        ).fetchone()
        assert row is not None
        build_id = UUID(str(row[0]))
        op = reg.execute(
            "INSERT INTO operations (kind, subject, database, host, params)"
            " VALUES ('template_build', %s, %s, %s, %s) RETURNING id",
            (key, staging, target.name, Jsonb({"build_id": str(build_id)})),
        ).fetchone()
        assert op is not None
    b = _Builder(reg, build_id, UUID(str(op[0])), staging)
    try:
        b.step("create", settings, report)
        # From template0, which no one can connect to: a session on template1 (any tenant
        # may open one on a server monk does not own) would make CREATE DATABASE fail.
        admin.create_database(adm, staging, template="template0")
        with connect(target, staging, purpose="template-build") as db:
            _fill(db, b, settings, plan, report)
            b.step("health", settings, report)
            expected = None if plan.source.migrations else _expected_counts(plan)
            health = _health(db, staging, expected)
            db.commit()
            if health.ok:
                # Clones copy the statistics: every tenant plans with them from its first query,
                # and autovacuum has no analyze to run on the closed template. Not VACUUM: its
                # visibility and free-space maps are two more files per table, and creating
                # files is most of what a clone costs.
                db.execute("RESET ROLE")
                db.execute("ANALYZE")
                db.commit()
        if not health.ok:
            raise OperationFailed(
                f"template {key!r} failed its health checks: {'; '.join(health.problems)}",
                step="health",
            )
        b.step("close", settings, report)
        adm.execute(
            sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(staging))
        )
        admin.close_database(adm, staging, as_template=True)
        stats = {
            "table_count": health.table_count,
            "record_count": health.record_count,
            "size_bytes": admin.database_size(adm, staging),
            "server_version": admin.server_version(adm),
            "migration_level": max((m.number for m in source.migrations), default=0),
        }
        b.step("swap", settings, report)
        if current is not None:
            _free_retired_name(reg, adm, target, current)
        with reg.transaction():
            reg.execute("UPDATE operations SET result = %s WHERE id = %s", (Jsonb(stats), b.op_id))
        _checkpoint(settings, "swap_renames")
        # The renames and the registry change commit together (ALTER DATABASE … RENAME runs in a
        # transaction on the system database's connection): whoever reads the registry knows
        # which build the name monk_template_<key> stands for.
        with reg.transaction():
            if current is not None:
                admin.terminate_sessions(reg, current.database)
                admin.rename_database(reg, current.database, retired_db_name(key, current.version))
            admin.rename_database(reg, staging, template_db_name(key))
            _checkpoint(settings, "swap_registry")
            stats["duration_ms"] = int((time.monotonic() - started) * 1000)
            _finish_swap(reg, target, key, build_id, b.op_id, stats)
    except BaseException as exc:
        _undo(reg, adm, b, exc)
        if (known := translate(exc)) is not None:
            raise known from exc
        if isinstance(exc, psycopg.Error):
            raise OperationFailed(
                f"building template {key!r} failed: {_pg_message(exc)}", step=_op_step(reg, b)
            ) from None
        raise
    built = _get(reg, build_id)
    log.info("built template %s version %s in %s ms", key, built.version, built.duration_ms)
    return built


def _fill(db: Conn, b: _Builder, settings: Settings, plan: _Plan, report: Progress) -> None:
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
    db.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(OWNER_ROLE)))
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
    b.step("migrations", settings, report)
    for migration in source.migrations:
        try:
            with db.transaction():
                db.execute(migration.sql.encode())
        except psycopg.Error as exc:
            raise _refused(source, f"{migration.template}/{migration.path}", exc) from None
    db.execute("RESET ROLE")
    marker = f"{_MARKER_PREFIX}{source.key} {plan.version}"
    db.execute(sql.SQL("COMMENT ON SCHEMA public IS {}").format(sql.Literal(marker)))
    db.commit()


def _pg_message(exc: psycopg.Error) -> str:
    diag = exc.diag
    message = diag.message_primary or str(exc).strip()
    if diag.message_detail:
        message += f" ({diag.message_detail})"
    return message


def _refused(source: TemplateSource, where: str, exc: psycopg.Error) -> InvalidTemplateSource:
    return InvalidTemplateSource(
        f"template {source.key!r} ({source.path}): {where}: PostgreSQL refused it: "
        f"{_pg_message(exc)}",
        file=where,
    )


def _op_step(reg: Conn, b: _Builder) -> str:
    row = reg.execute("SELECT step FROM operations WHERE id = %s", (b.op_id,)).fetchone()
    return str(row[0]) if row and row[0] else "build"


def _undo(reg: Conn, adm: Conn, b: _Builder, exc: BaseException) -> None:
    """Drop the staging database and mark the build failed; the current build is untouched."""
    error = str(exc) if isinstance(exc, MonkError) else f"{type(exc).__name__}: {exc}"
    if isinstance(exc, psycopg.Error):
        error = _pg_message(exc)
    try:
        admin.drop_database(adm, b.staging)
        with reg.transaction():
            reg.execute(
                "UPDATE template_builds SET status = 'failed', error = %s, dropped_at = now()"
                " WHERE id = %s",
                (error, b.build_id),
            )
            reg.execute(
                "UPDATE operations SET state = 'undone', error = %s, updated_at = now(),"
                " finished_at = now() WHERE id = %s",
                (error, b.op_id),
            )
    except (MonkError, psycopg.Error):
        # The server went away: the row stays 'building' and the next build cleans up.
        log.exception("could not undo the failed build of %s", b.staging)


def _free_retired_name(reg: Conn, adm: Conn, target: ServerTarget, current: TemplateBuild) -> None:
    """An earlier build of the current version may still sit, retired, under the name the
    current build is about to take (a forced rebuild, or A → B → A): same version, same
    content; drop it."""
    name = retired_db_name(current.key, current.version)
    rows = _fetch(reg, "host = %s AND database = %s AND dropped_at IS NULL", (target.name, name))
    if not admin.database_exists(adm, name):
        for row in rows:
            _mark_dropped(reg, row.id, error="its database disappeared")
        return
    if not rows:
        raise DatabaseExists(
            f"database {name} exists but is not a build registered here; drop it first",
            database=name,
        )
    admin.drop_database(adm, name)
    for row in rows:
        _mark_dropped(reg, row.id)


def _mark_dropped(reg: Conn, build_id: UUID, *, error: str | None = None) -> None:
    reg.execute(
        "UPDATE template_builds SET status = 'dropped', is_current = false, dropped_at = now(),"
        " error = coalesce(%s, error) WHERE id = %s",
        (error, build_id),
    )


def _finish_swap(
    reg: Conn, target: ServerTarget, key: str, build_id: UUID, op_id: UUID, stats: Mapping[str, Any]
) -> None:
    """After the renames: the old current build becomes retired, the new one current."""
    with reg.transaction():
        old = current_build(reg, key, target.name)
        if old is not None and old.id != build_id:
            reg.execute(
                "UPDATE template_builds SET status = 'retired', is_current = false,"
                " database = %s, retired_at = now() WHERE id = %s",
                (retired_db_name(key, old.version), old.id),
            )
        reg.execute(
            "UPDATE template_builds SET status = 'ready', is_current = true, database = %s,"
            " built_at = now(), error = NULL, table_count = %s, record_count = %s,"
            " size_bytes = %s, server_version = %s, migration_level = %s, duration_ms = %s"
            " WHERE id = %s",
            (
                template_db_name(key),
                stats.get("table_count"),
                stats.get("record_count"),
                stats.get("size_bytes"),
                stats.get("server_version"),
                stats.get("migration_level", 0),
                stats.get("duration_ms"),
                build_id,
            ),
        )
        reg.execute(
            "UPDATE operations SET state = 'done', step = 'swap', result = %s, updated_at = now(),"
            " finished_at = now() WHERE id = %s",
            (Jsonb(dict(stats)), op_id),
        )


# ---------------------------------------------------------------------------- health


def _expected_counts(plan: _Plan) -> dict[str, int]:
    counts = {
        table.name: len(plan.source.data.get(table.name, ())) for table in plan.compiled.tables
    }
    counts["users"] = 0
    counts["schemas"] = len(plan.compiled.tables)
    counts["columns"] = sum(len(table.columns) for table in plan.compiled.tables)
    return counts


def _health(db: Conn, database: str, expected: Mapping[str, int] | None) -> HealthReport:
    """Check the database against its own ``schemas``/``columns`` rows and the catalog.

    ``expected``: exact row counts per table (None: only counted, e.g. after migrations).
    """
    problems: list[str] = []
    for (table,) in db.execute(
        "SELECT table_name FROM schemas WHERE to_regclass(format('public.%I', table_name)) IS NULL"
    ).fetchall():
        problems.append(f"table {table} of schema registry row is missing")
    for table, column, want_type, want_required, got_type, got_not_null in db.execute(
        "SELECT c.schema_name, c.column_name, c.pg_type, c.is_required,"
        " format_type(a.atttypid, a.atttypmod), a.attnotnull"
        " FROM columns c JOIN schemas s ON s.name = c.schema_name"
        " LEFT JOIN pg_attribute a ON a.attrelid = to_regclass(format('public.%I', s.table_name))"
        "  AND a.attname = c.column_name AND a.attnum > 0 AND NOT a.attisdropped"
        " ORDER BY 1, 2"
    ).fetchall():
        if got_type is None:
            problems.append(f"column {table}.{column} is registered but missing")
        elif got_type != want_type:
            problems.append(f"column {table}.{column} is {got_type}, registered as {want_type}")
        elif bool(got_not_null) != bool(want_required):
            problems.append(
                f"column {table}.{column} NOT NULL is {got_not_null}, registered {want_required}"
            )
    for table, column in db.execute(
        "SELECT s.table_name, a.attname FROM schemas s"
        " JOIN pg_attribute a ON a.attrelid = to_regclass(format('public.%%I', s.table_name))"
        " WHERE a.attnum > 0 AND NOT a.attisdropped AND a.attname <> ALL(%s)"
        "  AND NOT EXISTS (SELECT 1 FROM columns c"
        "   WHERE c.schema_name = s.name AND c.column_name = a.attname)"
        " ORDER BY 1, 2",
        (list(SYSTEM_COLUMNS),),
    ).fetchall():
        problems.append(f"column {table}.{column} is not registered in columns")
    for table, name in db.execute(
        "SELECT conrelid::regclass::text, conname FROM pg_constraint"
        " WHERE NOT convalidated AND connamespace = 'public'::regnamespace ORDER BY 1, 2"
    ).fetchall():
        problems.append(f"constraint {name} on {table} is not validated")
    for kind, name in db.execute(
        # Members of an extension belong to it (owned by whoever created it): not checked.
        "SELECT 'relation', relname::text FROM pg_class c"
        " WHERE relnamespace = 'public'::regnamespace"
        "  AND relowner <> %s::regrole AND NOT EXISTS (SELECT 1 FROM pg_depend d"
        "   WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')"
        " UNION ALL SELECT 'function', proname::text FROM pg_proc p"
        "  WHERE pronamespace = 'public'::regnamespace AND proowner <> %s::regrole"
        "  AND NOT EXISTS (SELECT 1 FROM pg_depend d"
        "   WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')"
        " ORDER BY 1, 2",
        (OWNER_ROLE, OWNER_ROLE),
    ).fetchall():
        problems.append(f"{kind} {name} is not owned by {OWNER_ROLE}")
    tables = [
        str(r[0])
        for r in db.execute(
            "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace"
            " AND relkind IN ('r', 'p') ORDER BY relname"
        ).fetchall()
    ]
    for core in CORE_TABLES:
        if core not in tables:
            problems.append(f"core table {core} is missing")
    counts: dict[str, int] = {}
    for table in tables:
        row = db.execute(
            sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))
        ).fetchone()
        counts[table] = int(str(row[0])) if row else 0
    for table, want in (expected or {}).items():
        if counts.get(table, 0) != want:
            problems.append(f"table {table} has {counts.get(table, 0)} rows, expected {want}")
    return HealthReport(database, len(tables), sum(counts.values()), counts, tuple(problems))


def check(target: ServerTarget, settings: Settings, key: str) -> HealthReport:
    """Re-run the health checks on the current build of ``key``, in a scratch clone.

    Also checks that the template itself is closed (IS_TEMPLATE, no connections allowed, no
    session, CONNECT revoked from PUBLIC) and that the clone's counts match the build's.
    """
    validate_template_key(key)
    with _system(target, settings, "template-check") as reg, _key_lock(reg, key):
        build = current_build(reg, key, target.name)
        if build is None:
            raise TemplateNotFound(f"template {key!r} has no current build", template=key)
        with connect(target, autocommit=True, purpose="template-check") as adm:
            problems = _closed_problems(adm, build.database)
            if problems and not admin.database_exists(adm, build.database):
                return HealthReport(build.database, 0, 0, {}, tuple(problems))
            scratch = f"{CHECK_DB_PREFIX}{key}_{secrets.token_hex(4)}"
            assert len(scratch) <= MAX_IDENTIFIER_BYTES
            admin.create_database(adm, scratch, template=build.database)
            try:
                adm.execute(
                    sql.SQL("COMMENT ON DATABASE {} IS {}").format(
                        sql.Identifier(scratch), sql.Literal(_mark(settings))
                    )
                )
                with connect(target, scratch, purpose="template-check") as db:
                    report = _health(db, build.database, None)
                    marker = clone_marker(db)
            finally:
                admin.drop_database(adm, scratch)
    if marker != (build.key, build.version):
        problems.append(f"the template carries marker {marker}, not {build.key} {build.version}")
    if build.table_count is not None and report.table_count != build.table_count:
        problems.append(f"{report.table_count} tables, the build recorded {build.table_count}")
    if build.record_count is not None and report.record_count != build.record_count:
        problems.append(f"{report.record_count} records, the build recorded {build.record_count}")
    return dataclasses.replace(report, problems=(*problems, *report.problems))


def _closed_problems(adm: Conn, database: str) -> list[str]:
    row = adm.execute(
        "SELECT datistemplate, datallowconn, has_database_privilege('public', datname, 'CONNECT')"
        " FROM pg_database WHERE datname = %s",
        (database,),
    ).fetchone()
    if row is None:
        return [f"database {database} does not exist"]
    problems = []
    if not row[0]:
        problems.append(f"{database} is not marked IS_TEMPLATE")
    if row[1]:
        problems.append(f"{database} allows connections")
    if row[2]:
        problems.append(f"{database} grants CONNECT to PUBLIC")
    if admin.sessions_on(adm, database):
        problems.append(f"{database} has sessions")
    return problems


def _mark(settings: Settings) -> str:
    return f"monk:{settings.system_db_name}"


# ---------------------------------------------------------------------------- drop, prune


def _needed_by_tenants(reg: Conn, build: TemplateBuild) -> int:
    """Live tenants cloned from this build's version, unless the current build serves it."""
    if not build.is_current:
        current = current_build(reg, build.key, build.host)
        if current is not None and current.version == build.version:
            return 0
    row = reg.execute(
        "SELECT count(*) FROM tenants WHERE template_key = %s AND template_version = %s"
        " AND host = %s AND deleted_at IS NULL",
        (build.key, build.version, build.host),
    ).fetchone()
    return int(str(row[0])) if row else 0


def drop(
    target: ServerTarget,
    settings: Settings,
    key: str,
    version: str | None = None,
    *,
    force: bool = False,
) -> TemplateBuild:
    """Drop a build (default: the current one) and its database.

    Refuses, unless ``force``, the current build and a build whose version live tenants record.
    """
    validate_template_key(key)
    with _system(target, settings, "template-drop") as reg, _key_lock(reg, key):
        if version is None:
            found = current_build(reg, key, target.name)
            candidates = [found] if found else []
        else:
            candidates = _fetch(
                reg,
                "key = %s AND host = %s AND version = %s AND status IN ('ready', 'retired')"
                " ORDER BY is_current, created_at DESC",
                (key, target.name, validate_version(version)),
            )
        if not candidates:
            what = "current build" if version is None else f"live build {version}"
            raise TemplateNotFound(f"template {key!r} has no {what}", template=key)
        build = candidates[0]
        if build.is_current and not force:
            raise TemplateInUse(
                f"{build.database} ({key} {build.version}) is the current build of {key!r}: "
                "new tenants are cloned from it; use --force to drop it anyway",
                template=key,
            )
        tenants = _needed_by_tenants(reg, build)
        if tenants and not force:
            raise TemplateInUse(
                f"{tenants} live tenant(s) were cloned from {key} {build.version}; "
                "use --force to drop it anyway",
                template=key,
            )
        with connect(target, autocommit=True, purpose="template-drop") as adm:
            admin.drop_database(adm, build.database)
        _mark_dropped(reg, build.id)
        return _get(reg, build.id)


def prune(target: ServerTarget, settings: Settings, key: str | None = None) -> list[TemplateBuild]:
    """Drop the retired builds (of ``key``, or of every key) that no live tenant needs, and
    forget failed builds but the latest of each key (they have no database left; the latest
    still tells ``template list --all`` why the key's last build failed)."""
    with _system(target, settings, "template-prune") as reg:
        keys = [
            str(r[0])
            for r in reg.execute(
                "SELECT DISTINCT key FROM template_builds WHERE host = %s"
                " AND status IN ('retired', 'failed') AND (%s::text IS NULL OR key = %s)"
                " ORDER BY 1",
                (target.name, key, key),
            ).fetchall()
        ]
        dropped = []
        for k in keys:
            with _key_lock(reg, k):
                retired = _fetch(
                    reg,
                    "key = %s AND host = %s AND status = 'retired' ORDER BY created_at",
                    (k, target.name),
                )
                for build in retired:
                    if _needed_by_tenants(reg, build):
                        continue
                    with connect(target, autocommit=True, purpose="template-prune") as adm:
                        admin.drop_database(adm, build.database)
                    _mark_dropped(reg, build.id)
                    dropped.append(_get(reg, build.id))
                with reg.cursor(row_factory=class_row(TemplateBuild)) as cur:
                    cur.execute(
                        sql.SQL(
                            "DELETE FROM template_builds WHERE key = %s AND host = %s"
                            " AND status = 'failed' AND id <> (SELECT id FROM template_builds"
                            " WHERE key = %s AND host = %s AND status = 'failed'"
                            " ORDER BY created_at DESC LIMIT 1) RETURNING {}"
                        ).format(_BUILD_COLUMNS),
                        (k, target.name, k, target.name),
                    )
                    dropped.extend(cur.fetchall())
        return dropped


# ---------------------------------------------------------------------------- crash recovery


def _op_of(reg: Conn, build_id: UUID) -> tuple[UUID, str | None, dict[str, Any]] | None:
    row = reg.execute(
        "SELECT id, step, result FROM operations WHERE kind = 'template_build'"
        " AND params->>'build_id' = %s ORDER BY created_at DESC LIMIT 1",
        (str(build_id),),
    ).fetchone()
    if row is None:
        return None
    result = row[2] if isinstance(row[2], dict) else {}
    return UUID(str(row[0])), (str(row[1]) if row[1] else None), result


def _recover_key(reg: Conn, adm: Conn, target: ServerTarget, key: str) -> list[str]:
    """With the key's lock held: settle every 'building' row of ``key`` (their process is
    dead). Returns the staging databases handled."""
    handled = []
    for row in _fetch(
        reg,
        "key = %s AND host = %s AND status = 'building' ORDER BY created_at",
        (key, target.name),
    ):
        op = _op_of(reg, row.id)
        op_id, step, stats = op if op else (None, None, {})
        staging_exists = admin.database_exists(adm, row.database)
        if (
            step == "swap"
            and not staging_exists
            and row.database.startswith(STAGING_DB_PREFIX)
            and admin.database_exists(adm, template_db_name(key))
            and op_id is not None
        ):
            # Died after the renames committed: the registry only has to catch up.
            log.warning("finishing the interrupted swap of %s", row.database)
            _finish_swap(reg, target, key, row.id, op_id, stats)
            handled.append(row.database)
            continue
        if staging_exists and row.database.startswith(STAGING_DB_PREFIX):
            admin.drop_database(adm, row.database)
        with reg.transaction():
            reg.execute(
                "UPDATE template_builds SET status = 'failed', dropped_at = now(),"
                " error = 'interrupted: the building process died' WHERE id = %s",
                (row.id,),
            )
            if op_id is not None:
                reg.execute(
                    "UPDATE operations SET state = 'undone', updated_at = now(),"
                    " finished_at = now(), error = 'process died; undone' WHERE id = %s",
                    (op_id,),
                )
        handled.append(row.database)
    return handled


def _dead_keys(reg: Conn, host: str) -> list[str]:
    """Keys with a 'building' row whose build process is gone (nobody holds the key lock)."""
    keys = [
        str(r[0])
        for r in reg.execute(
            "SELECT DISTINCT key FROM template_builds WHERE host = %s AND status = 'building'",
            (host,),
        ).fetchall()
    ]
    dead = []
    for key in keys:
        if _try_lock(reg, key):
            _unlock(reg, key)
            dead.append(key)
    return dead


def _orphan_checks(adm: Conn, settings: Settings) -> list[str]:
    """Scratch databases of a ``check`` killed before it dropped them (ours, by their mark)."""
    rows = adm.execute(
        "SELECT datname FROM pg_database WHERE datname LIKE %s"
        " AND shobj_description(oid, 'pg_database') = %s ORDER BY 1",
        (CHECK_DB_PREFIX.replace("_", r"\_") + "%", _mark(settings)),
    ).fetchall()
    return [str(name) for (name,) in rows]


def _check_key(name: str) -> str:
    """The key of a scratch check database ``monk_check_<key>_<8 hex>``."""
    return name.removeprefix(CHECK_DB_PREFIX)[: -(1 + 8)]


def find_leftovers(target: ServerTarget, settings: Settings) -> list[str]:
    """What interrupted builds and checks left behind: the staging databases of dead builds
    (present or not, their rows still say 'building') and orphaned check databases."""
    with _system(target, settings, "template-doctor") as reg:
        found = []
        for key in _dead_keys(reg, target.name):
            rows = _fetch(reg, "key = %s AND host = %s AND status = 'building'", (key, target.name))
            found += [row.database for row in rows]
        with connect(target, autocommit=True, purpose="template-doctor") as adm:
            found += _checks_not_running(reg, adm, settings)
    return sorted(found)


def _checks_not_running(reg: Conn, adm: Conn, settings: Settings) -> list[str]:
    out = []
    for name in _orphan_checks(adm, settings):
        key = _check_key(name)
        if _try_lock(reg, key):
            _unlock(reg, key)
            out.append(name)
    return out


def cleanup_leftovers(target: ServerTarget, settings: Settings) -> list[str]:
    """Settle what ``find_leftovers`` reports; returns the names handled. Builds and checks
    running right now are left alone (their key lock is held)."""
    handled: list[str] = []
    with (
        _system(target, settings, "template-doctor") as reg,
        connect(target, autocommit=True, purpose="template-doctor") as adm,
    ):
        keys = [
            str(r[0])
            for r in reg.execute(
                "SELECT DISTINCT key FROM template_builds WHERE host = %s AND status = 'building'",
                (target.name,),
            ).fetchall()
        ]
        for key in keys:
            if not _try_lock(reg, key):
                continue
            try:
                handled += _recover_key(reg, adm, target, key)
            finally:
                _unlock(reg, key)
        for name in _orphan_checks(adm, settings):
            key = _check_key(name)
            if not _try_lock(reg, key):
                continue
            try:
                admin.drop_database(adm, name)
                handled.append(name)
            finally:
                _unlock(reg, key)
    return sorted(handled)


def describe_source(settings: Settings, key: str, source_dir: Path | None = None) -> dict[str, Any]:
    """What a source holds and the version a build of it would have (no database needed)."""
    plan = _plan(resolve_source(settings, key, source_dir))
    source = plan.source
    return {
        "key": source.key,
        "version": plan.version,
        "path": str(source.path),
        "description": source.description,
        "lineage": list(source.lineage),
        "schemas": [table.name for table in plan.compiled.tables],
        "records": {name: len(records) for name, records in source.data.items()},
        "migrations": [f"{m.number:04d}_{m.name}" for m in source.migrations],
        "database_settings": dict(source.database_settings),
    }
