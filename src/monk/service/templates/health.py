"""Health checks of a template: of a staging build before it is closed, and ``check`` of the
current build, which never opens the template: it clones it into a scratch database
``monk_check_K_<hex>``, runs the checks there, and drops it."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psycopg

from monk.adapters.postgres import admin, template_db
from monk.adapters.postgres.catalog import read_catalog
from monk.adapters.postgres.connection import ServerTarget, connect
from monk.adapters.registry import templates as builds
from monk.adapters.registry.templates import TemplateBuild
from monk.core.catalog import Catalog
from monk.core.clone_strategy import CloneChoice
from monk.core.identifiers import MAX_IDENTIFIER_BYTES
from monk.core.schema_compiler import CORE_TABLES
from monk.core.system_columns import SYSTEM_COLUMNS
from monk.core.template_names import validate_template_key
from monk.errors import TemplateNotFound
from monk.service import clone_support
from monk.service.templates.sources import Plan
from monk.settings import Settings

Conn = psycopg.Connection[Any]

OWNER_ROLE = "pg_database_owner"
"""Owner of every object inside a template (not of the template database itself): the built-in
role whose only member is the owner of the current database. A tenant's role owns its clone,
and so owns every object in it, without reassigning anything."""

CHECK_DB_PREFIX = "monk_check_"


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


def check_mark(settings: Settings) -> str:
    """The comment on a scratch check database: whose it is (see ``recovery``)."""
    return f"monk:{settings.system_db_name}"


def expected_counts(plan: Plan) -> dict[str, int]:
    counts = {
        table.name: len(plan.source.data.get(table.name, ())) for table in plan.compiled.tables
    }
    counts["users"] = 0
    counts["schemas"] = len(plan.compiled.tables)
    counts["columns"] = sum(len(table.columns) for table in plan.compiled.tables)
    return counts


def inspect(db: Conn, database: str, expected: Mapping[str, int] | None) -> HealthReport:
    """Check the database against its own ``schemas``/``columns`` rows and the catalog.

    ``expected``: exact row counts per table (None: only counted, e.g. after migrations).
    """
    problems: list[str] = []
    for table in template_db.missing_registered_tables(db):
        problems.append(f"table {table} of schema registry row is missing")
    for (
        table,
        column,
        want_type,
        want_required,
        got_type,
        got_not_null,
    ) in template_db.registered_columns(db):
        if got_type is None:
            problems.append(f"column {table}.{column} is registered but missing")
        elif got_type != want_type:
            problems.append(f"column {table}.{column} is {got_type}, registered as {want_type}")
        elif bool(got_not_null) != bool(want_required):
            problems.append(
                f"column {table}.{column} NOT NULL is {got_not_null}, registered {want_required}"
            )
    for table, column in template_db.unregistered_columns(db, SYSTEM_COLUMNS):
        problems.append(f"column {table}.{column} is not registered in columns")
    for table, name in template_db.unvalidated_constraints(db):
        problems.append(f"constraint {name} on {table} is not validated")
    for kind, name in template_db.not_owned_by(db, OWNER_ROLE):
        problems.append(f"{kind} {name} is not owned by {OWNER_ROLE}")
    tables = template_db.public_tables(db)
    for core in CORE_TABLES:
        if core not in tables:
            problems.append(f"core table {core} is missing")
    counts = {table: template_db.row_count(db, table) for table in tables}
    for table, want in (expected or {}).items():
        if counts.get(table, 0) != want:
            problems.append(f"table {table} has {counts.get(table, 0)} rows, expected {want}")
    return HealthReport(database, len(tables), sum(counts.values()), counts, tuple(problems))


def check(reg: Conn, adm: Conn, target: ServerTarget, settings: Settings, key: str) -> HealthReport:
    """Re-run the health checks on the current build of ``key``, in a scratch clone; ``reg``
    holds the key's lock.

    Also checks that the template itself is closed (IS_TEMPLATE, no connections allowed, no
    session, CONNECT revoked from PUBLIC) and that the clone's counts match the build's.
    """
    build = builds.current_build(reg, key, target.name)
    if build is None:
        raise TemplateNotFound(f"template {key!r} has no current build", template=key)
    problems = closed_problems(adm, build.database)
    if problems and not admin.database_exists(adm, build.database):
        return HealthReport(build.database, 0, 0, {}, tuple(problems))
    scratch = f"{CHECK_DB_PREFIX}{validate_template_key(key)}_{secrets.token_hex(4)}"
    assert len(scratch) <= MAX_IDENTIFIER_BYTES
    admin.create_database(
        adm, scratch, template=build.database, choice=_choice(reg, target, settings, build)
    )
    try:
        admin.comment_on_database(adm, scratch, check_mark(settings))
        with connect(target, scratch, purpose="template-check") as db:
            report = inspect(db, build.database, None)
            marker = template_db.clone_marker(db)
    finally:
        admin.drop_database(adm, scratch)
    if marker != (build.key, build.version):
        problems.append(f"the template carries marker {marker}, not {build.key} {build.version}")
    if build.table_count is not None and report.table_count != build.table_count:
        problems.append(f"{report.table_count} tables, the build recorded {build.table_count}")
    if build.record_count is not None and report.record_count != build.record_count:
        problems.append(f"{report.record_count} records, the build recorded {build.record_count}")
    return dataclasses.replace(report, problems=(*problems, *report.problems))


def _choice(
    reg: Conn, target: ServerTarget, settings: Settings, build: TemplateBuild
) -> CloneChoice:
    """A scratch clone is cloned as a tenant would be (a large template's check then costs
    what a provision does), with the host's file cloning as recorded."""
    found = clone_support.recorded(reg, target.name)
    return clone_support.choice(settings, build, supported=found is not None and found.supported)


def read_build_catalog(
    reg: Conn, adm: Conn, target: ServerTarget, settings: Settings, build: TemplateBuild
) -> Catalog:
    """The catalog of a build made before builds recorded theirs, read from a scratch clone
    (the template itself is never opened) made with the strategy of every clone of it; the
    caller holds the key's lock."""
    scratch = f"{CHECK_DB_PREFIX}{validate_template_key(build.key)}_{secrets.token_hex(4)}"
    admin.create_database(
        adm, scratch, template=build.database, choice=_choice(reg, target, settings, build)
    )
    try:
        admin.comment_on_database(adm, scratch, check_mark(settings))
        with connect(target, scratch, purpose="template-check") as db:
            return read_catalog(db)
    finally:
        admin.drop_database(adm, scratch)


def closed_problems(adm: Conn, database: str) -> list[str]:
    access = admin.template_access(adm, database)
    if access is None:
        return [f"database {database} does not exist"]
    problems = []
    if not access.is_template:
        problems.append(f"{database} is not marked IS_TEMPLATE")
    if access.allows_connections:
        problems.append(f"{database} allows connections")
    if access.public_may_connect:
        problems.append(f"{database} grants CONNECT to PUBLIC")
    if admin.sessions_on(adm, database):
        problems.append(f"{database} has sessions")
    return problems
