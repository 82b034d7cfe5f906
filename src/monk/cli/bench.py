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
    iterations: int | None = typer.Option(
        None,
        "--iterations",
        min=1,
        max=1000,
        help="Timed rounds of raw, scratch, cold and warm (default 30; with --template-size, "
        "rounds of each strategy, default 5).",
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
    tenants: int | None = typer.Option(
        None,
        "--tenants",
        min=1,
        max=100_000,
        help="With --upgrade: tenants to upgrade (default 200); with --data-plane: tenants "
        "served (default 300).",
    ),
    parallel: str = typer.Option(
        "1,2,4,8", "--parallel", help="With --upgrade: the parallelism levels to measure."
    ),
    remote: bool = typer.Option(
        False,
        "--remote",
        help="Measure provisioning on a host of the fleet instead: a second embedded server "
        "started for the run, cold (against CREATE DATABASE … TEMPLATE there) and warm.",
    ),
    move: bool = typer.Option(
        False,
        "--move",
        help="Measure a tenant move instead: a tenant of --size-mb moved between this server "
        "and a second embedded one, against a bare pg_dump | pg_restore of it.",
    ),
    size_mb: int = typer.Option(50, "--size-mb", min=1, max=10_000, help="With --move."),
    rounds: int = typer.Option(4, "--rounds", min=1, max=100, help="With --move: moves."),
    data_plane: bool = typer.Option(
        False,
        "--data-plane",
        help="Measure the tenant data API instead: --tenants databases behind one connection "
        "budget on a dedicated server (max_connections 100), --clients concurrent clients of "
        "a real monk serve; beside it one tenant alone, and the naive designs.",
    ),
    clients: int = typer.Option(
        64, "--clients", min=1, max=512, help="With --data-plane: concurrent HTTP clients."
    ),
    requests: int = typer.Option(
        10_000, "--requests", min=10, help="With --data-plane: requests of each load."
    ),
    host_connections: int = typer.Option(
        40,
        "--host-connections",
        min=1,
        max=90,
        help="With --data-plane: MONK_HOST_CONNECTIONS of the monk serve measured.",
    ),
    template_size: str | None = typer.Option(
        None,
        "--template-size",
        help="Measure clone strategies instead: raw WAL_LOG, FILE_COPY, FILE_COPY + clone "
        "(where the host clones files) and monk's cold provision, on --template and on a "
        "generated template of this size (e.g. 512MB), with the WAL each writes; "
        "--iterations rounds (5 unless given).",
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

    if data_plane:
        _bench_data_plane(tenants or 300, clients, requests, host_connections, json_file)
        return
    s = state()
    if template_size is not None:
        _bench_strategies(template, template_size, iterations or 5, json_file)
        return
    if upgrade:
        _bench_upgrade(tenants or 200, parse_concurrency(parallel), json_file)
        return
    if remote:
        _bench_remote(template, iterations or 30, json_file)
        return
    if move:
        _bench_move(size_mb, rounds, json_file)
        return
    if http:
        _bench_http(template, iterations or 30, json_file)
        return
    levels = parse_concurrency(concurrency)
    runner_config = BenchConfig(
        template=template,
        iterations=iterations or 30,
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


def _bench_remote(template: str, iterations: int, json_file: Path | None) -> None:
    from monk.bench.remote import RemoteBench
    from monk.service.presence import refuse_beside_serve

    s = state()
    refuse_beside_serve(s.target, s.settings.system_db_name, "the figures")
    with _phase_bar({}) as progress:
        result = RemoteBench(
            s.settings, s.target, template=template, iterations=iterations, progress=progress
        ).run()
    console.print(
        f"provisioning on a host of the fleet ({result['template']}, {result['iterations']} "
        "rounds; a second embedded server)"
    )
    for variant in ("raw", "cold", "new_role", "warm"):
        r = result[variant]
        extra = f", {r['from_pool']} from pool" if "from_pool" in r else ""
        if "spare_roles" in r:
            extra += f", {r['spare_roles']} spare role(s) of the host"
        console.print(
            f"  {variant:9}  p50 {r['p50_ms']} ms  p95 {r['p95_ms']} ms  p99 {r['p99_ms']} ms"
            f"{extra}"
        )
    console.print(
        f"  cold/raw {result['cold_over_raw']} (target ≤ 1.15), new_role/raw "
        f"{result['new_role_over_raw']}, raw/warm {result['raw_over_warm']}"
    )
    if json_file is not None:
        json_file.write_text(json.dumps(result, indent=2, default=str) + "\n")
        console.print(f"wrote {json_file}")


def _bench_strategies(
    template: str, size_text: str, iterations: int, json_file: Path | None
) -> None:
    from monk.bench.strategies import StrategyBench
    from monk.core.clone_strategy import parse_size
    from monk.service.presence import refuse_beside_serve

    try:
        size = parse_size(size_text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--template-size") from None
    s = state()
    refuse_beside_serve(s.target, s.settings.system_db_name, "the figures")
    rounds = iterations
    with _phase_bar({}) as progress:
        result = StrategyBench(
            s.settings,
            s.target,
            template_size=size,
            template=template,
            iterations=rounds,
            progress=progress,
        ).run()
    cloning = result["file_cloning"]
    console.print(
        f"clone strategies on {result['host']} (PostgreSQL {result['server_version']}), "
        f"{result['iterations']} rounds; file cloning: "
        f"{'yes' if cloning['supported'] else 'no'} ({cloning['detail']})"
    )
    for t in result["templates"]:
        console.print(f"  {t['template']} ({t['size']}): monk chose {t['monk_choice']}")
        for variant, ms in t["p50_ms"].items():
            console.print(
                f"    {variant:<16} p50 {ms:9.1f} ms  WAL {t['wal_bytes_p50'][variant]:>12,} B"
            )
        console.print(
            f"    monk cold / fastest raw ({t['fastest_raw']}): {t['cold_over_fastest_raw']}x;"
            f" WAL_LOG / monk cold: {t['wal_log_over_monk_cold']}x"
        )
    found = result["suggested_file_copy_above"]
    if found["setting"] is not None:
        console.print(
            f"  measured threshold: MONK_CLONE_FILE_COPY_ABOVE={found['setting']} "
            f"({found['reason']}; now {result['settings']['clone_file_copy_above']})",
            highlight=False,
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
        inproc, lean, http = r["in_process"], r["http_lean"], r["http"]
        console.print(
            f"  {label}: in process p50 {inproc['p50_ms']} ms (p99 {inproc['p99_ms']}), "
            f"HTTP p50 {lean['p50_ms']} ms (p99 {lean['p99_ms']}): "
            f"HTTP adds {r['http_lean_adds_p50_ms']} ms p50"
            + (f"; HTTP/raw {r['http_lean_over_raw']}" if call == "cold" else ""),
            highlight=False,
        )
        console.print(
            f"    from httpx (its own Python adds to the client's side): p50 {http['p50_ms']} "
            f"ms (p99 {http['p99_ms']}); adds {r['http_adds_p50_ms']} ms p50",
            highlight=False,
        )
        for way in ("in_process", "http_lean", "http"):
            if r[way]["failures"]:
                console.print(f"    {way}: {r[way]['failures']} failed: {r[way].get('errors')}")
    floors = (("asgi", "a bare ASGI app"), ("fastapi", "a FastAPI route of monk's shape"))
    for name, label in floors:
        f = result["floor"][name]
        console.print(
            f"  floor, {label} under the same uvicorn, no I/O: p50 "
            f"{f['after_pause']['p50_ms']} ms after the pause, "
            f"{f['back_to_back']['p50_ms']} ms back to back",
            highlight=False,
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


def _bench_move(size_mb: int, rounds: int, json_file: Path | None) -> None:
    from monk.bench.move import MoveBench
    from monk.service.presence import refuse_beside_serve

    s = state()
    refuse_beside_serve(s.target, s.settings.system_db_name, "the figures")
    with _phase_bar({}) as progress:
        result = MoveBench(
            s.settings, s.target, size_mb=size_mb, rounds=rounds, progress=progress
        ).run()
    m = result["median"]
    console.print(
        f"tenant move of {result['database_bytes'] / 1e6:.1f} MB ({result['rows']} rows), "
        f"{len(result['rounds'])} rounds, medians:"
    )
    console.print(f"  bare pg_dump -Fc -Z0 | pg_restore: {m['bare_copy_s']:.3f} s")
    console.print(
        f"  monk downtime: {m['downtime_s']:.3f} s ({result['downtime_over_bare']}x the bare "
        f"copy); as a client saw it: {m['client_downtime_s']:.3f} s "
        f"({result['client_downtime_over_bare']}x)"
    )
    console.print(f"  monk total: {m['total_s']:.3f} s (verify {m['verify_s']:.3f} s)")
    for r in result["rounds"]:
        console.print(
            f"    {r['from']} -> {r['to']}: bare {r['bare_copy_s']:.3f} s, downtime "
            f"{r['downtime_s']:.3f} s (client {r['client_downtime_s']}), total {r['total_s']:.3f} s"
        )
    if json_file is not None:
        json_file.write_text(json.dumps(result, indent=2, default=str) + "\n")
        console.print(f"wrote {json_file}")


def _bench_data_plane(
    tenants: int, clients: int, requests: int, host_connections: int, json_file: Path | None
) -> None:
    from monk.bench.data_plane import DataPlaneBench, DataPlaneConfig

    config = DataPlaneConfig(
        tenants=tenants,
        clients=clients,
        requests=requests,
        host_connections=host_connections,
        naive_requests=max(min(requests // 3, 3_000), clients),
    )
    with _phase_bar({}) as progress:
        result = DataPlaneBench(config, progress=progress).run()
    srv = result["server"]
    console.print(
        f"data plane: {tenants} tenants, {clients} clients, {requests} requests per load, "
        f"PostgreSQL {srv['version']} with max_connections {srv['max_connections']}, "
        f"MONK_HOST_CONNECTIONS {result['host_connections']}"
    )
    for label, key in (("many tenants", "many_tenants"), ("one tenant", "single_tenant")):
        r = result[key]
        console.print(
            f"  {label}: {r['errors']} errors, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, "
            f"{r['requests_per_s']} requests/s, at most {r['max_server_connections']} server "
            f"connections ({r['max_data_connections']} of them data)"
            + (f" {r['error_kinds']}" if r["errors"] else "")
        )
        if r["cpu_ms_per_request"]:
            cpu = ", ".join(f"{k} {v}" for k, v in r["cpu_ms_per_request"].items())
            console.print(f"    CPU ms per request: {cpu}")
    console.print(f"  many/one throughput: {result['ratio']} (target >= 0.7)")
    for design, r in result["naive"].items():
        console.print(
            f"  naive, {design.replace('_', ' ')}: {r['errors']} errors of {r['requests']}, "
            f"p50 {r['p50_ms']} ms, {r['requests_per_s']} requests/s, at most "
            f"{r['max_server_connections']} server connections"
            + (f" {r['error_kinds']}" if r["errors"] else "")
        )
    if json_file is not None:
        json_file.write_text(json.dumps(result, indent=2, default=str) + "\n")
        console.print(f"wrote {json_file}")
