"""``monk tenant …`` and ``monk token`` through the real command (a subprocess each time):
``--json`` objects equal to the HTTP API's tenant objects, bulk provisioning from a file, the
documented exit codes (0 ok, 1 error, 2 usage/validation, 3 not found, 4 conflict), and never a
traceback."""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import psycopg
import pytest
from fastapi.testclient import TestClient

from monk.api.app import create_app
from monk.api.auth import ALGORITHM, signing_secret
from monk.api.models import TenantHealth, TenantOut
from monk.system.migrator import MIGRATION_LOCK_KEY
from tests.conftest import MONK_BIN, settings_env
from tests.integration.conftest import Env


def monk(env: Env, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [MONK_BIN, *args],
        capture_output=True,
        text=True,
        env=settings_env(env.settings),
        timeout=timeout,
        check=False,
        cwd=env.settings.data_dir,
    )
    assert "Traceback" not in result.stderr, result.stderr
    assert "internal error" not in result.stderr, result.stderr
    return result


def monk_json(env: Env, *args: str, code: int = 0) -> Any:
    result = monk(env, *args, "--json")
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    return json.loads(result.stdout)


def name() -> str:
    return f"Cli Corp {uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def client(env: Env) -> Iterator[TestClient]:
    with TestClient(create_app(env.settings)) as c:
        yield c


@pytest.fixture(scope="module")
def auth(env: Env) -> dict[str, str]:
    token = monk(env, "token", "--root").stdout.strip()
    return {"Authorization": f"Bearer {token}"}


def as_api(cli_object: dict[str, Any]) -> dict[str, Any]:
    """The CLI's object read as the API's model: it must validate, with nothing left over."""
    out = TenantOut.model_validate(cli_object).model_dump()
    assert set(cli_object) <= set(out)
    return out


def _pathless(tenant: dict[str, Any]) -> dict[str, Any]:
    if not tenant.get("archive"):
        return tenant
    return tenant | {"archive": tenant["archive"] | {"path": None}}


def over_http(env: Env, cli_object: dict[str, Any]) -> dict[str, Any]:
    """The CLI's object as HTTP shows it: the same, but the archive's server folder by label."""
    out = as_api(cli_object)
    if out.get("archive"):
        path = out["archive"]["path"]
        assert path.startswith(f"{env.settings.archives}/")
        out["archive"] = out["archive"] | {
            "path": path.replace(str(env.settings.archives), "<archives>", 1)
        }
    return out


def test_token_root_is_one_line_signed_with_the_server_secret(env: Env) -> None:
    result = monk(env, "token", "--root", "--ttl", "120")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    claims = jwt.decode(lines[0], signing_secret(env.settings), algorithms=[ALGORITHM])
    assert claims["access"] == "root"
    assert 100 <= claims["exp"] - claims["iat"] <= 120
    assert monk(env, "token").returncode == 2  # --root is required


