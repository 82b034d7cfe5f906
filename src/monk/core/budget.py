"""The connection budget's decisions, without I/O: who is served next, from which connection.

A host's tenant data connections are counted in one ``Ledger``: at most ``host_cap`` open at
once (idle or busy), at most ``tenant_cap`` busy per database. Requests queue in arrival order;
``grants`` walks the queue from its head and serves every request that can be served now:

- an idle connection to its database: reused;
- else a free slot (fewer than ``host_cap`` open): a new connection;
- else the least recently used idle connection of another database: closed, and a new one
  opened in its place;
- else nothing is free for anyone: the walk stops (later requests could only be served from an
  idle connection, and there is none).

A request whose database already holds ``tenant_cap`` connections is passed over without
stopping the walk: a greedy tenant's extra requests wait behind its own, never in front of
another tenant's. Everything else is first come, first served.

Connections are named by keys the adapter chooses; the ledger never touches them.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Grant:
    """Serve request ``ticket`` (for ``database``): with idle connection ``reuse``, or else by
    opening a new one, after closing idle connection ``evict`` if that is set."""

    ticket: int
    database: str
    reuse: int | None = None
    evict: int | None = None

    @property
    def opens(self) -> bool:
        return self.reuse is None


@dataclass
class Ledger:
    host_cap: int
    tenant_cap: int
    # Counted open: idle and busy connections, and those being opened for a grant.
    open: int = 0
    busy: Counter[str] = field(default_factory=Counter)
    # key -> database, least recently returned first.
    idle: OrderedDict[int, str] = field(default_factory=OrderedDict)
    # ticket -> database, in arrival order.
    queue: OrderedDict[int, str] = field(default_factory=OrderedDict)
    # Busy connections of an evicted database: closed when they come back, not kept idle.
    doomed: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.host_cap < 1 or self.tenant_cap < 1:
            raise ValueError("host_cap and tenant_cap must be at least 1")

    def request(self, ticket: int, database: str) -> None:
        self.queue[ticket] = database

    def cancel(self, ticket: int) -> bool:
        """Withdraw a waiting request (its wait ran out); False if it was already served."""
        return self.queue.pop(ticket, None) is not None

    def grants(self) -> list[Grant]:
        """Serve what can be served now, in queue order; the ledger counts each grant."""
        out: list[Grant] = []
        for ticket, database in list(self.queue.items()):
            if self.busy[database] >= self.tenant_cap:
                continue
            grant = self._place(ticket, database)
            if grant is None:
                break
            del self.queue[ticket]
            self.busy[database] += 1
            self.doomed.discard(database)
            out.append(grant)
        return out

    def _place(self, ticket: int, database: str) -> Grant | None:
        for key, db in reversed(self.idle.items()):  # the warmest of its own
            if db == database:
                del self.idle[key]
                return Grant(ticket, database, reuse=key)
        if self.open < self.host_cap:
            self.open += 1
            return Grant(ticket, database)
        if self.idle:
            return Grant(ticket, database, evict=self._victim())
        return None

    def _victim(self) -> int:
        """Take out the idle connection to close: the least recently used."""
        key, _db = self.idle.popitem(last=False)
        return key

    def release(self, database: str, key: int | None) -> bool:
        """A busy connection of ``database`` comes back: kept idle as ``key`` (True), or, with
        ``key`` None (broken, failed to open) or its database evicted meanwhile, gone (False:
        the caller closes it)."""
        self.busy[database] -= 1
        if self.busy[database] <= 0:
            del self.busy[database]
        if key is None or database in self.doomed:
            self.open -= 1
            if database not in self.busy:
                self.doomed.discard(database)
            return False
        self.idle[key] = database
        return True

    def evict(self, database: str) -> list[int]:
        """Take out every idle connection of ``database`` (the caller closes them); its busy
        ones are closed when they come back."""
        keys = [key for key, db in self.idle.items() if db == database]
        for key in keys:
            del self.idle[key]
        self.open -= len(keys)
        if self.busy[database] > 0:
            self.doomed.add(database)
        return keys

    def drop_idle(self, key: int) -> None:
        """Forget an idle connection found dead or closed for another reason."""
        if self.idle.pop(key, None) is not None:
            self.open -= 1

    @property
    def waiting(self) -> int:
        return len(self.queue)
