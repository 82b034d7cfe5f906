"""Keeps the embedded PostgreSQL server that ``monk serve`` started running.

A postmaster killed (kill -9, the OOM killer) or gone after a PANIC it could not recover from
(a full disk) is started again: at once the first time, then with a doubling delay up to
``MAX_DELAY_S`` while restarts fail or the server keeps dying within ``STABLE_AFTER_S`` of the
last one. Each restart is logged with its reason; ``status()`` and the callback report them.
Only for the embedded server: an external server (MONK_DATABASE_URL) is its operator's.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from monk.adapters.embedded import EmbeddedServer
from monk.errors import MonkError

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 0.5
MAX_DELAY_S = 30.0
STABLE_AFTER_S = 60.0
_CAUSE = re.compile(r"\bPANIC:")


@dataclass(frozen=True)
class SupervisorStatus:
    restarts: int
    failed_restarts: int
    last_reason: str | None
    last_restart_at: float | None
    """Unix time of the last successful restart."""


class Supervisor:
    def __init__(
        self,
        server: EmbeddedServer,
        *,
        on_restart: Callable[[bool], None] | None = None,
        interval: float = CHECK_INTERVAL_S,
    ) -> None:
        self.server = server
        self._on_restart = on_restart
        self._interval = interval
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._restarts = 0
        self._failed = 0
        self._last_reason: str | None = None
        self._last_at: float | None = None
        self._log_offset = 0
        self._thread = threading.Thread(target=self._run, name="monk-supervisor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=90)

    def status(self) -> SupervisorStatus:
        with self._lock:
            return SupervisorStatus(self._restarts, self._failed, self._last_reason, self._last_at)

    def _run(self) -> None:
        pid = self.server.status().pid
        self._log_offset = self._log_size()
        attempt = 0  # failed restarts and quick re-crashes in a row: the backoff's exponent
        last_start = time.monotonic()
        while not self._stop.wait(self._interval):
            try:
                current = self.server.status().pid
            except OSError as exc:
                log.warning("supervisor: cannot read the server's state: %s", exc)
                continue
            if current is not None:
                pid = current
                if attempt and time.monotonic() - last_start > STABLE_AFTER_S:
                    attempt = 0
                continue
            reason = self._reason(pid)
            delay = 0.0 if attempt == 0 else min(MAX_DELAY_S, 2.0 ** (attempt - 1))
            if delay:
                log.warning("embedded server down (%s); restarting in %.0f s", reason, delay)
                if self._stop.wait(delay):
                    return
            attempt += 1
            last_start = time.monotonic()
            try:
                self.server.ensure_running()
            except Exception as exc:  # a full disk also fails as OSError (writing monk.conf)
                message = exc.message if isinstance(exc, MonkError) else str(exc)
                log.error("embedded server restart failed (%s): %s", reason, message)
                with self._lock:
                    self._failed += 1
                self._notify(False)
                continue
            pid = self.server.status().pid
            self._log_offset = self._log_size()
            log.warning("embedded server restarted (pid %s) after: %s", pid, reason)
            with self._lock:
                self._restarts += 1
                self._last_reason = reason
                self._last_at = time.time()
            self._notify(True)

    def _log_size(self) -> int:
        try:
            return self.server.log_file.stat().st_size
        except OSError:
            return 0

    def _reason(self, pid: int | None) -> str:
        """Why the server is down, as far as one can tell: the last PANIC it logged since it
        started (a kill -9 logs nothing)."""
        what = f"the postmaster (pid {pid}) is gone" if pid else "the server is not running"
        try:
            with self.server.log_file.open("rb") as fh:
                fh.seek(max(self._log_offset, self._log_size() - 65536))
                text = fh.read().decode(errors="replace")
        except OSError:
            text = ""
        causes = [line for line in text.splitlines() if _CAUSE.search(line)]
        return f"{what}; it logged: {causes[-1].strip()}" if causes else what

    def _notify(self, ok: bool) -> None:
        if self._on_restart is not None:
            try:
                self._on_restart(ok)
            except Exception:
                log.exception("supervisor callback failed")
