"""Drift, status and the doctor's fleet report, as a user runs them: the real ``monk`` command
on a real server; tenants changed by hand behind monk's back."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from monk.settings import Settings
from tests.conftest import RunMonk
from tests.integration.template_support import copy_builtin, drop_key, new_key


@pytest.fixture
def key(admin_url: str) -> Iterator[str]:
    k = new_key("d")
    yield k
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
    names = ["Drift Column", "Drift Index", "Drift Check", "Drift None"]
    for name in names:
        _ok(monk("tenant", "create", name, "--template", key, "--json"))
    db = {name: _tenant_db(monk, name) for name in names}
    _run_in(admin_url, db["Drift Column"], "ALTER TABLE contact ADD COLUMN note text")
    _run_in(admin_url, db["Drift Index"], "DROP INDEX contact_account_id_idx")
    _run_in(
        admin_url,
        db["Drift Check"],
        "ALTER TABLE contact DROP CONSTRAINT contact_first_name_minlen",
        "ALTER TABLE contact ADD CONSTRAINT contact_first_name_minlen"
        " CHECK (char_length(first_name) >= 2)",
    )

    untouched = monk("tenant", "drift", "Drift None", "--json")
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

    assert texts("Drift Column") == ["column contact.note: added (text)"]
    [index] = texts("Drift Index")
    assert index.startswith("index contact_account_id_idx: missing")
    [check] = texts("Drift Check")
    assert check.startswith("constraint contact_first_name_minlen: definition differs")
    assert ">= 2" in check

    # For people: the differences named, exit 1.
    shown = monk("tenant", "drift", "Drift Column")
    assert shown.returncode == 1
    assert "column contact.note: added (text)" in shown.stdout

    # The whole key, two at a time: each tenant's result, exit 1 as some drifted.
    fleet = monk("template", "drift", key, "--parallel", "2", "--json")
    assert fleet.returncode == 1, fleet.stderr
    by_name = {r["name"]: r for r in json.loads(fleet.stdout)}
    assert {n: r["drifted"] for n, r in by_name.items()} == {
        "Drift Column": True,
        "Drift Index": True,
        "Drift Check": True,
        "Drift None": False,
    }

    # Kept in the system database: status reports the last check.
    status = _ok(monk("template", "status", key, "--json"))
    assert status["drift"]["checked"] == 4
    assert status["drift"]["drifted"] == 3
    assert sorted(status["drift"]["drifted_tenants"]) == sorted(names[:3])

    # Undone by hand: the next check finds nothing.
    _run_in(admin_url, db["Drift Column"], "ALTER TABLE contact DROP COLUMN note")
    assert _ok(monk("tenant", "drift", "Drift Column", "--json"))["drifted"] is False
