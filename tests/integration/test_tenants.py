"""The tenant lifecycle through the service layer, on a real server."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import threading
import uuid
from pathlib import Path

import psycopg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from psycopg import sql
from psycopg.types.json import Jsonb

from monk.errors import (
    HashCollision,
    IdempotencyKeyReused,
    InvalidName,
    InvalidState,
    OperationFailed,
    StrayDatabase,
    TemplateNotFound,
    TenantExists,
    TenantNotFound,
)
from monk.service import purge, role_pool
from monk.service import templates as template_service
from monk.service.health import tenant_health
from monk.service.tenants import TenantService, TenantView
from tests.integration import template_support
from tests.integration.conftest import Env


def unique(prefix: str = "Acme") -> str:
    return f"{prefix} {uuid.uuid4().hex[:8]}"


def databases(env: Env, like: str = "tenant_%", *, every: bool = False) -> set[str]:
    """This installation's databases named ``like``: its ownership mark, or none yet (made, not
    yet configured). Other tests' installations on the same server are not counted, unless
    ``every``."""
    mark = f"monk:{env.settings.system_db_name}"
    with psycopg.connect(env.target.conninfo, dbname="postgres") as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s"
            " AND (%s OR coalesce(shobj_description(oid, 'pg_database'), %s) = %s)",
            (like, every, mark, mark),
        )
        return {r[0] for r in rows.fetchall()}


def roles(env: Env) -> set[str]:
    with psycopg.connect(env.target.conninfo, dbname="postgres") as conn:
        rows = conn.execute("SELECT rolname FROM pg_roles WHERE rolname LIKE 'tenant_%'")
        return {r[0] for r in rows.fetchall()}


def tenant_conn(url: str, **kw: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(url, connect_timeout=5, **kw)


def test_provision_gives_a_working_isolated_database(env: Env, svc: TenantService) -> None:
    name = unique()
    out = svc.provision(name, template=env.template).as_dict()
    assert out["name"] == name
    assert out["status"] == "active"
    assert out["database"].startswith("tenant_")
    assert out["template"] == env.template
    assert out["template_version"]
    for field in ("host", "port", "created_at", "connection_url"):
        assert out[field]
    with tenant_conn(out["connection_url"]) as conn:
        assert conn.execute("SELECT count(*) FROM account").fetchone() == (5,)
        assert conn.execute("SELECT count(*) FROM contact").fetchone() == (6,)
        # Every object belongs to pg_database_owner, i.e. to the owner of the database: the
        # tenant's role, which can therefore alter and drop them.
        owners = conn.execute(
            "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall()
        assert owners == [("pg_database_owner",)]
        db_owner = conn.execute(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()"
        ).fetchone()
        assert db_owner == (out["database"],)
        conn.execute("ALTER TABLE account ADD COLUMN tenant_note text")
        # the provision made root; the tenant's role may add users of its own
        conn.execute("INSERT INTO users (name, auth, access) VALUES ('alice', 'alice', 'full')")
        conn.commit()
    # its role reaches nothing else: the system database, the template, another tenant
    other = svc.provision(unique("Other"), template=env.template).as_dict()
    base = psycopg.conninfo.conninfo_to_dict(out["connection_url"])
    for dbname in (env.settings.system_db_name, f"monk_template_{env.template}", other["database"]):
        with pytest.raises(psycopg.OperationalError):
            tenant_conn(psycopg.conninfo.make_conninfo(**(base | {"dbname": dbname})))


def test_same_name_any_case_is_one_tenant(env: Env, svc: TenantService) -> None:
    name = unique()
    svc.provision(name, template=env.template)
    before = databases(env)
    with pytest.raises(TenantExists):
        svc.provision(f"  {name.upper()} ", template=env.template)
    assert databases(env) == before


def test_idempotency_key_returns_the_first_result(env: Env, svc: TenantService) -> None:
    name = unique()
    k1, k2 = f"k1-{uuid.uuid4().hex}", f"k2-{uuid.uuid4().hex}"
    first = svc.provision(name, template=env.template, idempotency_key=k1).as_dict()
    again = svc.provision(name, template=env.template, idempotency_key=k1).as_dict()
    assert again["id"] == first["id"]
    assert "connection_url" not in again  # the password is shown once
    assert again["replayed"] is True
    with pytest.raises(TenantExists):
        svc.provision(name, template=env.template, idempotency_key=k2)
    # k2 made nothing, so it is free for another request; k1 is not.
    other = unique()
    with pytest.raises(IdempotencyKeyReused):
        svc.provision(other, template=env.template, idempotency_key=k1)
    assert svc.provision(other, template=env.template, idempotency_key=k2).credentials


def test_fifty_concurrent_provisions_of_one_name(env: Env) -> None:
    name = unique("Race")
    s = env.settings.model_copy(update={"pool_size": 20})
    with TenantService(s, env.target) as service:

        def attempt(_: int) -> str:
            try:
                service.provision(name, template=env.template)
                return "ok"
            except TenantExists:
                return "exists"

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(attempt, range(50)))
    assert results.count("ok") == 1
    assert results.count("exists") == 49
    database = service.name(name).database
    assert database in databases(env)


def test_session_on_the_template_does_not_block_provisioning(env: Env, svc: TenantService) -> None:
    template_db = f"monk_template_{env.template}"
    with psycopg.connect(env.target.conninfo, dbname="postgres", autocommit=True) as adm:
        adm.execute(
            sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(template_db))
        )
    try:
        holder = psycopg.connect(env.target.conninfo, dbname=template_db)
        holder.execute("SELECT 1")
        out = svc.provision(unique(), template=env.template).as_dict()
        assert out["status"] == "active"
        holder.close()
    finally:
        with psycopg.connect(env.target.conninfo, dbname="postgres", autocommit=True) as adm:
            adm.execute(
                sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(
                    sql.Identifier(template_db)
                )
            )


def test_hash_collision_is_refused_and_overwrites_nothing(env: Env) -> None:
    weak = uuid.uuid4().hex[:16]
    with TenantService(env.settings, env.target, hasher=lambda _: weak) as weak_svc:
        first = weak_svc.provision(unique("First"), template=env.template)
        with pytest.raises(HashCollision, match="hashes to"):
            weak_svc.provision(unique("Second"), template=env.template)
        assert weak_svc.get(first.tenant.name).status == "active"
        with psycopg.connect(env.target.conninfo, dbname=first.tenant.database) as conn:
            assert conn.execute("SELECT count(*) FROM account").fetchone() == (5,)


@pytest.mark.parametrize("raw", ["", "   ", "bad\x00name", "tab\tname", "x" * 129])
def test_bad_names_are_refused_with_nothing_made(env: Env, svc: TenantService, raw: str) -> None:
    before = databases(env)
    with pytest.raises(InvalidName):
        svc.provision(raw, template=env.template)
    assert databases(env) == before


def test_unknown_template_is_not_found(env: Env, svc: TenantService) -> None:
    before = databases(env)
    with pytest.raises(TemplateNotFound):
        svc.provision(unique(), template="no_such_template_x")
    assert databases(env) == before


@hsettings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    raw=st.one_of(
        st.text(max_size=80),
        st.sampled_from(['"; DROP DATABASE monk_main; --', "O'Brien & Sons", "Ωmega ☃", "é" * 64]),
    )
)
def test_any_name_gives_a_tenant_or_a_validation_error(
    env: Env, svc: TenantService, raw: str
) -> None:
    suffix = uuid.uuid4().hex[:6]
    name = f"{raw}{suffix}" if raw.strip() else raw
    before = databases(env)
    try:
        view = svc.provision(name, template=env.template)
    except InvalidName:
        assert databases(env) == before
        return
    assert view.tenant.database in databases(env)
    purge.request_purge(svc, name, archive=False, forget=True)
    purge.work_queue(svc)
    assert databases(env) == before


def test_stray_database_is_refused_and_kept(env: Env, svc: TenantService) -> None:
    name = unique("Stray")
    database = svc.name(name).database
    with psycopg.connect(env.target.conninfo, dbname="postgres", autocommit=True) as adm:
        adm.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    with pytest.raises(StrayDatabase):
        svc.provision(name, template=env.template)
    assert database in databases(env)  # not ours to drop during provisioning
    with pytest.raises(TenantNotFound):
        svc.get(name)
    with psycopg.connect(env.target.conninfo, dbname="postgres", autocommit=True) as adm:
        adm.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(database)))


def test_failed_step_is_undone(env: Env, svc: TenantService) -> None:
    """A step that fails (here: a database setting the server rejects) leaves nothing."""
    s = env.settings
    bad_build = template_support.build(
        env.target,
        s,
        f"tb_bad_{uuid.uuid4().hex[:6]}",
        source_dir=template_service.builtin_source_dir("empty"),
    )
    with psycopg.connect(env.target.conninfo, dbname=s.system_db_name, autocommit=True) as conn:
        conn.execute(
            'UPDATE template_builds SET database_settings = \'{"work_mem": "lots"}\' WHERE id = %s',
            (bad_build.id,),
        )
    name = unique("Undo")
    before_dbs, before_roles = databases(env), roles(env)
    with pytest.raises(OperationFailed) as info:
        svc.provision(name, template=bad_build.key)
    assert info.value.step == "configure"
    assert databases(env) == before_dbs
    assert roles(env) == before_roles
    with pytest.raises(TenantNotFound):
        svc.get(name)


def test_disable_enable(env: Env, svc: TenantService) -> None:
    name = unique()
    url = svc.provision(name, template=env.template).as_dict()["connection_url"]
    held = tenant_conn(url)
    assert svc.disable(name).tenant.status == "disabled"
    with pytest.raises(psycopg.OperationalError):
        held.execute("SELECT 1")  # its sessions were ended
    with pytest.raises(psycopg.OperationalError):
        tenant_conn(url)
    assert svc.enable(name).tenant.is_active
    with tenant_conn(url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_trash_and_restore(env: Env, svc: TenantService) -> None:
    name = unique()
    url = svc.provision(name, template=env.template).as_dict()["connection_url"]
    trashed = svc.trash(name).tenant
    assert trashed.status == "trashed"
    assert trashed.trashed_at is not None
    assert svc.list(include_trashed=False, limit=10_000).count(trashed) == 0
    assert svc.restore(name).tenant.status == "active"
    with tenant_conn(url) as conn:
        assert conn.execute("SELECT count(*) FROM account").fetchone() == (5,)


def test_purge_archives_drops_and_restores_from_archive(env: Env, svc: TenantService) -> None:
    name = unique("Purged")
    view = svc.provision(name, template=env.template)
    with tenant_conn(view.as_dict()["connection_url"]) as conn:
        conn.execute("INSERT INTO account (name, email) VALUES ('Kept', 'kept@example.com')")
        conn.commit()
    requested, op = purge.request_purge(svc, name, archive=True)
    assert requested.tenant.status == "deleting"
    assert purge.work_queue(svc, only=op) >= 1
    assert view.tenant.database not in databases(env)
    assert view.tenant.role_name not in roles(env)
    with pytest.raises(TenantNotFound):
        svc.get(name)
    restored = svc.restore(name).as_dict()
    assert restored["status"] == "active"
    assert restored["archive"]["sha256"]
    with tenant_conn(restored["connection_url"]) as conn:
        assert conn.execute("SELECT count(*) FROM account WHERE name = 'Kept'").fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM account").fetchone() == (6,)


def test_restore_from_archive_keeps_the_tenants_identity(env: Env, svc: TenantService) -> None:
    name = unique("Identity")
    first = svc.provision(name, template=env.template).tenant
    for _ in range(2):  # purged and restored twice: still the one tenant
        _, op = purge.request_purge(svc, name, archive=True)
        purge.work_queue(svc, only=op)
        restored = svc.restore(name)
        assert (restored.tenant.id, restored.tenant.created_at) == (first.id, first.created_at)
        assert restored.tenant.deleted_at is None
        assert svc.get(name).id == first.id
        with tenant_conn(restored.as_dict()["connection_url"]) as conn:
            assert conn.execute("SELECT count(*) FROM account").fetchone() == (5,)
    rows = [t for t in svc.list(include_deleted=True, limit=10_000) if t.name == name]
    assert [t.id for t in rows] == [first.id]
    with psycopg.connect(env.target.conninfo, dbname=env.settings.system_db_name) as conn:
        kinds = conn.execute(
            "SELECT kind, tenant_id FROM events WHERE payload->>'name' = %s ORDER BY seq", (name,)
        ).fetchall()
    assert kinds == [
        ("tenant.provisioned", first.id),
        *[("tenant.purged", first.id), ("tenant.restored", first.id)] * 2,
    ]


def test_restore_from_archive_reserves_the_name_as_a_provision_does(
    env: Env, svc: TenantService
) -> None:
    """Restore's first step is the provisioning pipeline's reserve: the intent and its journal
    entry (a restore naming the archive) in one statement and, as for a cold provision, one of
    this process's spare roles renamed into the tenant's (its password is the one answered)."""
    name = unique("Reserved")
    svc.provision(name, template=env.template)
    _, op = purge.request_purge(svc, name, archive=True)
    purge.work_queue(svc, only=op)
    try:
        role_pool.fill(svc, 2)
        spares_before = len(svc.role_secrets)
        restored = svc.restore(name)
        assert len(svc.role_secrets) == spares_before - 1  # the tenant's role was a spare
        assert restored.tenant.role_name in roles(env)
        with tenant_conn(restored.as_dict()["connection_url"]) as conn:
            assert conn.execute("SELECT count(*) FROM account").fetchone() == (5,)
        with psycopg.connect(env.target.conninfo, dbname=env.settings.system_db_name) as conn:
            journal = conn.execute(
                "SELECT state, step, params->>'archive' FROM operations"
                " WHERE kind = 'restore' AND subject = %s",
                (restored.tenant.name_key,),
            ).fetchall()
        assert journal == [("done", "active", restored.tenant.archive_path)]
    finally:
        role_pool.drop_own(svc)


def test_purge_forget_frees_the_name(env: Env, svc: TenantService) -> None:
    name = unique()
    svc.provision(name, template=env.template)
    _, op = purge.request_purge(svc, name, archive=False, forget=True)
    purge.work_queue(svc, only=op)
    with pytest.raises(TenantNotFound):
        svc.restore(name)
    assert svc.provision(name, template=env.template).tenant.status == "active"


def test_credentials_rotate(env: Env, svc: TenantService) -> None:
    name = unique()
    old = svc.provision(name, template=env.template).as_dict()["connection_url"]
    new = svc.rotate_credentials(name).as_dict()["connection_url"]
    assert old != new
    with pytest.raises(psycopg.OperationalError):
        tenant_conn(old)
    with tenant_conn(new) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_health(env: Env, svc: TenantService) -> None:
    name = unique()
    svc.provision(name, template=env.template)
    report = tenant_health(svc, name)
    assert report["status"] == "healthy", report
    assert report["size_bytes"] > 0
    svc.disable(name)
    assert tenant_health(svc, name)["status"] == "warning"


def test_state_rules(env: Env, svc: TenantService) -> None:
    name = unique()
    svc.provision(name, template=env.template)
    svc.trash(name)
    with pytest.raises(InvalidState, match="it is trashed"):
        svc.enable(name)
    with pytest.raises(InvalidState, match="it is trashed"):
        svc.disable(name)
    with pytest.raises(TenantNotFound):
        svc.disable(unique("Nobody"))


def test_rebuild_during_provisioning_never_mislabels_a_tenant(
    env: Env, svc: TenantService, tmp_path: Path
) -> None:
    """Each tenant records the build whose content it really holds, even when the template is
    rebuilt while it is being cloned."""
    key = f"tr_{uuid.uuid4().hex[:8]}"
    source = tmp_path / key
    shutil.copytree(template_service.builtin_source_dir("basic"), source)
    template_support.build(env.target, env.settings, key, source_dir=source)
    stop = threading.Event()
    made: list[TenantView] = []

    def provision_loop() -> None:
        while not stop.is_set():
            made.append(svc.provision(unique("Swap"), template=key))

    worker = threading.Thread(target=provision_loop)
    worker.start()
    try:
        for label in ("two", "three", "four"):
            manifest = json.loads((source / "template.json").read_text())
            manifest["description"] = label
            (source / "template.json").write_text(json.dumps(manifest))
            template_support.build(env.target, env.settings, key, source_dir=source)
    finally:
        stop.set()
        worker.join()
    assert len(made) >= 2
    for view in made:
        with psycopg.connect(env.target.conninfo, dbname=view.tenant.database) as conn:
            assert template_service.clone_marker(conn) == (key, view.tenant.template_version)


def test_a_rebuild_between_clone_and_activation_is_caught_by_the_activation(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The activation's commit checks the build cloned (no read of its own after the clone):
    a rebuild landing just before it is refused there, and the tenant is cloned again from the
    new build, recording the version it holds. Nothing of the first clone is left."""
    key = f"tb_{uuid.uuid4().hex[:8]}"
    source = tmp_path / key
    shutil.copytree(template_service.builtin_source_dir("basic"), source)
    first = template_support.build(env.target, env.settings, key, source_dir=source)
    settings = env.settings.model_copy(update={"pool_spares": {}, "pool_roles": 0})
    with TenantService(settings, env.target) as svc:
        rebuilt: list[str] = []
        monkeypatch.setattr(
            svc,
            "prepare",
            template_support.rebuild_after_first_prepare(
                svc.prepare, env.target, env.settings, key, source, rebuilt
            ),
        )
        before = databases(env)
        view = svc.provision(unique("Rebuilt"), template=key)
        assert rebuilt
        assert rebuilt[0] != first.version
        assert view.tenant.template_version == rebuilt[0]
        assert databases(env) - before == {view.tenant.database}
        with psycopg.connect(env.target.conninfo, dbname=view.tenant.database) as conn:
            assert template_service.clone_marker(conn) == (key, rebuilt[0])
        with psycopg.connect(view.as_dict()["connection_url"]) as conn:
            assert conn.execute("SELECT count(*) FROM account").fetchone() == (5,)


