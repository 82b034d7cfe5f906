"""The pure math of ``monk bench``: percentiles, summaries, ratios, throughput, targets."""

from __future__ import annotations

import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from monk.bench import stats
from monk.bench.runner import BenchConfig, throughput_estimate, throughput_slices

finite = st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False)


def test_percentile_interpolates_between_closest_ranks() -> None:
    samples = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert stats.percentile(samples, 0) == 1.0
    assert stats.percentile(samples, 100) == 4.0
    assert stats.percentile(samples, 50) == 2.5
    assert stats.percentile(samples, 95) == pytest.approx(3.85)
    assert stats.percentile([10.0, 20.0], 99) == pytest.approx(19.9)


def test_percentile_of_one_sample_is_that_sample() -> None:
    for p in (0, 50, 95, 99, 100):
        assert stats.percentile([7.5], p) == 7.5


def test_percentile_refuses_nothing_and_out_of_range() -> None:
    with pytest.raises(ValueError, match="no samples"):
        stats.percentile([], 50)
    for p in (-1, 100.5, float("nan")):
        with pytest.raises(ValueError, match="outside"):
            stats.percentile([1.0], p)


@given(st.lists(finite, min_size=2, max_size=50))
def test_percentile_matches_statistics_inclusive_quantiles(samples: list[float]) -> None:
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    for p in (50, 95, 99):
        assert stats.percentile(samples, p) == pytest.approx(cuts[p - 1], rel=1e-9, abs=1e-9)


@given(st.lists(finite, min_size=1, max_size=50))
def test_percentiles_are_ordered_and_within_the_samples(samples: list[float]) -> None:
    p50, p95, p99 = (stats.percentile(samples, p) for p in (50, 95, 99))
    assert min(samples) <= p50 <= p95 <= p99 <= max(samples)


def test_summarize() -> None:
    out = stats.summarize([1.0, 2.0, 3.0, 4.0, 100.0], failures=1)
    assert out["n"] == 5
    assert out["failures"] == 1
    assert out["p50_ms"] == 3.0
    assert out["p95_ms"] == pytest.approx(80.8)
    assert out["p99_ms"] == pytest.approx(96.16)
    assert out["mean_ms"] == 22.0
    assert (out["min_ms"], out["max_ms"]) == (1.0, 100.0)
    assert stats.summarize([1.23456])["p50_ms"] == 1.235  # rounded to a microsecond


def test_summarize_of_nothing_has_no_figures() -> None:
    out = stats.summarize([], failures=2)
    assert out["n"] == 0
    assert out["failures"] == 2
    assert out["p50_ms"] is out["p95_ms"] is out["p99_ms"] is out["mean_ms"] is None


def test_ratio() -> None:
    assert stats.ratio(3.0, 2.0) == 1.5
    assert stats.ratio(1.0, 3.0) == 0.333
    assert stats.ratio(None, 2.0) is None
    assert stats.ratio(2.0, None) is None
    assert stats.ratio(2.0, 0.0) is None


def test_throughput() -> None:
    assert stats.throughput(10, 2.0) == 5.0
    assert stats.throughput(0, 2.0) == 0.0
    assert stats.throughput(3, 0.0) is None


def result(**over: object) -> dict[str, object]:
    base: dict[str, object] = {
        "raw": {"p50_ms": 50.0},
        "scratch": {"p50_ms": 180.0},
        "cold": {"p50_ms": 55.0},
        "warm": {"p50_ms": 1.5},
        "throughput": {
            "1": {"raw_per_s": 10.0, "monk_per_s": 9.0, "monk_failures": 0},
            "16": {"raw_per_s": 20.0, "monk_per_s": 18.5, "monk_failures": 0},
        },
    }
    return base | over


def test_ratios_use_p50s_and_best_throughputs() -> None:
    r = stats.ratios(result())
    assert r == {
        "cold_over_raw": 1.1,
        "raw_over_warm": 33.333,
        "scratch_over_cold": 3.273,
        "throughput_over_raw": 0.925,
    }


def test_ratios_without_warm_or_throughput_are_none() -> None:
    r = stats.ratios(result(warm=None, throughput={}))
    assert r["raw_over_warm"] is None
    assert r["throughput_over_raw"] is None
    assert r["cold_over_raw"] == 1.1


