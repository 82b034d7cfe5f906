"""Drift, status and the doctor's fleet report, as a user runs them: the real ``monk`` command
on a real server; tenants changed by hand behind monk's back."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from monk.adapters.registry import locks
from monk.api.app import create_app
from monk.api.auth import issue_root_token
from monk.service import drift
from monk.service.server import Server
from monk.service.tenants import TenantService
from monk.settings import Settings
from tests.conftest import RunMonk, drop_installation
from tests.integration.template_support import copy_builtin, drop_key, new_key

SUFFIX = uuid.uuid4().hex[:6]


def _n(name: str) -> str:
    """A tenant name of this run: database names are cluster-wide."""
    return f"{name} {SUFFIX}"


@pytest.fixture
def key(admin_url: str, settings: Settings) -> Iterator[str]:
    k = new_key("d")
    yield k
    # What the test's installation made (tenants' databases and roles) goes with it.
    drop_installation(admin_url, settings.system_db_name)
    drop_key(admin_url, k)


def _ok(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def _tenant_db(monk: RunMonk, name: str) -> str:
    return str(_ok(monk("tenant", "show", name, "--json"))["database"])


def _run_in(admin_url: str, database: str, *statements: str) -> None:
    """Change a tenant's database by hand, as its owner would (monk is not told)."""
    with psycopg.connect(admin_url, dbname=database, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement.encode())


def _build(monk: RunMonk, key: str, source: Path) -> dict[str, Any]:
    built: dict[str, Any] = _ok(monk("template", "build", key, "--source", str(source), "--json"))
    return built


def test_drift_finds_and_names_each_hand_change(
    monk: RunMonk, settings: Settings, admin_url: str, key: str, tmp_path: Path
) -> None:
    built = _build(monk, key, copy_builtin(tmp_path, "basic", key))
    assert built["fingerprint"]
    assert len(built["fingerprint"]) == 64
    names = [_n("Drift Column"), _n("Drift Index"), _n("Drift Check"), _n("Drift None")]
    for name in names:
        _ok(monk("tenant", "create", name, "--template", key, "--json"))
    db = {name: _tenant_db(monk, name) for name in names}
    _run_in(admin_url, db[_n("Drift Column")], "ALTER TABLE contact ADD COLUMN note text")
    _run_in(admin_url, db[_n("Drift Index")], "DROP INDEX contact_account_id_idx")
    _run_in(
        admin_url,
        db[_n("Drift Check")],
        "ALTER TABLE contact DROP CONSTRAINT contact_first_name_minlen",
        "ALTER TABLE contact ADD CONSTRAINT contact_first_name_minlen"
        " CHECK (char_length(first_name) >= 2)",
    )

    untouched = monk("tenant", "drift", _n("Drift None"), "--json")
    assert untouched.returncode == 0, untouched.stdout[:3000]
    clean = json.loads(untouched.stdout)
    assert clean["drifted"] is False
    assert clean["differences"] == []
    assert clean["claimed_by"] == "database"
    assert clean["template_version"] == built["version"]
    assert clean["fingerprint"] == clean["expected_fingerprint"] == built["fingerprint"]

    def texts(name: str) -> list[str]:
        result = monk("tenant", "drift", name, "--json")
        assert result.returncode == 1, result.stdout + result.stderr
        found = json.loads(result.stdout)
        assert found["drifted"] is True
        return [d["text"] for d in found["differences"]]

    assert texts(_n("Drift Column")) == ["column contact.note: added (text)"]
    [index] = texts(_n("Drift Index"))
    assert index.startswith("index contact_account_id_idx: missing")
    [check] = texts(_n("Drift Check"))
    assert check.startswith("constraint contact_first_name_minlen: definition differs")
    assert ">= 2" in check

    # For people: the differences named, exit 1.
    shown = monk("tenant", "drift", _n("Drift Column"))
    assert shown.returncode == 1
    assert "column contact.note: added (text)" in shown.stdout

    # The whole key, two at a time: each tenant's result, exit 1 as some drifted.
    fleet = monk("template", "drift", key, "--parallel", "2", "--json")
    assert fleet.returncode == 1, fleet.stderr
    by_name = {r["name"]: r for r in json.loads(fleet.stdout)}
    assert {n: r["drifted"] for n, r in by_name.items()} == {
        _n("Drift Column"): True,
        _n("Drift Index"): True,
        _n("Drift Check"): True,
        _n("Drift None"): False,
    }

    # Kept in the system database: status reports the last check.
    status = _ok(monk("template", "status", key, "--json"))
    assert status["drift"]["checked"] == 4
    assert status["drift"]["drifted"] == 3
    assert sorted(status["drift"]["drifted_tenants"]) == sorted(names[:3])

    # The doctor reports each drifted tenant (exit 1) and repairs none of them.
    for args in (("doctor", "--json"), ("doctor", "--repair", "--json")):
        doctor = monk(*args)
        assert doctor.returncode == 1, doctor.stdout + doctor.stderr
        report = json.loads(doctor.stdout)
        found = {p["subject"]: p for p in report["remaining"] if p["kind"] == "drifted"}
        assert set(found) == {db[n] for n in names[:3]}
        assert "column contact.note: added (text)" in found[db[_n("Drift Column")]]["detail"]
        assert found[db[_n("Drift Column")]]["repair"].startswith("none: ")
    assert "drifted" in monk("doctor").stdout

    # A new build: every tenant is behind it; the doctor warns per key, names with --json.
    source = tmp_path / key
    (source / "migrations").mkdir()
    (source / "migrations/0001_note.sql").write_text("CREATE TABLE note (body text);")
    _build(monk, key, source)
    report = json.loads(monk("doctor", "--json").stdout)
    [behind] = [w for w in report["warnings"] if w["kind"] == "behind_build"]
    assert behind["subject"] == key
    assert behind["detail"].startswith(f"4 tenant(s) of {key} are not at its current build")
    assert behind["tenants"] == sorted(names, key=str.casefold)
    plain = monk("doctor")
    assert f"warning: behind_build {key}: 4 tenant(s)" in plain.stdout.replace("\n", " ")
    # Still compared with the build each one is at, not the current one.
    assert _ok(monk("tenant", "drift", _n("Drift None"), "--json"))["drifted"] is False

    # Undone by hand: the next check finds nothing.
    _run_in(admin_url, db[_n("Drift Column")], "ALTER TABLE contact DROP COLUMN note")
    assert _ok(monk("tenant", "drift", _n("Drift Column"), "--json"))["drifted"] is False


