"""The one place monk opens PostgreSQL connections, and translates connection failures.

Every connection carries ``application_name`` (so monk's sessions can be told apart, and ended,
on a template), a connect timeout and a statement timeout. DDL that must not run in a transaction
block (CREATE/DROP DATABASE) gets an autocommit connection.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cache
from typing import Any, Self

import psycopg
from psycopg import conninfo as pg_conninfo

from monk.core import scram
from monk.errors import (
    ConfigError,
    DatabaseMissing,
    DatabaseUnavailable,
    DiskFull,
    HostUnavailable,
    HostUnsuitable,
    InvalidRequest,
    MonkError,
)

log = logging.getLogger(__name__)

APPLICATION_NAME = "monk"


@dataclass(frozen=True)
class ServerTarget:
    """One PostgreSQL server monk administers: how to reach it as admin, and what to call it.

    ``name`` is what the registry records as a tenant's ``host``; ``conninfo`` holds the admin
    connection parameters without a database name; ``public_host``/``public_port`` go into the
    connection URLs handed to tenants.
    """

    name: str
    conninfo: str
    public_host: str
    public_port: int
    maintenance_db: str = "postgres"
    source: str = "MONK_DATABASE_URL"
    connect_timeout: int = 10
    statement_timeout_ms: int = 60_000
    # A host of the fleet (``monk host add``), not the server that keeps the system database:
    # a failure to reach it is HostUnavailable, naming it.
    remote: bool = False

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        name: str,
        connect_timeout: int = 10,
        statement_timeout_ms: int = 60_000,
        source: str = "MONK_DATABASE_URL",
        remote: bool = False,
    ) -> ServerTarget:
        try:
            params = pg_conninfo.conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            raise ConfigError(f"{source} is not a valid PostgreSQL URL: {exc}") from None
        maintenance_db = str(params.pop("dbname", None) or "postgres")
        clean = {k: str(v) for k, v in params.items() if v is not None}
        host = clean.get("host", "localhost")
        return cls(
            name=name,
            conninfo=pg_conninfo.make_conninfo(**clean),
            public_host="localhost" if host.startswith("/") else host.split(",")[0],
            public_port=int(clean.get("port", "5432").split(",")[0]),
            maintenance_db=maintenance_db,
            source=source,
            connect_timeout=connect_timeout,
            statement_timeout_ms=statement_timeout_ms,
            remote=remote,
        )

    def url(self, dbname: str) -> str:
        """A libpq URL for ``dbname`` with the admin's credentials."""
        params = pg_conninfo.conninfo_to_dict(self.conninfo)
        params["dbname"] = dbname
        return _to_url({k: str(v) for k, v in params.items() if v is not None})


def with_scram_keys(target: ServerTarget, verifier: str | None) -> ServerTarget:
    """``target`` logging in with its SCRAM keys instead of its password when it can (libpq 18,
    a password in its conninfo that ``verifier``, its role's stored SCRAM verifier, matches):
    each connection then skips the password's PBKDF2 (4096 HMACs, ~2-6 ms of client CPU).
    Otherwise ``target`` as it is. The keys log in as the password does: as secret as it."""
    if verifier is None or psycopg.pq.version() < 180000:
        return target
    params = {
        k: str(v) for k, v in pg_conninfo.conninfo_to_dict(target.conninfo).items() if v is not None
    }
    password = params.pop("password", None)
    keys = None if password is None else scram.client_keys(password, verifier)
    if keys is None:
        return target
    params["scram_client_key"], params["scram_server_key"] = keys
    params["require_auth"] = "scram-sha-256"
    return replace(target, conninfo=pg_conninfo.make_conninfo(**params))


