"""The overview's charts as inline SVG geometry, drawn on the server: no chart library, nothing
fetched by the browser."""

from __future__ import annotations

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


def hour(overview: Overview, now: datetime | None = None) -> Charts:
    """Provisions per minute and their p50/p99 latency, from the journal (every process's),
    over the last 60 minutes, oldest on the left."""
    now = (now or datetime.now(UTC)).replace(second=0, microsecond=0)
    start = now - timedelta(minutes=SLOTS - 1)
    counts = [0] * SLOTS
    p50: list[float | None] = [None] * SLOTS
    p99: list[float | None] = [None] * SLOTS
    for m in overview.minutes:
        i = int((m.at - start).total_seconds() // 60)
        if 0 <= i < SLOTS:
            counts[i], p50[i], p99[i] = m.provisions, m.p50_ms, m.p99_ms
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
