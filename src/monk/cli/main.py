"""The ``monk`` command: a thin client of the service layer (parse, call, render)."""

from __future__ import annotations

import logging
import os
import sys

import typer

from monk.cli import db as db_cli
from monk.cli import template as template_cli
from monk.cli.context import begin, state
from monk.cli.output import print_error, print_json, print_mapping
from monk.errors import MonkError, status_and_exit

app = typer.Typer(
    name="monk",
    help="A PostgreSQL database per tenant, cloned in milliseconds from pre-built templates.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(db_cli.app, name="db")
app.add_typer(template_cli.app, name="template")


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
        sys.exit(130)
    except Exception as exc:
        if os.environ.get("MONK_DEBUG"):
            raise
        print(f"internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
