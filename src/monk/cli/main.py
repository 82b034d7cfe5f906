"""The ``monk`` command: a thin client of the service layer (parse, call, render)."""

from __future__ import annotations

import logging
import os
import sys

import typer

from monk.cli import bench as bench_cli
from monk.cli import db as db_cli
from monk.cli import events as events_cli
from monk.cli import host as host_cli
from monk.cli import pool as pool_cli
from monk.cli import template as template_cli
from monk.cli import tenant as tenant_cli
from monk.cli.context import begin, state
from monk.cli.exits import INTERNAL_ERROR, INTERRUPTED, PROBLEMS_FOUND
from monk.cli.output import console, print_error, print_json, print_mapping, print_rows
from monk.errors import MonkError, status_and_exit

# Each command imports what it needs when it runs (the service, the HTTP stack, the bench):
# 'monk --help' and a plain tenant command start without them.

app = typer.Typer(
    name="monk",
    help="A PostgreSQL database per tenant, cloned in milliseconds from pre-built templates.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(db_cli.app, name="db")
app.add_typer(events_cli.app, name="events")
app.add_typer(host_cli.app, name="host")
app.add_typer(pool_cli.app, name="pool")
app.add_typer(template_cli.app, name="template")
app.add_typer(tenant_cli.app, name="tenant")
app.command("bench")(bench_cli.bench)


@app.callback()
def _main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what monk does."),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    begin()


@app.command()
def init(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Start the server if embedded, create the system database, apply its migrations."""
    s = state()
    target, result = s.server.init()
    out = {
        "system_database": s.settings.system_db_name,
        "host": target.name,
        "created_database": result.created_database,
        "applied_migrations": result.applied,
    }
    if as_json:
        print_json(out)
    else:
        print_mapping(out)


@app.command()
def config(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Print the effective settings, secrets masked."""
    masked = state().settings.masked()
    if as_json:
        print_json(masked)
    else:
        print_mapping(masked)


@app.command()
def doctor(
    repair: bool = typer.Option(False, "--repair", help="Finish or undo each problem."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Compare the registry with the server; exit 0 when consistent, 1 listing problems."""
    from monk.service import doctor as doctor_service

    found = doctor_service.checkup(state().tenants, repair_them=repair)
    if as_json:
        print_json(
            {
                "problems": [p.as_dict() for p in found.problems],
                "repaired": found.repaired,
                "remaining": [p.as_dict() for p in found.remaining],
                "warnings": [p.as_dict() for p in found.warnings],
            }
        )
    else:
        if not found.problems:
            console.print("consistent: registry and server agree")
        else:
            rows = [p.as_dict() for p in found.problems]
            print_rows(rows, ["kind", "subject", "host", "detail", "repair"])
        for line in found.repaired:
            console.print(f"repaired {line}")
        # Warnings (the server may not be monk's) are reported, never repaired, exit 0.
        for w in found.warnings:
            console.print(f"warning: {w.kind} {w.subject}: {w.detail} ({w.repair})")
    if found.remaining:
        raise typer.Exit(PROBLEMS_FOUND)


@app.command()
def token(
    root: bool = typer.Option(False, "--root", help="A token with root access (required)."),
    ttl: int = typer.Option(3600, "--ttl", min=60, help="Seconds until it expires."),
) -> None:
    """Print a signed API token alone on stdout."""
    from monk.api.auth import issue_root_token

    if not root:
        raise typer.BadParameter("only root tokens exist today: pass --root")
    typer.echo(issue_root_token(state().settings, ttl_seconds=ttl))


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    templates: str = typer.Option(
        "empty,basic,crm", "--templates", help="Built-in templates to build when missing."
    ),
) -> None:
    """Start the database if embedded, migrate, build templates, reconcile, then serve HTTP."""
    import gc

    import uvicorn

    from monk.api.app import create_app, listen
    from monk.api.runtime import Runtime
    from monk.service import doctor as doctor_service

    settings = state().settings
    # The port first: a busy one stops this process before it touches the database.
    with listen(host, port) as sock:
        runtime = Runtime(settings)
        for key in [k.strip() for k in templates.split(",") if k.strip()]:
            build = runtime.tenants.templates.ensure_built(key)
            console.print(f"template {key}: ready ({build.version})")
        problems = doctor_service.diagnose(doctor_service.take_snapshot(runtime.tenants))
        for line in doctor_service.repair(runtime.tenants, problems) if problems else []:
            console.print(f"reconciled {line}")
        console.print(
            f"monk serving on http://{host}:{port}  (API docs: http://{host}:{port}/docs)"
        )
        console.print("root token: monk token --root")
        app = create_app(settings, runtime=runtime)
        # What start-up made lives as long as the process: frozen, the collector never scans
        # it again. A full collection of those ~130k objects took 170-560 ms (a 2-core VM
        # under load), every thread stopped, whichever request was in flight included.
        gc.collect()
        gc.freeze()
        config = uvicorn.Config(app, host=host, port=port, log_level="info")
        server = uvicorn.Server(config)
        try:
            server.run(sockets=[sock])
        except SystemExit:
            if server.started:
                raise
            # uvicorn exits 3 when the application fails to start: monk's 3 is "not found"
            raise MonkError("the HTTP server did not start (its log is above)") from None


def run() -> None:
    """Console-script entry: every MonkError becomes one message and its exit code.

    Typer (standalone mode) handles usage errors itself (exit 2) and exits on success.
    """
    try:
        app()
    except MonkError as err:
        print_error(err)
        sys.exit(status_and_exit(err)[1])
    except KeyboardInterrupt:
        sys.exit(INTERRUPTED)
    except Exception as exc:
        if os.environ.get("MONK_DEBUG"):
            raise
        from monk.adapters.postgres.connection import translate

        known = translate(exc)
        if known is not None:
            print_error(known)
            sys.exit(status_and_exit(known)[1])
        print(f"internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(INTERNAL_ERROR)
