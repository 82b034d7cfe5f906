"""The everyday tenant commands, run for real against the database, import only what they use:
not the HTTP stack, the password hasher, the bench, the pool or the upgrades, nor the other
command groups. A guard on start-up (0.47 s before, see docs/benchmarks.md), not a timed test:
the figures live in the benchmarks."""

from __future__ import annotations

import subprocess
import uuid

import pytest

from monk.service.tenants import TenantService
from tests.conftest import MONK_BIN, settings_env
from tests.integration.conftest import Env

# What a registry read never needs: the HTTP stack and its templates, argon2 (the console's and
# the root users' hasher), the bench, the warm pool and the upgrades, the other command groups.
NOT_FOR_A_READ = (
    "fastapi",
    "uvicorn",
    "starlette",
    "jinja2",
    "argon2",
    "jsonschema",
    "monk.api",
    "monk.bench",
    "monk.service.pool",
    "monk.service.upgrades",
    "monk.service.templates",
    "monk.cli.bench",
    "monk.cli.template",
    "monk.cli.host",
    "monk.cli.pool",
    "monk.cli.db",
    "monk.cli.events",
)


def imported_by(env: Env, *args: str) -> set[str]:
    """The modules the real ``monk`` imports for ARGS (``-X importtime``'s list); it must
    succeed."""
    run_env = settings_env(env.settings) | {"PYTHONPROFILEIMPORTTIME": "1"}
    run_env.pop("PYTHONDONTWRITEBYTECODE", None)
    done = subprocess.run(
        [MONK_BIN, *args],
        capture_output=True,
        text=True,
        env=run_env,
        timeout=60,
        check=False,
        cwd=env.settings.data_dir.parent,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("import time:")]
    assert lines, "no -X importtime output"
    return {ln.rsplit("|", 1)[1].strip() for ln in lines}


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules for h in NOT_FOR_A_READ if m == h or m.startswith(h + "."))


@pytest.fixture(scope="module")
def tenant_name(env: Env) -> str:
    with TenantService(env.settings, env.target) as svc:
        return svc.provision(f"startup-{uuid.uuid4().hex[:8]}", template=env.template).tenant.name


@pytest.mark.parametrize(
    "args",
    [("tenant", "show", "{name}"), ("tenant", "show", "{name}", "--json"), ("tenant", "list")],
)
def test_a_tenant_read_imports_only_what_it_uses(
    env: Env, tenant_name: str, args: tuple[str, ...]
) -> None:
    modules = imported_by(env, *(a.format(name=tenant_name) for a in args))
    # The list is real: the command, the service and the driver ran.
    assert {"monk.cli.tenant", "monk.service.tenants", "psycopg"} <= modules
    assert heavy(modules) == []


def test_the_command_groups_load_on_demand_and_still_all_run(env: Env) -> None:
    # Each group loads when named, the bench included; an unknown name is still refused with
    # the suggestion of a known one.
    for group in ("db", "events", "host", "pool", "template", "tenant"):
        modules = imported_by(env, group, "--help")
        assert f"monk.cli.{group}" in modules
        others = {f"monk.cli.{g}" for g in ("bench", "db", "events", "host", "pool")} - {
            f"monk.cli.{group}"
        }
        assert not modules & others, group
    assert "monk.cli.bench" in imported_by(env, "bench", "--help")
    typo = subprocess.run(
        [MONK_BIN, "tenannt", "list"],
        capture_output=True,
        text=True,
        env=settings_env(env.settings),
        timeout=60,
        check=False,
        cwd=env.settings.data_dir.parent,
    )
    assert typo.returncode == 2
    assert "Did you mean 'tenant'?" in typo.stderr
    # 'monk --help' still lists every command and group, in the order it always had.
    listing = subprocess.run(
        [MONK_BIN, "--help"],
        capture_output=True,
        text=True,
        env=settings_env(env.settings) | {"COLUMNS": "120"},
        timeout=60,
        check=False,
    ).stdout
    names = [ln.split()[1] for ln in listing.splitlines() if ln.startswith("│ ") and ln[2] != " "]
    assert names[names.index("bench") :] == [
        "bench", "init", "config", "doctor", "token", "serve",
        "db", "events", "host", "pool", "template", "tenant",
    ]  # fmt: skip
