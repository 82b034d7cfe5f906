"""Template builds in the system database: the ``template_builds`` rows, their ``operations``
journal rows (kind ``template_build``) and the per-key advisory lock.

Every function takes an open autocommit connection to the system database; the template service
decides what to do with the snapshots these return.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

from monk.adapters.registry import rendered
from monk.core.template_names import retired_db_name, template_db_name

Conn = psycopg.Connection[Any]


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
    fingerprint: str | None
    """sha256 of the build's catalog (``monk.core.catalog``); None for builds made before."""
    clone_strategy: str | None = None
    """template.json's ``clone_strategy`` (auto, wal_log, file_copy); None: not given."""

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for name, value in out.items():
            if isinstance(value, datetime):
                out[name] = value.isoformat()
            elif isinstance(value, UUID):
                out[name] = str(value)
        return out


@dataclass(frozen=True)
class NewBuild:
    """What a build records before it creates its staging database."""

    key: str
    version: str
    database: str
    host: str
    description: str | None
    version_label: str | None
    parent_key: str | None
    source: str
    database_settings: Mapping[str, str]
    monk_version: str
    compiler_version: str
    compiled_schemas: Mapping[str, Any] | None = None
    """The JSON Schemas the build compiles (schema name → document), for its successor's step."""
    migration_manifest: Sequence[Mapping[str, Any]] | None = None
    """``{number, name, sha256}`` of each migration file the build applies."""
    clone_strategy: str | None = None
    """template.json's ``clone_strategy``, for every clone of the build."""


@dataclass(frozen=True)
class RecordedPlan:
    """What a build recorded for its successor (see ``NewBuild``)."""

    compiled_schemas: dict[str, Any]
    migration_manifest: list[dict[str, Any]]


@dataclass(frozen=True)
class BuildOperation:
    """The journal row of a build: the last step it reached and the stats it recorded."""

    id: UUID
    step: str | None
    result: dict[str, Any]


_BUILD_COLUMNS = rendered(
    sql.SQL(", ").join(sql.Identifier(f.name) for f in dataclasses.fields(TemplateBuild))
)


def _fetch(conn: Conn, where: str, params: Sequence[Any]) -> list[TemplateBuild]:
    query = sql.SQL("SELECT {} FROM template_builds WHERE ").format(_BUILD_COLUMNS) + sql.SQL(
        where  # constant SQL written in this module
    )
    with conn.cursor(row_factory=class_row(TemplateBuild)) as cur:
        cur.execute(query, params)
        return cur.fetchall()


# ---------------------------------------------------------------------------- reads


def current_build(conn: Conn, key: str, host: str) -> TemplateBuild | None:
    """The ready build tenants of ``key`` on ``host`` are cloned from."""
    rows = _fetch(conn, "key = %s AND host = %s AND is_current", (key, host))
    return rows[0] if rows else None


def hosts_with_current(conn: Conn, key: str) -> set[str]:
    """The hosts that have a ready (current) build of ``key``: where placement may clone it."""
    rows = conn.execute(
        "SELECT host FROM template_builds WHERE key = %s AND is_current", (key,)
    ).fetchall()
    return {str(r[0]) for r in rows}


def current_builds(conn: Conn, host: str) -> list[TemplateBuild]:
    """The current build of every key on ``host``."""
    return _fetch(conn, "host = %s AND is_current", (host,))


def settings_by_build(conn: Conn, host: str) -> dict[tuple[str, str], dict[str, str]]:
    """The database settings each build (key, version) on ``host`` gives its clones."""
    return {
        (b.key, b.version): dict(b.database_settings) for b in _fetch(conn, "host = %s", (host,))
    }


_REBUILT = "MK002"


def queue_build_check(conn: Conn, key: str, host: str, build_id: UUID) -> None:
    """In the caller's (pipelined) transaction, before the writes that use a clone of
    ``build_id``: fail the whole transaction if it is no longer ``key``'s current build on
    ``host`` (a rebuild swapped it during the clone; ``rebuilt`` tells that error)."""
    conn.execute("SELECT assert_current_build(%s, %s, %s)", (key, host, build_id), prepare=True)


def rebuilt(exc: BaseException) -> bool:
    """``exc`` is ``queue_build_check``'s refusal: the clone may hold another build."""
    return isinstance(exc, psycopg.Error) and exc.sqlstate == _REBUILT


