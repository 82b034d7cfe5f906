"""``monk template …``: build, inspect, check and retire template databases."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape

from monk.cli.context import state
from monk.cli.exits import PROBLEMS_FOUND
from monk.cli.output import console, err_console, print_json, print_mapping, print_rows
from monk.errors import InvalidRequest, MonkError, OperationFailed

# The template service (and jsonschema with it) is imported by the commands that run it.
if TYPE_CHECKING:
    from rich.status import Status

    from monk.adapters.postgres.connection import ServerTarget
    from monk.service.templates import TemplateBuild, TemplateService
    from monk.service.upgrades import Progress as UpgradeProgress
    from monk.service.upgrades import RunReport

app = typer.Typer(
    help="Template databases: build them from sources, list, check, drop, prune.",
    no_args_is_help=True,
)

_STEP_LABELS = {
    "validate": "read and validate the source",
    "journal": "record the build",
    "create": "create the staging database",
    "extensions": "extensions",
    "core_tables": "core tables (users, schemas, columns)",
    "tables": "tables from the schemas",
    "registry": "schemas and columns rows",
    "seed": "seed records",
    "bulk_seed": "bulk seed files (COPY)",
    "migrations": "migrations",
    "sync": "columns rows follow the catalog",
    "health": "health checks",
    "close": "close it as a template",
    "swap": "swap it in",
    "up_to_date": "already built",
}

_LIST_COLUMNS = [
    "key",
    "version",
    "status",
    "current",
    "database",
    "tables",
    "records",
    "size",
    "built_at",
]


class _StepDisplay:
    """A spinner on the running step and a tick line per finished step (terminals only)."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.step: str | None = None
        self.started = 0.0
        self.status: Status | None = None

    def __enter__(self) -> _StepDisplay:
        self.status = console.status(f"{self.key}: starting")
        self.status.start()
        return self

    def __call__(self, step: str) -> None:
        self._finish_step()
        self.step, self.started = step, time.monotonic()
        if self.status is not None:
            self.status.update(f"{escape(self.key)}: {_STEP_LABELS.get(step, step)}…")

    def _finish_step(self, failed: bool = False) -> None:
        if self.step is None:
            return
        elapsed = (time.monotonic() - self.started) * 1000
        mark = "[red]✗[/]" if failed else "[green]✓[/]"
        label = _STEP_LABELS.get(self.step, self.step)
        console.print(f"  {mark} {escape(self.key)}: {label} [dim]{elapsed:.0f} ms[/]")
        self.step = None

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._finish_step(failed=exc is not None)
        if self.status is not None:
            self.status.stop()


def _target() -> ServerTarget:
    """The admin target: the server started and the system database up to date."""
    target, _ = state().server.init()
    return target


def _service() -> TemplateService:
    """The template service of the admin target, with pools of its own (close it)."""
    from monk.service.templates import TemplateService

    return TemplateService.open(state().settings, _target())


@contextlib.contextmanager
def _host_service(host: str | None) -> Iterator[TemplateService]:
    """The template service of ``host`` (None: the local one, on pools of its own)."""
    if host is None:
        with _service() as templates:
            yield templates
        return
    from monk.service import host_templates

    yield host_templates.service_of(state().tenants, host)


_HOST_OPTION = typer.Option(None, "--host", help="A host of the fleet (default: the local one).")


def _size(size: int | None) -> str:
    if size is None:
        return ""
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(size)


def _row(build: TemplateBuild) -> dict[str, Any]:
    return {
        "key": build.key,
        "version": build.version,
        "status": build.status,
        "current": "yes" if build.is_current else "",
        "database": build.database,
        "tables": build.table_count,
        "records": build.record_count,
        "size": _size(build.size_bytes),
        "built_at": build.built_at.strftime("%Y-%m-%d %H:%M:%S") if build.built_at else None,
    }


