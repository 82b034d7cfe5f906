"""``monk bench``: provisioning latency and throughput against raw PostgreSQL, side by side."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from monk.cli.context import state
from monk.cli.output import console, err_console

_PHASES = {
    "latency": "latency rounds (raw, scratch, cold, warm)",
    "throughput": "throughput levels (raw, monk)",
    "deprovision": "deprovisioning",
}


def parse_concurrency(value: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise typer.BadParameter(f"{value!r}: give comma-separated integers, e.g. 1,2,4") from None
    if not levels or any(level < 1 or level > 64 for level in levels):
        raise typer.BadParameter(f"{value!r}: each level must be between 1 and 64")
    return levels


def bench(
    template: str = typer.Option(
        "saas",
        "--template",
        help="Template key to measure (default saas: 30 tables, 90 indexes, ~1,000 rows, "
        "the size at which scratch and clone compare meaningfully).",
    ),
    iterations: int = typer.Option(
        30, "--iterations", min=1, max=1000, help="Timed rounds of raw, scratch, cold and warm."
    ),
    concurrency: str = typer.Option(
        "1,2,4,8,16", "--concurrency", help="Thread counts of the throughput measurements."
    ),
    level_seconds: float = typer.Option(
        4.0,
        "--level-seconds",
        min=0.2,
        max=120,
        help="Seconds raw and monk each run at every throughput level (in two halves, "
        "interleaved).",
    ),
    drop_each_round: bool = typer.Option(
        False,
        "--drop-each-round",
        help="Drop what each round made right away (less disk; creations then pay for the "
        "drops before them) instead of at the end.",
    ),
    json_file: Path | None = typer.Option(
        None, "--json", help="Also write the result as JSON to this file.", dir_okay=False
    ),
    upgrade: bool = typer.Option(
        False,
        "--upgrade",
        help="Measure a fleet upgrade instead: N tenants, one migration per build, at each "
        "--parallel level, a no-op run, and a one-by-one loop over fresh connections.",
    ),
    tenants: int = typer.Option(
        200, "--tenants", min=1, max=100_000, help="With --upgrade: tenants to upgrade."
    ),
    parallel: str = typer.Option(
        "1,2,4,8", "--parallel", help="With --upgrade: the parallelism levels to measure."
    ),
    http: bool = typer.Option(
        False,
        "--http",
        help="Measure the HTTP path instead: cold and warm provisions and a tenant read "
        "through a real 'monk serve' and a keep-alive client, beside the same service calls "
        "in process and the raw clone (--iterations rounds).",
    ),
) -> None:
    """Measure provisioning (raw clone, from scratch, cold, warm pool), throughput and
    deprovisioning on this server; removes everything it creates. A benchmark, not a test."""
    # Imported here: the bench and its progress bars load only when 'monk bench' runs.
    from monk.bench.report import render
    from monk.bench.runner import Bench, BenchConfig
    from monk.service.presence import refuse_beside_serve

    s = state()
    if upgrade:
        _bench_upgrade(tenants, parse_concurrency(parallel), json_file)
        return
    if http:
        _bench_http(template, iterations, json_file)
        return
    levels = parse_concurrency(concurrency)
    runner_config = BenchConfig(
        template=template,
        iterations=iterations,
        concurrency=levels,
        drop_each_round=drop_each_round,
        level_seconds=level_seconds,
    )
    target = s.target
    embedded = s.settings.database_url is None
    refuse_beside_serve(target, s.settings.system_db_name, "the figures")
    with _phase_bar(_PHASES) as progress:
        result = Bench(
            s.settings, target, runner_config, progress=progress, embedded=embedded
        ).run()
    render(result, console)
    if json_file is not None:
        json_file.write_text(json.dumps(result, indent=2, default=str) + "\n")
        console.print(f"wrote {json_file}")


@contextmanager
def _phase_bar(labels: dict[str, str]) -> Iterator[Callable[[str, int, int], None]]:
    """A progress bar per bench phase on stderr (none when it is not a terminal); yields the
    callback the bench reports ``(phase, done, total)`` to."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
        disable=not err_console.is_terminal,
    ) as bar:
        tasks: dict[str, int] = {}

        def progress(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = int(bar.add_task(labels.get(phase, phase), total=total))
            bar.update(tasks[phase], completed=done, total=total)  # type: ignore[arg-type]

        yield progress


def _bench_upgrade(tenants: int, levels: tuple[int, ...], json_file: Path | None) -> None:
    from monk.bench.upgrade import UpgradeBench
    from monk.service.presence import refuse_beside_serve

    s = state()
    refuse_beside_serve(s.target, s.settings.system_db_name, "the figures")
    with _phase_bar({}) as progress:
        result = UpgradeBench(
            s.settings, s.target, tenants=tenants, levels=levels, progress=progress
        ).run()
    base, best, noop = result["baseline"], result["best"], result["noop"]
    console.print(f"fleet upgrade of {result['tenants']} tenants ({result['template']})")
    console.print(
        f"  one by one, fresh connections: {base['seconds']:.2f} s "
        f"({base['tenants_per_s']:.0f} tenants/s)"
    )
    for r in result["monk"]:
        console.print(
            f"  monk template upgrade --parallel {r['parallel']}: {r['seconds']:.2f} s "
            f"({r['tenants_per_s']:.0f} tenants/s) {r['counts']}"
        )
    console.print(
        f"  best: --parallel {best['parallel']}, {result['speedup_over_baseline']}x the loop"
    )
    console.print(
        f"  no-op run: {noop['seconds']:.3f} s, {noop['tenant_sessions_opened']} tenant "
        f"session(s) opened {noop['counts']}"
    )
    if json_file is not None:
        json_file.write_text(json.dumps(result, indent=2, default=str) + "\n")
        console.print(f"wrote {json_file}")


def _bench_http(template: str, iterations: int, json_file: Path | None) -> None:
    from monk.bench.http import HttpBench, HttpBenchConfig
    from monk.service.presence import refuse_beside_serve

    s = state()
    refuse_beside_serve(s.target, s.settings.system_db_name, "the figures")
    config = HttpBenchConfig(template=template, iterations=iterations)
    labels = {"warm": "warm provisions and reads", "cold": "cold provisions"}
    with _phase_bar(labels) as progress:
        result = HttpBench(s.settings, s.target, config, progress=progress).run()
    raw = result["raw"]
    console.print(
        f"HTTP path, template {template}, {iterations} rounds, {result['duration_s']} s; "
        f"raw clone p50 {raw['p50_ms']} ms, p99 {raw['p99_ms']} ms"
    )
    for call, label in (
        ("cold", "cold provision"),
        ("warm", "warm provision"),
        ("get", "GET /api/root/tenant/{name}"),
        ("get_back_to_back", "the same GET, back to back"),
    ):
        r = result[call]
        inproc, http = r["in_process"], r["http"]
        console.print(
            f"  {label}: in process p50 {inproc['p50_ms']} ms (p99 {inproc['p99_ms']}), "
            f"HTTP p50 {http['p50_ms']} ms (p99 {http['p99_ms']}); "
            f"HTTP adds {r['http_adds_p50_ms']} ms p50 ({r['http_over_in_process']}x)"
            + (f"; HTTP/raw {r['http_over_raw']}" if call == "cold" else ""),
            highlight=False,
        )
        for variant in ("in_process", "http"):
            if r[variant]["failures"]:
                console.print(
                    f"    {variant}: {r[variant]['failures']} failed: {r[variant].get('errors')}"
                )
    for target in result["targets"]:
        met = {True: "met", False: "NOT met", None: "not measured"}[target["met"]]
        console.print(
            f"  target {target['target']} {target['goal']}: {target['measured']} ({met})",
            highlight=False,
        )
    for note in result["notes"]:
        console.print(f"note: {note}", highlight=False)
    if json_file is not None:
        json_file.write_text(json.dumps(result, indent=2, default=str) + "\n")
        console.print(f"wrote {json_file}")
