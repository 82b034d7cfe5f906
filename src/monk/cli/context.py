"""Per-invocation CLI state: settings read once, the server resolved lazily."""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING

# Only for annotations: a command imports the settings, the server and the service when it
# first asks for them, so 'monk --help' does not pay for pydantic and psycopg.
if TYPE_CHECKING:
    from monk.adapters.postgres.connection import ServerTarget
    from monk.service.server import Server
    from monk.service.tenants import TenantService
    from monk.settings import Settings


class CliState:
    @cached_property
    def settings(self) -> Settings:
        from monk.settings import load_settings

        return load_settings()

    @cached_property
    def server(self) -> Server:
        from monk.service.server import Server

        return Server.from_settings(self.settings)

    @cached_property
    def target(self) -> ServerTarget:
        """The admin target, with the server started and the system database up to date."""
        return self.server.ready()

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
