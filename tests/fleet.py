"""The test ground of a fleet: more real PostgreSQL servers beside the session's own.

``fleet`` (session-scoped, in tests/conftest.py) starts each extra server the first time a
test asks for it and keeps it for the whole session: ``fleet.second`` is monk's embedded
PostgreSQL 18 in a temp dir, ``fleet.third`` Debian's PostgreSQL 15 where its binaries are
installed (as in CI), else another embedded 18. Both are reached over TCP with a password, as
a managed server would be. Tests that stop or break a server take one of their own with
``fleet_server`` (function-scoped, stopped at the end), never the shared ones.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest

from monk.adapters.embedded import SUPERUSER, EmbeddedServer
from tests.conftest import free_port

DEBIAN_PG15 = Path("/usr/lib/postgresql/15/bin")


class DebianServer(EmbeddedServer):
    """An embedded-style server run from Debian's PostgreSQL binaries (another major)."""

    def __init__(self, data_dir: Path, *, bin_dir: Path, port: int) -> None:
        super().__init__(data_dir, port=port, durable=False)
        self._bin = bin_dir

    def tool(self, name: str) -> Path:
        return self._bin / name


@dataclass
class FleetServer:
    """One extra server: its admin URL (TCP, password inside) and how to stop and start it."""

    server: EmbeddedServer
    major: int

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def password(self) -> str:
        return self.server.password_file.read_text().strip()

    @property
    def url(self) -> str:
        return self.url_as(SUPERUSER, self.password)

    def url_as(self, user: str, password: str, dbname: str = "postgres") -> str:
        return (
            f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}"
            f"@127.0.0.1:{self.port}/{dbname}"
        )

    def connect(self, dbname: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.url_as(SUPERUSER, self.password, dbname), autocommit=True)

    def make_role(self, *attributes: str) -> tuple[str, str]:
        """A new login role with ``attributes`` (e.g. "CREATEDB"): (name, password)."""
        name = f"r_{secrets.token_hex(4)}"
        password = secrets.token_urlsafe(18)
        with self.connect() as conn:
            conn.execute(
                psycopg.sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} {}").format(
                    psycopg.sql.Identifier(name),
                    psycopg.sql.Literal(password),
                    psycopg.sql.SQL(" ".join(attributes)),
                )
            )
        return name, password

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        self.server.ensure_running()


def start_server(data_dir: Path, *, major: int = 18) -> FleetServer:
    """A new server in ``data_dir``: the embedded 18, or Debian's 15 (skips without it)."""
    port = free_port()
    if major == 18:
        server: EmbeddedServer = EmbeddedServer(data_dir, port=port, durable=False)
    else:
        bin_dir = Path(f"/usr/lib/postgresql/{major}/bin")
        if not (bin_dir / "initdb").exists():
            pytest.skip(f"PostgreSQL {major} binaries are not installed in {bin_dir}")
        server = DebianServer(data_dir, bin_dir=bin_dir, port=port)
    server.ensure_running()
    return FleetServer(server, major)


class Fleet:
    """The session's extra servers, each started on first use."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        self._factory = factory
        self._started: dict[str, FleetServer] = {}

    def _get(self, which: str, major: int) -> FleetServer:
        if which not in self._started:
            self._started[which] = start_server(self._factory.mktemp(f"fleet-{which}"), major=major)
        return self._started[which]

    @property
    def second(self) -> FleetServer:
        return self._get("second", 18)

    @property
    def third(self) -> FleetServer:
        return self._get("third", 15 if (DEBIAN_PG15 / "initdb").exists() else 18)

    def stop_all(self) -> None:
        for fs in self._started.values():
            with contextlib.suppress(Exception):
                fs.stop()


@contextlib.contextmanager
def own_fleet_server(data_dir: Path) -> Iterator[FleetServer]:
    """A server of one test alone (embedded 18), to stop, restart or break."""
    fs = start_server(data_dir)
    try:
        yield fs
    finally:
        with contextlib.suppress(Exception):
            fs.stop()


def server_major(fs: FleetServer) -> int:
    with fs.connect() as conn:
        row = conn.execute("SHOW server_version_num").fetchone()
    assert row is not None
    return int(str(row[0])) // 10000
