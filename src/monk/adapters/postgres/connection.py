"""The one place monk opens PostgreSQL connections, and translates connection failures.

Every connection carries ``application_name`` (so monk's sessions can be told apart, and ended,
on a template), a connect timeout and a statement timeout. DDL that must not run in a transaction
block (CREATE/DROP DATABASE) gets an autocommit connection.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
from psycopg import conninfo as pg_conninfo

from monk.errors import ConfigError, DatabaseUnavailable

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

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        name: str,
        connect_timeout: int = 10,
        statement_timeout_ms: int = 60_000,
    ) -> ServerTarget:
        try:
            params = pg_conninfo.conninfo_to_dict(url)
        except psycopg.ProgrammingError as exc:
            raise ConfigError(f"MONK_DATABASE_URL is not a valid PostgreSQL URL: {exc}") from None
        maintenance_db = str(params.pop("dbname", None) or "postgres")
        clean = {k: str(v) for k, v in params.items() if v is not None}
        host = clean.get("host", "localhost")
        return cls(
            name=name,
            conninfo=pg_conninfo.make_conninfo(**clean),
            public_host="localhost" if host.startswith("/") else host.split(",")[0],
            public_port=int(clean.get("port", "5432").split(",")[0]),
            maintenance_db=maintenance_db,
            connect_timeout=connect_timeout,
            statement_timeout_ms=statement_timeout_ms,
        )

    def url(self, dbname: str) -> str:
        """A libpq URL for ``dbname`` with the admin's credentials."""
        params = pg_conninfo.conninfo_to_dict(self.conninfo)
        params["dbname"] = dbname
        return _to_url({k: str(v) for k, v in params.items() if v is not None})


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
) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """Open a connection to ``dbname`` (default: the maintenance database) as monk's admin role.

    A server that cannot be reached raises DatabaseUnavailable naming the server.
    """
    conn = open_connection(
        target,
        dbname,
        autocommit=autocommit,
        purpose=purpose,
        statement_timeout_ms=statement_timeout_ms,
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
) -> psycopg.Connection[tuple[object, ...]]:
    timeout = target.statement_timeout_ms if statement_timeout_ms is None else statement_timeout_ms
    try:
        return psycopg.connect(
            target.conninfo,
            dbname=dbname or target.maintenance_db,
            autocommit=autocommit,
            application_name=f"{APPLICATION_NAME}:{purpose}",
            connect_timeout=target.connect_timeout,
            options=f"-c statement_timeout={int(timeout)}",
        )
    except psycopg.OperationalError as exc:
        raise unavailable(target, dbname or target.maintenance_db, exc) from None


def unavailable(target: ServerTarget, dbname: str, exc: BaseException) -> DatabaseUnavailable:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = lines[0].removeprefix("connection failed: ") if lines else type(exc).__name__
    return DatabaseUnavailable(
        f"{target.source}: cannot connect to database {dbname!r} on server {target.name!r}: "
        f"{reason}",
        host=target.name,
        database=dbname,
    )
