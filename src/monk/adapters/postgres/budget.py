"""The connection budget of one host: every tenant data connection of this process to that
server, at most ``host_connections`` open at once, at most ``tenant_connections`` in use by one
tenant database. The decisions (reuse, open, evict the least recently used idle one, queue) are
``monk.core.budget.Ledger``'s; this module opens, checks, cleans and closes the connections.

monk's own control connections (``pools.ServerPools``: registry, admin) are not counted here:
they have pools of their own, so a budget that is all in use never makes monk wait for them.

Connections log in as monk's admin role (monk does not keep tenant passwords), autocommit, with
``application_name`` ``monk:data``: a caller opens its transactions (``conn.transaction()``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import pq

from monk.adapters.postgres.connection import (
    APPLICATION_NAME,
    GuardedConnection,
    ServerTarget,
    server_down,
    unavailable,
)
from monk.adapters.postgres.pools import alive, mark_returned
from monk.core.budget import Grant, Ledger
from monk.errors import BudgetExhausted

log = logging.getLogger(__name__)

PURPOSE = "data"

# What a request may leave on its session, undone when the connection comes back, in one round
# trip: an open cursor WITH HOLD, LISTEN, a role or session user set, settings (SET, not SET
# LOCAL: those end with their transaction), advisory locks, temporary tables. This is DISCARD
# ALL without DEALLOCATE ALL and DISCARD PLANS: psycopg prepares a statement run often on a
# connection and remembers it, and would fail its next run of a statement deallocated behind
# its back; a prepared statement holds no tenant data and no privilege, only a plan.
_RESET = (
    "CLOSE ALL; UNLISTEN *; RESET SESSION AUTHORIZATION; RESET ROLE; RESET ALL; "
    "SELECT pg_advisory_unlock_all(); DISCARD TEMP"
)


# How long a closed connection's backend may take to exit before its slot opens again anyway
# (logged). An idle backend exits in well under a millisecond once told to.
EXIT_WAIT_S = 2.0


class Exiting:
    """A connection closed (Terminate sent) whose server backend may still be exiting.

    A backend told to terminate leaves pg_stat_activity and frees its ``max_connections`` slot
    a moment after the client closes; opening a successor at once can let the server count
    both. PostgreSQL keeps the backend's socket open until its process ends so that a client
    can make a "synchronous close" (pqcomm.c, socket_close): a duplicate of the socket is kept
    across ``close()``, and its end of file is the backend gone. No query, no other connection.
    """

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._sock: socket.socket | None = None
        try:
            fd = os.dup(conn.fileno())
        except (OSError, psycopg.Error):
            fd = -1
        if fd >= 0:
            try:
                self._sock = socket.socket(fileno=fd)
            except OSError:
                os.close(fd)
        conn.close()  # sends Terminate: the backend starts exiting now

    def wait(self, timeout: float | None = None) -> bool:
        """True once the backend has exited; False after ``timeout`` (default EXIT_WAIT_S;
        logged) or when it could not be watched."""
        timeout = EXIT_WAIT_S if timeout is None else timeout
        sock, self._sock = self._sock, None
        if sock is None:
            return False
        with sock:
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    if not sock.recv(4096):
                        return True  # end of file: the backend process has ended
                except TimeoutError:
                    break
                except OSError:
                    return True  # reset: gone too
        log.warning("budget: a closed connection's backend did not exit within %.1f s", timeout)
        return False

    def abandon(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def close_and_wait(conn: psycopg.Connection[Any], timeout: float | None = None) -> bool:
    """Close ``conn`` and wait until its backend has exited (see ``Exiting``)."""
    return Exiting(conn).wait(timeout)


# What a grant carries: the idle connection it reuses, the one it evicted (closed at once, its
# backend exiting while the grantee wakes up), or nothing (a free slot).
Held = psycopg.Connection[Any] | Exiting | None


@dataclass(frozen=True)
class BudgetStats:
    """Counters since this budget was made, and its state now (for /metrics)."""

    host: str
    open: int  # connections open (idle, in use, being opened)
    busy: int  # in use by a request
    waiting: int  # requests queued now
    opens: int  # connections opened
    evictions: int  # idle connections closed to make room for another database
    closed_for_tenant: int  # idle connections closed by evict(database)
    discarded: int  # broken connections dropped (found dead, or broken in use)
    waits: int  # requests that had to queue
    wait_seconds: float  # their time in the queue, summed
    exhausted: int  # requests that gave up after the wait limit (BudgetExhausted)
    exit_wait_seconds: float = 0.0  # evictions' waits for the evicted backend to exit, summed


class Budget:
    def __init__(
        self,
        target: ServerTarget,
        *,
        host_connections: int,
        tenant_connections: int,
        wait_ms: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.target = target
        self.wait_s = wait_ms / 1000
        self._clock = clock
        self._cond = threading.Condition()
        self._ledger = Ledger(host_cap=host_connections, tenant_cap=tenant_connections)
        self._idle: dict[int, psycopg.Connection[Any]] = {}
        # ticket -> its grant with the idle connection it reuses or evicts, taken out of
        # ``_idle`` (an evicted one is closed by the grantee before it opens its own: its
        # backend is told to exit before the new one is forked).
        self._granted: dict[int, tuple[Grant, Held]] = {}
        self._next = 0
        self._closed = False
        self._opens = self._evictions = self._closed_for_tenant = self._discarded = 0
        self._waits = self._exhausted = 0
        self._wait_seconds = 0.0
        self._exit_wait_seconds = 0.0
        # Connections in use whose session ``commit`` reset already (by id: a connection is in
        # one request at a time, and the id is dropped when it comes back).
        self._reset: set[int] = set()

    # ------------------------------------------------------------------ use

    @contextmanager
    def connection(self, database: str) -> Iterator[psycopg.Connection[Any]]:
        """A clean autocommit connection to ``database`` for one request; handed back clean
        (rolled back, reset) or, if broken, closed. BudgetExhausted after the wait limit,
        DatabaseUnavailable if the server cannot be reached."""
        key, conn = self._acquire(database)
        try:
            yield conn
        except psycopg.OperationalError as exc:
            if server_down(exc) and (conn.broken or conn.closed):
                raise unavailable(self.target, database, exc) from exc
            raise
        finally:
            self._release(database, key, self._clean(conn))

    def _acquire(self, database: str) -> tuple[int, psycopg.Connection[Any]]:
        started = self._clock()
        own = False  # the wait ran out on the tenant's own cap, not the host's
        with self._cond:
            if self._closed:
                raise unavailable(self.target, database, "the budget is closed")
            ticket = self._next
            self._next += 1
            self._ledger.request(ticket, database)
            self._dispatch()
            grant = self._granted.pop(ticket, None)
            if grant is None:
                self._waits += 1
                try:
                    grant = self._wait(ticket, started + self.wait_s)
                finally:
                    self._wait_seconds += self._clock() - started
                if grant is None:
                    self._exhausted += 1
                    own = self._ledger.busy[database] >= self._ledger.tenant_cap
        if grant is None:
            why = (
                f"its tenant's {self._ledger.tenant_cap} connections (MONK_TENANT_CONNECTIONS)"
                if own
                else f"all {self._ledger.host_cap} tenant connections of the host "
                "(MONK_HOST_CONNECTIONS)"
            )
            raise BudgetExhausted(
                f"no connection to database {database!r} on host {self.target.name!r} "
                f"within {self.wait_s * 1000:.0f} ms: {why} stayed in use",
                host=self.target.name,
                database=database,
            )
        return self._serve(grant)

    def _wait(self, ticket: int, deadline: float) -> tuple[Grant, Held] | None:
        """Under the lock: the grant of ``ticket``, or None once ``deadline`` passed (the
        request withdrawn). Interrupted, it gives back a grant it got."""
        try:
            while True:
                grant = self._granted.pop(ticket, None)
                if grant is not None:
                    return grant
                remaining = deadline - self._clock()
                if remaining <= 0 and self._ledger.cancel(ticket):
                    return None
                self._cond.wait(timeout=max(remaining, 0.001))
        except BaseException:
            if not self._ledger.cancel(ticket):
                self._give_back(self._granted.pop(ticket))
            raise

    def _give_back(self, granted: tuple[Grant, Held]) -> None:
        """Under the lock: a grant not used (its requester was interrupted)."""
        grant, held = granted
        if grant.reuse is not None and isinstance(held, psycopg.Connection):
            self._ledger.release(grant.database, grant.reuse)
            self._idle[grant.reuse] = held
        else:
            if isinstance(held, Exiting):
                held.abandon()  # evicted for it: already closed
            self._ledger.release(grant.database, None)
        self._dispatch()

    def _serve(self, granted: tuple[Grant, Held]) -> tuple[int, psycopg.Connection[Any]]:
        """The connection a grant stands for: the idle one it reuses if still alive, else a
        new one in its slot (once the backend of the one it evicted has exited). A failure to
        open gives the slot back."""
        grant, held = granted
        if isinstance(held, psycopg.Connection):
            assert grant.reuse is not None
            if alive(held):
                return grant.reuse, held
            self._discard(held)  # dead while idle (a restart, a terminated backend)
        elif isinstance(held, Exiting):
            # Evicted: its backend gone before this slot opens again, so that the server never
            # counts more than the cap either (not just monk). Bounded: EXIT_WAIT_S.
            started = time.perf_counter()
            held.wait()
            with self._cond:
                self._exit_wait_seconds += time.perf_counter() - started
        try:
            conn = self._open(grant.database)
        except BaseException:
            self._release(grant.database, grant.ticket, None)
            raise
        return grant.ticket, conn

    def _open(self, database: str) -> psycopg.Connection[Any]:
        t = self.target
        try:
            conn = GuardedConnection.connect(
                t.conninfo,
                dbname=database,
                autocommit=True,
                application_name=f"{APPLICATION_NAME}:{PURPOSE}",
                connect_timeout=t.connect_timeout,
                options=f"-c statement_timeout={int(t.statement_timeout_ms)}",
            )
        except psycopg.OperationalError as exc:
            raise unavailable(t, database, exc) from None
        with self._cond:
            self._opens += 1
        return conn

    def commit(self, conn: psycopg.Connection[Any]) -> None:
        """Commit the transaction the caller opened on ``conn`` and reset the session for the
        next request, in one round trip (a simple query: a failing COMMIT raises here and the
        reset is not run, so ``_clean`` runs it when the connection comes back). The caller
        runs nothing more on ``conn``."""
        conn.execute("COMMIT; " + _RESET, prepare=False)
        self._reset.add(id(conn))

    def _clean(self, conn: psycopg.Connection[Any]) -> psycopg.Connection[Any] | None:
        """``conn`` ready for the next request, or None (broken: closed and counted)."""
        if conn.closed or conn.broken:
            self._reset.discard(id(conn))
            self._discard(conn)
            return None
        if id(conn) in self._reset and conn.info.transaction_status == pq.TransactionStatus.IDLE:
            self._reset.discard(id(conn))  # committed and reset by ``commit``
            mark_returned(conn)
            return conn
        self._reset.discard(id(conn))
        try:
            status = conn.info.transaction_status
            if status == pq.TransactionStatus.ACTIVE:
                raise psycopg.InterfaceError("a query still running")  # cannot be cleaned
            if status != pq.TransactionStatus.IDLE:
                conn.rollback()
            conn.execute(_RESET)
        except psycopg.Error as exc:
            log.info("budget: dropped a connection that could not be cleaned: %s", exc)
            self._discard(conn)
            return None
        mark_returned(conn)
        return conn

    def _release(self, database: str, key: int, conn: psycopg.Connection[Any] | None) -> None:
        if conn is not None:
            with self._cond:
                doomed = self._closed or database in self._ledger.doomed
            if doomed:
                # Not kept: its backend gone before its slot is handed to the next request.
                close_and_wait(conn)
                conn = None
        with self._cond:
            kept = self._ledger.release(database, key if conn is not None else None)
            if kept and self._closed:
                self._ledger.drop_idle(key)
                kept = False
            if kept:
                assert conn is not None
                self._idle[key] = conn
            self._dispatch()
        if conn is not None and not kept:
            conn.close()

    def _dispatch(self) -> None:
        """Under the lock: hand out what the ledger grants now, and wake the grantees."""
        grants = self._ledger.grants()
        for grant in grants:
            held: Held = None
            if grant.reuse is not None:
                held = self._idle.pop(grant.reuse)
            elif grant.evict is not None:
                # Closed now, under the lock (a few bytes sent): the backend exits while the
                # grantee wakes up, which then waits for the rest of its exit.
                held = Exiting(self._idle.pop(grant.evict))
                self._evictions += 1
            self._granted[grant.ticket] = (grant, held)
        if grants:
            self._cond.notify_all()

    def _discard(self, conn: psycopg.Connection[Any]) -> None:
        with self._cond:
            self._discarded += 1
        conn.close()

    @staticmethod
    def _close_all(conns: list[psycopg.Connection[Any]]) -> None:
        """Close them and wait for their backends to exit (a DROP DATABASE that follows, or a
        slot handed out again, finds them gone)."""
        exiting = [Exiting(conn) for conn in conns if not conn.closed]  # all told at once
        for each in exiting:
            each.wait()

    # ------------------------------------------------------------------ control

    def evict(self, database: str) -> int:
        """Close this budget's idle connections to ``database`` now; the ones in use are closed
        as they come back. Before a tenant is disabled, purged or moved. Returns how many
        were closed now."""
        with self._cond:
            keys = self._ledger.evict(database)
            conns = [self._idle.pop(key) for key in keys]
            self._closed_for_tenant += len(conns)
        self._close_all(conns)
        with self._cond:
            self._dispatch()  # the freed slots may serve a waiting request
        return len(conns)

    def stats(self) -> BudgetStats:
        with self._cond:
            ledger = self._ledger
            return BudgetStats(
                host=self.target.name,
                open=ledger.open,
                busy=sum(ledger.busy.values()),
                waiting=ledger.waiting,
                opens=self._opens,
                evictions=self._evictions,
                closed_for_tenant=self._closed_for_tenant,
                discarded=self._discarded,
                waits=self._waits,
                wait_seconds=self._wait_seconds,
                exhausted=self._exhausted,
                exit_wait_seconds=self._exit_wait_seconds,
            )

    def close(self) -> None:
        """Close the idle connections; the ones in use are closed as they come back."""
        with self._cond:
            self._closed = True
            for key in list(self._idle):
                self._ledger.drop_idle(key)
            conns = list(self._idle.values())
            self._idle.clear()
        self._close_all(conns)