def get(conn: Conn, build_id: UUID) -> TemplateBuild:
    return _fetch(conn, "id = %s", (build_id,))[0]


def list_builds(
    conn: Conn, host: str, key: str | None = None, *, everything: bool = False
) -> list[TemplateBuild]:
    """Builds on ``host``, newest first per key; dropped ones only with ``everything``."""
    return _fetch(
        conn,
        "host = %s AND (%s OR status <> 'dropped') AND (%s::text IS NULL OR key = %s)"
        " ORDER BY key, created_at DESC",
        (host, everything, key, key),
    )


def builds_of_version(conn: Conn, key: str, host: str, version: str) -> list[TemplateBuild]:
    """Every build of ``key`` at ``version``: the current one first, then newest first."""
    return _fetch(
        conn,
        "key = %s AND host = %s AND version = %s ORDER BY is_current DESC, created_at DESC",
        (key, host, version),
    )


def live_builds_of_version(conn: Conn, key: str, host: str, version: str) -> list[TemplateBuild]:
    """The builds of ``key`` at ``version`` that still have a database (ready or retired),
    not the current one first, then newest first."""
    return _fetch(
        conn,
        "key = %s AND host = %s AND version = %s AND status IN ('ready', 'retired')"
        " ORDER BY is_current, created_at DESC",
        (key, host, version),
    )


def builds_in_status(conn: Conn, key: str, host: str, status: str) -> list[TemplateBuild]:
    """The builds of ``key`` in ``status``, oldest first."""
    return _fetch(
        conn, "key = %s AND host = %s AND status = %s ORDER BY created_at", (key, host, status)
    )


def builds_named(conn: Conn, host: str, database: str) -> list[TemplateBuild]:
    """The builds on ``host`` whose (not dropped) database is ``database``."""
    return _fetch(conn, "host = %s AND database = %s AND dropped_at IS NULL", (host, database))


def keys_in_status(
    conn: Conn, host: str, statuses: Sequence[str], key: str | None = None
) -> list[str]:
    """The keys (only ``key``, if given) with a build in one of ``statuses``, sorted."""
    rows = conn.execute(
        "SELECT DISTINCT key FROM template_builds WHERE host = %s AND status = ANY(%s)"
        " AND (%s::text IS NULL OR key = %s) ORDER BY 1",
        (host, list(statuses), key, key),
    ).fetchall()
    return [str(r[0]) for r in rows]


def live_tenants_of(conn: Conn, key: str, version: str, host: str) -> int:
    """How many live tenants record that they were cloned from ``key`` at ``version``."""
    row = conn.execute(
        "SELECT count(*) FROM tenants WHERE template_key = %s AND template_version = %s"
        " AND host = %s AND deleted_at IS NULL",
        (key, version, host),
    ).fetchone()
    return int(str(row[0])) if row else 0


def build_operation(conn: Conn, build_id: UUID) -> BuildOperation | None:
    """The latest journal row of the build ``build_id``."""
    row = conn.execute(
        "SELECT id, step, result FROM operations WHERE kind = 'template_build'"
        " AND params->>'build_id' = %s ORDER BY created_at DESC LIMIT 1",
        (str(build_id),),
    ).fetchone()
    if row is None:
        return None
    result = row[2] if isinstance(row[2], dict) else {}
    return BuildOperation(UUID(str(row[0])), str(row[1]) if row[1] else None, result)


def recorded_plan(conn: Conn, build_id: UUID) -> RecordedPlan | None:
    """The schemas and migration manifest a build recorded; None for a build made before monk
    recorded them."""
    row = conn.execute(
        "SELECT compiled_schemas, migration_manifest FROM template_builds WHERE id = %s",
        (build_id,),
    ).fetchone()
    if row is None or row[0] is None or row[1] is None:
        return None
    return RecordedPlan(dict(row[0]), list(row[1]))


def build_catalog(conn: Conn, build_id: UUID) -> dict[str, Any] | None:
    """The catalog a build recorded (``Catalog.as_dict``), None if it has none."""
    row = conn.execute("SELECT catalog FROM template_builds WHERE id = %s", (build_id,)).fetchone()
    return row[0] if row and isinstance(row[0], dict) else None


