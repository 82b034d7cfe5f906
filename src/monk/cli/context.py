"""Per-invocation CLI state: settings read once, the server resolved lazily."""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING

from monk.adapters.postgres.connection import ServerTarget
from monk.service.server import Server
from monk.settings import Settings, load_settings

if TYPE_CHECKING:
    from monk.service.tenants import TenantService


class CliState:
    @cached_property
    def settings(self) -> Settings:
        return load_settings()

    @cached_property
    def server(self) -> Server:
        return Server.from_settings(self.settings)

    @cached_property
    def target(self) -> ServerTarget:
        """The admin target, with the server started and the system database up to date."""
        target, _ = self.server.init()
        return target

    @cached_property
    def tenants(self) -> TenantService:
        from monk.service.tenants import TenantService

        return TenantService(self.settings, self.target)


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
