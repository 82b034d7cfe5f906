"""Connection pools of one server: its system database (registry) and its maintenance database
(server-level DDL). Both autocommit: CREATE/DROP DATABASE refuse transaction blocks, and the
registry code opens its transactions explicitly.

Pools bound monk's own connections (``max_size`` each), the first line of a global connection
budget on a server that hosts many tenant databases.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from monk.adapters.postgres.connection import APPLICATION_NAME, ServerTarget, unavailable

# A connection used moments ago is almost surely alive: checking it would cost a round trip on
# every request. One idle for longer is checked before it is handed out (a server restart, an
# idle timeout), and replaced if dead.
_TRUST_FOR_S = 5.0
_WAIT_FOR_CONNECTION_S = 30.0


def _mark_returned(conn: psycopg.Connection[Any]) -> None:
    _returned_at[conn] = time.monotonic()


def _check_if_idle(conn: psycopg.Connection[Any]) -> None:
    returned = _returned_at.get(conn)
    if returned is None or time.monotonic() - returned > _TRUST_FOR_S:
        ConnectionPool.check_connection(conn)


_returned_at: weakref.WeakKeyDictionary[psycopg.Connection[Any], float] = (
    weakref.WeakKeyDictionary()
)


class ServerPools:
    def __init__(self, target: ServerTarget, system_db: str, *, max_size: int = 8) -> None:
        self.target = target
        self.system_db = system_db
        # The registry's statements are small indexed reads and writes, prepared and run on
        # every request: a generic plan serves them all, where a custom plan is made again at
        # each execution (0.3 ms of server CPU for the provision's intent statement).
        self._system = self._pool(
            system_db, "registry", max_size, settings="-c plan_cache_mode=force_generic_plan"
        )
        self._admin = self._pool(target.maintenance_db, "admin", max_size)

    def _pool(
        self, dbname: str, purpose: str, max_size: int, *, settings: str = ""
    ) -> ConnectionPool[Any]:
        return ConnectionPool(
            self.target.conninfo,
            kwargs={
                "dbname": dbname,
                "autocommit": True,
                "application_name": f"{APPLICATION_NAME}:{purpose}",
                "connect_timeout": self.target.connect_timeout,
                "options": f"-c statement_timeout={self.target.statement_timeout_ms} {settings}",
            },
            min_size=0,
            max_size=max_size,
            # How long a caller may wait for a free connection when all are busy: a queue
            # under load, not a failure (each new connection has its own connect_timeout).
            timeout=_WAIT_FOR_CONNECTION_S,
            check=_check_if_idle,
            reset=_mark_returned,
            open=True,
            name=f"monk-{purpose}",
        )

    @contextmanager
    def _get(self, pool: ConnectionPool[Any], dbname: str) -> Iterator[psycopg.Connection[Any]]:
        try:
            with pool.connection() as conn:
                yield conn
        except PoolTimeout as exc:
            raise unavailable(self.target, dbname, exc) from None

    def system(self) -> AbstractContextManager[psycopg.Connection[Any]]:
        """An autocommit connection to the system database (registry)."""
        return self._get(self._system, self.system_db)

    def admin(self) -> AbstractContextManager[psycopg.Connection[Any]]:
        """An autocommit connection to the maintenance database (server-level DDL)."""
        return self._get(self._admin, self.target.maintenance_db)

    def close(self) -> None:
        self._system.close()
        self._admin.close()