def split_password(
    url: str, *, what: str = "the URL", public: ServerTarget | None = None
) -> tuple[str, str | None]:
    """``url`` (a libpq URL or key=value string) as a URL without its password, and the
    password (None if it had none). A URL libpq cannot read is an InvalidRequest that does
    not quote it (it may hold the password). ``public``: a unix socket host is replaced by
    that target's public address (for display)."""
    try:
        params = pg_conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        raise InvalidRequest(
            f"{what} is not a valid PostgreSQL URL (postgresql://USER:PASSWORD@HOST:PORT/DBNAME)",
            field="url",
        ) from None
    clean = {k: str(v) for k, v in params.items() if v is not None}
    password = clean.pop("password", None)
    if public is not None and clean.get("host", "/").startswith("/"):
        clean["host"], clean["port"] = public.public_host, str(public.public_port)
    if "sslpassword" in clean:
        raise InvalidRequest(f"{what}: sslpassword is not supported", field="url")
    if not all(p.strip().isdigit() for p in clean.get("port", "5432").split(",")):
        raise InvalidRequest(f"{what}: the port must be a number", field="url")
    return _to_url(clean), password


def with_password(url: str, password: str | None) -> str:
    """``url`` (from ``split_password``) with ``password`` put back."""
    if password is None:
        return url
    params = {k: str(v) for k, v in pg_conninfo.conninfo_to_dict(url).items() if v is not None}
    params["password"] = password
    return _to_url(params)


def _to_url(params: dict[str, str]) -> str:
    from urllib.parse import quote, urlencode

    user = params.pop("user", "")
    password = params.pop("password", None)
    dbname = params.pop("dbname", "")
    host = params.get("host", "")
    port = params.get("port", "")
    auth = quote(user, safe="")
    if password is not None:
        auth += ":" + quote(password, safe="")
    netloc = (auth + "@") if auth else ""
    if host and not host.startswith("/"):
        params.pop("host")
        netloc += host
        if port:
            params.pop("port")
            netloc += f":{port}"
    query = urlencode(params)
    return f"postgresql://{netloc}/{quote(dbname, safe='')}" + (f"?{query}" if query else "")


@contextmanager
def connect(
    target: ServerTarget,
    dbname: str | None = None,
    *,
    autocommit: bool = False,
    purpose: str = "admin",
    statement_timeout_ms: int | None = None,
    async_commit: bool = False,
) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """Open a connection to ``dbname`` (default: the maintenance database) as monk's admin role
    (``async_commit``: see ``open_connection``).

    A server that cannot be reached raises DatabaseUnavailable naming the server.
    """
    conn = open_connection(
        target,
        dbname,
        autocommit=autocommit,
        purpose=purpose,
        statement_timeout_ms=statement_timeout_ms,
        async_commit=async_commit,
    )
    try:
        yield conn
    finally:
        conn.close()


def open_connection(
    target: ServerTarget,
    dbname: str | None = None,
    *,
    autocommit: bool = False,
    purpose: str = "admin",
    statement_timeout_ms: int | None = None,
    lock_timeout_ms: int | None = None,
    async_commit: bool = False,
) -> psycopg.Connection[tuple[object, ...]]:
    """``lock_timeout_ms``: the session's lock_timeout, set by its start-up packet (no round
    trip of its own); ``async_commit``: its synchronous_commit off, likewise (for a session
    whose commits a later one of the same operation on the same server flushes)."""
    timeout = target.statement_timeout_ms if statement_timeout_ms is None else statement_timeout_ms
    options = f"-c statement_timeout={int(timeout)}"
    if lock_timeout_ms is not None:
        options += f" -c lock_timeout={int(lock_timeout_ms)}"
    if async_commit:
        options += " -c synchronous_commit=off"
    try:
        return GuardedConnection.connect(
            target.conninfo,
            dbname=dbname or target.maintenance_db,
            autocommit=autocommit,
            application_name=f"{APPLICATION_NAME}:{purpose}",
            connect_timeout=target.connect_timeout,
            options=options,
        )
    except psycopg.OperationalError as exc:
        raise unavailable(target, dbname or target.maintenance_db, exc) from None


