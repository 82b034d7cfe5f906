"""Settings read from the environment (no database)."""

from __future__ import annotations

import pytest

from monk.settings import Settings


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
