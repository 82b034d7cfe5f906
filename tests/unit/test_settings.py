"""Settings read from the environment (no database)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from monk.errors import ConfigError
from monk.settings import Settings, load_settings
from tests.conftest import MONK_BIN


@pytest.mark.parametrize("variable", ["MONK_DATA_DIR", "MONK_ARCHIVE_DIR"])
def test_an_empty_folder_is_refused(monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    """Path('') is the current directory: the embedded server must not land there."""
    monkeypatch.setenv(variable, "")
    with pytest.raises(ValueError, match="is empty"):
        Settings(_env_file=None)  # type: ignore[call-arg]


def test_scram_iterations_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MONK_SCRAM_ITERATIONS", "0")
    with pytest.raises(ValueError, match="scram_iterations"):
        Settings(_env_file=None)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("MONK_TEMPLATE_PATH", "/tmp", "a JSON list of folders"),
        ("MONK_HOOKS", "[", 'a JSON list of {"url"'),
        ("MONK_POOL_SPARES", "notjson", "a JSON object of template key to count"),
    ],
)
@pytest.mark.parametrize("command", [["config"], ["serve", "--port", "1"]])
def test_malformed_json_setting_is_one_line_and_exit_6(
    tmp_path: Path, variable: str, value: str, expected: str, command: list[str]
) -> None:
    """Through the real CLI: no 'internal error', no traceback, the variable and what it wants;
    and nothing is created (the data dir stays absent)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MONK_")}
    environ |= {"MONK_DATA_DIR": str(tmp_path / "data"), variable: value}
    done = subprocess.run(
        [MONK_BIN, *command],
        env=environ,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 6, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"{variable}: is not valid JSON (expected {expected}" in lines[0]
    assert "Traceback" not in done.stderr
    assert "internal error" not in done.stderr
    assert not (tmp_path / "data").exists()


def test_json_settings_still_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MONK_TEMPLATE_PATH", '["/srv/a"]')
    monkeypatch.setenv("MONK_POOL_SPARES", '{"basic": 3}')
    monkeypatch.setenv("MONK_HOOKS", '[{"url": "https://example.com/h"}]')
    s = load_settings(_env_file=None)
    assert s.template_path == [Path("/srv/a")]
    assert s.pool_spares == {"basic": 3}
    assert s.hooks[0].url == "https://example.com/h"


def test_a_bad_member_names_where_inside(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MONK_POOL_SPARES", '{"basic": "x"}')
    with pytest.raises(ConfigError, match=r"^MONK_POOL_SPARES\[basic\]: "):
        load_settings(_env_file=None)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("7d", 7 * 86400), ("12h", 43200), (" 30M ", 1800), ("45s", 45), ("90", 90), ("2w", 1209600),
     ("0", 0), ("off", None), ("OFF", None)],
)  # fmt: skip
def test_template_retention_is_a_duration_or_off(
    monkeypatch: pytest.MonkeyPatch, text: str, seconds: int | None
) -> None:
    monkeypatch.setenv("MONK_TEMPLATE_RETENTION", text)
    retention = load_settings(_env_file=None).retention
    assert (None if retention is None else retention.total_seconds()) == seconds


def test_template_retention_default_and_bad_values(monkeypatch: pytest.MonkeyPatch) -> None:
    default = Settings(_env_file=None).retention  # type: ignore[call-arg]
    assert default is not None
    assert default.days == 7
    for bad in ("7 days", "-1d", "soon", ""):
        monkeypatch.setenv("MONK_TEMPLATE_RETENTION", bad)
        with pytest.raises(ConfigError, match=r"^MONK_TEMPLATE_RETENTION: .* not a duration"):
            load_settings(_env_file=None)


def test_console_users_are_argon2_hashes_and_never_shown(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from argon2 import PasswordHasher

    hashed = PasswordHasher().hash("pw")
    monkeypatch.setenv("MONK_CONSOLE_USERS", '{"alice": "plaintext"}')
    with pytest.raises(ValueError, match="user 'alice': not an argon2 hash"):
        Settings(_env_file=None)  # type: ignore[call-arg]
    monkeypatch.setenv("MONK_CONSOLE_USERS", '{"alice": "' + hashed + '"}')
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    assert s.console_users == {"alice": hashed}
    assert s.masked()["MONK_CONSOLE_USERS"] == {"alice": "********"}
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MONK_")}
    environ |= {"MONK_DATA_DIR": str(tmp_path / "d"), "MONK_CONSOLE_USERS": "{"}
    done = subprocess.run(
        [MONK_BIN, "config"], env=environ, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 6
    assert "MONK_CONSOLE_USERS: is not valid JSON (expected a JSON object of user name" in (
        done.stderr
    )
