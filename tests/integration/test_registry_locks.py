"""The name locks of provisioning: the one-round-trip gate never leaves one behind."""

from __future__ import annotations

import psycopg
import pytest

from monk.adapters import registry
from monk.errors import TenantExists
from monk.service.tenants import TenantService
from tests.integration.conftest import Env
from tests.integration.test_tenants import unique


def lockable(env: Env, database: str) -> bool:
    """Whether another session can take the name's lock right now (and gives it back)."""
    key = registry.advisory_key(database)
    with psycopg.connect(env.target.conninfo, dbname=env.settings.system_db_name) as conn:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
        if row == (True,):
            conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
        return row == (True,)


def test_a_refused_provision_leaves_the_name_unlocked(env: Env, svc: TenantService) -> None:
    name = unique("Gate")
    view = svc.provision(name, template=env.template)
    with pytest.raises(TenantExists):
        svc.provision(name, template=env.template)
    # the service's pooled session that was refused is still open, idle: it holds nothing
    assert lockable(env, view.tenant.database)
    assert lockable(env, svc.name(unique("Free")).database)


def test_a_busy_name_is_reported_busy_and_left_to_its_holder(env: Env, svc: TenantService) -> None:
    name = svc.name(unique("Busy"))
    key = registry.advisory_key(name.database)
    with psycopg.connect(env.target.conninfo, dbname=env.settings.system_db_name) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (key,))
        with pytest.raises(TenantExists):
            svc.provision(name.display, template=env.template)
        holder.execute("SELECT pg_advisory_unlock(%s)", (key,))
    assert lockable(env, name.database)
    assert svc.provision(name.display, template=env.template).tenant.status == "active"


@pytest.mark.parametrize("sign", [1, -1])
def test_unlock_if_held(env: Env, sign: int) -> None:
    database = next(
        d
        for d in (f"tenant_{i:016x}" for i in range(1000))
        if (registry.advisory_key(d) < 0) == (sign < 0)
    )
    with psycopg.connect(
        env.target.conninfo, dbname=env.settings.system_db_name, autocommit=True
    ) as conn:
        registry.unlock_if_held(conn, database)  # not held: nothing, no warning needed
        assert registry.try_lock(conn, database)
        assert not lockable(env, database)
        registry.unlock_if_held(conn, database)
        assert lockable(env, database)