def test_more_concurrent_provisions_than_pooled_connections(env: Env) -> None:
    """Provisions queue for monk's bounded pools instead of failing or deadlocking."""
    s = env.settings.model_copy(update={"pool_size": 2})
    with TenantService(s, env.target) as small, concurrent.futures.ThreadPoolExecutor(8) as ex:
        views = list(
            ex.map(lambda _: small.provision(unique("Queue"), template=env.template), range(8))
        )
    assert len({v.tenant.database for v in views}) == 8
    assert all(v.tenant.status == "active" for v in views)


def test_scram_iterations_apply_to_tenant_passwords(env: Env) -> None:
    settings = env.settings.model_copy(update={"scram_iterations": 16})
    with TenantService(settings, env.target) as service:
        view = service.provision(unique("Iterations"), template=env.template)
    with psycopg.connect(view.as_dict()["connection_url"]) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (view.tenant.role_name,)
    with psycopg.connect(env.target.conninfo, dbname="postgres") as conn:
        row = conn.execute(
            "SELECT rolpassword FROM pg_authid WHERE rolname = %s", (view.tenant.role_name,)
        ).fetchone()
    assert row is not None
    assert str(row[0]).startswith("SCRAM-SHA-256$16:")


def test_database_settings_reach_the_tenant(env: Env, svc: TenantService) -> None:
    s = env.settings
    build = template_support.build(
        env.target,
        s,
        f"tb_set_{uuid.uuid4().hex[:6]}",
        source_dir=template_service.builtin_source_dir("empty"),
    )
    with psycopg.connect(env.target.conninfo, dbname=s.system_db_name, autocommit=True) as conn:
        conn.execute(
            "UPDATE template_builds SET database_settings = %s WHERE id = %s",
            (Jsonb({"work_mem": "8MB", "monk_test.tier": "it's gold"}), build.id),
        )
    view = svc.provision(unique("Settings"), template=build.key)
    with tenant_conn(view.as_dict()["connection_url"]) as conn:
        assert conn.execute("SHOW work_mem").fetchone() == ("8MB",)
        assert conn.execute("SELECT current_setting('monk_test.tier')").fetchone() == ("it's gold",)
