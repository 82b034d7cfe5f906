"""Pure benchmark math: percentiles, summaries, ratios, throughput, and the issue's targets.

No I/O, no clock: the runner measures, this module only computes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


def percentile(samples: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0–100) by linear interpolation between closest ranks.

    The same definition as numpy's default ("linear") and ``statistics.quantiles(...,
    method="inclusive")``: rank ``(n - 1) * p / 100`` over the sorted samples. One sample is every
    percentile of itself. Raises ValueError on no samples or ``p`` outside [0, 100].
    """
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0 <= p <= 100 or math.isnan(p):
        raise ValueError(f"percentile {p!r} is outside [0, 100]")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * p / 100
    low = math.floor(rank)
    high = math.ceil(rank)
    if low == high:
        return float(ordered[low])
    fraction = rank - low
    return float(ordered[low] + (ordered[high] - ordered[low]) * fraction)


def summarize(samples_ms: Sequence[float], *, failures: int = 0) -> dict[str, Any]:
    """p50/p95/p99 (and mean, min, max) of latencies in milliseconds, rounded to 0.001 ms.

    No samples gives ``None`` for every figure and ``n`` 0.
    """
    out: dict[str, Any] = {"n": len(samples_ms), "failures": failures}
    if not samples_ms:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None} | out | _no_spread()
    return {
        "p50_ms": _ms(percentile(samples_ms, 50)),
        "p95_ms": _ms(percentile(samples_ms, 95)),
        "p99_ms": _ms(percentile(samples_ms, 99)),
        **out,
        "mean_ms": _ms(sum(samples_ms) / len(samples_ms)),
        "min_ms": _ms(min(samples_ms)),
        "max_ms": _ms(max(samples_ms)),
    }


def _no_spread() -> dict[str, Any]:
    return {"mean_ms": None, "min_ms": None, "max_ms": None}


def _ms(value: float) -> float:
    return round(value, 3)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator`` rounded to 0.001, or None when either is missing or the
    denominator is not positive (a ratio over nothing is no figure, not infinity)."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return round(numerator / denominator, 3)


def throughput(successes: int, seconds: float) -> float | None:
    """Successes per wall-clock second (None for no elapsed time)."""
    if seconds <= 0:
        return None
    return round(successes / seconds, 3)


def best(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def ratios(result: Mapping[str, Any]) -> dict[str, float | None]:
    """The issue's ratios from a result's variant summaries and throughput table.

    ``cold_over_raw`` and ``scratch_over_cold`` compare p50s; ``raw_over_warm`` is how many warm
    handouts fit in one raw clone; ``throughput_over_raw`` is monk's best rate over raw's best,
    across concurrency levels.
    """

    def p50(variant: str) -> float | None:
        summary = result.get(variant)
        return None if not summary else summary.get("p50_ms")

    levels = (result.get("throughput") or {}).values()
    return {
        "cold_over_raw": ratio(p50("cold"), p50("raw")),
        "raw_over_warm": ratio(p50("raw"), p50("warm")),
        "scratch_over_cold": ratio(p50("scratch"), p50("cold")),
        "throughput_over_raw": ratio(
            best([level.get("monk_per_s") for level in levels]),
            best([level.get("raw_per_s") for level in levels]),
        ),
    }


@dataclass(frozen=True)
class Target:
    name: str
    goal: str
    measured: str
    met: bool | None  # None: not measured in this run

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.name, "goal": self.goal, "measured": self.measured, "met": self.met}


def _fmt(value: float | None, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:g}{unit}"


def _check(value: float | None, ok: Callable[[float], bool]) -> bool | None:
    return None if value is None else ok(value)


def targets(result: Mapping[str, Any]) -> list[Target]:
    """Each target of the issue next to what this result measured."""
    r = result.get("ratios") or ratios(result)
    warm = result.get("warm") or {}
    warm_p50 = warm.get("p50_ms")
    at_16 = (result.get("throughput") or {}).get("16") or {}
    failures_16 = at_16.get("monk_failures")
    tput = r.get("throughput_over_raw")
    tput_met = None if tput is None or failures_16 is None else tput >= 0.9 and failures_16 == 0
    return [
        Target(
            "cold_over_raw",
            "≤ 1.15",
            _fmt(r.get("cold_over_raw")),
            _check(r.get("cold_over_raw"), lambda v: v <= 1.15),
        ),
        Target("warm p50", "≤ 2 ms", _fmt(warm_p50, " ms"), _check(warm_p50, lambda v: v <= 2)),
        Target(
            "raw_over_warm",
            "≥ 20",
            _fmt(r.get("raw_over_warm")),
            _check(r.get("raw_over_warm"), lambda v: v >= 20),
        ),
        Target(
            "scratch_over_cold",
            "≥ 3",
            _fmt(r.get("scratch_over_cold")),
            _check(r.get("scratch_over_cold"), lambda v: v >= 3),
        ),
        Target(
            "throughput_over_raw",
            "≥ 0.9, 0 fail @16",
            f"{_fmt(tput)}, {_fmt(failures_16)} fail @16",
            tput_met,
        ),
    ]
