"""/api/root/template through the real ASGI app: build, list, show, check, drop, prune.

The app runs on its own system database with one extra source folder (``MONK_TEMPLATE_PATH``)
holding a copy of the built-in ``basic`` source under a unique key: template database names are
cluster-wide, so the tests never build a built-in key.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from monk.adapters.postgres.connection import ServerTarget
from monk.api.app import create_app
from monk.api.auth import issue_root_token
from monk.settings import Settings
from monk.templates.source import builtin_sources_dir
from tests.conftest import MONK_BIN, drop_installation, settings_env
from tests.integration import template_support

BASE = "/api/root/template"


@pytest.fixture(scope="module")
def key() -> str:
    return f"at_{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def tpl_settings(
    admin_url: str, tmp_path_factory: pytest.TempPathFactory, key: str
) -> Iterator[Settings]:
    root = tmp_path_factory.mktemp("api_templates")
    sources = root / "sources"
    shutil.copytree(builtin_sources_dir() / "basic", sources / key)
    system_db = f"monk_at_{uuid.uuid4().hex[:10]}"
    s = Settings(
        database_url=admin_url,  # type: ignore[arg-type]
        system_db_name=system_db,
        data_dir=root / "data",
        template_path=[sources],
        pool_spares={},
        _env_file=None,  # type: ignore[call-arg]
    )
    yield s
    drop_installation(admin_url, system_db)


@pytest.fixture(scope="module")
def client(tpl_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(tpl_settings)) as c:
        yield c


@pytest.fixture(scope="module")
def auth(tpl_settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_root_token(tpl_settings, ttl_seconds=600)}"}


@pytest.fixture(scope="module")
def built(client: TestClient, auth: dict[str, str], key: str) -> dict[str, Any]:
    r = client.post(f"{BASE}/{key}", headers=auth)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()["data"]
    return data


def ok(r: Any, status: int = 200) -> Any:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["success"] is True
    return body["data"]


def fail(r: Any, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body == {"success": False, "error": body["error"], "error_code": code}
    return str(body["error"])


def test_template_routes_need_a_root_token(client: TestClient, key: str) -> None:
    for method, path in [
        ("GET", BASE),
        ("GET", f"{BASE}/{key}"),
        ("POST", f"{BASE}/{key}"),
        ("POST", f"{BASE}/{key}/check"),
        ("DELETE", f"{BASE}/{key}"),
        ("POST", f"{BASE}/prune"),
    ]:
        fail(client.request(method, path), 401, "AUTH_FAILED")


def test_build_then_up_to_date(
    client: TestClient, auth: dict[str, str], key: str, built: dict[str, Any]
) -> None:
    assert built["built"] is True
    assert built["key"] == key
    assert built["status"] == "ready"
    assert built["is_current"] is True
    assert built["database"] == f"monk_template_{key}"
    assert built["table_count"] is not None
    assert built["record_count"] >= 5 + 6  # accounts and contacts, and registry rows
    again = ok(client.post(f"{BASE}/{key}", json={"force": False}, headers=auth))
    assert again["built"] is False
    assert again["id"] == built["id"]
    metrics = client.get("/metrics").text
    assert 'monk_template_builds_total{result="ok"}' in metrics
    assert 'monk_template_builds_total{result="up_to_date"}' in metrics


def test_list_and_show(
    client: TestClient, auth: dict[str, str], key: str, built: dict[str, Any]
) -> None:
    listed = ok(client.get(BASE, headers=auth))
    assert built["id"] in [b["id"] for b in listed]
    only = ok(client.get(BASE, params={"key": key}, headers=auth))
    assert {b["key"] for b in only} == {key}
    assert ok(client.get(BASE, params={"key": "no_such_key"}, headers=auth)) == []

    shown = ok(client.get(f"{BASE}/{key}", headers=auth))
    assert shown == {k: v for k, v in built.items() if k not in ("built", "hosts")}
    assert built["hosts"] is None  # no host in the fleet but the local one
    by_version = ok(client.get(f"{BASE}/{key}", params={"version": built["version"]}, headers=auth))
    assert by_version["id"] == built["id"]


def test_check_is_healthy(
    client: TestClient, auth: dict[str, str], key: str, built: dict[str, Any]
) -> None:
    report = ok(client.post(f"{BASE}/{key}/check", headers=auth))
    assert report["ok"] is True
    assert report["problems"] == []
    assert report["database"] == built["database"]
    assert report["counts"]["account"] == 5
    assert report["counts"]["contact"] == 6


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "code"),
    [
        ("GET", f"{BASE}/Bad-Key", {}, 400, "INVALID_NAME"),
        ("GET", BASE, {"params": {"key": "Bad Key"}}, 400, "INVALID_NAME"),
        ("GET", f"{BASE}/no_such_key", {}, 404, "TEMPLATE_NOT_FOUND"),
        ("GET", f"{BASE}/prune", {}, 404, "TEMPLATE_NOT_FOUND"),
        ("GET", f"{BASE}/basic", {"params": {"version": "v1"}}, 400, "INVALID_NAME"),
        ("POST", f"{BASE}/no_such_key", {}, 404, "TEMPLATE_NOT_FOUND"),
        ("POST", f"{BASE}/Bad-Key", {}, 400, "INVALID_NAME"),
        ("POST", f"{BASE}/no_such_key", {"json": {"force": "maybe"}}, 422, "VALIDATION_ERROR"),
        # No way to point a build at a folder on the server.
        ("POST", f"{BASE}/no_such_key", {"json": {"source": "/etc"}}, 422, "VALIDATION_ERROR"),
        ("POST", f"{BASE}/no_such_key/check", {}, 404, "TEMPLATE_NOT_FOUND"),
        ("DELETE", f"{BASE}/no_such_key", {}, 404, "TEMPLATE_NOT_FOUND"),
        ("DELETE", f"{BASE}/x", {"params": {"version": "zz"}}, 400, "INVALID_NAME"),
        ("POST", f"{BASE}/prune", {"params": {"key": "Bad Key"}}, 400, "INVALID_NAME"),
    ],
)
def test_bad_requests_are_clear_4xx(
    client: TestClient,
    auth: dict[str, str],
    method: str,
    path: str,
    kwargs: dict[str, Any],
    status: int,
    code: str,
) -> None:
    fail(client.request(method, path, headers=auth, **kwargs), status, code)


def test_rebuild_drop_and_prune(
    client: TestClient, auth: dict[str, str], key: str, built: dict[str, Any]
) -> None:
    rebuilt = ok(client.post(f"{BASE}/{key}", json={"force": True}, headers=auth))
    assert rebuilt["built"] is True
    assert rebuilt["id"] != built["id"]
    builds = ok(client.get(BASE, params={"key": key}, headers=auth))
    statuses = {b["id"]: (b["status"], b["is_current"]) for b in builds}
    assert statuses[rebuilt["id"]] == ("ready", True)
    assert statuses[built["id"]] == ("retired", False)

    # The current build is refused without force.
    fail(client.delete(f"{BASE}/{key}", headers=auth), 409, "TEMPLATE_IN_USE")

    # An explicit version picks the retired build first: nobody needs it.
    dropped = ok(client.delete(f"{BASE}/{key}", params={"version": built["version"]}, headers=auth))
    assert dropped["id"] == built["id"]
    assert dropped["status"] == "dropped"
    default = ok(client.get(BASE, params={"key": key}, headers=auth))
    assert built["id"] not in [b["id"] for b in default]
    everything = ok(client.get(BASE, params={"key": key, "all": True}, headers=auth))
    assert built["id"] in [b["id"] for b in everything]

    # Prune drops retired builds; a second prune finds nothing.
    third = ok(client.post(f"{BASE}/{key}", json={"force": True}, headers=auth))
    pruned = ok(client.post(f"{BASE}/prune", params={"key": key}, headers=auth))
    assert [b["id"] for b in pruned] == [rebuilt["id"]]
    assert ok(client.post(f"{BASE}/prune", headers=auth)) == []

    # force drops even the current build; then there is none.
    gone = ok(client.delete(f"{BASE}/{key}", params={"force": True}, headers=auth))
    assert gone["id"] == third["id"]
    fail(client.get(f"{BASE}/{key}", headers=auth), 404, "TEMPLATE_NOT_FOUND")
    fail(client.post(f"{BASE}/{key}/check", headers=auth), 404, "TEMPLATE_NOT_FOUND")


def test_openapi_documents_the_template_routes(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths[BASE]) == {"get"}
    assert set(paths[f"{BASE}/{{key}}"]) == {"get", "post", "delete"}
    assert set(paths[f"{BASE}/{{key}}/check"]) == {"post"}
    assert set(paths[f"{BASE}/prune"]) == {"post"}
    # each route lists its real statuses: a build can miss its source or conflict, a prune not
    assert {"401", "404", "409", "422"} <= set(paths[f"{BASE}/{{key}}"]["post"]["responses"])
    assert {"401", "422"} <= set(paths[f"{BASE}/prune"]["post"]["responses"])


def no_server_path(text: str, settings: Settings) -> None:
    """None of the server's folders in an HTTP answer."""
    for folder in (
        builtin_sources_dir(),
        *settings.template_path,
        settings.data_dir,
        settings.data_dir.parent,
    ):
        assert str(folder) not in text, text
        assert str(folder.resolve()) not in text, text
    assert "site-packages" not in text, text


