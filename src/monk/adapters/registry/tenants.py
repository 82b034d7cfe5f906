"""The provisioning pipeline's statements on the system database: reserve a name (intent,
journal, a host's spare role claimed), obtain a role, configure a database, activate. The steps
that change a server's catalogs run as system functions (``make_tenant_role``,
``configure_tenant_database``, ``claim_spare_role_or_raise``) on the registry's session: one
round trip each, and no DDL sent by the client (psycopg would discard the session's prepared
statements)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import psycopg
from psycopg import Cursor, sql
from psycopg.rows import class_row, kwargs_row
from psycopg.types.json import Jsonb

from monk.adapters.registry import TENANT_COLUMNS as _COLUMNS
from monk.adapters.registry import Tenant, rendered
from monk.adapters.registry.locks import advisory_key
from monk.core.identifiers import validate_database_name, validate_role_name
from monk.core.tenant_names import TenantName
from monk.errors import MonkError

Conn = psycopg.Connection[Any]


@dataclass(frozen=True)
class Reservation:
    """What ``reserve`` answers: whether it took the name's lock, the template's client
    sessions, the intent row if it wrote one (only when it took the lock), and whether the
    host's spare role was claimed for it (None: no claim ran)."""

    locked: bool
    sessions: int
    tenant: Tenant | None
    claimed: bool | None


_RESERVE = rendered(
    sql.SQL(
        "WITH gate AS MATERIALIZED ("
        " SELECT CASE WHEN %(have_lock)s THEN true ELSE pg_try_advisory_lock(%(lock)s) END"
        " AS locked,"
        " CASE WHEN %(async)s THEN set_config('synchronous_commit', 'off', true) END AS async,"
        # The function under pg_stat_activity, not the view: the view's joins cost 0.2 ms of
        # this ~1 ms statement (p50; docs/benchmarks.md, "Session 10").
        " (SELECT count(*) FROM pg_stat_get_activity(NULL) AS a"
        " JOIN pg_database AS d ON d.oid = a.datid WHERE d.datname = %(template_db)s"
        " AND a.backend_type = 'client backend') AS sessions,"
        # Another host's row held (FOR KEY SHARE) until the intent commits: 'host remove'
        # locks it FOR UPDATE before it counts tenants, so it never removes a host a provision
        # is placing onto (it waits, then sees the intent).
        " (SELECT count(*) FROM (SELECT 1 FROM hosts WHERE name = %(host)s AND NOT is_local"
        " FOR KEY SHARE) h) AS placed),"
        " intent AS (INSERT INTO tenants (id, name, name_key, database, host, is_active, status,"
        " template_key, template_version, role_name, step, idempotency_key)"
        " SELECT %(id)s, %(name)s, %(key)s, %(database)s, %(host)s, false, 'provisioning',"
        " %(template)s, %(version)s, %(role)s, 'intent', %(idempotency_key)s"
        " FROM gate WHERE gate.locked AND (NOT %(remote)s OR gate.placed > 0)"
        " AND NOT EXISTS (SELECT 1 FROM tenants WHERE deleted_at IS NULL"
        " AND (name_key = %(key)s OR database = %(database)s))"
        " AND (%(spares_ok)s OR NOT EXISTS (SELECT 1 FROM spares WHERE host = %(host)s"
        " AND template_key = %(template)s AND status = 'ready'))"
        " RETURNING {columns}),"
        " op AS (INSERT INTO operations (id, kind, subject, database, host, state, params)"
        " SELECT %(op)s, %(kind)s, %(key)s, %(database)s, %(host)s, 'running', %(params)s"
        " FROM intent),"
        # A host of the fleet's spare role: marked with the intent, renamed there after the
        # commit. (The registry's server claims its spare role in the activation instead.)
        " claimed AS (SELECT claim_host_spare_role(%(spare)s, %(keyholder)s, %(host)s, intent.id)"
        " AS ok FROM intent WHERE %(spare)s::text IS NOT NULL)"
        " SELECT gate.locked AS gate_locked, gate.sessions AS gate_sessions,"
        " claimed.ok AS gate_claimed, intent.*"
        " FROM gate LEFT JOIN intent ON true LEFT JOIN claimed ON true"
    ).format(columns=_COLUMNS)
)


def reserve(
    conn: Conn,
    name: TenantName,
    *,
    tenant_id: UUID,
    op_id: UUID,
    host: str,
    template_key: str,
    template_version: str,
    template_database: str,
    idempotency_key: str | None,
    spare_role: str | None,
    keyholder: UUID,
    async_commit: bool,
    have_lock: bool = False,
    spares_ok: bool = False,
    operation: str = "provision",
    params: Mapping[str, Any] | None = None,
    remote: bool = False,
) -> Reservation:
    """Reserve the name (the pipeline's first step) in one statement, its own transaction: take the
    name's session lock, count the template's sessions, and only if the lock was free, no live
    tenant has the name or its database and no spare of the template is ready, write the intent,
    its journal entry (a running ``provision`` operation) and, on a host of the fleet
    (``remote``), mark ``spare_role``'s row (if given) with the intent (the caller renames it
    on the host). On the registry's own server nothing else is written: ``tenants`` and
    ``operations`` are all a FILE_COPY clone's checkpoint finds dirty (its spare role is
    claimed in the activation, ``spare_roles.queue_claim``). Anything else writes nothing: the
    caller releases the lock if it was
    taken and takes the full path. The statement's snapshot predates its lock: a tenant
    committed in between is caught by the unique indexes (an error: ``registry.intent_errors``).
    ``async_commit``: the commit does not wait for its WAL flush (a later synchronous commit on
    the same server flushes it). ``have_lock``: the caller holds the name's lock already (the
    statement takes it otherwise); ``spares_ok``: write the intent even if a spare is ready (the
    caller tried the warm handout). ``operation`` and ``params``: the journal entry's kind and
    parameters (default: a ``provision`` of the template's version; a restore from archive
    records its archive). ``remote``: ``host`` is a host of the fleet, whose row must be there
    (no intent otherwise: it was removed)."""
    if spare_role is not None and not remote:
        raise ValueError("a spare role of the registry's server is claimed in the activation")
    values = {
        "lock": advisory_key(name.database),
        "async": async_commit,
        "template_db": template_database,
        "id": tenant_id,
        "name": name.display,
        "key": name.key,
        "database": name.database,
        "host": host,
        "template": template_key,
        "version": template_version,
        "role": name.role,
        "idempotency_key": idempotency_key,
        "op": op_id,
        "kind": operation,
        "params": Jsonb(
            dict(params)
            if params is not None
            else {"template": template_key, "version": template_version}
        ),
        "spare": spare_role,
        "keyholder": keyholder,
        "have_lock": have_lock,
        "spares_ok": spares_ok,
        "remote": remote,
    }
    with conn.cursor(row_factory=kwargs_row(_reservation)) as cur:
        row = cur.execute(_RESERVE, values, prepare=True).fetchone()
    assert row is not None
    return row


