"""Connection pools of one server: its system database (registry) and its maintenance database
(server-level DDL). Both autocommit: CREATE/DROP DATABASE refuse transaction blocks, and the
registry code opens its transactions explicitly.

Pools bound monk's own connections (``max_size`` each), the first line of a global connection
budget on a server that hosts many tenant databases.
"""

from __future__ import annotations

import select
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from monk.adapters.postgres.connection import (
    APPLICATION_NAME,
    GuardedConnection,
    ServerTarget,
    breaker,
    server_down,
    unavailable,
)

# A connection used moments ago is almost surely alive: a round trip to check it on every
# request would cost more than it saves. One idle for longer is checked before it is handed
# out (an idle timeout, a dropped network path), and replaced if dead.
_TRUST_FOR_S = 5.0
_WAIT_FOR_CONNECTION_S = 30.0
# A caller waiting for a connection looks at the server's breaker this often: a server found
# down while it waits fails it at once instead of after the whole wait.
_WAIT_SLICE_S = 0.2


def mark_returned(conn: psycopg.Connection[Any]) -> None:
    _returned_at[conn] = time.monotonic()


def alive(conn: psycopg.Connection[Any]) -> bool:
    """Whether an idle pooled connection may be handed out.

    An idle session receives nothing (monk never LISTENs): anything to read on its socket is
    the server saying goodbye (a restart, a terminated backend) or closing it. That costs no
    round trip, so it is looked at every time; a real check runs only then, or after an idle
    spell longer than ``_TRUST_FOR_S``."""
    if conn.closed or conn.broken:
        return False
    returned = _returned_at.get(conn)
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        return False
    if not readable and returned is not None and time.monotonic() - returned <= _TRUST_FOR_S:
        return True
    try:
        ConnectionPool.check_connection(conn)
    except psycopg.Error:
        return False
    return True


_returned_at: weakref.WeakKeyDictionary[psycopg.Connection[Any], float] = (
    weakref.WeakKeyDictionary()
)