def test_a_key_built_with_source_is_rebuilt_or_explained_without_paths(
    client: TestClient,
    auth: dict[str, str],
    tpl_settings: Settings,
    tmp_path: Path,
) -> None:
    assert tpl_settings.database_url is not None
    target = ServerTarget.from_url(tpl_settings.database_url.get_secret_value(), name="localhost")
    elsewhere = tmp_path / "blog_src"
    shutil.copytree(builtin_sources_dir() / "basic", elsewhere)
    outside = f"as_{uuid.uuid4().hex[:8]}"
    template_support.build_template(target, tpl_settings, outside, source_dir=elsewhere)

    # Its build says where its source is, never the path.
    shown = client.get(f"{BASE}/{outside}", headers=auth)
    assert ok(shown)["source"] == "--source"
    listed = client.get(BASE, params={"all": True}, headers=auth)
    assert {b["source"] for b in ok(listed)} <= {"MONK_TEMPLATE_PATH", "--source"}
    no_server_path(shown.text + listed.text, tpl_settings)

    # Over HTTP a folder outside the configured sources is not read: the answer says how.
    refused = client.post(f"{BASE}/{outside}", json={"force": True}, headers=auth)
    message = fail(refused, 404, "TEMPLATE_NOT_FOUND")
    assert f"monk template build {outside} --source DIR" in message
    assert "MONK_TEMPLATE_PATH" in message
    no_server_path(refused.text, tpl_settings)
    unknown = client.post(f"{BASE}/no_such_key", headers=auth)
    fail(unknown, 404, "TEMPLATE_NOT_FOUND")
    no_server_path(unknown.text, tpl_settings)

    # The CLI lists it, with its folder, and rebuilds it from there without --source.
    env = settings_env(tpl_settings)
    sources = subprocess.run(
        [MONK_BIN, "template", "sources", "--json"], env=env, capture_output=True, text=True
    )
    assert sources.returncode == 0, sources.stderr
    row = {r["key"]: r for r in json.loads(sources.stdout)}[outside]
    assert row["from"] == f"--source {elsewhere.resolve()}"
    assert row["version"] == ok(shown)["version"]
    rebuilt = subprocess.run(
        [MONK_BIN, "template", "build", outside, "--force", "--json"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert json.loads(rebuilt.stdout)["source"] == str(elsewhere.resolve())

    # A folder inside MONK_TEMPLATE_PATH under another name: HTTP rebuilds from it.
    inside = f"ai_{uuid.uuid4().hex[:8]}"
    folder = tpl_settings.template_path[0] / f"{inside}_v2"
    shutil.copytree(builtin_sources_dir() / "basic", folder)
    first = template_support.build_template(target, tpl_settings, inside, source_dir=folder)
    again = ok(client.post(f"{BASE}/{inside}", json={"force": True}, headers=auth))
    assert again["built"] is True
    assert again["source"] == "MONK_TEMPLATE_PATH"
    assert again["version"] == first.build.version


def test_a_broken_configured_source_is_named_without_the_server_path(
    client: TestClient, auth: dict[str, str], tpl_settings: Settings
) -> None:
    broken = f"ab_{uuid.uuid4().hex[:8]}"
    folder = tpl_settings.template_path[0] / broken
    shutil.copytree(builtin_sources_dir() / "basic", folder)
    (folder / "schemas/account.json").write_text('{"type": "object", "properties": {')
    r = client.post(f"{BASE}/{broken}", headers=auth)
    message = fail(r, 422, "INVALID_TEMPLATE_SOURCE")
    assert f"<MONK_TEMPLATE_PATH>/{broken}/schemas/account.json" in message
    no_server_path(r.text, tpl_settings)


def test_provision_of_a_never_built_key_is_409_and_makes_nothing(
    client: TestClient, auth: dict[str, str], tpl_settings: Settings, admin_url: str
) -> None:
    """No HTTP request builds a template: the answer names the command that does."""
    never = f"nb_{uuid.uuid4().hex[:8]}"
    shutil.copytree(builtin_sources_dir() / "empty", tpl_settings.template_path[0] / never)

    def made() -> tuple[set[str], int, int]:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            names = {str(r[0]) for r in conn.execute("SELECT datname FROM pg_database")}
        with psycopg.connect(admin_url, dbname=tpl_settings.system_db_name) as reg:
            tenants = reg.execute("SELECT count(*) FROM tenants").fetchone()
            builds = reg.execute(
                "SELECT count(*) FROM template_builds WHERE key = %s", (never,)
            ).fetchone()
        assert tenants is not None
        assert builds is not None
        return names, int(tenants[0]), int(builds[0])

    before = made()
    r = client.post(
        "/api/root/tenant", json={"name": f"nb {never}", "template": never}, headers=auth
    )
    message = fail(r, 409, "TEMPLATE_NOT_BUILT")
    assert f"monk template build {never}" in message
    assert f"POST /api/root/template/{never}" in message
    assert made() == before
    assert before[2] == 0
