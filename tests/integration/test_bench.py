"""``monk bench`` through the real CLI: the JSON it writes, and that it leaves nothing behind.

A benchmark, not a test of speed: no timing is asserted here, only shape and clean-up.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psycopg
import pytest
from psycopg import sql

from monk.settings import Settings
from monk.templates.source import builtin_sources_dir
from tests.conftest import MONK_BIN, RunMonk, free_port, settings_env

SUMMARY_KEYS = {"p50_ms", "p95_ms", "p99_ms", "n"}


def server_objects(admin_url: str) -> dict[str, set[str]]:
    with psycopg.connect(admin_url, autocommit=True) as conn:

        def names(query: str) -> set[str]:
            return {str(r[0]) for r in conn.execute(query).fetchall()}

        return {
            "databases": names(
                "SELECT datname FROM pg_database WHERE datname LIKE 'tenant\\_%'"
                " OR datname LIKE 'monkbench\\_%' OR datname LIKE 'monk\\_spare\\_%'"
            ),
            "roles": names(
                "SELECT rolname FROM pg_roles WHERE rolname LIKE 'tenant\\_%'"
                " OR rolname LIKE 'monk\\_spare\\_%'"
            ),
        }


def drop_template(admin_url: str, database: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        db = sql.Identifier(database)
        conn.execute(sql.SQL("ALTER DATABASE {} IS_TEMPLATE false").format(db))
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(db))


def own_template(monk: RunMonk, tmp_path: Path) -> tuple[str, dict[str, str]]:
    """A copy of the small built-in template under a key of its own: template database names
    are cluster-global and other tests share this server."""
    key = f"bench_{uuid.uuid4().hex[:8]}"
    folder = tmp_path / "sources"
    shutil.copytree(builtin_sources_dir() / "basic", folder / key)
    env = {"MONK_TEMPLATE_PATH": json.dumps([str(folder)])}
    assert monk("init", env=env).returncode == 0
    return key, env


def test_bench_writes_its_json_and_removes_what_it_made(
    monk: RunMonk, settings: Settings, admin_url: str, tmp_path: Path
) -> None:
    key, env = own_template(monk, tmp_path)
    before = server_objects(admin_url)
    out = tmp_path / "out.json"
    try:
        run = monk(
            "bench",
            "--template",
            key,
            "--iterations",
            "2",
            "--concurrency",
            "1,2",
            "--level-seconds",
            "0.6",
            "--json",
            str(out),
            env=env,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr + run.stdout
        assert "ratios and targets" in run.stdout
        result = json.loads(out.read_text())

        for variant in ("raw", "scratch", "cold", "warm"):
            summary = result[variant]
            assert set(summary) >= SUMMARY_KEYS, variant
            assert summary["n"] == 2, variant
            assert summary["failures"] == 0, (variant, summary)
            assert summary["p50_ms"] <= summary["p95_ms"] <= summary["p99_ms"]
        assert result["cold"]["from_pool"] == 0
        assert result["warm"]["from_pool"] == 2
        assert result["warm"]["all_from_pool"] is True

        assert set(result["throughput"]) == {"1", "2"}
        assert result["config"]["level_seconds"] == 0.6
        for level in result["throughput"].values():
            # each level runs for a time, not a count: both variants at least 0.6 s, in two
            # halves, as many operations as fit
            assert level["seconds"] == 0.6
            for side in ("raw", "monk"):
                assert level[f"{side}_per_s"] > 0
                assert level[f"{side}_failures"] == 0
                assert level[f"{side}_seconds"] >= 0.6
                assert level[f"{side}_ops"] >= 2
                assert level[f"{side}_per_s"] == pytest.approx(
                    level[f"{side}_ops"] / level[f"{side}_seconds"], rel=0.01
                )
            assert level["ops"] == level["raw_ops"] + level["monk_ops"]
        deprovision = result["deprovision"]
        assert deprovision["answer"]["n"] == deprovision["dropped"]["n"] == 4
        assert set(result["ratios"]) == {
            "cold_over_raw",
            "raw_over_warm",
            "scratch_over_cold",
            "throughput_over_raw",
        }
        assert all(isinstance(v, float) for v in result["ratios"].values())
        assert result["server"]["version"]
        assert set(result["server"]["durability"]) == {
            "fsync",
            "synchronous_commit",
            "full_page_writes",
        }
        assert result["template"]["key"] == key
        assert [t["target"] for t in result["targets"]] == [
            "cold_over_raw",
            "warm p50",
            "raw_over_warm",
            "scratch_over_cold",
            "throughput_over_raw",
        ]
        assert result["notes"] == []
        assert result["config"]["dropped_while_measuring"] is False

        # nothing left behind: databases, roles, registry rows, spares
        assert server_objects(admin_url) == before
        with psycopg.connect(admin_url, dbname=settings.system_db_name) as reg:
            assert reg.execute("SELECT count(*) FROM tenants").fetchone() == (0,)
            assert reg.execute("SELECT count(*) FROM spares").fetchone() == (0,)
    finally:
        drop_template(admin_url, f"monk_template_{key}")


def test_bench_can_drop_as_it_goes(
    monk: RunMonk, settings: Settings, admin_url: str, tmp_path: Path
) -> None:
    key, env = own_template(monk, tmp_path)
    before = server_objects(admin_url)
    out = tmp_path / "out.json"
    try:
        run = monk(
            "bench",
            "--template",
            key,
            "--iterations",
            "2",
            "--concurrency",
            "2",
            "--level-seconds",
            "0.6",
            "--drop-each-round",
            "--json",
            str(out),
            env=env,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr + run.stdout
        result = json.loads(out.read_text())
        assert result["config"]["dropped_while_measuring"] is True
        assert result["deprovision"]["answer"]["n"] == result["deprovision"]["dropped"]["n"] == 4
        assert result["throughput"]["2"]["monk_failures"] == 0
        assert server_objects(admin_url) == before
        with psycopg.connect(admin_url, dbname=settings.system_db_name) as reg:
            assert reg.execute("SELECT count(*) FROM tenants").fetchone() == (0,)
    finally:
        drop_template(admin_url, f"monk_template_{key}")


def test_bench_refuses_to_run_beside_a_serving_monk(
    monk: RunMonk, settings: Settings, admin_url: str, tmp_path: Path
) -> None:
    """A serving monk refills the template's spares (and makes spare roles) while the bench
    measures: the bench says so and makes nothing; once the server is gone it runs."""
    key, env = own_template(monk, tmp_path)
    env |= {"MONK_POOL_SPARES": json.dumps({key: 1}), "MONK_POOL_ROLES": "2"}
    port = free_port()
    proc = subprocess.Popen(
        [MONK_BIN, "serve", "--port", str(port), "--templates", key],
        env=settings_env(settings) | env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("monk serve did not answer /health within 60 s")
            time.sleep(0.2)
        before = server_objects(admin_url)["databases"]
        refused = monk(
            "bench", "--template", key, "--iterations", "1", "--concurrency", "1", env=env
        )
        assert refused.returncode == 4, refused.stderr + refused.stdout
        assert "monk serve is running on this installation" in refused.stderr
        assert "Traceback" not in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        made = server_objects(admin_url)["databases"] - before
        assert not {d for d in made if d.startswith(("monkbench_", "tenant_"))}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    try:
        ran = monk(
            "bench",
            "--template",
            key,
            "--iterations",
            "1",
            "--concurrency",
            "1",
            "--level-seconds",
            "0.4",
            env=env,
        )
        assert ran.returncode == 0, ran.stderr + ran.stdout
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            spares = conn.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE 'monk\\_spare\\_%%'"
                " AND shobj_description(oid, 'pg_database') = %s",
                (f"monk:{settings.system_db_name}",),
            ).fetchall()
        for (spare,) in spares:
            drop_template(admin_url, spare)
        drop_template(admin_url, f"monk_template_{key}")


def test_bench_upgrade_measures_a_fleet_upgrade_and_removes_what_it_made(
    monk: RunMonk, settings: Settings, admin_url: str, tmp_path: Path
) -> None:
    assert monk("init").returncode == 0
    before = server_objects(admin_url)
    out = tmp_path / "upgrade.json"
    done = monk(
        "bench",
        "--upgrade",
        "--tenants",
        "4",
        "--parallel",
        "1,2",
        "--json",
        str(out),
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert result["tenants"] == 4
    assert result["baseline"]["seconds"] > 0
    assert [(r["parallel"], r["counts"]) for r in result["monk"]] == [
        (1, {"done": 4}),
        (2, {"done": 4}),
    ]
    assert result["best"]["parallel"] in (1, 2)
    assert result["noop"]["counts"] == {"skipped": 4}
    assert result["noop"]["tenant_sessions_opened"] == 0
    assert "no-op run" in done.stdout
    assert server_objects(admin_url) == before
    with psycopg.connect(admin_url, autocommit=True) as conn:
        left = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'monk\\_%bench\\_up\\_%'"
        ).fetchall()
    assert left == []


def test_bench_remote_measures_provisioning_on_a_host_of_the_fleet_and_removes_it(
    monk: RunMonk, settings: Settings, admin_url: str, tmp_path: Path
) -> None:
    """A second embedded server started for the run, added as a host, measured (raw clone
    there, cold and warm provisions placed there), then removed with what was made."""
    key, env = own_template(monk, tmp_path)
    before = server_objects(admin_url)
    out = tmp_path / "remote.json"
    done = monk(
        "bench",
        "--remote",
        "--template",
        key,
        "--iterations",
        "2",
        "--json",
        str(out),
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    for variant in ("raw", "cold", "warm"):
        assert set(result[variant]) >= SUMMARY_KEYS, variant
        assert result[variant]["n"] == 2
    assert result["cold"]["from_pool"] == 0
    assert result["cold"]["spare_roles"] == 2  # each cold one renamed a spare role of the host
    assert set(result["new_role"]) >= SUMMARY_KEYS
    assert result["new_role_over_raw"] > 0
    assert result["warm"]["from_pool"] == 2
    assert result["cold_over_raw"] > 0
    assert "cold/raw" in done.stdout
    # Nothing left: no host, no tenant rows, nothing on the local server.
    listed = monk("host", "list", "--json")
    assert [h["name"] for h in json.loads(listed.stdout)] == ["localhost"]
    assert json.loads(monk("tenant", "list", "--json").stdout) == []
    assert server_objects(admin_url) == before


@pytest.mark.slow
def test_bench_move_measures_a_move_against_a_bare_copy_and_removes_what_it_made(
    monk: RunMonk, settings: Settings, admin_url: str, tmp_path: Path
) -> None:
    assert monk("init").returncode == 0
    before = server_objects(admin_url)
    out = tmp_path / "move.json"
    done = monk(
        "bench", "--move", "--size-mb", "2", "--rounds", "2", "--json", str(out), timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert result["database_bytes"] > 2_000_000
    assert [r["to"] for r in result["rounds"]][1] == settings.host_name
    for r in result["rounds"]:
        assert 0 < r["downtime_s"] <= r["total_s"]
        assert r["bare_copy_s"] > 0
        assert r["client_downtime_s"] is not None
    assert result["downtime_over_bare"] > 0
    assert "monk downtime" in done.stdout
    assert server_objects(admin_url) == before
    hosts = json.loads(monk("host", "list", "--json").stdout)
    assert [h["name"] for h in hosts] == [settings.host_name]


@pytest.mark.slow
def test_bench_data_plane_serves_many_tenants_within_the_budget_and_shows_the_naive_failing(
    monk: RunMonk, tmp_path: Path
) -> None:
    """``monk bench --data-plane`` small: its own server (max_connections 100, removed after),
    a real monk serve, 25 tenants and 8 clients; no errors through the budget, which holds the
    data connections to MONK_HOST_CONNECTIONS; a pool per tenant (4 connections each: 100)
    runs out of the server's 80 non-superuser slots."""
    leftovers = set(Path(tempfile.gettempdir()).glob("monk-bench-data-*"))
    out = tmp_path / "data-plane.json"
    done = monk(
        "bench",
        "--data-plane",
        "--tenants",
        "25",
        "--clients",
        "8",
        "--requests",
        "300",
        "--json",
        str(out),
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert result["server"]["max_connections"] == 100
    assert (result["tenants"], result["clients"], result["host_connections"]) == (25, 8, 40)
    for load in ("many_tenants", "single_tenant"):
        r = result[load]
        assert (r["requests"], r["errors"]) == (300, 0), r
        assert 0 < r["p50_ms"] <= r["p99_ms"]
        assert r["requests_per_s"] > 0
        assert 0 < r["max_data_connections"] <= result["host_connections"], r
        assert r["max_server_connections"] <= result["server"]["max_connections"]
        # Where the CPU went, per request: the clients, monk serve, the PostgreSQL server.
        cpu = r["cpu_ms_per_request"]
        assert set(cpu) == {"clients", "monk_serve", "postgres"}, cpu
        assert all(v > 0 for v in cpu.values()), cpu
    assert result["ratio"] > 0
    naive = result["naive"]
    assert naive["pool_per_tenant"]["errors"] > 0, naive
    assert {
        "remaining connection slots are reserved",
        "too many clients already",
    } & set(naive["pool_per_tenant"]["error_kinds"]), naive
    assert naive["connection_per_request"]["requests"] > 0
    assert "many/one throughput" in done.stdout
    assert "CPU ms per request" in done.stdout
    assert set(Path(tempfile.gettempdir()).glob("monk-bench-data-*")) == leftovers


def test_bench_template_size_measures_every_strategy_and_removes_what_it_made(
    monk: RunMonk, settings: Settings, admin_url: str, tmp_path: Path
) -> None:
    """``--template-size``: raw WAL_LOG and FILE_COPY (and FILE_COPY + clone where the host
    clones files) beside monk's cold provision, on the small template and a generated one,
    with the WAL each wrote; the generated template and every clone gone afterwards."""
    key, env = own_template(monk, tmp_path)
    before = server_objects(admin_url)
    out = tmp_path / "sizes.json"
    run = monk(
        "bench",
        "--template",
        key,
        "--template-size",
        "4MB",
        "--iterations",
        "2",
        "--json",
        str(out),
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr + run.stdout
    result = json.loads(out.read_text())
    clones = result["file_cloning"]["supported"]
    small, big = result["templates"]
    assert small["template"] == key
    assert big["template"].startswith("bench_size_")
    assert big["size_bytes"] > small["size_bytes"]
    assert big["size_bytes"] >= 3 * 1024 * 1024  # about the size asked for
    for t in (small, big):
        extra = {"file_copy+clone"} if clones else set()
        assert set(t["p50_ms"]) == {"wal_log", "file_copy", "monk_cold"} | extra
        assert all(ms > 0 for ms in t["p50_ms"].values())
        # WAL_LOG writes the template's pages into the WAL; FILE_COPY next to nothing.
        assert t["wal_bytes_p50"]["wal_log"] > t["size_bytes"] // 2
        assert t["wal_bytes_p50"]["file_copy"] < 1024 * 1024
        assert t["monk_choice"] == "wal_log"  # both under the default 32MB threshold
        # Each cold provision renamed in a spare role made before it (untimed), as under
        # monk serve: not a CREATE ROLE during the clone.
        assert t["monk_cold_spare_roles_used"] == 2
        assert t["fastest_raw"] in ("wal_log", "file_copy")
    assert "monk cold / fastest raw" in run.stdout
    # the threshold this run measured, where the two strategies cross (or 0, or the largest)
    found = result["suggested_file_copy_above"]
    assert isinstance(found["bytes"], int), found
    assert found["bytes"] >= 0, found
    assert f"MONK_CLONE_FILE_COPY_ABOVE={found['setting']}" in run.stdout
    after = server_objects(admin_url)
    assert after == before
    with psycopg.connect(admin_url) as conn:
        left = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'monk%bench\\_size\\_%'"
        ).fetchall()
    assert left == []


def test_bench_http_measures_the_api_beside_the_service_calls_and_removes_what_it_made(
    monk: RunMonk, settings: Settings, admin_url: str, tmp_path: Path
) -> None:
    """`monk bench --http`: a real `monk serve` and a keep-alive client, cold and warm
    provisions and a tenant read over HTTP beside the same service calls in process and the
    raw clone, in one run; shape and clean-up only (no timing is asserted)."""
    key, env = own_template(monk, tmp_path)
    before = server_objects(admin_url)
    out = tmp_path / "http.json"
    try:
        run = monk(
            "bench",
            "--http",
            "--template",
            key,
            "--iterations",
            "2",
            "--json",
            str(out),
            env=env,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr + run.stdout
        assert "HTTP adds" in run.stdout
        result = json.loads(out.read_text())
        assert set(result["raw"]) >= SUMMARY_KEYS
        assert result["raw"]["n"] == 4  # a raw clone in every round of both servers' rounds
        for call in ("cold", "warm", "get"):
            for way in ("in_process", "http_lean", "http"):
                summary = result[call][way]
                assert summary["n"] == 2, (call, way, summary)
                assert summary["failures"] == 0, (call, way, summary)
                assert summary["p50_ms"] <= summary["p99_ms"]
        for call in ("cold", "warm", "get", "get_back_to_back"):
            # what the API adds: from the lean client (http.client); httpx's beside it
            for way in ("http_lean", "http"):
                assert result[call][f"{way}_adds_p50_ms"] == pytest.approx(
                    result[call][way]["p50_ms"] - result[call]["in_process"]["p50_ms"], abs=0.002
                )
        assert "from httpx" in run.stdout
        for way in ("in_process", "http_lean", "http"):
            assert result["get_back_to_back"][way]["n"] == 20
            assert result["get_back_to_back"][way]["failures"] == 0
            assert result["warm"][way]["from_pool"] == 2  # every warm one from a spare
            assert result["cold"][way]["from_pool"] == 0  # no cold one
        assert result["cold"]["http_lean_over_raw"] == pytest.approx(
            result["cold"]["http_lean"]["p50_ms"] / result["raw"]["p50_ms"], abs=0.002
        )
        # the floor: the same uvicorn serving apps that do no I/O, read the same ways
        for floor in ("asgi", "fastapi"):
            assert result["floor"][floor]["after_pause"]["n"] == 2
            assert result["floor"][floor]["back_to_back"]["n"] == 20
            assert result["floor"][floor]["after_pause"]["failures"] == 0
        assert "floor, a FastAPI route" in run.stdout
        assert [t["target"] for t in result["targets"]] == [
            "cold: HTTP adds (p50)",
            "warm: HTTP adds (p50)",
            "get: HTTP adds (p50)",
            "get back to back: HTTP adds (p50)",
            "warm over HTTP (p50)",
            "cold over HTTP / raw (p50)",
        ]
        assert all(t["met"] is not None for t in result["targets"])
        assert result["notes"] == []
        # nothing left behind: databases, roles, registry rows, spares (the servers stopped)
        assert server_objects(admin_url) == before
        with psycopg.connect(admin_url, dbname=settings.system_db_name) as reg:
            assert reg.execute("SELECT count(*) FROM tenants").fetchone() == (0,)
            assert reg.execute("SELECT count(*) FROM spares").fetchone() == (0,)
    finally:
        drop_template(admin_url, f"monk_template_{key}")