@pytest.fixture
def api(admin_url: str, tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str], str, Path]]:
    """The real ASGI app on its own system database, with one source folder of its own."""
    key = new_key("da")
    source = copy_builtin(tmp_path / "sources", "basic", key)
    system_db = f"monk_dr_{uuid.uuid4().hex[:10]}"
    s = Settings(
        database_url=admin_url,  # type: ignore[arg-type]
        system_db_name=system_db,
        data_dir=tmp_path / "data",
        template_path=[tmp_path / "sources"],
        pool_spares={},
        _env_file=None,  # type: ignore[call-arg]
    )
    try:
        with TestClient(create_app(s)) as client:
            auth = {"Authorization": f"Bearer {issue_root_token(s, ttl_seconds=600)}"}
            yield client, auth, key, source
    finally:
        drop_installation(admin_url, system_db)
        drop_key(admin_url, key)


def test_status_and_drift_over_http(
    api: tuple[TestClient, dict[str, str], str, Path], admin_url: str
) -> None:
    client, auth, key, source = api
    tpl, ten = "/api/root/template", "/api/root/tenant"

    def ok(response: Any) -> Any:
        assert response.status_code in (200, 201), response.text
        return response.json()["data"]

    first = ok(client.post(f"{tpl}/{key}", headers=auth, json={}))
    names = [_n("Http Old A"), _n("Http Old B"), _n("Http Old C")]
    for name in names:
        ok(client.post(ten, headers=auth, json={"name": name, "template": key}))
    ok(client.patch(f"{ten}/{_n('Http Old C')}", headers=auth, json={"is_active": False}))
    # A new build (one more migration file): the tenants stay where they are, behind it.
    (source / "migrations").mkdir()
    (source / "migrations/0001_note.sql").write_text("CREATE TABLE note (body text);")
    second = ok(client.post(f"{tpl}/{key}", headers=auth, json={}))
    assert second["version"] != first["version"]
    ok(client.post(ten, headers=auth, json={"name": _n("Http New"), "template": key}))

    status = ok(client.get(f"{tpl}/{key}/status", headers=auth))
    assert status["current"]["version"] == second["version"]
    assert status["current"]["fingerprint"] == second["fingerprint"]
    assert status["total"] == 4
    counts = {(r["version"], r["level"], r["status"]): r["count"] for r in status["tenants"]}
    assert counts == {
        (first["version"], 0, "active"): 2,
        (first["version"], 0, "disabled"): 1,
        (second["version"], 1, "active"): 1,
    }
    assert status["behind"] == {"count": 3, "tenants": names}
    per_build = {b["version"]: b for b in status["builds"]}
    assert per_build[first["version"]]["status"] == "retired"
    assert per_build[first["version"]]["tenants"] == 3
    assert per_build[second["version"]]["is_current"] is True
    assert status["drift"]["checked"] == 0
    assert ok(client.get(f"{tpl}/{key}/drift", headers=auth)) == []
    assert ok(client.get(f"{ten}/{_n('Http Old A')}/drift", headers=auth)) is None

    # By hand, in one old tenant: a column. Each tenant is compared with its own build, the
    # disabled one too (opened to monk's admin for the read, closed again).
    db = ok(client.get(f"{ten}/{_n('Http Old B')}", headers=auth))["database"]
    _run_in(admin_url, db, "ALTER TABLE account ADD COLUMN secret_flag boolean DEFAULT false")
    results = ok(client.post(f"{tpl}/{key}/drift", headers=auth, params={"parallel": 2}))
    by_name = {r["name"]: r for r in results}
    assert {n: r["drifted"] for n, r in by_name.items()} == {
        _n("Http Old A"): False,
        _n("Http Old B"): True,
        _n("Http Old C"): False,
        _n("Http New"): False,
    }
    assert by_name[_n("Http Old A")]["template_version"] == first["version"]
    assert by_name[_n("Http New")]["template_version"] == second["version"]
    assert [d["text"] for d in by_name[_n("Http Old B")]["differences"]] == [
        "column account.secret_flag: added (boolean)"
    ]
    closed = ok(client.get(f"{ten}/{_n('Http Old C')}", headers=auth))
    assert closed["status"] == "disabled"
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(admin_url, dbname=closed["database"]).close()

    one = ok(client.post(f"{ten}/{_n('Http Old B')}/drift", headers=auth))
    assert one["drifted"] is True
    kept = ok(client.get(f"{ten}/{_n('Http Old B')}/drift", headers=auth))
    assert kept["drifted"] is True
    assert kept["differences"] == one["differences"]
    status = ok(client.get(f"{tpl}/{key}/status", headers=auth))
    assert status["drift"]["drifted_tenants"] == [_n("Http Old B")]
    assert status["drift"]["clean"] == 3
    missing = client.get(f"{tpl}/nokey_{uuid.uuid4().hex[:6]}/status", headers=auth)
    assert missing.status_code == 404


