"""Which PostgreSQL server monk administers, and getting it ready (started, initialised)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psycopg

from monk.adapters.embedded import EmbeddedServer
from monk.adapters.postgres import admin
from monk.adapters.postgres.connection import ServerTarget, connect
from monk.errors import MonkError
from monk.service import clone_support
from monk.settings import Settings
from monk.system.migrator import InitResult, ensure_system_database, is_current

log = logging.getLogger(__name__)


def reserved_connections(settings: Settings) -> int:
    """Connections the embedded server keeps for monk (its superuser): one process's two pools
    (registry, admin) and a few connections of its own beside them (template builds, health, a
    CLI command): 20 at the default pool size, of max_connections = 100."""
    return min(2 * settings.pool_size + 4, 60)


@dataclass(frozen=True)
class Server:
    """The server of this monk installation: an external one (MONK_DATABASE_URL) or embedded."""

    settings: Settings
    embedded: EmbeddedServer | None

    @classmethod
    def from_settings(cls, settings: Settings) -> Server:
        if settings.database_url is not None:
            return cls(settings, None)
        return cls(
            settings,
            EmbeddedServer(
                settings.data_dir,
                port=settings.embedded_port,
                durable=settings.embedded_durable,
                reserved_connections=reserved_connections(settings),
            ),
        )

    def target(self) -> ServerTarget:
        """Connection parameters of the admin role; starts the embedded server if needed."""
        s = self.settings
        if s.database_url is not None:
            return ServerTarget.from_url(
                s.database_url.get_secret_value(),
                name=s.host_name,
                connect_timeout=s.connect_timeout,
                statement_timeout_ms=s.statement_timeout_ms,
            )
        assert self.embedded is not None
        self.embedded.ensure_running()
        return self.embedded.target(
            name=s.host_name,
            connect_timeout=s.connect_timeout,
            statement_timeout_ms=s.statement_timeout_ms,
        )

    def init(self) -> tuple[ServerTarget, InitResult]:
        """Start (embedded) and bring the system database up to date; idempotent."""
        target = self.target()
        result = ensure_system_database(target, self.settings.system_db_name)
        if self.embedded is not None:
            # monk owns this server: tenants reach their own database only (PUBLIC may connect
            # to postgres and template1 by default; a session there would block builds).
            with connect(target, autocommit=True, purpose="init") as adm:
                admin.revoke_public_connect(
                    adm, ["postgres", "template1", self.settings.system_db_name]
                )
        # At start: whether this server clones files (PostgreSQL 18 on a reflink filesystem),
        # found once rather than at the first provision ('monk host check' finds it again).
        try:
            with (
                connect(target, autocommit=True, purpose="init") as adm,
                connect(
                    target, self.settings.system_db_name, autocommit=True, purpose="init"
                ) as reg,
            ):
                if clone_support.recorded(reg, target.name) is None:
                    clone_support.detect_and_record(reg, adm, target, is_local=True)
        except (MonkError, psycopg.Error) as exc:
            log.warning("file cloning not detected (the first clone will try again): %s", exc)
        return target, result

    def ready(self) -> ServerTarget:
        """The admin target of a server that is up with its system database current: one read
        when there is nothing to do (every command but ``monk init`` starts here), else
        ``init``."""
        target = self.target()
        if is_current(target, self.settings.system_db_name):
            return target
        return self.init()[0]

    def status(self) -> dict[str, object]:
        """What a person asks first: is it up, which version, where. Does not start anything."""
        s = self.settings
        info: dict[str, object] = {"mode": "embedded" if self.embedded else "external"}
        if self.embedded is not None:
            st = self.embedded.status()
            info |= {
                "data_dir": str(st.data_dir),
                "initialized": st.initialized,
                "pid": st.pid,
                "port": st.port,
            }
            if not st.running:
                return info | {"running": False}
        try:
            if self.embedded is not None:
                target = self.embedded.target(
                    name=s.host_name,
                    connect_timeout=s.connect_timeout,
                    statement_timeout_ms=s.statement_timeout_ms,
                )
            else:
                target = self.target()
            with connect(target, purpose="status") as conn:
                version = admin.server_version(conn)
                has_system = admin.database_exists(conn, s.system_db_name)
            cloning: dict[str, object] | None = None
            if has_system:
                with connect(target, s.system_db_name, autocommit=True, purpose="status") as reg:
                    found = clone_support.recorded(reg, target.name)
                cloning = found.as_dict() if found is not None else None
        except MonkError as exc:
            return info | {"running": False, "error": exc.message}
        except psycopg.errors.UndefinedColumn:
            cloning = None  # a system database before migration 0018: not detected yet
        return info | {
            "running": True,
            "host": target.name,
            "server_version": version,
            "system_database": s.system_db_name,
            "system_database_exists": has_system,
            # Detected at 'monk db start' / 'monk init' (and 'monk host check'): None until then.
            "file_cloning": cloning,
        }
