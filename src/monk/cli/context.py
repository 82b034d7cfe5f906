"""Per-invocation CLI state: settings read once, the server resolved lazily."""

from __future__ import annotations

from functools import cached_property

from monk.service.server import Server
from monk.settings import Settings, load_settings


class CliState:
    @cached_property
    def settings(self) -> Settings:
        return load_settings()

    @cached_property
    def server(self) -> Server:
        return Server.from_settings(self.settings)


_current: CliState | None = None


def begin() -> None:
    """Called by the root callback: a fresh state for each invocation."""
    global _current
    _current = CliState()


def state() -> CliState:
    if _current is None:
        begin()
    assert _current is not None
    return _current