def retired_unneeded(conn: Conn, key: str, host: str) -> list[TemplateBuild]:
    """The retired builds of ``key``, oldest first, that nothing needs: no tenant holding a
    database (trashed ones included), no archive of a purged tenant, no spare records its
    version; or the current build has that same version (it serves them all)."""
    return _fetch(
        conn,
        "key = %s AND host = %s AND status = 'retired'"
        # the current build serves whatever needs this version (a forced rebuild)
        " AND (EXISTS (SELECT 1 FROM template_builds c WHERE c.host = template_builds.host"
        "   AND c.key = template_builds.key AND c.is_current"
        "   AND c.version = template_builds.version)"
        "  OR (NOT EXISTS (SELECT 1 FROM tenants t WHERE t.host = template_builds.host"
        "   AND t.template_key = template_builds.key"
        "   AND t.template_version = template_builds.version"
        "   AND (t.deleted_at IS NULL OR t.archive_path IS NOT NULL))"
        "  AND NOT EXISTS (SELECT 1 FROM spares s WHERE s.host = template_builds.host"
        "   AND s.template_key = template_builds.key"
        "   AND s.template_version = template_builds.version)))"
        " ORDER BY created_at",
        (key, host),
    )


def operation_step(conn: Conn, op_id: UUID) -> str | None:
    row = conn.execute("SELECT step FROM operations WHERE id = %s", (op_id,)).fetchone()
    return str(row[0]) if row and row[0] else None


# ---------------------------------------------------------------------------- writes


def start_build(conn: Conn, new: NewBuild) -> tuple[UUID, UUID]:
    """Record a build (status building) and its journal row, in one transaction; returns
    (build id, operation id)."""
    with conn.transaction():
        row = conn.execute(
            "INSERT INTO template_builds (key, version, database, host, description,"
            " version_label, parent_key, source, database_settings, monk_version,"
            " compiler_version, compiled_schemas, migration_manifest, clone_strategy)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
            (
                new.key,
                new.version,
                new.database,
                new.host,
                new.description,
                new.version_label,
                new.parent_key,
                new.source,
                Jsonb(dict(new.database_settings)),
                new.monk_version,
                new.compiler_version,
                None if new.compiled_schemas is None else Jsonb(dict(new.compiled_schemas)),
                None if new.migration_manifest is None else Jsonb(list(new.migration_manifest)),
                new.clone_strategy,
            ),
        ).fetchone()
        assert row is not None
        build_id = UUID(str(row[0]))
        op = conn.execute(
            "INSERT INTO operations (kind, subject, database, host, params)"
            " VALUES ('template_build', %s, %s, %s, %s) RETURNING id",
            (new.key, new.database, new.host, Jsonb({"build_id": str(build_id)})),
        ).fetchone()
        assert op is not None
    return build_id, UUID(str(op[0]))


def set_build_step(conn: Conn, op_id: UUID, step: str) -> None:
    conn.execute("UPDATE operations SET step = %s, updated_at = now() WHERE id = %s", (step, op_id))


def set_build_result(conn: Conn, op_id: UUID, stats: Mapping[str, Any]) -> None:
    """Record the stats of a build before its swap (a crashed swap finishes with them)."""
    with conn.transaction():
        conn.execute("UPDATE operations SET result = %s WHERE id = %s", (Jsonb(dict(stats)), op_id))


def mark_failed(conn: Conn, build_id: UUID, op_id: UUID | None, error: str, op_error: str) -> None:
    """The build failed (its staging database is gone): the row and its journal row say so."""
    with conn.transaction():
        conn.execute(
            "UPDATE template_builds SET status = 'failed', error = %s, dropped_at = now()"
            " WHERE id = %s",
            (error, build_id),
        )
        if op_id is not None:
            conn.execute(
                "UPDATE operations SET state = 'undone', error = %s, updated_at = now(),"
                " finished_at = now() WHERE id = %s",
                (op_error, op_id),
            )


def record_catalog(
    conn: Conn, build_id: UUID, catalog: Mapping[str, Any], fingerprint: str
) -> None:
    """Record the catalog of a build's database (read before it is closed, or later from a
    scratch clone of it) and its fingerprint."""
    conn.execute(
        "UPDATE template_builds SET catalog = %s, fingerprint = %s WHERE id = %s",
        (Jsonb(dict(catalog)), fingerprint, build_id),
    )


