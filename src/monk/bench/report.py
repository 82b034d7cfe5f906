"""Rendering a ``monk bench`` result for people: rich tables (JSON is the result itself)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.table import Table

_LABELS = {
    "raw": "CREATE DATABASE … TEMPLATE (floor)",
    "scratch": "empty database + DDL + seed",
    "cold": "monk provision, cold clone",
    "warm": "monk provision, warm pool",
}


def _ms(value: Any) -> str:
    return "–" if value is None else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _rate(value: Any) -> str:
    return "–" if value is None else f"{value:.1f}"


def render(result: Mapping[str, Any], console: Console) -> None:
    server = result.get("server", {})
    durability = ", ".join(f"{k}={v}" for k, v in server.get("durability", {}).items())
    machine = result.get("machine", {})
    template = result.get("template", {})
    console.print(
        f"PostgreSQL {server.get('version', '?')} ({server.get('mode', '?')}; {durability};"
        f" scram iterations {server.get('scram_iterations', '?')})"
        f" · {machine.get('cpus', '?')} CPUs, {machine.get('platform', '?')}"
    )
    size = template.get("size_bytes")
    console.print(
        f"template {template.get('key')} @ {template.get('version')}"
        f" ({template.get('tables')} tables, {template.get('records')} records"
        f"{'' if size is None else f', {size / 1e6:.1f} MB'})"
        f" · {result.get('config', {}).get('iterations')} iterations"
        f" · {result.get('duration_s')} s"
    )

    latency = Table(title="provisioning latency (ms)")
    for column in ("variant", "n", "p50", "p95", "p99", "failures", "note"):
        latency.add_column(column, justify="left" if column in ("variant", "note") else "right")
    for variant in _LABELS:
        summary = result.get(variant)
        if summary is None:
            latency.add_row(variant, "0", "–", "–", "–", "–", "warm pool not available")
            continue
        note = ""
        if "from_pool" in summary:
            note = f"{summary['from_pool']} from pool"
        latency.add_row(
            variant,
            str(summary.get("n")),
            _ms(summary.get("p50_ms")),
            _ms(summary.get("p95_ms")),
            _ms(summary.get("p99_ms")),
            str(summary.get("failures", 0)),
            note,
        )
    deprovision = result.get("deprovision") or {}
    for key in ("answer", "dropped"):
        summary = deprovision.get(key) or {}
        latency.add_row(
            f"purge {key}",
            str(summary.get("n", 0)),
            _ms(summary.get("p50_ms")),
            _ms(summary.get("p95_ms")),
            _ms(summary.get("p99_ms")),
            str(summary.get("failures", 0)),
            "",
        )
    console.print(latency)
    for variant, label in _LABELS.items():
        console.print(f"  {variant}: {label}", highlight=False)
    console.print("  purge answer: request_purge returns; purge dropped: the background drop done")

    seconds = result.get("config", {}).get("level_seconds")
    throughput = Table(title=f"throughput (successes / wall second; {seconds} s a variant a level)")
    for column in ("threads", "raw ops", "raw/s", "raw fail", "monk ops", "monk/s", "monk fail"):
        throughput.add_column(column, justify="right")
    for level, row in (result.get("throughput") or {}).items():
        throughput.add_row(
            level,
            str(row.get("raw_ops")),
            _rate(row.get("raw_per_s")),
            str(row.get("raw_failures")),
            str(row.get("monk_ops")),
            _rate(row.get("monk_per_s")),
            str(row.get("monk_failures")),
        )
    console.print(throughput)

    ratios = Table(title="ratios and targets")
    for column in ("target", "goal", "measured", "met"):
        ratios.add_column(column)
    for target in result.get("targets", []):
        met = target.get("met")
        mark = (
            "[green]met[/]" if met else "[dim]not measured[/]" if met is None else "[red]not met[/]"
        )
        ratios.add_row(target["target"], target["goal"], target["measured"], mark)
    console.print(ratios)
    for note in result.get("notes", []):
        console.print(f"note: {note}", highlight=False)
