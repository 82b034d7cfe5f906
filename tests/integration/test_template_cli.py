"""``monk template …`` as a user runs it: real subprocesses, bad inputs, kill -9 mid-build."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from monk.core.template_names import template_db_name
from monk.settings import Settings
from tests.conftest import MONK_BIN, RunMonk, settings_env
from tests.integration.template_support import (
    assert_closed_template,
    copy_builtin,
    drop_key,
    key_databases,
    new_key,
    read_json,
    scratch_clone,
    staging_databases,
    write_json,
)


@pytest.fixture
def key(admin_url: str) -> Iterator[str]:
    k = new_key()
    yield k
    drop_key(admin_url, k)


def _json(result: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    return data


def test_build_basic_on_a_fresh_install(monk: RunMonk, admin_url: str) -> None:
    drop_key(admin_url, "basic")
    try:
        built = _json(monk("template", "build", "basic", "--json"))
        assert built["built"] is True
        assert built["status"] == "ready"
        assert built["is_current"] is True
        assert built["database"] == "monk_template_basic"
        assert built["table_count"] == 5
        assert_closed_template(admin_url, "monk_template_basic")
        with scratch_clone(admin_url, "monk_template_basic") as db:
            assert db.execute("SELECT count(*) FROM account").fetchone() == (5,)
            assert db.execute("SELECT count(*) FROM contact").fetchone() == (6,)
            assert db.execute("SELECT count(*) FROM schemas").fetchone() == (2,)
        again = _json(monk("template", "build", "basic", "--json"))
        assert again["built"] is False
        assert again["id"] == built["id"]

        listed = json.loads(monk("template", "list", "--json").stdout)
        assert [(b["key"], b["status"]) for b in listed] == [("basic", "ready")]
        shown = _json(monk("template", "show", "basic", "--json"))
        assert shown["version"] == built["version"]
        checked = _json(monk("template", "check", "basic", "--json"))
        assert checked["ok"] is True
        assert checked["record_count"] == built["record_count"]
        human = monk("template", "list")
        assert human.returncode == 0
        assert "basic" in human.stdout

        refused = monk("template", "drop", "basic")
        assert refused.returncode == 4
        assert "current build" in refused.stderr
        assert json.loads(monk("template", "prune", "--json").stdout) == []
        dropped = _json(monk("template", "drop", "basic", "--force", "--json"))
        assert dropped["status"] == "dropped"
        missing = monk("template", "show", "basic")
        assert missing.returncode == 3
    finally:
        drop_key(admin_url, "basic")


def test_usage_errors(monk: RunMonk) -> None:
    assert monk("template", "build").returncode == 2
    unknown = monk("template", "build", "no_such_template")
    assert unknown.returncode == 3
    assert "no template source 'no_such_template'" in unknown.stderr
    bad_key = monk("template", "build", "Bad-Key")
    assert bad_key.returncode == 2
    assert "Traceback" not in bad_key.stderr


def _invalid_json(src: Path) -> None:
    (src / "schemas/account.json").write_text('{"type": "object", "properties": {')


def _invalid_schema(src: Path) -> None:
    schema = read_json(src / "schemas/account.json")
    schema["properties"]["balance"]["minimum"] = "zero"
    write_json(src / "schemas/account.json", schema)


def _bad_name(src: Path) -> None:
    write_json(
        src / "schemas/Bad-Table.json", {"type": "object", "properties": {"x": {"type": "string"}}}
    )


def _bad_seed(src: Path) -> None:
    data = read_json(src / "data/account.json")
    data[2]["email"] = "not an email"
    write_json(src / "data/account.json", data)


def _failing_migration(src: Path) -> None:
    (src / "migrations").mkdir()
    (src / "migrations/0001_broken.sql").write_text("ALTER TABLE no_such_table ADD x int;\n")


def _missing_parent(src: Path) -> None:
    manifest = read_json(src / "template.json")
    write_json(src / "template.json", manifest | {"extends": "no_such_parent"})


@pytest.mark.parametrize(
    ("breakage", "names"),
    [
        (_invalid_json, "schemas/account.json"),
        (_invalid_schema, "schemas/account.json"),
        (_bad_name, "Bad-Table"),
        (_bad_seed, "data/account.json: record 2: field 'email'"),
        (_failing_migration, "migrations/0001_broken.sql"),
        (_missing_parent, "template.json"),
    ],
)
def test_bad_source_is_a_clear_error_and_leaves_nothing(
    monk: RunMonk,
    admin_url: str,
    key: str,
    tmp_path: Path,
    breakage: Callable[[Path], None],
    names: str,
) -> None:
    good = copy_builtin(tmp_path / "good", "basic", key)
    before = _json(monk("template", "build", key, "--source", str(good), "--json"))
    bad = copy_builtin(tmp_path / "bad", "basic", key)
    breakage(bad)
    result = monk("template", "build", key, "--source", str(bad))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert names in result.stderr
    assert staging_databases(admin_url, key) == []
    after = _json(monk("template", "show", key, "--json"))
    assert after["id"] == before["id"]
    assert after["status"] == "ready"
    assert_closed_template(admin_url, template_db_name(key))


def _popen_build(settings: Settings, key: str, source: Path, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [MONK_BIN, "template", "build", key, "--source", str(source), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=settings_env(settings) | env,
        cwd=settings.data_dir.parent,
        start_new_session=True,
    )


def _wait_paused(proc: subprocess.Popen[str], step: str) -> None:
    assert proc.stderr is not None
    deadline = time.monotonic() + 60
    line = proc.stderr.readline()
    while f"paused at template_build:{step}" not in line:
        assert time.monotonic() < deadline, "build never reached the pause"
        assert line or proc.poll() is None, f"build ended early: {proc.returncode}"
        line = proc.stderr.readline()


def _kill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    "step", ["create", "tables", "seed", "health", "swap", "swap_renames", "swap_registry"]
)
def test_killed_build_never_blocks_the_next(
    monk: RunMonk, settings: Settings, admin_url: str, key: str, tmp_path: Path, step: str
) -> None:
    v1 = copy_builtin(tmp_path / "v1", "basic", key)
    first = _json(monk("template", "build", key, "--source", str(v1), "--json"))
    v2 = copy_builtin(tmp_path / "v2", "basic", key)
    data = read_json(v2 / "data/account.json")
    data[0]["name"] = "Acme Two"
    write_json(v2 / "data/account.json", data)

    proc = _popen_build(settings, key, v2, MONK_FAULT_PAUSE_AT=f"template_build:{step}")
    _wait_paused(proc, step)
    _kill(proc)

    again = _json(monk("template", "build", key, "--source", str(v2), "--json"))
    # The swap (renames and registry) is one transaction: a kill anywhere, even between the
    # renames and the registry update, leaves the old build current and the next build redoes it.
    assert again["built"] is True
    assert again["version"] != first["version"]
    assert staging_databases(admin_url, key) == []
    assert_closed_template(admin_url, template_db_name(key))
    builds = json.loads(monk("template", "list", key, "--json").stdout)
    statuses = sorted(b["status"] for b in builds)
    assert statuses == ["failed", "ready", "retired"]
    with scratch_clone(admin_url, template_db_name(key)) as db:
        assert db.execute(
            "SELECT name FROM account WHERE id = 'a0000000-0000-4000-8000-000000000001'"
        ).fetchone() == ("Acme Two",)
    assert _json(monk("template", "check", key, "--json"))["ok"] is True


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.3, 0.6, 0.9, 1.2])
def test_build_killed_at_a_random_moment(
    monk: RunMonk, settings: Settings, admin_url: str, key: str, tmp_path: Path, delay: float
) -> None:
    source = copy_builtin(tmp_path, "crm", key)
    proc = _popen_build(settings, key, source)
    time.sleep(delay)
    _kill(proc)
    # The doctor's clean-up (or simply the next build) settles what the kill left.
    result = _json(monk("template", "build", key, "--source", str(source), "--json"))
    assert result["status"] == "ready"
    assert staging_databases(admin_url, key) == []
    assert_closed_template(admin_url, template_db_name(key))
    with psycopg.connect(admin_url, dbname=settings.system_db_name) as conn:
        building = conn.execute(
            "SELECT count(*) FROM template_builds WHERE status = 'building'"
        ).fetchone()
    assert building == (0,)


def test_build_all_goes_on_past_a_bad_source(monk: RunMonk, admin_url: str, tmp_path: Path) -> None:
    good, bad = new_key(), new_key()
    folder = tmp_path / "sources"
    copy_builtin(folder, "empty", good)
    bad_path = copy_builtin(folder, "empty", bad)
    write_json(
        bad_path / "schemas" / "thing.json",
        {"type": "object", "properties": {"Bad-Name": {"type": "string"}}},
    )
    env = {"MONK_TEMPLATE_PATH": json.dumps([str(folder)])}
    try:
        done = monk("template", "build", "--all", "--json", env=env, timeout=600)
        assert done.returncode == 1, done.stderr
        by_key = {item["key"]: item for item in json.loads(done.stdout)}
        assert by_key[good]["status"] == "ready"
        assert {"empty", "basic", "crm", "saas"} <= set(by_key)
        assert by_key[bad]["built"] is False
        assert by_key[bad]["error"]["code"] == "INVALID_TEMPLATE_SOURCE"
        assert bad in done.stderr
        assert "1 of" in done.stderr
        assert key_databases(admin_url, bad) == []
        assert_closed_template(admin_url, template_db_name(good))
    finally:
        for k in (good, bad, "empty", "basic", "crm", "saas"):
            drop_key(admin_url, k)


def test_tenant_create_builds_a_never_built_template_first(
    monk: RunMonk, settings: Settings, admin_url: str, key: str, tmp_path: Path
) -> None:
    """The CLI may build a template inside ``tenant create`` (an HTTP request never does):
    it says so on stderr, then provisions from the new build."""
    folder = tmp_path / "sources"
    copy_builtin(folder, "empty", key)
    env = {"MONK_TEMPLATE_PATH": json.dumps([str(folder)])}
    created = monk("tenant", "create", f"cli {key}", "--template", key, "--json", env=env)
    assert created.returncode == 0, created.stderr
    assert f"building template {key} first" in created.stderr
    tenant = json.loads(created.stdout)
    assert tenant["status"] == "active"
    built = _json(monk("template", "show", key, "--json", env=env))
    assert tenant["template_version"] == built["version"]
    with psycopg.connect(admin_url, dbname=tenant["database"]) as db:
        assert db.execute("SELECT count(*) FROM schemas").fetchone() == (0,)
    # Built now: the next create says nothing about building.
    again = monk("tenant", "create", f"cli2 {key}", "--template", key, "--json", env=env)
    assert again.returncode == 0, again.stderr
    assert "building template" not in again.stderr
    for name in (f"cli {key}", f"cli2 {key}"):
        gone = monk("tenant", "delete", name, "--purge", "--no-archive", "--forget", env=env)
        assert gone.returncode == 0, gone.stderr
