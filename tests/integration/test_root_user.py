"""The tenant's first user, ``root``, made by the provisioning pipeline itself: a spare carries
it from when it was made (a warm handout hashes nothing and connects to nothing but the
registry), a cold provision writes it in the step that connects to the new database, before
the activation; a crash anywhere leaves no tenant, or a tenant with its root user."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from monk.core import passwords
from monk.errors import StrayDatabase
from monk.service import pool
from monk.service.tenants import TenantService
from tests.integration.conftest import Env
from tests.integration.test_crash import kill_at, run
from tests.integration.test_pool import root_password_works
from tests.integration.test_tenants import databases


@pytest.fixture
def drained(env: Env, svc: TenantService) -> Iterator[TenantService]:
    pool.drain(svc)
    yield svc
    pool.drain(svc)


def unique(prefix: str) -> str:
    return f"{prefix} {uuid.uuid4().hex[:8]}"


def sessions_of(env: Env, database: str) -> tuple[int, int]:
    """(oid, sessions so far) of a database: the oid survives the handout's rename."""
    with psycopg.connect(env.target.conninfo, dbname="postgres", autocommit=True) as conn:
        row = conn.execute(
            "SELECT d.oid::int, coalesce(s.sessions, 0)::int FROM pg_database d"
            " LEFT JOIN pg_stat_database s ON s.datid = d.oid WHERE d.datname = %s",
            (database,),
        ).fetchone()
    assert row is not None, database
    return int(row[0]), int(row[1])


