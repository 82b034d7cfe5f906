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
    p50: str  # polyline points
    p99: str
    max_ms: float
    total: int


def hour(overview: Overview, now: datetime | None = None) -> Charts:
    """Provisions per minute and their p50/p99 over the last 60 minutes, oldest on the left."""
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
            at = (start + timedelta(minutes=i)).strftime("%H:%M")
            bars.append(Bar(i * slot + 1, HEIGHT - h, slot - 2, h, f"{at}: {n} provisions"))
    max_ms = max([v for v in p99 if v is not None] or [1.0])

    def points(values: list[float | None]) -> str:
        return " ".join(
            f"{i * slot + slot / 2:.1f},{HEIGHT - HEIGHT * v / max_ms:.1f}"
            for i, v in enumerate(values)
            if v is not None
        )

    return Charts(bars, max(counts), points(p50), points(p99), max_ms, sum(counts))