@app.command()
def build(
    key: str | None = typer.Argument(None, help="Template key (built-in, or a source folder)."),
    all_keys: bool = typer.Option(False, "--all", help="Build every known template source."),
    force: bool = typer.Option(False, "--force", help="Rebuild even if the version is current."),
    source: Path | None = typer.Option(
        None, "--source", help="Build this source folder under KEY.", file_okay=False
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Build a template database from its source and make it the one tenants are cloned from."""
    from monk.service import templates as template_service

    s = state()
    if all_keys == (key is not None):
        raise InvalidRequest("give a template KEY or --all (not both)")
    if all_keys and source is not None:
        raise InvalidRequest("--source builds one KEY; it cannot be combined with --all")
    keys = template_service.available_keys(s.settings) if all_keys else [str(key)]
    from monk.service import host_templates

    svc = s.tenants
    hosts = host_templates.build_hosts(svc)
    fleet = len(hosts) > 1
    results: list[list[host_templates.HostBuild]] = []
    failures: list[tuple[str, MonkError]] = []
    show_steps = console.is_terminal and not as_json

    def host_step(host: str, step: str) -> None:
        # Per-host progress: one line per step reached, from each host's build thread.
        console.print(f"  {escape(host)}: {_STEP_LABELS.get(step, step)}")

    for k in keys:
        try:
            if show_steps and not fleet:
                with _StepDisplay(k) as display:
                    answers = host_templates.build_everywhere(
                        svc,
                        k,
                        force=force,
                        source_dir=source,
                        recorded_anywhere=True,
                        progress=lambda _h, step: (
                            None if step in ("done", "failed") else display(step)
                        ),
                        hosts=hosts,
                    )
                    if answers[0].error is not None:
                        raise answers[0].error
            else:
                answers = host_templates.build_everywhere(
                    svc,
                    k,
                    force=force,
                    source_dir=source,
                    recorded_anywhere=True,
                    progress=host_step if show_steps else None,
                    hosts=hosts,
                )
            if answers[0].error is not None:
                raise answers[0].error
        except MonkError as exc:
            if not all_keys:
                raise
            # One bad source does not stop the others; each failure left nothing behind.
            failures.append((k, exc))
            if not as_json:
                err_console.print(f"[red]{escape(k)}[/red]: {exc.code}: {escape(str(exc))}")
            continue
        results.append(answers)
        for a in answers:
            where = f"{escape(a.host)}: " if fleet else ""
            if a.error is not None:
                # Another host failed: the others' builds stand; its row says why.
                failures.append((f"{k}@{a.host}", a.error))
                if not as_json:
                    err_console.print(
                        f"[red]{where}{escape(k)}[/red]: {a.error.code}: {escape(str(a.error))}"
                    )
                continue
            if as_json or a.result is None:
                continue
            b = a.result.build
            if a.result.built:
                console.print(
                    f"{where}built {escape(b.key)} {b.version} as {b.database}: "
                    f"{b.table_count} tables, {b.record_count} records, "
                    f"{_size(b.size_bytes)}, {b.duration_ms} ms"
                )
            else:
                console.print(f"{where}{escape(b.key)} is up to date: {b.version} in {b.database}")
    if as_json:
        out: list[dict[str, object]] = []
        for answers in results:
            first = answers[0].as_dict()
            first.pop("host", None)
            if fleet:
                first["hosts"] = [a.as_dict() for a in answers]
            out.append(first)
        out += [
            {"key": k, "built": False, "error": {"code": exc.code, "message": str(exc)}}
            for k, exc in failures
            if "@" not in k
        ]
        print_json(out if all_keys else out[0])
    local_failures = [k for k, _ in failures if "@" not in k]
    if local_failures and len(local_failures) == len(failures):
        raise OperationFailed(
            f"{len(failures)} of {len(keys)} template(s) failed to build: "
            + ", ".join(local_failures),
            step="build",
        )
    if failures:
        # A host that failed: the others built; its failed row says why ('template list').
        raise OperationFailed(
            f"{len(failures)} build(s) failed: "
            + "; ".join(f"{k}: {exc}" if "@" in k else k for k, exc in failures),
            step="build",
        )


@app.command("list")
def list_(
    key: str | None = typer.Argument(None, help="Only this template key."),
    everything: bool = typer.Option(False, "--all", help="Include dropped builds."),
    host: str | None = _HOST_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Builds of every template (or of KEY), newest first."""
    with _host_service(host) as templates:
        builds = templates.list_builds(key, everything=everything)
    if as_json:
        print_json([b.as_dict() for b in builds])
    elif not builds:
        console.print("no template builds yet: try 'monk template build basic'")
    else:
        print_rows([_row(b) for b in builds], _LIST_COLUMNS)


@app.command()
def show(
    key: str = typer.Argument(..., help="Template key."),
    version: str | None = typer.Option(
        None, "--version", help="A build version (default: current)."
    ),
    host: str | None = _HOST_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Everything recorded about the current build of KEY (or the build of --version)."""
    with _host_service(host) as templates:
        b = templates.show(key, version)
    if as_json:
        print_json(b.as_dict())
    else:
        print_mapping(b.as_dict())


@app.command()
def check(
    key: str = typer.Argument(..., help="Template key."),
    host: str | None = _HOST_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Re-run the health checks on the current build (in a scratch clone); exit 1 on problems."""
    with _host_service(host) as templates:
        report = templates.check(key)
    if as_json:
        print_json(report.as_dict())
    elif report.ok:
        console.print(
            f"{escape(key)}: healthy ({report.table_count} tables, {report.record_count} records)"
        )
    else:
        console.print(f"{escape(key)}: {len(report.problems)} problem(s)")
        for problem in report.problems:
            console.print(f"  - {escape(problem)}")
    if not report.ok:
        raise typer.Exit(PROBLEMS_FOUND)


@app.command()
def drop(
    key: str = typer.Argument(..., help="Template key."),
    version: str | None = typer.Option(
        None, "--version", help="The build to drop (default: current)."
    ),
    force: bool = typer.Option(
        False, "--force", help="Drop even the current build or one that tenants were cloned from."
    ),
    host: str | None = _HOST_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Drop a build and its database (on the local host, or --host)."""
    with _host_service(host) as templates:
        b = templates.drop(key, version, force=force)
    if as_json:
        print_json(b.as_dict())
    else:
        console.print(f"dropped {escape(b.key)} {b.version} ({b.database})")


@app.command()
def prune(
    key: str | None = typer.Argument(None, help="Only this template key."),
    host: str | None = _HOST_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Drop the retired builds that no live tenant was cloned from; forget failed builds but
    the latest of each key (on every host, or --host)."""
    if host is None:
        from monk.service import host_templates

        dropped = host_templates.prune_everywhere(state().tenants, key)
    else:
        with _host_service(host) as templates:
            dropped = templates.prune(key)
    if as_json:
        print_json([b.as_dict() for b in dropped])
    elif not dropped:
        console.print("nothing to prune")
    else:
        for b in dropped:
            if b.status == "failed":
                console.print(f"forgot failed build {escape(b.key)} {b.version}")
            else:
                console.print(f"dropped {escape(b.key)} {b.version} ({b.database})")


@app.command()
def status(
    key: str = typer.Argument(..., help="Template key."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Where the tenants of KEY are: per build and migration level, the current build, spares,
    tenants behind, the last drift checks (from the system database alone)."""
    from monk.service import fleet

    report = fleet.template_status(state().tenants, key)
    if as_json:
        print_json(report)
        return
    current = report["current"]
    console.print(
        f"{escape(key)}: current build "
        + (f"{current['version']} (level {current['level']})" if current else "none")
        + f", {report['total']} tenant(s), {report['behind']['count']} behind"
    )
    counted = ["version", "level", "status", "count", "current"]
    print_rows(report["tenants"], counted, title="tenants")
    if report["spares"]:
        print_rows(report["spares"], counted, title="spares")
    # Minutes are enough on a terminal (--json keeps the full time).
    builds = [
        {**b, "current": b["is_current"], "retired": (b["retired_at"] or "")[:16].replace("T", " ")}
        for b in report["builds"]
    ]
    print_rows(
        builds,
        ["version", "status", "current", "level", "tenants", "spares", "retired"],
        title="builds",
    )
    d = report["drift"]
    if d["checked"]:
        console.print(
            f"drift (last checked {d['last_checked_at']}): {d['drifted']} drifted, "
            f"{d['clean']} clean, {d['not_compared']} not compared"
            + (f": {escape(', '.join(d['drifted_tenants']))}" if d["drifted_tenants"] else "")
        )
    else:
        console.print(f"drift: never checked (run 'monk template drift {escape(key)}')")


@app.command()
def drift(
    key: str = typer.Argument(..., help="Template key."),
    parallel: int = typer.Option(
        4, "--parallel", min=1, max=64, help="Tenant databases checked at once."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Compare every tenant of KEY with the build it claims to be at; exit 1 when any drifted
    (the results are kept for 'monk template status' and 'monk doctor')."""
    from monk.cli.tenant import print_drift
    from monk.service import drift as drift_service

    results = drift_service.template_drift(state().tenants, key, parallel=parallel)
    if as_json:
        print_json([r.as_dict() for r in results])
    else:
        for result in results:
            print_drift(result)
        drifted = sum(1 for r in results if r.drifted)
        unchecked = sum(1 for r in results if r.drifted is None)
        console.print(
            f"{len(results)} tenant(s) of {escape(key)}: {drifted} drifted, "
            f"{len(results) - drifted - unchecked} clean, {unchecked} not compared"
        )
    if any(r.drifted for r in results):
        raise typer.Exit(PROBLEMS_FOUND)


@app.command()
def sources(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """The template sources monk knows (built-in, MONK_TEMPLATE_PATH, and the folders keys were
    built from with --source) and their versions."""
    from monk.service import templates as template_service

    s = state()
    rows: list[dict[str, Any]] = []
    configured = template_service.available_keys(s.settings)
    for k in configured:
        try:
            rows.append(template_service.describe_source(s.settings, k) | {"from": "configured"})
        except MonkError as exc:
            rows.append({"key": k, "from": "configured", "error": exc.message})
    # Keys built with --source: rebuilt from the folder recorded with their builds.
    try:
        with _service() as templates:
            elsewhere = [
                (k, templates.recorded_source(k))
                for k in sorted({b.key for b in templates.list_builds()} - set(configured))
            ]
    except MonkError as exc:  # the sources are still worth listing without the database
        err_console.print(f"[yellow]keys built with --source not listed: {escape(str(exc))}[/]")
        elsewhere = []
    for k, folder in elsewhere:
        if folder is None:
            continue
        try:
            described = template_service.describe_source(s.settings, k, folder)
            rows.append(described | {"from": f"--source {folder}"})
        except MonkError as exc:
            rows.append({"key": k, "from": f"--source {folder}", "error": exc.message})
    if as_json:
        print_json(rows)
    else:
        print_rows(
            [
                r | {"schemas": ", ".join(r.get("schemas", [])), "error": r.get("error")}
                for r in rows
            ],
            ["key", "version", "from", "schemas", "description", "error"],
        )


@app.command()
def upgrade(
    key: str = typer.Argument(..., help="Template key."),
    to: str | None = typer.Option(
        None, "--to", help="The build version to bring tenants to (default: the current build)."
    ),
    tenants: list[str] = typer.Option(
        [], "--tenants", help="Only this tenant (repeat for several).", show_default=False
    ),
    canary: int = typer.Option(
        0, "--canary", min=0, help="Upgrade this many tenants first; any failure stops the run."
    ),
    parallel: int = typer.Option(
        8,
        "--parallel",
        min=1,
        max=64,
        help="Tenants at once.",  # upgrades.DEFAULT_PARALLEL
    ),
    on_error: str = typer.Option(
        "stop", "--on-error", help="stop: schedule no more after a failure; continue: finish."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="List what would be done; change and open nothing."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the per-tenant result as JSON."),
) -> None:
    """Bring the tenants of KEY to a build: each in one transaction in its own database, the
    canary wave first, resumable (the same command again finishes a run whose process died).
    Exit 1 when a tenant failed."""
    from monk.service import upgrades

    options = upgrades.UpgradeOptions(
        to_version=to,
        tenants=tuple(tenants),
        canary=canary,
        parallel=parallel,
        on_error=on_error,
    )
    svc = state().tenants
    if dry_run:
        report = upgrades.plan(svc, key, options)
    else:
        run = upgrades.begin(svc, key, options)
        if run.resumed and not as_json:
            err_console.print(f"resuming the unfinished run {run.op_id} of {escape(key)}")
        if console.is_terminal and not as_json:
            with _UpgradeBar(key, run.to_version) as bar:
                report = run.execute(bar)
        else:
            report = run.execute()
    if as_json:
        print_json(report.as_dict())
    else:
        _print_upgrade(report)
    if report.failed or report.state == "failed":
        raise typer.Exit(PROBLEMS_FOUND)


class _UpgradeBar:
    """A progress bar with the counts and the rate (terminals only)."""

    def __init__(self, key: str, version: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.progress = Progress(
            TextColumn(f"{escape(key)} → {version}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[counts]}"),
            TextColumn("{task.fields[rate]}"),
            console=console,
        )
        self.task = self.progress.add_task("upgrade", total=None, counts="", rate="")
        self.started = time.monotonic()

    def __enter__(self) -> _UpgradeBar:
        self.progress.start()
        return self

    def __call__(self, p: UpgradeProgress) -> None:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(p.counts.items()) if n)
        elapsed = max(time.monotonic() - self.started, 1e-6)
        self.progress.update(
            self.task,
            total=p.total,
            completed=p.finished,
            counts=counts,
            rate=f"{p.counts.get('done', 0) / elapsed:.1f} tenants/s",
        )

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()


def _print_upgrade(report: RunReport) -> None:
    counts = ", ".join(f"{n} {s}" for s, n in sorted(report.counts.items()) if n) or "no tenants"
    what = "would upgrade" if report.state == "planned" else "upgrade"
    took = f" in {report.elapsed_s:.2f} s" if report.elapsed_s is not None else ""
    run = f" (run {report.operation_id})" if report.operation_id else ""
    console.print(f"{what} {escape(report.key)} to {report.to_version}: {counts}{took}{run}")
    if report.error:
        err_console.print(f"[red]{escape(report.error)}[/]")
    shown = [
        t.as_dict()
        for t in report.tenants
        if report.state == "planned" or t.state in ("failed", "skipped")
    ]
    if shown:
        print_rows(shown, ["name", "state", "from_version", "reason"])