def test_lifecycle_json_equals_the_api(
    env: Env, client: TestClient, auth: dict[str, str], tmp_path: Path
) -> None:
    n = name()
    created = monk_json(env, "tenant", "create", n, "--template", env.template)
    assert created["name"] == n
    assert created["status"] == "active"
    assert created["connection_url"]
    with psycopg.connect(created["connection_url"]) as conn:
        assert conn.execute("SELECT count(*) FROM account").fetchone() == (5,)

    shown = monk_json(env, "tenant", "show", n)
    api = client.get(f"/api/root/tenant/{n}", headers=auth).json()["data"]
    assert as_api(shown) == api
    answer_only = {"connection_url", "provisioned_from", "root_user"}  # only in the create answer
    assert as_api(created)["provisioned_from"] in ("pool", "clone")
    assert {k: v for k, v in as_api(created).items() if k not in answer_only} == {
        k: v for k, v in api.items() if k not in answer_only
    }

    listed = monk_json(env, "tenant", "list", "--limit", "10000")
    api_list = client.get("/api/root/tenant", params={"limit": 10_000}, headers=auth).json()
    # Other tests' tenants may have archives anywhere: HTTP names their folders by label only.
    assert [_pathless(as_api(t)) for t in listed] == [_pathless(t) for t in api_list["data"]]
    assert n in [t["name"] for t in listed]

    health = TenantHealth.model_validate(monk_json(env, "tenant", "health", n)).model_dump()
    api_health = client.get(f"/api/root/tenant/{n}/health", headers=auth).json()["data"]
    # The size is measured live: the first connection to a new database writes its relcache
    # init file (~160 kB), so two checks a moment apart may differ there and only there.
    assert health.pop("size_bytes") > 0
    assert api_health.pop("size_bytes") > 0
    assert health == api_health
    assert health["status"] == "healthy"

    assert monk_json(env, "tenant", "disable", n)["status"] == "disabled"
    assert client.get(f"/api/root/tenant/{n}", headers=auth).json()["data"]["is_active"] is False
    assert monk_json(env, "tenant", "enable", n)["status"] == "active"

    rotated = monk_json(env, "tenant", "credentials", n, "--rotate")
    assert rotated["connection_url"] != created["connection_url"]
    with psycopg.connect(rotated["connection_url"]) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    plain = monk_json(env, "tenant", "credentials", n)
    assert plain.get("connection_url") is None

    archived = monk_json(env, "tenant", "archive", n)
    assert archived["archive"] is not None
    assert Path(archived["archive"]["path"]).is_file()
    as_api(archived)

    trashed = monk_json(env, "tenant", "delete", n)
    assert trashed["status"] == "trashed"
    assert as_api(trashed)["trashed_at"] is not None
    assert monk_json(env, "tenant", "restore", n)["status"] == "active"

    purged = monk_json(env, "tenant", "delete", n, "--purge")
    assert purged["status"] == "deleted"
    assert purged["archive"] is not None
    api_purged = client.get(
        "/api/root/tenant",
        params={"include_deleted": True, "include_trashed": True, "limit": 10_000},
        headers=auth,
    ).json()["data"]
    assert over_http(env, purged) in api_purged
    assert monk(env, "tenant", "show", n).returncode == 3
    shown_deleted = monk_json(env, "tenant", "show", n, "--include-deleted")
    assert as_api(shown_deleted) == as_api(purged)
    api_deleted = client.get(f"/api/root/tenant/{n}?include_deleted=true", headers=auth)
    assert api_deleted.json()["data"] == over_http(env, purged)
    restored = monk_json(env, "tenant", "restore", n)
    assert restored["status"] == "active"
    with psycopg.connect(restored["connection_url"]) as conn:
        assert conn.execute("SELECT count(*) FROM account").fetchone() == (5,)

    forgotten = monk_json(env, "tenant", "delete", n, "--purge", "--no-archive", "--forget")
    assert forgotten == {"name": n, "database": created["database"], "status": "forgotten"}
    assert monk(env, "tenant", "show", n).returncode == 3
    assert client.get(f"/api/root/tenant/{n}", headers=auth).status_code == 404


