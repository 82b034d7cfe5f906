"""Console sessions: kept in this process's memory, so that signing out ends a session for
good (a stateless cookie would stay valid until it expired). A restart of ``monk serve``
signs everyone out; that is the price, and a small one for an operators' console."""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from dataclasses import dataclass

COOKIE = "monk_console"


@dataclass(frozen=True)
class Session:
    id: str
    user: str
    csrf: str
    expires: float


class Sessions:
    def __init__(self, ttl_seconds: int) -> None:
        self.ttl = ttl_seconds
        self._lock = threading.Lock()
        self._by_id: dict[str, Session] = {}

    def open(self, user: str) -> Session:
        now = time.monotonic()
        session = Session(
            secrets.token_urlsafe(32), user, secrets.token_urlsafe(32), now + self.ttl
        )
        with self._lock:
            # forget the expired ones on the way: the store never grows without bound
            for sid in [s.id for s in self._by_id.values() if s.expires <= now]:
                del self._by_id[sid]
            self._by_id[session.id] = session
        return session

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        with self._lock:
            session = self._by_id.get(sid)
        if session is None or session.expires <= time.monotonic():
            return None
        return session

    def close(self, sid: str) -> None:
        with self._lock:
            self._by_id.pop(sid, None)


def csrf_ok(session: Session, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(session.csrf, given)