def test_targets_met() -> None:
    checks = {t.name: t for t in stats.targets(result())}
    assert list(checks) == [
        "cold_over_raw",
        "warm p50",
        "raw_over_warm",
        "scratch_over_cold",
        "throughput_over_raw",
    ]
    assert all(t.met for t in checks.values())
    assert checks["cold_over_raw"].measured == "1.1"
    assert checks["warm p50"].measured == "1.5 ms"


def test_targets_not_met_or_not_measured() -> None:
    slow = result(
        cold={"p50_ms": 60.0},
        warm={"p50_ms": 3.0},
        throughput={"16": {"raw_per_s": 20.0, "monk_per_s": 19.0, "monk_failures": 2}},
    )
    checks = {t.name: t.met for t in stats.targets(slow)}
    assert checks["cold_over_raw"] is False
    assert checks["warm p50"] is False
    assert checks["raw_over_warm"] is False  # 50 / 3 < 20
    assert checks["scratch_over_cold"] is True
    assert checks["throughput_over_raw"] is False  # fast enough, but failures at 16
    missing = {t.name: t.met for t in stats.targets(result(warm=None, throughput={"2": {}}))}
    assert missing["warm p50"] is None
    assert missing["raw_over_warm"] is None
    assert missing["throughput_over_raw"] is None  # concurrency 16 was not run
    assert stats.targets(result())[0].as_dict() == {
        "target": "cold_over_raw",
        "goal": "≤ 1.15",
        "measured": "1.1",
        "met": True,
    }


def test_throughput_estimate_is_generous_and_grows_with_the_time_of_a_level() -> None:
    config = BenchConfig(concurrency=(1, 2, 4, 8, 16), level_seconds=4.0)
    # two cores at a 30 ms clone clone ~67 a second; the estimate allows half as much again,
    # for both variants, 4 s each, at five levels
    assert throughput_estimate(config, 30.0, 2) == 4001
    longer = BenchConfig(concurrency=(1, 2, 4, 8, 16), level_seconds=8.0)
    assert throughput_estimate(longer, 30.0, 2) == 8001
    assert throughput_estimate(config, None, 2) == 100 * 2 * 4 * 5 + 1  # no raw p50: 100/s


def test_a_level_is_cut_into_an_even_count_of_slices_of_about_a_second() -> None:
    assert throughput_slices(4.0) == (4, 1.0)
    assert throughput_slices(0.6) == (2, 0.3)
    assert throughput_slices(3.0) == (4, 0.75)
    assert throughput_slices(10.0) == (10, 1.0)


def test_http_targets_are_read_on_the_lean_client_beside_the_stacks_floor() -> None:
    """``monk bench --http``: what the API adds is the http.client figure (httpx's own cost
    is the client's); each 'adds' target shows the floor a FastAPI route doing nothing takes
    under the same uvicorn, read the same way (after the pause, or back to back)."""
    from monk.bench.http import http_targets

    def call(inproc: float, lean: float, httpx: float) -> dict[str, object]:
        return {
            "in_process": {"p50_ms": inproc},
            "http_lean": {"p50_ms": lean},
            "http": {"p50_ms": httpx},
            "http_lean_adds_p50_ms": round(lean - inproc, 3),
            "http_adds_p50_ms": round(httpx - inproc, 3),
        }

    result = {
        "cold": {**call(40.0, 42.5, 43.0), "http_lean_over_raw": 1.12},
        "warm": call(1.5, 2.4, 3.5),
        "get": call(0.9, 2.4, 3.6),
        "get_back_to_back": call(0.3, 0.9, 1.3),
        "floor": {
            "fastapi": {"after_pause": {"p50_ms": 1.3}, "back_to_back": {"p50_ms": 0.36}},
            "asgi": {"after_pause": {"p50_ms": 0.9}, "back_to_back": {"p50_ms": 0.22}},
        },
    }
    targets = {t.name: t for t in http_targets(result)}
    assert targets["warm: HTTP adds (p50)"].met is True  # 0.9 from http.client, 2.0 from httpx
    assert targets["get: HTTP adds (p50)"].met is False
    assert targets["get: HTTP adds (p50)"].measured == "1.5 ms (the stack's floor: 1.3)"
    assert targets["get back to back: HTTP adds (p50)"].measured == (
        "0.6 ms (the stack's floor: 0.36)"
    )
    assert targets["warm over HTTP (p50)"].met is True  # 2.4 ms
    assert targets["cold over HTTP / raw (p50)"].met is True