def sessions_by_oid(env: Env, oid: int) -> int:
    with psycopg.connect(env.target.conninfo, dbname="postgres", autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute(
            "SELECT coalesce(sessions, 0)::int FROM pg_stat_database WHERE datid = %s", (oid,)
        ).fetchone()
    return int(row[0]) if row else 0


def test_a_warm_provision_answers_the_spares_root_user_hashing_nothing(
    env: Env, drained: TenantService, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = drained
    # Spares of other installations (other tests' servers of the fleet) may share the server.
    others = set(databases(env, "monk_spare_%"))
    assert pool.fill(svc, env.template, 1) == 1
    [spare] = set(databases(env, "monk_spare_%")) - others
    time.sleep(0.2)  # sessions are counted as their backends exit: the spare's maker's too
    oid, before = sessions_of(env, spare)

    def no_hashing(password: str) -> str:
        raise AssertionError("argon2 on the warm path")

    monkeypatch.setattr(passwords, "hash_password", no_hashing)
    view = svc.provision(unique("Warm root"), template=env.template)
    monkeypatch.undo()
    assert view.provisioned_from == "pool"
    # The handout opened no session on the tenant's database.
    time.sleep(0.2)
    assert sessions_by_oid(env, oid) == before
    assert view.root_password is not None
    assert view.as_dict()["root_user"] == {"username": "root", "password": view.root_password}
    assert root_password_works(env, view.tenant.database, view.root_password)


def test_a_provision_with_a_given_root_password_is_cold_and_writes_it_before_activation(
    env: Env, drained: TenantService
) -> None:
    svc = drained
    others = set(databases(env, "monk_spare_%"))  # other installations' (see above)
    assert pool.fill(svc, env.template, 1) == 1
    view = svc.provision(unique("Given root"), template=env.template, root_password="correct horse")
    # The spare's root user has a password of its own: a given one is written by the clone's
    # prepare step, and the spare stays for the next provision.
    assert view.provisioned_from == "clone"
    assert view.root_password == "correct horse"
    assert root_password_works(env, view.tenant.database, "correct horse")
    assert len(set(databases(env, "monk_spare_%")) - others) == 1


def test_a_cold_provision_through_the_service_makes_root(env: Env, drained: TenantService) -> None:
    view = drained.provision(unique("Cold root"), template=env.template)
    assert view.provisioned_from == "clone"
    assert view.root_password is not None
    assert root_password_works(env, view.tenant.database, view.root_password)


@pytest.mark.slow
@pytest.mark.parametrize("step", ["intent", "cloned", "migrated", "configured"])
def test_a_crash_at_any_step_leaves_no_tenant_or_one_with_its_root_user(
    env: Env, step: str
) -> None:
    name = unique("Crash root")
    before = databases(env)
    kill_at(env, step, "tenant", "create", name, "--template", env.template)
    fixed = run(env, "doctor", "--repair", "--json")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    # Before its activation's commit a provision is undone whole, root user and all.
    assert databases(env) == before
    made = run(env, "tenant", "create", name, "--template", env.template, "--json")
    assert made.returncode == 0, made.stderr
    out = json.loads(made.stdout)
    assert root_password_works(env, out["database"], out["root_user"]["password"])


def test_a_cold_provision_hashes_its_root_password_again_only_once_it_is_done(
    env: Env, drained: TenantService
) -> None:
    """The pair a cold provision takes is replaced after the provision, not beside its clone:
    a refill's argon2 (~80 ms of CPU) running during the clone slowed it (docs/benchmarks.md);
    a provision that fails refills as well."""
    svc = drained
    svc.root_passwords.keep(2)
    assert svc.root_passwords.settle(30)
    assert svc.root_passwords.outstanding() == 2
    seen: dict[str, int] = {}
    hook = svc.checkpoint

    def record(step: str) -> None:
        seen[step] = svc.root_passwords.outstanding()
        hook(step)

    svc.checkpoint = record  # type: ignore[method-assign]
    view = svc.provision(unique("Refill after"), template=env.template)
    assert view.provisioned_from == "clone"
    assert seen == {"intent": 1, "cloned": 1, "migrated": 1, "role": 1, "configured": 1}
    assert svc.root_passwords.outstanding() == 2  # refilled (being hashed) once answered
    assert root_password_works(env, view.tenant.database, view.root_password or "")

    # A provision that fails (a stray database of its name is in the clone's way) refills too.
    name = unique("Refill stray")
    stray = svc.name(name).database
    with psycopg.connect(env.target.conninfo, dbname="postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{stray}"')
    try:
        assert svc.root_passwords.settle(30)
        seen.clear()
        with pytest.raises(StrayDatabase):
            svc.provision(name, template=env.template)
        assert seen == {"intent": 1}
        assert svc.root_passwords.outstanding() == 2
    finally:
        with psycopg.connect(env.target.conninfo, dbname="postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{stray}"')


def test_the_root_user_is_one_statement_on_a_session_that_commits_asynchronously(
    env: Env, drained: TenantService
) -> None:
    """The prepare step's session: autocommit, ``synchronous_commit`` off from its start-up
    packet (no SET round trip); ``put_root`` there is one statement, committed on its own."""
    from monk.adapters.postgres import tenant_users
    from monk.adapters.postgres.connection import connect

    view = drained.provision(unique("One statement"), template=env.template)
    with connect(
        env.target, view.tenant.database, autocommit=True, purpose="prepare", async_commit=True
    ) as conn:
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("off",)
        assert tenant_users.put_root(conn, passwords.hash_password("another one"))
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert root_password_works(env, view.tenant.database, "another one")


def _waiting(env: Env, tenant_id: object) -> bool:
    with psycopg.connect(env.target.conninfo, dbname=env.settings.system_db_name) as conn:
        found = conn.execute("SELECT 1 FROM pending_roots WHERE tenant_id = %s", (tenant_id,))
        return found.fetchone() is not None


def _has_root(env: Env, database: str) -> bool:
    with psycopg.connect(env.target.conninfo, dbname=database) as conn:
        return conn.execute("SELECT 1 FROM users WHERE auth = 'root'").fetchone() is not None


def test_under_serve_a_cold_provision_is_answered_before_its_root_user_is_written(
    env: Env, drained: TenantService
) -> None:
    """``monk serve``'s cold provision connects to nothing but the registry after its clone: the
    root user's hash commits with the activation and is written after the answer. Until then
    (a process killed right after answering is the same state) every use of the tenant's users
    writes it first, a login included; an existing root user is never overwritten."""
    from monk.service import root_users, tenant_auth

    svc = drained
    svc.root_after_answer = True
    try:
        opened: list[str] = []
        hook = svc.checkpoint
        svc.checkpoint = lambda step: (opened.append(step), hook(step))  # type: ignore[method-assign]
        view = svc.provision(unique("After answer"), template=env.template)
    finally:
        svc.root_after_answer = False
        svc.checkpoint = hook  # type: ignore[method-assign]
    assert view.provisioned_from == "clone"
    assert view.root_password is not None
    tenant = view.tenant
    # No session ever opened in the new database before the answer; the hash waits.
    assert sessions_of(env, tenant.database)[1] == 0
    assert _waiting(env, tenant.id)
    assert not _has_root(env, tenant.database)

    # The first login (within milliseconds of the answer) writes it and succeeds.
    policy = tenant_auth.LoginPolicy(max_failures=5, window=60)
    identity = tenant_auth.login(svc, policy, tenant.name, "root", view.root_password)
    assert identity.access == "root"
    assert not _waiting(env, tenant.id)
    assert root_password_works(env, tenant.database, view.root_password)
    # Nothing waits any more: a second write is a no-op and keeps the password as it is.
    assert root_users.write_pending(svc, tenant) is False
    assert root_password_works(env, tenant.database, view.root_password)


@pytest.mark.slow
def test_doctor_reports_and_writes_a_root_user_left_waiting(
    env: Env, drained: TenantService
) -> None:
    """A process killed between its answer and the write leaves the hash waiting: ``monk
    doctor`` reports it and ``--repair`` writes it (so does ``monk serve``'s worker)."""
    svc = drained
    svc.root_after_answer = True
    try:
        view = svc.provision(unique("Left waiting"), template=env.template)
    finally:
        svc.root_after_answer = False
    assert _waiting(env, view.tenant.id)
    time.sleep(5.2)  # reported once it waited well past an answer's after-work
    found = run(env, "doctor", "--json")
    assert found.returncode != 0
    kinds = {(p["kind"], p["subject"]) for p in json.loads(found.stdout)["problems"]}
    assert ("root_user_waiting", view.tenant.database) in kinds
    fixed = run(env, "doctor", "--repair", "--json")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert not _waiting(env, view.tenant.id)
    assert root_password_works(env, view.tenant.database, view.root_password or "")


def test_closing_a_tenant_writes_its_waiting_root_user_first(
    env: Env, drained: TenantService
) -> None:
    """A disable (as a trash or a purge) closes the database: a root user still waiting is
    written first, while it can be, so no closed tenant is left with one waiting."""
    svc = drained
    svc.root_after_answer = True
    try:
        view = svc.provision(unique("Closed early"), template=env.template)
    finally:
        svc.root_after_answer = False
    assert _waiting(env, view.tenant.id)
    svc.disable(view.tenant.name)
    assert not _waiting(env, view.tenant.id)  # forgotten only once written
    svc.enable(view.tenant.name)
    assert root_password_works(env, view.tenant.database, view.root_password or "")
