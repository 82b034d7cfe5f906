"""Fixtures of the lifecycle tests: one system database and one template, built once."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest

from monk.adapters.postgres.connection import ServerTarget
from monk.service import templates as template_service
from monk.service.tenants import TenantService
from monk.settings import Settings
from monk.system.migrator import ensure_system_database
from tests.integration import template_support


@dataclass(frozen=True)
class Env:
    settings: Settings
    target: ServerTarget
    template: str


@pytest.fixture(scope="session")
def env(lifecycle_settings: Settings) -> Env:
    s = lifecycle_settings
    assert s.database_url is not None
    target = ServerTarget.from_url(s.database_url.get_secret_value(), name="localhost")
    ensure_system_database(target, s.system_db_name)
    key = f"tb_{uuid.uuid4().hex[:8]}"
    source = template_service.builtin_source_dir("basic")
    template_support.build(target, s, key, source_dir=source)
    return Env(s, target, key)


@pytest.fixture
def svc(env: Env) -> Iterator[TenantService]:
    with TenantService(env.settings, env.target) as service:
        yield service


def end_keyholder_sessions(env: Env) -> None:
    """What other processes see when a keyholder dies: its keyholder session ends, and its
    lock with it (so its spares may be adopted and its spare roles dropped)."""
    with psycopg.connect(
        env.target.conninfo, dbname=env.settings.system_db_name, autocommit=True
    ) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'monk:keyholder'"
        )
