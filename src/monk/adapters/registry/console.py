"""What the web console reads: counts and pages of the system database, and the server's
statistics views. Nothing here opens a tenant or template database."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql

Conn = psycopg.Connection[Any]

# The columns the tenants table may be sorted by (the request names the key, never SQL).
SORTS = {
    "name": sql.SQL("name_key"),
    "status": sql.SQL("status"),
    "template": sql.SQL("template_key"),
    "host": sql.SQL("host"),
    "created": sql.SQL("created_at"),
}


@dataclass(frozen=True)
class Minute:
    at: datetime
    provisions: int
    p50_ms: float = 0.0
    p99_ms: float = 0.0


@dataclass
class Overview:
    by_status: dict[str, int] = field(default_factory=dict)
    by_template_host: list[tuple[str, str, int]] = field(default_factory=list)
    minutes: list[Minute] = field(default_factory=list)
    spares_ready: dict[str, int] = field(default_factory=dict)
    purges_queued: int = 0
    purges_failing: int = 0
    events_undelivered: int = 0
    events_oldest: datetime | None = None
    builds_not_ready: list[dict[str, Any]] = field(default_factory=list)


def overview(conn: Conn) -> Overview:
    """The overview's figures: a handful of aggregate queries over indexed columns."""
    out = Overview()
    for status, n in conn.execute(
        "SELECT status, count(*) FROM tenants WHERE deleted_at IS NULL GROUP BY 1 ORDER BY 1"
    ).fetchall():
        out.by_status[str(status)] = int(n)
    out.by_template_host = [
        (str(t), str(h), int(n))
        for t, h, n in conn.execute(
            "SELECT coalesce(template_key, '(none)'), host, count(*) FROM tenants"
            " WHERE deleted_at IS NULL GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2 LIMIT 50"
        ).fetchall()
    ]
    # Provisions finished per minute of the last hour, by every process, and their latency as
    # the journal timed them (intent to activation; a warm handout's one statement).
    out.minutes = [
        Minute(at, int(n), float(p50), float(p99))
        for at, n, p50, p99 in conn.execute(
            "SELECT date_trunc('minute', finished_at), count(*),"
            " percentile_cont(0.5) WITHIN GROUP (ORDER BY ms),"
            " percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)"
            " FROM (SELECT finished_at,"
            "  1000 * extract(epoch FROM finished_at - created_at)::float8 AS ms"
            "  FROM operations WHERE kind = 'provision' AND state = 'done'"
            "  AND finished_at > now() - interval '1 hour') o"
            " GROUP BY 1 ORDER BY 1"
        ).fetchall()
    ]
    for key, n in conn.execute(
        "SELECT template_key, count(*) FROM spares WHERE status = 'ready' GROUP BY 1"
    ).fetchall():
        out.spares_ready[str(key)] = int(n)
    row = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE attempts > 0) FROM operations"
        " WHERE kind = 'purge' AND state = 'queued'"
    ).fetchone()
    if row:
        out.purges_queued, out.purges_failing = int(row[0]), int(row[1])
    row = conn.execute(
        "SELECT count(*), min(created_at) FROM events WHERE delivered_at IS NULL"
    ).fetchone()
    if row:
        out.events_undelivered, out.events_oldest = int(row[0]), row[1]
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute(
            "SELECT key, version, host, status, error, created_at FROM template_builds"
            " WHERE dropped_at IS NULL AND status <> 'ready' ORDER BY created_at DESC LIMIT 50"
        )
        out.builds_not_ready = cur.fetchall()
    return out


@dataclass(frozen=True)
class TenantRow:
    name: str
    database: str
    status: str
    template_key: str | None
    template_version: str | None
    host: str
    created_at: datetime


def tenant_page(
    conn: Conn,
    *,
    search: str = "",
    status: str = "",
    template: str = "",
    host: str = "",
    sort: str = "created",
    descending: bool = False,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[TenantRow], int]:
    """One page of live tenants (trashed included), and how many match."""
    clauses: list[sql.Composable] = [sql.SQL("deleted_at IS NULL")]
    params: list[Any] = []
    if search:
        # LIKE's own wildcards in the search are literal
        pattern = "%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        clauses.append(sql.SQL("(name ILIKE %s OR database ILIKE %s)"))
        params += [pattern, pattern]
    if status:
        clauses.append(sql.SQL("status = %s"))
        params.append(status)
    if template:
        clauses.append(sql.SQL("template_key = %s"))
        params.append(template)
    if host:
        clauses.append(sql.SQL("host = %s"))
        params.append(host)
    where = sql.SQL(" AND ").join(clauses)
    order = SORTS.get(sort, SORTS["created"])
    direction = sql.SQL("DESC") if descending else sql.SQL("ASC")
    query = sql.SQL(
        "SELECT name, database, status, template_key, template_version, host, created_at,"
        " count(*) OVER () FROM tenants WHERE {} ORDER BY {} {}, id {} LIMIT %s OFFSET %s"
    ).format(where, order, direction, direction)
    rows = conn.execute(query, [*params, limit, offset]).fetchall()
    if rows:
        total = int(rows[0][-1])
    else:
        count = sql.SQL("SELECT count(*) FROM tenants WHERE {}").format(where)
        found = conn.execute(count, params).fetchone()
        total = int(found[0]) if found else 0
    return [TenantRow(*r[:-1]) for r in rows], total


