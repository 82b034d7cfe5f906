"""This process's presence on its system database: one session holding its keyholder lock
(``registry.locks``) for the process's life, kill -9 included.

Two things ride on that one lock. Spares and spare roles name their keyholder, the process whose
memory holds their passwords: its lock gone is what lets another process adopt its spares or
drop its spare roles. And a ``monk serve`` names the same session as serving, so that
``monk bench``, whose figures a serving monk's pool refiller and requests would skew, can
refuse to run beside it and say why.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any
from uuid import UUID

import psycopg

from monk.adapters import registry
from monk.adapters.postgres.connection import ServerTarget, connect, open_connection
from monk.errors import InvalidState

log = logging.getLogger(__name__)

# Another process's check for dead keyholders holds each lock it looks at for an instant.
_BUSY_TRIES = 5
_BUSY_PAUSE_S = 0.02


class Presence:
    """The session holding this process's keyholder lock; ``hold`` (again) takes it."""

    def __init__(self, target: ServerTarget, system_db: str, instance_id: UUID) -> None:
        self._target = target
        self._system_db = system_db
        self._instance_id = instance_id
        self._conn: psycopg.Connection[Any] | None = None
        self._mutex = threading.Lock()
        self.serving = False

    def hold(self, *, check: bool = False) -> None:
        """Hold the lock (on a connection of its own) before this process names itself
        keyholder of a spare or a spare role, so that no other process takes those over while
        it lives. ``check``: make sure the session still holds it (a server restart ends every
        session), and take it again if not."""
        with self._mutex:
            conn = self._conn
            if conn is not None and check and not registry.keyholder_session_alive(conn):
                conn.close()
                conn = self._conn = None
                log.warning("keyholder lock lost with its connection; taking it again")
            if conn is not None and not conn.closed:
                return
            conn = open_connection(
                self._target,
                self._system_db,
                autocommit=True,
                purpose=registry.SERVE_PURPOSE if self.serving else "keyholder",
            )
            for attempt in range(_BUSY_TRIES):
                if registry.hold_keyholder_lock(conn, self._instance_id):
                    self._conn = conn
                    return
                if attempt + 1 < _BUSY_TRIES:
                    time.sleep(_BUSY_PAUSE_S)
            conn.close()  # still busy: try again next time
            log.warning("keyholder lock of %s is busy", self._instance_id)

    def serve(self) -> None:
        """From now on this process is a running ``monk serve``, and its session says so."""
        with self._mutex:
            self.serving = True
            if self._conn is not None and not (self._conn.closed or self._conn.broken):
                registry.mark_serving(self._conn)
        self.hold()

    def release(self) -> None:
        with self._mutex:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def refuse_beside_serve(target: ServerTarget, system_db: str, what: str) -> None:
    """InvalidState when a ``monk serve`` is running on this installation."""
    with connect(target, system_db, autocommit=True, purpose="presence") as conn:
        running = registry.serving_keyholders(conn)
    if running:
        raise InvalidState(
            f"monk serve is running on this installation (system database {system_db!r} on "
            f"{target.name!r}): its pool refiller and requests would skew {what}; stop it, or "
            "run on an installation of its own (its own MONK_DATA_DIR and MONK_EMBEDDED_PORT, "
            "or MONK_DATABASE_URL)",
            serving=running,
        )
