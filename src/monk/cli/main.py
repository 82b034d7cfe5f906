"""The ``monk`` command: a thin client of the service layer (parse, call, render)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, MutableMapping
from typing import Any

import typer
from typer.core import TyperGroup

from monk.cli.context import begin, state
from monk.cli.exits import INTERNAL_ERROR, INTERRUPTED, PROBLEMS_FOUND
from monk.cli.output import console, print_error, print_json, print_mapping, print_rows
from monk.errors import MonkError, status_and_exit

# Each command imports what it needs when it runs (the service, the HTTP stack, the bench):
# 'monk --help' and a plain tenant command start without them. The command groups are loaded
# the same way: 'monk tenant show' imports and builds monk.cli.tenant alone, not the 50 other
# commands' modules and parameters (Typer inspected every command's parameters: 26 ms).

# Name -> (module, attribute): a Typer sub-app, or the function of a single command. In the
# order 'monk --help' lists them after the commands defined here (bench comes first).
_LAZY: dict[str, tuple[str, str]] = {
    "db": ("monk.cli.db", "app"),
    "events": ("monk.cli.events", "app"),
    "host": ("monk.cli.host", "app"),
    "pool": ("monk.cli.pool", "app"),
    "template": ("monk.cli.template", "app"),
    "tenant": ("monk.cli.tenant", "app"),
}
_LAZY_FIRST: dict[str, tuple[str, str]] = {"bench": ("monk.cli.bench", "bench")}


def _load(name: str, module: str, attribute: str) -> Any:
    """The click command of one lazy name, built as ``add_typer``/``command`` would."""
    # __import__, not importlib.import_module: the same import, and 'python -X importtime'
    # still reports it (it times only the interpreter's own import statement path).
    found = getattr(__import__(module, fromlist=[attribute]), attribute)
    if isinstance(found, typer.Typer):
        group = typer.main.get_group(found)
        group.name = name
        return group
    single = typer.Typer()
    single.command(name)(found)
    return typer.main.get_group(single).commands[name]


class _LazyCommands(MutableMapping[str, Any]):
    """The root's commands: those defined here as built, the others built on first lookup."""

    def __init__(self, built: MutableMapping[str, Any]) -> None:
        self._order = [*_LAZY_FIRST, *built, *_LAZY]
        self._built = dict(built)

    def __getitem__(self, name: str) -> Any:
        if name not in self._built:
            where = _LAZY_FIRST.get(name) or _LAZY.get(name)
            if where is None:
                raise KeyError(name)
            self._built[name] = _load(name, *where)
        return self._built[name]

    def __setitem__(self, name: str, command: Any) -> None:
        if name not in self._order:
            self._order.append(name)
        self._built[name] = command

    def __delitem__(self, name: str) -> None:
        self._order.remove(name)
        self._built.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self._order  # without loading it

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._order))

    def __len__(self) -> int:
        return len(self._order)


class _LazyGroup(TyperGroup):
    def __init__(self, **attrs: Any) -> None:
        super().__init__(**attrs)
        self.commands = _LazyCommands(self.commands)

    def list_commands(self, ctx: Any) -> list[str]:
        # Names only: the base class reads every item, which would load every group.
        return list(self.commands)


app = typer.Typer(
    name="monk",
    cls=_LazyGroup,
    help="A PostgreSQL database per tenant, cloned in milliseconds from pre-built templates.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


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
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="info",
            timeout_keep_alive=settings.http_keep_alive,
        )
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