def filter_choices(conn: Conn) -> tuple[list[str], list[str]]:
    """The template keys and hosts live tenants have, for the filters' menus."""
    templates = conn.execute(
        "SELECT DISTINCT template_key FROM tenants WHERE deleted_at IS NULL"
        " AND template_key IS NOT NULL ORDER BY 1"
    ).fetchall()
    hosts = conn.execute("SELECT name FROM hosts ORDER BY name").fetchall()
    return [str(t) for (t,) in templates], [str(h) for (h,) in hosts]


def tenant_history(
    conn: Conn, name_key: str, tenant_id: UUID, *, limit: int = 50
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The tenant's journal entries and events, newest first."""
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute(
            "SELECT id, kind, state, step, error, created_at, finished_at FROM operations"
            " WHERE subject = %s ORDER BY created_at DESC LIMIT %s",
            (name_key, limit),
        )
        ops = cur.fetchall()
        cur.execute(
            "SELECT seq, kind, created_at, delivered_at, attempts, last_error FROM events"
            " WHERE tenant_id = %s ORDER BY seq DESC LIMIT %s",
            (tenant_id, limit),
        )
        events = cur.fetchall()
    return ops, events


def database_stats(conn: Conn, database: str) -> tuple[int | None, int | None]:
    """(size in bytes, sessions now) of ``database`` on the server ``conn`` is on, from its
    statistics functions and views: no connection to that database."""
    row = conn.execute(
        "SELECT (SELECT pg_database_size(oid) FROM pg_database WHERE datname = %s),"
        " (SELECT numbackends FROM pg_stat_database WHERE datname = %s)",
        (database, database),
    ).fetchone()
    if row is None:
        return None, None
    return row[0], row[1]


def operations_page(
    conn: Conn, *, kind: str = "", state: str = "", subject: str = "", limit: int = 100
) -> list[dict[str, Any]]:
    clauses: list[sql.Composable] = [sql.SQL("TRUE")]
    params: list[Any] = []
    for column, value in (("kind", kind), ("state", state), ("subject", subject)):
        if value:
            clauses.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
            params.append(value)
    query = sql.SQL(
        "SELECT id, kind, subject, host, state, step, error, attempts, created_at, finished_at"
        " FROM operations WHERE {} ORDER BY created_at DESC LIMIT %s"
    ).format(sql.SQL(" AND ").join(clauses))
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute(query, [*params, limit])
        return cur.fetchall()


def events_page(
    conn: Conn, *, kind: str = "", undelivered: bool = False, limit: int = 100
) -> list[dict[str, Any]]:
    clauses: list[sql.Composable] = [sql.SQL("TRUE")]
    params: list[Any] = []
    if kind:
        clauses.append(sql.SQL("e.kind = %s"))
        params.append(kind)
    if undelivered:
        clauses.append(sql.SQL("e.delivered_at IS NULL"))
    query = sql.SQL(
        "SELECT e.seq, e.kind, e.payload->>'name' AS tenant, e.created_at, e.delivered_at,"
        " e.attempts, e.next_attempt_at, e.last_error FROM events e WHERE {}"
        " ORDER BY e.seq DESC LIMIT %s"
    ).format(sql.SQL(" AND ").join(clauses))
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute(query, [*params, limit])
        return cur.fetchall()


def builds(conn: Conn) -> list[dict[str, Any]]:
    """Every build not dropped (and the failed ones), with its live tenants."""
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute(
            "SELECT b.key, b.version, b.host, b.status, b.is_current, b.size_bytes,"
            " b.table_count, b.record_count, b.error, b.created_at, b.retired_at,"
            " (SELECT count(*) FROM tenants t WHERE t.deleted_at IS NULL"
            "   AND t.template_key = b.key AND t.template_version = b.version"
            "   AND t.host = b.host) AS tenants,"
            # a build in progress: the step its journal entry has reached
            " CASE WHEN b.status = 'building' THEN (SELECT o.step FROM operations o"
            "   WHERE o.kind = 'template_build' AND o.subject = b.key AND o.host = b.host"
            "   AND o.state = 'running' ORDER BY o.created_at DESC LIMIT 1) END AS step"
            " FROM template_builds b WHERE b.dropped_at IS NULL"
            " ORDER BY b.key, b.created_at DESC LIMIT 500"
        )
        return cur.fetchall()