def test_exit_codes(env: Env) -> None:
    n = name()
    assert monk(env, "tenant", "create", n, "--template", env.template).returncode == 0

    twice = monk(env, "tenant", "create", n.upper(), "--template", env.template)
    assert twice.returncode == 4
    assert "TENANT_EXISTS" in twice.stderr

    unknown = monk(env, "tenant", "show", f"nobody {uuid.uuid4().hex}")
    assert unknown.returncode == 3
    assert "TENANT_NOT_FOUND" in unknown.stderr
    for command in ("health", "disable", "enable", "restore", "archive", "delete"):
        assert monk(env, "tenant", command, f"nobody {uuid.uuid4().hex}").returncode == 3

    for bad in ("", "   ", "x" * 200, "tab\there"):
        invalid = monk(env, "tenant", "create", bad, "--template", env.template)
        assert invalid.returncode == 2, (bad, invalid.stderr)
        assert "INVALID_NAME" in invalid.stderr
    assert monk(env, "tenant", "create", name(), "--template", "Bad Key!").returncode == 2
    assert monk(env, "tenant", "create", name(), "--template", "no_such_tpl").returncode == 3

    # Usage errors: Typer's own (exit 2) and monk's argument checks.
    assert monk(env, "tenant", "create").returncode == 2
    assert monk(env, "tenant", "delete", n, "--forget").returncode == 2
    assert monk(env, "tenant", "list", "--limit", "0").returncode == 2
    # An unknown status was accepted and listed nothing; now it names the allowed values.
    bogus = monk(env, "tenant", "list", "--status", "active", "--status", "bogus")
    assert bogus.returncode == 2, bogus.stderr
    assert bogus.stdout == ""
    for allowed in ("provisioning", "active", "disabled", "trashed", "deleting", "deleted"):
        assert f"'{allowed}'" in bogus.stderr
    assert monk(env, "tenant", "list", "--status", "failed").returncode == 2
    # The session's installation holds other tests' tenants too: more than a page.
    listed = monk_json(env, "tenant", "list", "--status", "active", "--limit", "10000")
    assert n in [t["name"] for t in listed]
    assert monk(env, "tenant", "nope").returncode == 2

    # Not in a state that allows it: conflicts.
    assert monk(env, "tenant", "delete", n).returncode == 0
    for command in (["disable", n], ["enable", n], ["credentials", n, "--rotate"]):
        conflict = monk(env, "tenant", *command)
        assert conflict.returncode == 4, (command, conflict.stderr)
        assert "INVALID_STATE" in conflict.stderr
    assert monk(env, "tenant", "delete", n, "--purge", "--no-archive", "--forget").returncode == 0


def test_bulk_create_from_a_file(env: Env, tmp_path: Path) -> None:
    names = [name() for _ in range(5)]
    bad = "y" * 200
    path = tmp_path / "names.txt"
    path.write_text("# tenants to provision\n" + "\n".join([*names, "", bad]) + "\n")
    result = monk(
        env,
        "tenant",
        "create",
        "--from",
        str(path),
        "--parallel",
        "4",
        "--template",
        env.template,
        "--json",
    )
    assert result.returncode == 1, result.stderr
    summary = json.loads(result.stdout)
    assert summary["succeeded"] == 5
    assert summary["failed"] == 1
    by_name = {r["name"]: r for r in summary["results"]}
    assert set(by_name) == {*names, bad}
    assert all(by_name[n]["ok"] for n in names)
    assert by_name[bad]["ok"] is False
    assert by_name[bad]["error_code"] == "INVALID_NAME"
    assert len({by_name[n]["database"] for n in names}) == 5

    # The table form ends with a summary line; everything is provisioned already: 6 failures.
    again = monk(env, "tenant", "create", "--from", str(path), "--template", env.template)
    assert again.returncode == 1
    assert "0 provisioned, 6 failed" in again.stdout

    all_good = tmp_path / "good.txt"
    fresh = [name() for _ in range(2)]
    all_good.write_text("\n".join(fresh) + "\n")
    ok = monk(env, "tenant", "create", "--from", str(all_good), "--template", env.template)
    assert ok.returncode == 0, ok.stderr
    assert "2 provisioned, 0 failed" in ok.stdout

    missing = monk(env, "tenant", "create", "--from", str(tmp_path / "absent.txt"))
    assert missing.returncode == 2

    for n in [*names, *fresh]:
        assert (
            monk(env, "tenant", "delete", n, "--purge", "--no-archive", "--forget").returncode == 0
        )


URL_LINE = re.compile(r"^(?P<label>.*?)\s*(?P<url>postgresql://\S+)$", re.MULTILINE)