class ServerPools:
    """``registry``: the pools of the server that keeps the system database, for a host of the
    fleet that does not (its ``system()`` is the registry's, its ``admin()`` its own)."""

    def __init__(
        self,
        target: ServerTarget,
        system_db: str,
        *,
        max_size: int = 8,
        registry: ServerPools | None = None,
        admin_db: str | None = None,
        prepare: Callable[[ServerTarget], None] | None = None,
    ) -> None:
        """``admin_db``: the database the admin pool connects to (default: the maintenance
        database); ``prepare``: run once, before the first admin connection (again after a
        failure), e.g. to make ``admin_db`` and install monk's functions there."""
        self.target = target
        self.system_db = system_db
        self.breaker = breaker(target.conninfo)
        self._registry = registry
        self.admin_db = admin_db or target.maintenance_db
        self._prepare = prepare
        self._prepare_lock = threading.Lock()
        # The registry's statements are small indexed reads and writes, prepared and run on
        # every request: a generic plan serves them all, where a custom plan is made again at
        # each execution (0.3 ms of server CPU for the provision's intent statement).
        self._system = (
            None
            if registry is not None
            else self._pool(
                system_db, "registry", max_size, settings="-c plan_cache_mode=force_generic_plan"
            )
        )
        self._admin = self._pool(self.admin_db, "admin", max_size)

    @property
    def keeps_registry(self) -> bool:
        """This server keeps the system database (the local host)."""
        return self._registry is None

    def _pool(
        self, dbname: str, purpose: str, max_size: int, *, settings: str = ""
    ) -> ConnectionPool[Any]:
        return ConnectionPool(
            self.target.conninfo,
            # Opens through the server's breaker (see connection.Breaker).
            connection_class=GuardedConnection,
            kwargs={
                "dbname": dbname,
                "autocommit": True,
                "application_name": f"{APPLICATION_NAME}:{purpose}",
                "connect_timeout": self.target.connect_timeout,
                "options": f"-c statement_timeout={self.target.statement_timeout_ms} {settings}",
            },
            min_size=0,
            max_size=max_size,
            timeout=_WAIT_FOR_CONNECTION_S,
            # A failed connection attempt is not retried in the background (its backoff would
            # keep a returned server unused for seconds): the next caller that needs one
            # makes the pool try again.
            reconnect_timeout=0,
            reconnect_failed=lambda _pool: None,
            # No reset callback: with one, psycopg_pool returns every connection through its
            # worker thread (a hop: 17.5 -> 14 context switches an API read); _get marks it.
            open=True,
            name=f"monk-{purpose}",
        )

    def _acquire(
        self, pool: ConnectionPool[Any], dbname: str, wait: float = _WAIT_FOR_CONNECTION_S
    ) -> psycopg.Connection[Any]:
        """A live connection of ``pool``: dead idle ones are dropped on the spot (no backoff),
        and a server down fails at once with DatabaseUnavailable; every connection busy for
        ``wait`` seconds too."""
        deadline = time.monotonic() + wait
        while True:
            reason = self.breaker.refusal(probe=False)
            if reason is not None:
                raise unavailable(self.target, dbname, reason)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                # All connections busy for the whole wait (a queue, not a server down).
                raise unavailable(
                    self.target,
                    dbname,
                    f"no free connection in monk's pool after {wait:g} s",
                )
            try:
                conn: psycopg.Connection[Any] = pool.getconn(timeout=min(_WAIT_SLICE_S, remaining))
            except PoolTimeout:
                continue
            if alive(conn):
                return conn
            conn.close()
            pool.putconn(conn)  # a closed connection is discarded, and replaced on demand

    @contextmanager
    def _get(
        self, pool: ConnectionPool[Any], dbname: str, wait: float = _WAIT_FOR_CONNECTION_S
    ) -> Iterator[psycopg.Connection[Any]]:
        conn = self._acquire(pool, dbname, wait)
        try:
            with conn:  # as ConnectionPool.connection(): commit, or roll back on an error
                yield conn
        except psycopg.OperationalError as exc:
            # The server went away while in use: retryable, not a failure of monk's.
            if server_down(exc) and (conn.broken or conn.closed):
                raise unavailable(self.target, dbname, exc) from exc
            raise
        finally:
            mark_returned(conn)
            pool.putconn(conn)

    def system(
        self, *, wait: float = _WAIT_FOR_CONNECTION_S
    ) -> AbstractContextManager[psycopg.Connection[Any]]:
        """An autocommit connection to the system database (registry); DatabaseUnavailable
        when every one stays busy for ``wait`` seconds."""
        if self._registry is not None:
            return self._registry.system(wait=wait)
        assert self._system is not None
        return self._get(self._system, self.system_db, wait)

    def system_idle(self) -> bool:
        """The registry's server is not known to be down and its pool has an idle connection
        now: a registry call made at once needs no wait for a connection nor a new one (what
        ``monk serve`` checks before running a short call on its event loop thread)."""
        if self._registry is not None:
            return self._registry.system_idle()
        assert self._system is not None
        if not self.breaker.closed:  # down, or a probe due: that may wait for a connect
            return False
        return self._system.get_stats().get("pool_available", 0) > 0

    def admin(self) -> AbstractContextManager[psycopg.Connection[Any]]:
        """An autocommit connection for server-level DDL (to ``admin_db``)."""
        if self._prepare is not None:
            with self._prepare_lock:
                if self._prepare is not None:
                    reason = self.breaker.refusal(probe=False)
                    if reason is not None:
                        raise unavailable(self.target, self.admin_db, reason)
                    self._prepare(self.target)
                    self._prepare = None
        return self._get(self._admin, self.admin_db)

    def close(self) -> None:
        if self._system is not None:
            self._system.close()
        self._admin.close()
