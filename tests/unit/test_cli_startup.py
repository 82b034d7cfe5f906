"""The CLI starts without what its command does not need (no database, no timing asserts):
each command imports the service, the HTTP stack or the bench when it runs."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.conftest import MONK_BIN

# Heavy or unrelated to a plain command: the HTTP stack, the bench, the template compiler's
# JSON Schema validator, and monk's own API package.
NOT_AT_START = ("fastapi", "uvicorn", "starlette", "jsonschema", "monk.bench.runner", "monk.api")


def imported_by(*args: str) -> set[str]:
    """The modules the real ``monk`` command imports (``-X importtime``'s list) for ARGS."""
    env = dict(os.environ, PYTHONPROFILEIMPORTTIME="1")
    done = subprocess.run(
        [MONK_BIN, *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("import time:")]
    assert lines, "no -X importtime output"
    # "import time: <self> | <cumulative> | <indent><module>"
    return {ln.rsplit("|", 1)[1].strip() for ln in lines}


@pytest.mark.parametrize(
    "args",
    [("--help",), ("tenant", "show", "--help"), ("tenant", "--help"), ("template", "--help")],
)
def test_help_does_not_import_the_heavy_parts(args: tuple[str, ...]) -> None:
    modules = imported_by(*args)
    assert "monk.cli.main" in modules  # the list is real: the CLI itself is in it
    loaded = sorted(
        m for m in modules for heavy in NOT_AT_START if m == heavy or m.startswith(heavy + ".")
    )
    assert loaded == []


def test_help_does_not_import_the_service_or_the_database_driver() -> None:
    modules = imported_by("--help")
    assert not {m for m in modules if m.startswith(("monk.service", "psycopg", "pydantic"))}