def monk_cols(env: Env, columns: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    """The real command through a pipe, as on a terminal of ``columns`` columns."""
    full_env = settings_env(env.settings)
    full_env.pop("COLUMNS", None)
    if columns is not None:
        full_env["COLUMNS"] = columns
    result = subprocess.run(
        [MONK_BIN, *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
        check=False,
        cwd=env.settings.data_dir,
    )
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "…" not in result.stdout, result.stdout
    return result


def logs_in(url: str) -> None:
    with psycopg.connect(url, connect_timeout=10) as conn:
        assert conn.execute("SELECT current_user").fetchone() is not None


@pytest.mark.parametrize("columns", ["40", "80", None])
def test_secrets_are_printed_whole_at_any_width(
    env: Env, tmp_path: Path, columns: str | None
) -> None:
    n = name()
    created = monk_cols(env, columns, "tenant", "create", n, "--template", env.template)
    urls = URL_LINE.findall(created.stdout)
    assert len(urls) == 1, created.stdout
    assert urls[0][0] == "connection_url"
    logs_in(urls[0][1])

    rotated = monk_cols(env, columns, "tenant", "credentials", n, "--rotate")
    [(label, url)] = URL_LINE.findall(rotated.stdout)
    assert label == "connection_url"
    assert url != urls[0][1]
    logs_in(url)

    # Bulk creation in table mode shows each created tenant's URL, whole.
    names = [name() for _ in range(2)]
    path = tmp_path / "names.txt"
    path.write_text("\n".join(names) + "\n")
    bulk = monk_cols(env, columns, "tenant", "create", "--from", str(path), "-t", env.template)
    found = dict(URL_LINE.findall(bulk.stdout))
    assert set(found) == {f"{x}:" for x in names}, bulk.stdout
    for url in found.values():
        logs_in(url)
    for x in [n, *names]:
        gone = monk(env, "tenant", "delete", x, "--purge", "--no-archive", "--forget")
        assert gone.returncode == 0


def test_idempotency_key_on_the_command_line(env: Env) -> None:
    key = f"cli-{uuid.uuid4().hex}"
    n = name()
    first = monk_json(env, "tenant", "create", n, "-t", env.template, "--idempotency-key", key)
    again = monk_json(env, "tenant", "create", n, "-t", env.template, "--idempotency-key", key)
    assert again["id"] == first["id"]
    assert again["replayed"] is True
    assert "connection_url" not in again
    table = monk(env, "tenant", "create", n, "-t", env.template, "--idempotency-key", key)
    assert table.returncode == 0
    assert "--rotate" in table.stdout
    other = monk(env, "tenant", "create", name(), "-t", env.template, "--idempotency-key", key)
    assert other.returncode == 2, other.stderr
    assert "IDEMPOTENCY_KEY_REUSED" in other.stderr


# What `monk tenant show` must start without (the -X importtime list of the real command):
# the HTTP stack and the bench, the template service (its compiler and jsonschema: reading a
# tenant builds nothing), and the purge machinery (pg_dump's adapter, the operations journal).
SHOW_LEAVES_UNLOADED = (
    "fastapi",
    "uvicorn",
    "starlette",
    "monk.api",
    "monk.bench.runner",
    "jsonschema",
    "monk.core.schema_compiler",
    "monk.service.templates",
    "monk.service.purge",
    "monk.adapters.dump",
    "monk.adapters.registry.operations",
    "monk.service.doctor",
    "monk.service.health",
)


def test_tenant_show_starts_without_the_http_stack_or_the_bench(env: Env) -> None:
    """A plain tenant command loads the service and the driver, not what other commands need
    (the -X importtime list of the real command; tests/unit/test_cli_startup.py: --help); and
    it does not migrate the system database when it is current: it starts, and answers, while
    another session holds the migrations' lock."""
    n = name()
    monk_json(env, "tenant", "create", n, "--template", env.template)
    with psycopg.connect(
        env.target.conninfo, dbname=env.settings.system_db_name, autocommit=True
    ) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        shown = subprocess.run(
            [MONK_BIN, "tenant", "show", n],
            capture_output=True,
            text=True,
            env=settings_env(env.settings) | {"PYTHONPROFILEIMPORTTIME": "1"},
            timeout=30,
            check=False,
            cwd=env.settings.data_dir,
        )
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert n in shown.stdout
    modules = {
        ln.rsplit("|", 1)[1].strip()
        for ln in shown.stderr.splitlines()
        if ln.startswith("import time:")
    }
    assert "monk.service.tenants" in modules  # the list is real
    loaded = sorted(
        m
        for m in modules
        for unwanted in SHOW_LEAVES_UNLOADED
        if m == unwanted or m.startswith(unwanted + ".")
    )
    assert loaded == []
