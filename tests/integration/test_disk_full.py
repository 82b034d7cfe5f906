"""A really full disk (issue 10, item 12): the server's data directory on a small tmpfs, filled
up. Provisioning and building answer DISK_FULL (exit 5, HTTP 507 with Retry-After), leave
nothing half-made, and a purge without archive still frees space."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient

from monk.api.app import create_app
from monk.api.auth import issue_root_token
from tests.conftest import MONK_BIN, settings_env
from tests.faults import OwnServer, own_server, small_disk

pytestmark = pytest.mark.slow


def monk(own: OwnServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MONK_BIN, *args],
        env=settings_env(own.settings),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def databases(own: OwnServer, like: str) -> list[str]:
    with psycopg.connect(own.url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s", (like,)
        ).fetchall()
    return [str(r[0]) for r in rows]


def test_a_full_disk_is_disk_full_and_a_purge_still_frees_space(tmp_path: Path) -> None:
    with (
        small_disk(tmp_path / "disk", 160) as disk,
        own_server(disk.path, wal_dir=tmp_path / "wal", monk_dir=tmp_path / "monk") as own,
    ):
        built = monk(own, "template", "build", "basic")
        assert built.returncode == 0, built.stderr
        first, second = (f"Full {uuid.uuid4().hex[:6]}" for _ in range(2))
        for name in (first, second):
            made = monk(own, "tenant", "create", name)
            assert made.returncode == 0, made.stderr
        tenants_before = databases(own, "tenant_%")
        with psycopg.connect(own.url, autocommit=True) as conn:
            conn.execute("CHECKPOINT")  # as the server's own would have by now

        # Full for anything monk makes (a clone, a build needs megabytes). Not one byte left
        # would stop PostgreSQL itself: its next checkpoint PANICs, and it cannot recover
        # until an operator frees space (nothing a client of the server can do).
        filler = disk.fill(leave_bytes=1 << 20)
        assert disk.free_bytes() <= 1 << 20

        refused = monk(own, "tenant", "create", f"Refused {uuid.uuid4().hex[:6]}")
        assert refused.returncode == 5, (refused.returncode, refused.stderr)
        assert "DISK_FULL" in refused.stderr
        assert "--purge --no-archive" in refused.stderr  # says what to do
        assert "Traceback" not in refused.stderr
        # one error line (beside the log's warning that the provision was undone)
        assert [ln for ln in refused.stderr.splitlines() if "DISK_FULL" in ln] == [
            refused.stderr.splitlines()[-1]
        ]
        assert databases(own, "tenant_%") == tenants_before  # nothing half-made

        rebuilt = monk(own, "template", "build", "basic", "--force")
        assert rebuilt.returncode == 5, (rebuilt.returncode, rebuilt.stderr)
        assert "DISK_FULL" in rebuilt.stderr
        assert databases(own, "monk_staging_%") == []

        with TestClient(create_app(own.settings)) as client:
            token = issue_root_token(own.settings, ttl_seconds=600)
            r = client.post(
                "/api/root/tenant",
                json={"name": f"Http {uuid.uuid4().hex[:6]}"},
                headers={"Authorization": f"Bearer {token}"},
            )
            assert r.status_code == 507, r.text
            assert r.json()["error_code"] == "DISK_FULL"
            assert int(r.headers["Retry-After"]) > 0
        assert databases(own, "tenant_%") == tenants_before

        free = disk.free_bytes()
        purged = monk(own, "tenant", "delete", first, "--purge", "--no-archive")
        assert purged.returncode == 0, purged.stderr[-500:]
        assert disk.free_bytes() > free + (4 << 20), "the purge freed no space"
        assert len(databases(own, "tenant_%")) == len(tenants_before) - 1

        # With room again, provisioning works.
        filler.unlink()
        again = monk(own, "tenant", "create", f"Again {uuid.uuid4().hex[:6]}")
        assert again.returncode == 0, again.stderr