def open_checked(target: ServerTarget, *, purpose: str) -> psycopg.Connection[tuple[object, ...]]:
    """A connection to ``target``'s maintenance database for checking it as a host: a server
    that does not answer raises HostUnavailable, one that answers and refuses (credentials,
    pg_hba.conf, no such database) HostUnsuitable, each with libpq's reason."""
    try:
        return GuardedConnection.connect(
            target.conninfo,
            dbname=target.maintenance_db,
            autocommit=True,
            application_name=f"{APPLICATION_NAME}:{purpose}",
            connect_timeout=target.connect_timeout,
            options=f"-c statement_timeout={int(target.statement_timeout_ms)}",
        )
    except psycopg.OperationalError as exc:
        reason = _first_line(exc)
        if not refused_by_server(exc):
            raise HostUnavailable(
                f"{target.source}: cannot reach the server: {reason}", host=target.name
            ) from None
        raise HostUnsuitable(
            f"{target.source}: the server refused the connection: {reason}", host=target.name
        ) from None


def unavailable(target: ServerTarget, dbname: str, exc: BaseException | str) -> MonkError:
    """What a failed connection to ``dbname`` on ``target`` is: DatabaseMissing when the server
    answered that the database does not exist (the server is up: a 404, not a retry);
    HostUnavailable, naming the host, when a host of the fleet cannot be reached (no answer, or
    its breaker open); else DatabaseUnavailable (the local server down, or a refusal such as a
    password no longer valid)."""
    reason = exc if isinstance(exc, str) else _first_line(exc)
    if isinstance(exc, psycopg.Error) and refused_by_server(exc) and _MISSING_DB in str(exc):
        return DatabaseMissing(
            f"database {dbname!r} does not exist on server {target.name!r}",
            host=target.name,
            database=dbname,
        )
    down = not isinstance(exc, psycopg.Error) or not refused_by_server(exc)
    if target.remote and down:
        return HostUnavailable(
            f"host {target.name!r} is unavailable: cannot connect to database {dbname!r}: {reason}",
            host=target.name,
            database=dbname,
        )
    return DatabaseUnavailable(
        f"{target.source}: cannot connect to database {dbname!r} on server {target.name!r}: "
        f"{reason}",
        host=target.name,
        database=dbname,
    )


# libpq's text of the server's FATAL 3D000 at connection time (no SQLSTATE is kept then).
_MISSING_DB = '" does not exist'


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0].removeprefix("connection failed: ") if lines else type(exc).__name__


# ---------------------------------------------------------------- circuit breaker

# SQLSTATEs (None: no answer at all, a refused or timed-out socket) saying the server itself
# cannot be used now: down, starting, stopping. A missing database or a wrong password says
# nothing about the server, and too many connections is a server that answers.
_SERVER_DOWN_STATES = frozenset({None, "57P01", "57P02", "57P03", "08000", "08001", "08006"})
_PROBE_EVERY_S = 0.5


class Breaker:
    """One per server: after a connection attempt found the server down, every caller fails at
    once (no connect timeout, no pool wait) with the reason, except one probe attempt every
    ``probe_every`` seconds; the first attempt that succeeds closes it again."""

    def __init__(self, probe_every: float = _PROBE_EVERY_S) -> None:
        self.probe_every = probe_every
        self._lock = threading.Lock()
        self._reason: str | None = None
        self._next_probe = 0.0

    @property
    def closed(self) -> bool:
        """No attempt found the server down since the last one that succeeded."""
        with self._lock:
            return self._reason is None

    def refusal(self, *, probe: bool) -> str | None:
        """None: go ahead (closed, or a probe is due: ``probe`` takes that turn); else why not."""
        with self._lock:
            if self._reason is None:
                return None
            now = time.monotonic()
            if now >= self._next_probe:
                if probe:
                    self._next_probe = now + self.probe_every
                return None
            return self._reason

    def failed(self, reason: str) -> None:
        with self._lock:
            if self._reason is None:
                log.warning("database server unreachable: %s", reason)
            self._reason = reason
            self._next_probe = time.monotonic() + self.probe_every

    def succeeded(self) -> None:
        with self._lock:
            if self._reason is not None:
                log.warning("database server reachable again")
            self._reason = None


_breakers: dict[tuple[str, str, str], Breaker] = {}
_breakers_lock = threading.Lock()