@pytest.fixture
def svc(settings: Settings) -> Iterator[TenantService]:
    target, _ = Server.from_settings(settings).init()
    with TenantService(settings, target) as service:
        yield service


def test_what_drift_compares_with_when_the_records_are_missing(
    svc: TenantService, settings: Settings, key: str, admin_url: str, tmp_path: Path
) -> None:
    source = copy_builtin(tmp_path, "basic", key)
    first = svc.templates.build(key, source_dir=source).build
    old = svc.provision(_n("Old Build Tenant"), template=key).tenant
    (source / "migrations").mkdir()
    (source / "migrations/0001_note.sql").write_text("CREATE TABLE note (body text);")
    svc.templates.build(key, source_dir=source)

    # A build made before builds recorded their catalog: drift reads it from a scratch clone of
    # the (retired) build, records it, and compares.
    with psycopg.connect(admin_url, dbname=settings.system_db_name, autocommit=True) as reg:
        reg.execute(
            "UPDATE template_builds SET catalog = NULL, fingerprint = NULL WHERE id = %s",
            (first.id,),
        )
    checked = drift.tenant_drift(svc, _n("Old Build Tenant"))
    assert checked.drifted is False
    assert checked.template_version == first.version
    assert svc.templates.show(key, first.version).fingerprint == checked.expected_fingerprint
    assert checked.fingerprint == checked.expected_fingerprint

    # A tenant cloned before templates held monk.build: the registry says where it is.
    _run_in(admin_url, old.database, "DROP SCHEMA monk CASCADE")
    checked = drift.tenant_drift(svc, _n("Old Build Tenant"))
    assert (checked.claimed_by, checked.drifted) == ("registry", False)
    assert checked.template_version == first.version

    # Neither a recorded catalog nor a database to read it from: not compared, and why.
    with psycopg.connect(admin_url, dbname=settings.system_db_name, autocommit=True) as reg:
        reg.execute(
            "UPDATE template_builds SET catalog = NULL, fingerprint = NULL WHERE id = %s",
            (first.id,),
        )
    svc.templates.drop(key, first.version, force=True)
    checked = drift.tenant_drift(svc, _n("Old Build Tenant"))
    assert checked.drifted is None
    assert checked.error is not None
    assert "recorded no catalog and its database is gone" in checked.error
    [kept] = drift.last_results(svc, key)
    assert kept.drifted is None
    assert kept.error == checked.error


def test_a_closed_tenant_is_read_under_its_lock_and_closed_again(
    svc: TenantService, settings: Settings, key: str, admin_url: str, tmp_path: Path
) -> None:
    svc.templates.build(key, source_dir=copy_builtin(tmp_path, "basic", key))
    tenant = svc.provision(_n("Closed Drift"), template=key).tenant
    _run_in(admin_url, tenant.database, "CREATE INDEX account_name_extra ON account (name)")
    svc.disable(_n("Closed Drift"))
    # Another process works on the tenant (holds its lock): not opened, not compared.
    with psycopg.connect(admin_url, dbname=settings.system_db_name, autocommit=True) as other:
        lock = locks.advisory_key(tenant.database)
        other.execute("SELECT pg_advisory_lock(%s)", (lock,))
        busy = drift.tenant_drift(svc, _n("Closed Drift"))
        # Released before the session ends (its end is not waited for).
        other.execute("SELECT pg_advisory_unlock(%s)", (lock,))
    assert busy.drifted is None
    assert busy.error == "not checked: busy with another operation"
    found = drift.tenant_drift(svc, _n("Closed Drift"))
    assert found.drifted is True
    assert [d.subject for d in found.differences] == ["account_name_extra"]
    assert svc.get(_n("Closed Drift")).status == "disabled"
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(admin_url, dbname=tenant.database).close()