def mark_dropped(conn: Conn, build_id: UUID, *, error: str | None = None) -> None:
    conn.execute(
        "UPDATE template_builds SET status = 'dropped', is_current = false, dropped_at = now(),"
        " error = coalesce(%s, error) WHERE id = %s",
        (error, build_id),
    )


def forget_failed_but_latest(conn: Conn, key: str, host: str) -> list[TemplateBuild]:
    """Delete the failed builds of ``key`` but the latest one; returns the rows deleted."""
    with conn.cursor(row_factory=class_row(TemplateBuild)) as cur:
        cur.execute(
            sql.SQL(
                "DELETE FROM template_builds WHERE key = %s AND host = %s"
                " AND status = 'failed' AND id <> (SELECT id FROM template_builds"
                " WHERE key = %s AND host = %s AND status = 'failed'"
                " ORDER BY created_at DESC LIMIT 1) RETURNING {}"
            ).format(_BUILD_COLUMNS),
            (key, host, key, host),
        )
        return cur.fetchall()


def forget_host(conn: Conn, host: str) -> list[str]:
    """Delete every build row and upgrade step of a host that is removed; returns the
    databases its builds still had there (not dropped), for the removal to drop."""
    conn.execute("DELETE FROM template_upgrades WHERE host = %s", (host,))
    rows = conn.execute(
        "DELETE FROM template_builds WHERE host = %s RETURNING database, dropped_at", (host,)
    ).fetchall()
    return sorted(str(r[0]) for r in rows if r[1] is None)


def finish_swap(
    conn: Conn, key: str, host: str, build_id: UUID, op_id: UUID, stats: Mapping[str, Any]
) -> None:
    """After the renames: the old current build becomes retired, the new one current."""
    with conn.transaction():
        old = current_build(conn, key, host)
        if old is not None and old.id != build_id:
            conn.execute(
                "UPDATE template_builds SET status = 'retired', is_current = false,"
                " database = %s, retired_at = now() WHERE id = %s",
                (retired_db_name(key, old.version), old.id),
            )
        conn.execute(
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
        conn.execute(
            "UPDATE operations SET state = 'done', step = 'swap', result = %s, updated_at = now(),"
            " finished_at = now() WHERE id = %s",
            (Jsonb(dict(stats)), op_id),
        )


# ---------------------------------------------------------------------------- the key lock


def _lock_id(key: str, host: str | None = None) -> int:
    # The local host's lock keeps the id it always had; another host's builds of a key run
    # beside them (each host's databases are its own), so its lock is its own too.
    name = f"monk.template:{key}" if host is None else f"monk.template:{host}:{key}"
    raw = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    return raw - (1 << 64) if raw >= (1 << 63) else raw


def try_key_lock(conn: Conn, key: str, host: str | None = None) -> bool:
    """Take the key's session advisory lock (of ``host``; None: the local one) if free."""
    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (_lock_id(key, host),)).fetchone()
    return bool(row and row[0])


def key_unlock(conn: Conn, key: str, host: str | None = None) -> None:
    conn.execute("SELECT pg_advisory_unlock(%s)", (_lock_id(key, host),))


def key_is_free(conn: Conn, key: str, host: str | None = None) -> bool:
    """Whether nobody holds the key's lock (a build or check of it is not running)."""
    if not try_key_lock(conn, key, host):
        return False
    key_unlock(conn, key, host)
    return True


@contextlib.contextmanager
def key_lock(conn: Conn, key: str, host: str | None = None) -> Iterator[None]:
    """Hold the key's session advisory lock (waiting for another build as long as it takes)."""
    conn.execute("SET statement_timeout = 0")
    try:
        conn.execute("SELECT pg_advisory_lock(%s)", (_lock_id(key, host),))
    finally:
        conn.execute("RESET statement_timeout")
    try:
        yield
    finally:
        with contextlib.suppress(psycopg.Error):
            key_unlock(conn, key, host)


@contextlib.contextmanager
def key_lock_if_free(conn: Conn, key: str, host: str | None = None) -> Iterator[bool]:
    """Hold the key's lock for the block if nobody holds it; yields whether it was taken."""
    if not try_key_lock(conn, key, host):
        yield False
        return
    try:
        yield True
    finally:
        key_unlock(conn, key, host)
