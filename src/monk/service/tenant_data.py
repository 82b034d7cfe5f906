"""The tenant data API: describe a tenant's models, read and write their records.

Each call checks the user's access (``monk.core.data_query.require``), takes one connection to
the tenant's database from its host's connection budget (``Hosts.budget``), runs the adapter's
statements in one transaction, and hands the connection back. The models (``schemas`` and
``columns`` rows) are cached per (host, database, build), where the build is the tenant's
``template_key:template_version:migration_level`` as the system database records it: an upgrade
changes it, so the next request after the tenant state's refresh (MONK_TENANT_STATE_TTL_MS)
reads the models again. A statement that meets a column or table the cache still had (the
registry row updated a moment after the tenant's upgrade committed) drops the entry and runs
once more on fresh models.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg

from monk.adapters.postgres import tenant_data as data_db
from monk.adapters.registry.logins import TenantState
from monk.core import data_query as q
from monk.core.data_query import Action, Model
from monk.errors import InvalidQuery, ModelNotFound, RecordNotFound
from monk.service.pipeline import Hosts

T = TypeVar("T")
Conn = psycopg.Connection[Any]

_CACHE_MAX = 10_000  # tenant databases whose models one process keeps


@dataclass(frozen=True)
class Caller:
    """Who a data request is from: the tenant (its state now), the token's user and the access
    the token claims (as it was at login)."""

    state: TenantState
    user_id: str
    access: str


@dataclass(frozen=True)
class ReadQuery:
    where: str | None = None
    order: str | None = None
    limit: int | None = None
    offset: int | None = None
    select: str | None = None
    include_trashed: bool = False


class TenantData:
    """A user's access level is read from the tenant's ``users`` row on every request (in the
    round trip that opens its transaction): a user removed or lowered loses that access at
    once, though their token is still valid."""

    def __init__(self, hosts: Hosts) -> None:
        self.hosts = hosts
        self._lock = threading.Lock()
        self._models: dict[tuple[str, str], tuple[str | None, dict[str, Model]]] = {}

    # ------------------------------------------------------------------ plumbing

    def _cached(self, state: TenantState, conn: Conn) -> dict[str, Model]:
        key = (state.host, state.database)
        with self._lock:
            hit = self._models.get(key)
        if hit is not None and hit[0] == state.build:
            return hit[1]
        models = data_db.load_models(conn)
        with self._lock:
            if len(self._models) >= _CACHE_MAX:
                self._models.clear()  # bounded: a reload is one query
            self._models[key] = (state.build, models)
        return models

    @staticmethod
    def _begin(caller: Caller, conn: Conn) -> str:
        """Open the request's transaction as the tenant's role and return the lower of the
        token's access and the user's access now (read in the same round trip, so every
        request sees it current); ``deny`` for a user removed since the login."""
        try:
            user_id: uuid.UUID | None = uuid.UUID(caller.user_id)
        except ValueError:
            user_id = None
        found = data_db.begin(conn, caller.state.role, user_id)
        current = found or "deny"
        levels = q.ACCESS_LEVELS
        if caller.access not in levels or current not in levels:
            return "deny"
        return min(caller.access, current, key=levels.index)

    def forget(self, host: str, database: str) -> None:
        with self._lock:
            self._models.pop((host, database), None)

    def _run(
        self,
        caller: Caller,
        action: Action,
        model_name: str | None,
        work: Callable[[Conn, Model | None, dict[str, Model]], T],
    ) -> T:
        q.require(caller.access, action)  # what the token claims: refused without a connection
        state = caller.state
        budget = self.hosts.budget(state.host)
        for attempt in (1, 2):
            with budget.connection(state.database) as conn:
                try:
                    # Not committed on an exception: the budget rolls the connection back.
                    q.require(self._begin(caller, conn), action)
                    models = self._cached(state, conn)
                    model = None
                    if model_name is not None:
                        model = models.get(model_name)
                        if model is None:
                            raise ModelNotFound(
                                f"model {q.shown(model_name)} is not registered in this "
                                "tenant (GET /api/describe lists its models)"
                            )
                    result = work(conn, model, models)
                    budget.commit(conn)
                    return result
                except (psycopg.errors.UndefinedColumn, psycopg.errors.UndefinedTable):
                    # The models changed under the cache (an upgrade): once more, fresh.
                    self.forget(state.host, state.database)
                    if attempt == 2:
                        raise
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ describe

    def models(self, caller: Caller) -> list[dict[str, Any]]:
        def work(_c: Conn, _m: Model | None, models: dict[str, Model]) -> list[dict[str, Any]]:
            return [
                {
                    "name": m.name,
                    "title": m.definition.get("title"),
                    "description": m.definition.get("description"),
                    "fields": list(m.fields),
                }
                for m in models.values()
            ]

        return self._run(caller, Action.READ, None, work)

    def describe(self, caller: Caller, model: str) -> dict[str, Any]:
        def work(_c: Conn, m: Model | None, _ms: dict[str, Model]) -> dict[str, Any]:
            assert m is not None
            return m.describe()

        return self._run(caller, Action.READ, model, work)

    # ------------------------------------------------------------------ read

    def find(self, caller: Caller, model: str, query: ReadQuery) -> list[dict[str, Any]]:
        where = q.parse_json(query.where, "where")
        limit, offset = q.check_limit(query.limit, query.offset)

        def work(conn: Conn, m: Model | None, _ms: dict[str, Model]) -> list[dict[str, Any]]:
            assert m is not None
            fields = q.select_fields(m, query.select)
            condition, params = q.compile_where(m, where)
            order = q.compile_order(m, query.order)
            return data_db.select(
                conn,
                m,
                fields,
                condition,
                params,
                order=order,
                limit=limit,
                offset=offset,
                include_trashed=query.include_trashed,
            )

        return self._run(caller, Action.READ, model, work)

    def get(
        self, caller: Caller, model: str, record_id: str, *, include_trashed: bool
    ) -> dict[str, Any]:
        rid = q.check_id(record_id)

        def work(conn: Conn, m: Model | None, _ms: dict[str, Model]) -> dict[str, Any]:
            assert m is not None
            row = data_db.get(conn, m, rid, include_trashed=include_trashed)
            if row is None:
                raise RecordNotFound(f"model {m.name!r} has no record {rid}")
            return row

        return self._run(caller, Action.READ, model, work)

    # ------------------------------------------------------------------ write

    def create(self, caller: Caller, model: str, records: Any) -> list[dict[str, Any]]:
        def work(conn: Conn, m: Model | None, _ms: dict[str, Model]) -> list[dict[str, Any]]:
            assert m is not None
            checked = q.validate_records(m, records, partial=False)
            return data_db.insert(conn, m, [values for _id, values in checked])

        return self._run(caller, Action.WRITE, model, work)

    def update_many(self, caller: Caller, model: str, records: Any) -> list[dict[str, Any]]:
        """PUT: each record names its id and the fields to set; all or nothing."""

        def work(conn: Conn, m: Model | None, _ms: dict[str, Model]) -> list[dict[str, Any]]:
            assert m is not None
            checked = q.validate_records(m, records, partial=True, with_id=True)
            out = []
            for i, (rid, values) in enumerate(checked):
                assert rid is not None
                out.append(_update_one(conn, m, rid, values, index=i))
            return out

        return self._run(caller, Action.WRITE, model, work)

    def update(self, caller: Caller, model: str, record_id: str, body: Any) -> dict[str, Any]:
        rid = q.check_id(record_id)

        def work(conn: Conn, m: Model | None, _ms: dict[str, Model]) -> dict[str, Any]:
            assert m is not None
            if isinstance(body, dict) and "id" in body:
                if str(body["id"]).lower() != rid:
                    raise InvalidQuery("the body's id differs from the path's")
                body.pop("id")
            _id, values = q.validate_record(m, body, partial=True)
            return _update_one(conn, m, rid, values, index=None)

        return self._run(caller, Action.WRITE, model, work)

    def patch(
        self, caller: Caller, model: str, where: str | None, body: Any
    ) -> list[dict[str, Any]]:
        """PATCH ?where=: the same changes on every matched live record."""
        if where is None:
            raise InvalidQuery("PATCH needs ?where= (where={} changes every record)")
        parsed = q.parse_json(where, "where")

        def work(conn: Conn, m: Model | None, _ms: dict[str, Model]) -> list[dict[str, Any]]:
            assert m is not None
            values = q.changes(m, body)
            condition, params = q.compile_where(m, parsed)
            return data_db.update(conn, m, values, condition, params)

        return self._run(caller, Action.WRITE, model, work)

    def delete(
        self,
        caller: Caller,
        model: str,
        *,
        where: str | None,
        ids: Any,
        permanent: bool,
    ) -> list[dict[str, Any]]:
        """Soft delete (``trashed_at``) or, with ``permanent`` and root access, ``deleted_at``:
        the records matched by ``where`` or listed in ``ids``."""
        if (where is None) == (ids is None):
            raise InvalidQuery(
                "DELETE needs ?where= or a body listing the ids (one of them; where={} is every "
                "record)"
            )
        parsed = q.parse_json(where, "where") if where is not None else None
        id_list = q.parse_ids(ids) if ids is not None else None

        def work(conn: Conn, m: Model | None, _ms: dict[str, Model]) -> list[dict[str, Any]]:
            assert m is not None
            if id_list is not None:
                condition, params = q.compile_where(m, {"id": {"$in": id_list}})
            else:
                condition, params = q.compile_where(m, parsed)
            return data_db.mark(
                conn, m, "deleted_at" if permanent else "trashed_at", condition, params
            )

        action = Action.PERMANENT_DELETE if permanent else Action.DELETE
        return self._run(caller, action, model, work)

    def delete_one(
        self, caller: Caller, model: str, record_id: str, *, permanent: bool
    ) -> dict[str, Any]:
        rid = q.check_id(record_id)

        def work(conn: Conn, m: Model | None, _ms: dict[str, Model]) -> dict[str, Any]:
            assert m is not None
            rows = data_db.mark(
                conn,
                m,
                "deleted_at" if permanent else "trashed_at",
                data_db.by_id(),
                [rid],
            )
            if not rows:
                raise RecordNotFound(f"model {m.name!r} has no record {rid}")
            return rows[0]

        action = Action.PERMANENT_DELETE if permanent else Action.DELETE
        return self._run(caller, action, model, work)


def _update_one(
    conn: Conn, m: Model, rid: str, values: dict[str, Any], *, index: int | None
) -> dict[str, Any]:
    if values:
        rows = data_db.update(conn, m, values, data_db.by_id(), [rid], index=index)
    else:
        row = data_db.get(conn, m, rid, include_trashed=False)
        rows = [row] if row is not None else []
    if not rows:
        where = f"record {index}: " if index is not None else ""
        raise RecordNotFound(f"{where}model {m.name!r} has no record {rid}")
    return rows[0]
