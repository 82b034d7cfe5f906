"""The overview's charts as inline SVG geometry, drawn on the server: no chart library, nothing
fetched by the browser."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from monk.service.console import Overview

WIDTH, HEIGHT, SLOTS = 600, 120, 60


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    label: str


@dataclass(frozen=True)
class Charts:
    bars: list[Bar]
    max_count: int
    p50: list[tuple[float, float]]  # (x, y) of each minute that had provisions
    p99: list[tuple[float, float]]
    max_ms: float
    total: int


def _percentile(ordered: list[float], q: float) -> float:
    """The nearest-rank percentile of sorted values."""
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def hour(
    overview: Overview, samples: Iterable[tuple[float, float]], now: datetime | None = None
) -> Charts:
    """Provisions per minute (every process's, from the journal) and the p50/p99 latency of
    ``samples`` ((unix time, seconds) of this process's provisions) over the last 60 minutes,
    oldest on the left."""
    now = (now or datetime.now(UTC)).replace(second=0, microsecond=0)
    start = now - timedelta(minutes=SLOTS - 1)
    counts = [0] * SLOTS
    for m in overview.minutes:
        i = int((m.at - start).total_seconds() // 60)
        if 0 <= i < SLOTS:
            counts[i] = m.provisions
    per_slot: list[list[float]] = [[] for _ in range(SLOTS)]
    for at, seconds in samples:
        i = int((at - start.timestamp()) // 60)
        if 0 <= i < SLOTS:
            per_slot[i].append(seconds * 1000)
    p50: list[float | None] = [None] * SLOTS
    p99: list[float | None] = [None] * SLOTS
    for i, values in enumerate(per_slot):
        if values:
            values.sort()
            p50[i], p99[i] = _percentile(values, 0.5), _percentile(values, 0.99)
    slot = WIDTH / SLOTS
    top = max(counts) or 1
    bars = []
    for i, n in enumerate(counts):
        if n:
            h = HEIGHT * n / top
            label = (start + timedelta(minutes=i)).strftime("%H:%M")
            bars.append(Bar(i * slot + 1, HEIGHT - h, slot - 2, h, f"{label}: {n} provisions"))
    max_ms = max([v for v in p99 if v is not None] or [1.0]) or 1.0

    def points(values: list[float | None]) -> list[tuple[float, float]]:
        return [
            (round(i * slot + slot / 2, 1), round(HEIGHT - HEIGHT * v / max_ms, 1))
            for i, v in enumerate(values)
            if v is not None
        ]

    return Charts(bars, max(counts), points(p50), points(p99), max_ms, sum(counts))
