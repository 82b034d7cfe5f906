"""The upgrade step a build records from its predecessor, and what it records for its successor.

A step's script, run in one transaction in a database of the predecessor build (see
``monk.adapters.registry.upgrades``), is in this order:

    0. the changes of monk's own tables since the predecessor's compiler version
       (``schema_compiler.CORE_UPGRADES``)
    1. the schema change (``monk.core.schema_diff``) between the schemas the predecessor
       compiled and the new ones: DDL, then the ``schemas``/``columns`` rows (one chunk)
    2. each migration file numbered above the predecessor's level (a chunk each)
    3. the metadata sync (``template_db.SYNC_COLUMNS``): ``columns`` follows the catalog

which is the order a fresh build runs the same things in (tables and rows, migrations, sync), so
a database brought forward step by step has the catalog and registry rows of a fresh clone.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg

from monk.adapters.postgres import template_db
from monk.adapters.registry import templates as builds
from monk.adapters.registry.templates import RecordedPlan, TemplateBuild
from monk.adapters.registry.upgrades import UpgradeStep
from monk.core.schema_compiler import compile_template, core_upgrade
from monk.core.schema_diff import schema_change
from monk.core.upgrade_plan import MigrationEntry, check_applied_migrations
from monk.errors import InvalidTemplateSource
from monk.service.templates.sources import Plan
from monk.templates.source import TemplateSource

log = logging.getLogger(__name__)

Conn = psycopg.Connection[Any]


def migration_level(source: TemplateSource) -> int:
    return max((m.number for m in source.migrations), default=0)


def manifest(source: TemplateSource) -> list[MigrationEntry]:
    return [MigrationEntry.of(m.number, m.name, m.sql) for m in source.migrations]


def recorded_for_successor(plan: Plan) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(compiled schemas, migration manifest) a build of ``plan`` records in its row."""
    schemas = {name: plan.source.schemas[name] for name in sorted(plan.source.schemas)}
    return schemas, [entry.as_json() for entry in manifest(plan.source)]


def upgrade_step(reg: Conn, predecessor: TemplateBuild, plan: Plan) -> UpgradeStep | None:
    """The step from ``predecessor`` to a build of ``plan``; None when the predecessor was built
    before monk recorded its schemas (its tenants then have no path to the new build).

    Raises InvalidTemplateSource, before anything is built, for a schema change that cannot be
    applied safely or an applied migration file that changed or disappeared."""
    recorded = builds.recorded_plan(reg, predecessor.id)
    if recorded is None:
        log.warning(
            "build %s of %s recorded no schemas: no upgrade step to %s",
            predecessor.version,
            predecessor.key,
            plan.version,
        )
        return None
    try:
        return compose_step(predecessor, recorded, plan)
    except InvalidTemplateSource as exc:
        raise InvalidTemplateSource(
            f"template {plan.source.key!r} ({plan.source.path}): cannot upgrade build "
            f"{predecessor.version} to this source: {exc.message}",
            **exc.details,
        ) from None


def compose_step(predecessor: TemplateBuild, recorded: RecordedPlan, plan: Plan) -> UpgradeStep:
    """``upgrade_step`` once the predecessor's record is read (no I/O)."""
    applied = [MigrationEntry.from_json(entry) for entry in recorded.migration_manifest]
    check_applied_migrations(applied, manifest(plan.source), predecessor.version)
    added = [m for m in plan.source.migrations if m.number > predecessor.migration_level]
    script: list[str] = []
    # monk's own tables first, as a fresh build creates them before the template's.
    core = core_upgrade(predecessor.compiler_version)
    if core:
        script.append("\n".join(f"{statement};" for statement in core))
    # Unchanged schemas (only migration files or seed data changed) need no compile: compiling
    # saas's 27 schemas takes ~0.1 s.
    change = None
    if recorded.compiled_schemas != dict(plan.source.schemas):
        old = compile_template(recorded.compiled_schemas)
        # All files, not only the added ones: a column an earlier file dropped may leave the
        # schema.
        change = schema_change(old, plan.compiled, [m.sql for m in plan.source.migrations])
    if change:
        statements = [statement.as_string(None) + ";" for statement in change.statements]
        header = f"-- monk: schema change {predecessor.version} -> {plan.version}"
        script.append("\n".join([header, *statements]))
    script += [m.sql for m in added]
    script.append(template_db.SYNC_COLUMNS)
    return UpgradeStep(
        from_version=predecessor.version,
        to_version=plan.version,
        script=tuple(script),
        level=migration_level(plan.source),
    )
