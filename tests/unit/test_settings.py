"""Settings read from the environment (no database)."""

from __future__ import annotations

from pathlib import Path

import pytest

from monk.settings import Settings, _default_data_dir


def test_empty_variables_mean_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MONK_DATA_DIR", "")
    monkeypatch.setenv("MONK_DATABASE_URL", "")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.data_dir == _default_data_dir()
    assert settings.data_dir != Path()
    assert settings.database_url is None


def test_scram_iterations_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MONK_SCRAM_ITERATIONS", "0")
    with pytest.raises(ValueError, match="scram_iterations"):
        Settings(_env_file=None)  # type: ignore[call-arg]