@cache
def _server_key(conninfo: str) -> tuple[str, str, str]:
    params = pg_conninfo.conninfo_to_dict(conninfo)
    host, hostaddr, port = (str(params.get(k) or "") for k in ("host", "hostaddr", "port"))
    return host, hostaddr, port


def breaker(conninfo: str) -> Breaker:
    """The breaker of the server ``conninfo`` points at (host, port), shared process-wide."""
    key = _server_key(conninfo)
    with _breakers_lock:
        return _breakers.setdefault(key, Breaker())


# A failed connection attempt carries no SQLSTATE, only libpq's text: a FATAL the server sent
# is an answer (a wrong password, no such database, pg_hba.conf), except these, which say
# the server cannot be used now.
_FATAL_BUT_DOWN = (
    "starting up",
    "shutting down",
    "in recovery mode",
    "not yet accepting connections",
    "not accepting connections",
)


# libpq's own refusals of what the server asked for: the server is up.
_CLIENT_REFUSED = ("fe_sendauth:", "does not support SSL")


def refused_by_server(exc: psycopg.Error) -> bool:
    """True when a connection attempt reached a server that answered and refused it (or
    asked for what the client could not give: a password, SSL)."""
    if exc.sqlstate is not None:
        return exc.sqlstate not in _SERVER_DOWN_STATES
    text = str(exc)
    if any(s in text for s in _CLIENT_REFUSED):
        return True
    return "FATAL:" in text and not any(s in text for s in _FATAL_BUT_DOWN)


def server_down(exc: psycopg.Error) -> bool:
    """True when ``exc`` says the server cannot be reached or used at all (a server that
    refuses monk's credentials is up: its breaker stays closed)."""
    return exc.sqlstate in _SERVER_DOWN_STATES and not refused_by_server(exc)


class GuardedConnection(psycopg.Connection[Any]):
    """A connection whose opening goes through its server's breaker: refused at once while the
    server is known to be down, and each outcome recorded. The pools use it too."""

    @classmethod
    def connect(cls, conninfo: str = "", **kwargs: Any) -> Self:
        guard = breaker(conninfo)
        reason = guard.refusal(probe=True)
        if reason is not None:
            raise psycopg.OperationalError(f"{reason} (server down; next probe within 1 s)")
        try:
            conn = super().connect(conninfo, **kwargs)
        except psycopg.OperationalError as exc:
            if server_down(exc):
                guard.failed(_first_line(exc))
            raise
        guard.succeeded()
        return conn


# ---------------------------------------------------------------- errors of the server


def translate(exc: BaseException) -> MonkError | None:
    """The MonkError a PostgreSQL (or file system) failure stands for, if it is one monk
    reports as such: a full disk, or a server gone away. None: leave ``exc`` as it is.

    The one place these are recognised; the edges (HTTP handler, CLI) and the steps that wrap
    failures into OperationFailed ask here first."""
    if isinstance(exc, MonkError):
        return None
    if isinstance(exc, psycopg.errors.DiskFull) or (
        isinstance(exc, OSError) and exc.errno == errno.ENOSPC
    ):
        return disk_full(exc)
    if isinstance(exc, psycopg.OperationalError) and server_down(exc):
        return DatabaseUnavailable(f"the database server cannot be used now: {_first_line(exc)}")
    if isinstance(exc, psycopg.InterfaceError) and "closed" in str(exc):
        return DatabaseUnavailable(f"the database connection was lost: {_first_line(exc)}")
    return None


def disk_full(exc: BaseException | str) -> DiskFull:
    """DiskFull for a PostgreSQL or file-system failure (or a tool's one-line complaint)."""
    detail = exc if isinstance(exc, str) else _first_line(exc)
    if isinstance(exc, OSError):
        detail = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    return DiskFull(
        f"disk full ({detail}): free space on that disk (purge tenants with `monk tenant delete "
        "NAME --purge --no-archive`, drop retired templates with `monk template prune`) or "
        "grow it, then retry",
        detail=detail,
    )
