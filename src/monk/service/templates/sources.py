"""Template sources: where a key's source folder is, what it holds, and its validated plan.
No database here, except ``recorded_source``/``rebuild_source``, which read the registry."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from monk.adapters.registry import templates as builds
from monk.adapters.registry.templates import TemplateBuild
from monk.core.schema_compiler import (
    CompiledTemplate,
    Statement,
    compile_template,
    seed_statements,
)
from monk.core.template_names import validate_template_key
from monk.errors import InvalidTemplateSource, TemplateNotFound
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

Conn = psycopg.Connection[Any]


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
            raise no_source(key)
    else:
        path = source_dir.resolve()
        folders = [*folders, path.parent]
    source = load_source(path, key)
    return resolve_parents(source, lambda parent: find_source(parent, folders))


def no_source(key: str) -> TemplateNotFound:
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
    if inside(path, [builtin_sources_dir()]):
        return "builtin"
    if inside(path, settings.template_path):
        return "MONK_TEMPLATE_PATH"
    return "--source"


def inside(path: Path, folders: Sequence[Path]) -> bool:
    resolved = path.resolve()
    return any(resolved.is_relative_to(folder.resolve()) for folder in folders)


def path_labels(settings: Settings) -> dict[str, str]:
    """The server folders monk knows, each with the name it is shown by instead (see
    ``monk.core.redact``): sources, data and archive folders."""
    labels = {str(settings.data_dir): "<MONK_DATA_DIR>", str(settings.archives): "<archives>"}
    labels |= {str(folder): "<MONK_TEMPLATE_PATH>" for folder in settings.template_path}
    labels[str(builtin_sources_dir())] = "<builtin>"
    return labels | {str(Path(k).resolve()): v for k, v in labels.items()}


def recorded_source(reg: Conn, host: str, key: str) -> Path | None:
    """The folder the current build of ``key`` (else its newest build) was read from."""
    found = builds.list_builds(reg, host, key, everything=True)
    # Stable sort: the current build first, then newest first as listed.
    for build in sorted(found, key=lambda b: not b.is_current):
        if build.source:
            return Path(build.source)
    return None


def rebuild_source(
    reg: Conn, host: str, settings: Settings, key: str, *, anywhere: bool
) -> Path | None:
    """The folder a build of ``key`` without ``--source`` reads: None when a configured folder
    (built-in, MONK_TEMPLATE_PATH) has the key; else the folder its builds were made from (by
    ``--source``), if ``anywhere`` (the CLI, run by the operator who chose that folder) or if
    it lies inside a configured folder (the HTTP API reads no other). TemplateNotFound says how
    to rebuild otherwise, naming no path."""
    if find_source(validate_template_key(key), source_folders(settings)) is not None:
        return None
    recorded = recorded_source(reg, host, key)
    if recorded is None:
        raise no_source(key)
    if not (anywhere or inside(recorded, source_folders(settings))):
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
class Plan:
    """A validated source, ready to execute: nothing wrong with it can be seen without a DB."""

    source: TemplateSource
    version: str
    compiled: CompiledTemplate
    seeds: list[Statement]
    seed_origins: list[tuple[str, int]]  # (table, record index) of each seed statement


def plan(source: TemplateSource) -> Plan:
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
    return Plan(source, content_hash(source), compiled, seeds, origins)


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


def describe_source(settings: Settings, key: str, source_dir: Path | None = None) -> dict[str, Any]:
    """What a source holds and the version a build of it would have (no database needed)."""
    planned = plan(resolve_source(settings, key, source_dir))
    source = planned.source
    return {
        "key": source.key,
        "version": planned.version,
        "path": str(source.path),
        "description": source.description,
        "lineage": list(source.lineage),
        "schemas": [table.name for table in planned.compiled.tables],
        "records": {name: len(records) for name, records in source.data.items()},
        "migrations": [f"{m.number:04d}_{m.name}" for m in source.migrations],
        "database_settings": dict(source.database_settings),
    }