def _reservation(
    gate_locked: bool, gate_sessions: int, gate_claimed: bool | None, **columns: Any
) -> Reservation:
    tenant = Tenant(**columns) if columns.get("id") is not None else None
    return Reservation(bool(gate_locked), int(gate_sessions), tenant, gate_claimed)


_ACTIVATION = rendered(
    sql.SQL(
        "WITH configured AS MATERIALIZED ("
        " SELECT configure_tenant_database(%(database)s, %(role)s, %(mark)s, %(settings)s,"
        " %(role_limit)s)),"
        " op AS (UPDATE operations SET state = 'done', step = 'active', error = NULL,"
        " result = NULL, updated_at = now(), finished_at = now() WHERE id = %(op)s),"
        " activated AS (UPDATE tenants SET status = 'active', is_active = true, step = 'active',"
        " migration_level = %(level)s, template_version = %(version)s,"
        " connection_limit = %(connection_limit)s WHERE id = %(id)s"
        " RETURNING {columns})"
        " SELECT activated.* FROM activated, (SELECT count(*) FROM configured) AS c"
    ).format(columns=_COLUMNS)
)


_ACTIVATION_ONLY = rendered(
    sql.SQL(
        "WITH op AS (UPDATE operations SET state = 'done', step = 'active', error = NULL,"
        " result = NULL, updated_at = now(), finished_at = now() WHERE id = %(op)s)"
        " UPDATE tenants SET status = 'active', is_active = true, step = 'active',"
        " migration_level = %(level)s, template_version = %(version)s,"
        " connection_limit = %(connection_limit)s WHERE id = %(id)s"
        " RETURNING {columns}"
    ).format(columns=_COLUMNS)
)


def queue_activation(
    conn: Conn,
    tenant_id: UUID,
    op_id: UUID,
    *,
    migration_level: int,
    template_version: str,
    configure: tuple[str, str, str, Jsonb, int] | None,
    connection_limit: int | None = None,
) -> Cursor[Tenant]:
    """Configure and activate, a provision's last writes in one statement:
    ``configure_tenant_database`` (``configure``: ``configure_args``: database, role, mark,
    settings, the role's connection limit), the tenant active with its own connection limit
    (None: the default), its journal entry done. Queued (read with ``fetch_tenant``); the caller's
    transaction commits it. ``configure`` None: the database is on another host, configured
    there before (``admin.configure_database``): activation alone."""
    cur = conn.cursor(row_factory=class_row(Tenant))
    if configure is None:
        cur.execute(
            _ACTIVATION_ONLY,
            {
                "connection_limit": connection_limit,
                "op": op_id,
                "id": tenant_id,
                "level": migration_level,
                "version": template_version,
            },
        )
        return cur
    database, role, mark, settings, role_limit = configure
    cur.execute(
        _ACTIVATION,
        {
            "database": database,
            "role": role,
            "mark": mark,
            "settings": settings,
            "role_limit": role_limit,
            "connection_limit": connection_limit,
            "op": op_id,
            "id": tenant_id,
            "level": migration_level,
            "version": template_version,
        },
        prepare=True,
    )
    return cur


def make_role(
    conn: Conn, role: str, *, verifier: str, mark: str, login: bool, connection_limit: int
) -> None:
    """Obtain a role, new: ``make_tenant_role`` (a leftover of that name dropped first, the
    password given as a SCRAM verifier, the ownership mark, membership for a CREATEROLE admin)."""
    validate_role_name(role)
    conn.execute(
        "SELECT make_tenant_role(%s, %s, %s, %s, %s)",
        (role, verifier, mark, login, connection_limit),
        prepare=True,
    )


def configure(conn: Conn, args: tuple[str, str, str, Jsonb, int]) -> None:
    """Configure on its own: ``configure_tenant_database`` with ``configure_args`` in one
    statement (a provision's activation runs it in its own statement, ``queue_activation``)."""
    conn.execute("SELECT configure_tenant_database(%s, %s, %s, %s, %s)", args)


def configure_args(
    database: str, role: str, mark: str, settings: Mapping[str, str], connection_limit: int
) -> tuple[str, str, str, Jsonb, int]:
    """The arguments of ``configure_tenant_database``, validated as the client composes none."""
    validate_database_name(database)
    validate_role_name(role)
    for key in settings:
        if not all(part.isidentifier() for part in key.split(".")):
            raise MonkError(f"invalid database setting name {key!r}")
    return database, role, mark, Jsonb(dict(settings)), connection_limit
