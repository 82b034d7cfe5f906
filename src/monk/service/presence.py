"""A running ``monk serve`` makes itself known on its system database (``registry.SERVE_LOCK``),
so that ``monk bench``, whose figures a serving monk's pool refiller and requests would skew,
can refuse to run beside it and say why."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import psycopg

from monk.adapters import registry
from monk.adapters.postgres.connection import ServerTarget, connect, open_connection
from monk.errors import InvalidState, MonkError

log = logging.getLogger(__name__)


class ServeMark:
    """The serve's own session holding the mark; ``hold`` again after a lost connection."""

    def __init__(self, target: ServerTarget, system_db: str) -> None:
        self._target = target
        self._system_db = system_db
        self._conn: psycopg.Connection[Any] | None = None

    def hold(self) -> None:
        if self._conn is not None and not (self._conn.closed or self._conn.broken):
            return
        try:
            self._conn = open_connection(
                self._target, self._system_db, autocommit=True, purpose="serve"
            )
            registry.hold_serve_lock(self._conn)
        except (MonkError, psycopg.Error) as exc:
            log.warning("could not mark this server as running: %s", exc)
            self.release()

    def release(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None


def refuse_beside_serve(target: ServerTarget, system_db: str, what: str) -> None:
    """InvalidState when a ``monk serve`` is running on this installation."""
    with connect(target, system_db, autocommit=True, purpose="presence") as conn:
        running = registry.serve_lock_holders(conn)
    if running:
        raise InvalidState(
            f"monk serve is running on this installation (system database {system_db!r} on "
            f"{target.name!r}): its pool refiller and requests would skew {what}; stop it, or "
            "run on an installation of its own (its own MONK_DATA_DIR and MONK_EMBEDDED_PORT, "
            "or MONK_DATABASE_URL)",
            serving=running,
        )
