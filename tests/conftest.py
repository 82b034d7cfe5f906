"""Test fixtures: a real PostgreSQL server for the whole session, never a mock.

By default the session starts monk's embedded server in a temp dir (fsync off: tests only).
With MONK_DATABASE_URL set (CI's second pass: Debian's PostgreSQL 15), the suite runs against
that external server instead.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest
from psycopg import sql

from monk.adapters.embedded import EmbeddedServer
from monk.adapters.postgres.connection import ServerTarget
from monk.settings import Settings

if TYPE_CHECKING:
    from tests.fleet import Fleet, FleetServer

EXTERNAL_URL = os.environ.get("MONK_DATABASE_URL")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Admin URL (maintenance database) of the server the suite runs against."""
    if EXTERNAL_URL:
        yield EXTERNAL_URL
        return
    data_dir = tmp_path_factory.mktemp("embedded")
    server = EmbeddedServer(data_dir, port=free_port(), durable=False)
    server.ensure_running()
    target = server.target(name="localhost", connect_timeout=10, statement_timeout_ms=60_000)
    yield target.url("postgres")
    server.stop()


@pytest.fixture
def settings(admin_url: str, tmp_path: Path) -> Iterator[Settings]:
    """Settings of one test: its own system database on the shared server."""
    system_db = f"monk_t_{uuid.uuid4().hex[:10]}"
    s = Settings(
        database_url=admin_url,  # type: ignore[arg-type]
        system_db_name=system_db,
        data_dir=tmp_path / "data",
        _env_file=None,  # type: ignore[call-arg]
    )
    yield s
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(system_db))
        )


@pytest.fixture
def target(settings: Settings) -> ServerTarget:
    assert settings.database_url is not None
    return ServerTarget.from_url(settings.database_url.get_secret_value(), name="localhost")


def settings_env(s: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MONK_")}
    if s.database_url is not None:
        env["MONK_DATABASE_URL"] = s.database_url.get_secret_value()
    env["MONK_SYSTEM_DB_NAME"] = s.system_db_name
    env["MONK_DATA_DIR"] = str(s.data_dir)
    env["MONK_EMBEDDED_PORT"] = str(s.embedded_port)
    env["MONK_EMBEDDED_DURABLE"] = "true" if s.embedded_durable else "false"
    env["MONK_POOL_SPARES"] = json.dumps(s.pool_spares)
    return env


MONK_BIN = str(Path(sys.executable).parent / "monk")

RunMonk = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def monk(settings: Settings) -> RunMonk:
    """Run the real ``monk`` command with this test's settings."""

    def run(
        *args: str, env: dict[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        full_env = settings_env(settings) | (env or {})
        return subprocess.run(
            [MONK_BIN, *args],
            capture_output=True,
            text=True,
            env=full_env,
            timeout=timeout,
            check=False,
            cwd=settings.data_dir.parent,
        )

    return run


@pytest.fixture(scope="session")
def lifecycle_settings(
    admin_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    """One system database for the tenant lifecycle tests, with a template built once.

    Template and tenant databases are cluster-global names, so tests sharing the server use
    their own template key (a copy of the built-in ``basic``) and unique tenant names.
    """
    system_db = f"monk_l_{uuid.uuid4().hex[:10]}"
    s = Settings(
        database_url=admin_url,  # type: ignore[arg-type]
        system_db_name=system_db,
        data_dir=tmp_path_factory.mktemp("lifecycle"),
        clone_timeout=20,
        pool_spares={},  # the pool tests fill their own; no background refills elsewhere
        _env_file=None,  # type: ignore[call-arg]
    )
    yield s
    drop_installation(admin_url, system_db)


def drop_installation(admin_url: str, system_db: str) -> None:
    """Drop what an installation made: its tenants' databases and roles, its templates."""
    mark = f"monk:{system_db}"
    templates: list[tuple[str]] = []
    with psycopg.connect(admin_url, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (system_db,)).fetchone():
            with psycopg.connect(admin_url, dbname=system_db) as sysconn:
                templates = sysconn.execute(
                    "SELECT database FROM template_builds WHERE dropped_at IS NULL"
                ).fetchall()
        dbs = conn.execute(
            "SELECT datname FROM pg_database WHERE shobj_description(oid, 'pg_database') = %s",
            (mark,),
        ).fetchall()
        # An invalid database (an interrupted drop) refuses ALTER, and ends the session for it.
        invalid = {
            str(r[0])
            for r in conn.execute("SELECT datname FROM pg_database WHERE datconnlimit = -2")
        }
        for (db,) in [*dbs, *templates]:
            if db not in invalid:
                conn.execute(
                    sql.SQL("ALTER DATABASE {} IS_TEMPLATE false").format(sql.Identifier(db))
                )
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db))
            )
        roles = conn.execute(
            "SELECT rolname FROM pg_roles WHERE shobj_description(oid, 'pg_authid') = %s", (mark,)
        ).fetchall()
        for (role,) in roles:
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(system_db))
        )


# ---------------------------------------------------------------- a fleet of servers
# Imported inside the fixtures: tests.fleet imports free_port from here.


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """More real servers beside the session's own, each started on first use (tests/fleet.py)."""
    from tests.fleet import Fleet

    f = Fleet(tmp_path_factory)
    yield f
    f.stop_all()


@pytest.fixture
def fleet_server(tmp_path: Path) -> Iterator[FleetServer]:
    """A server of this test alone (embedded 18), to stop, restart or break."""
    from tests.fleet import own_fleet_server

    with own_fleet_server(tmp_path / "own-pg") as fs:
        yield fs
