"""Upgrade steps between template builds: the ``template_upgrades`` rows.

A build that replaces a current build records one step, predecessor → build; a tenant at any
older build of the key follows the steps in order (``path``). Every function takes an open
connection to the system database.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import class_row

Conn = psycopg.Connection[Any]


@dataclass(frozen=True)
class UpgradeStep:
    """SQL that brings a database of build ``from_version`` to ``to_version``."""

    from_version: str
    to_version: str
    script: Sequence[str]
    """Run in order, in one transaction, in the tenant's database as ``pg_database_owner``."""
    level: int
    """The migration level the database is at after the step."""


def record_step(conn: Conn, host: str, key: str, step: UpgradeStep) -> None:
    """Record (or replace: a forced rebuild of the same pair) the step of one build pair."""
    conn.execute(
        "INSERT INTO template_upgrades (host, key, from_version, to_version, script, level)"
        " VALUES (%s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (host, key, from_version, to_version)"
        " DO UPDATE SET script = EXCLUDED.script, level = EXCLUDED.level, created_at = now()",
        (host, key, step.from_version, step.to_version, list(step.script), step.level),
    )


def path(
    conn: Conn, host: str, key: str, from_version: str, to_version: str
) -> list[UpgradeStep] | None:
    """The steps from ``from_version`` to ``to_version``, in order ([] when equal); None when
    no chain of recorded steps leads there.

    Builds form a chain (each records the step from the build it replaced); a key rebuilt back
    to an earlier version (A → B → A) makes a cycle, which the walk never enters twice. Of
    several paths the one with the fewest steps wins.
    """
    if from_version == to_version:
        return []
    with conn.cursor(row_factory=class_row(_Edge)) as cur:
        cur.execute(
            "WITH RECURSIVE walk (to_version, trail) AS ("
            "  SELECT to_version, ARRAY[from_version, to_version] FROM template_upgrades"
            "   WHERE host = %(host)s AND key = %(key)s AND from_version = %(from)s"
            "  UNION ALL"
            "  SELECT u.to_version, w.trail || u.to_version"
            "   FROM walk w JOIN template_upgrades u"
            "    ON u.host = %(host)s AND u.key = %(key)s AND u.from_version = w.to_version"
            "   WHERE u.to_version <> ALL(w.trail) AND w.to_version <> %(to)s)"
            " SELECT trail FROM walk WHERE to_version = %(to)s"
            " ORDER BY cardinality(trail) LIMIT 1",
            {"host": host, "key": key, "from": from_version, "to": to_version},
        )
        found = cur.fetchone()
    if found is None:
        return None
    trail = found.trail
    rows = conn.execute(
        "SELECT from_version, to_version, script, level FROM template_upgrades"
        " WHERE host = %s AND key = %s AND (from_version, to_version) IN"
        "  (SELECT * FROM unnest(%s::text[], %s::text[]))",
        (host, key, trail[:-1], trail[1:]),
    ).fetchall()
    by_pair = {(r[0], r[1]): UpgradeStep(r[0], r[1], tuple(r[2]), int(r[3])) for r in rows}
    return [by_pair[pair] for pair in itertools.pairwise(trail)]


@dataclass(frozen=True)
class _Edge:
    trail: list[str]
