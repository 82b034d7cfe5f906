"""``monk db …``: the PostgreSQL server monk uses."""

from __future__ import annotations

import os
import shutil

import typer

from monk.cli.context import state
from monk.cli.exits import SERVER_DOWN
from monk.cli.output import console, print_json, print_mapping
from monk.errors import ConfigError

app = typer.Typer(
    help="The PostgreSQL server monk uses (embedded unless MONK_DATABASE_URL).",
    no_args_is_help=True,
)


def _embedded_only(action: str) -> None:
    if state().server.embedded is None:
        raise ConfigError(
            f"'monk db {action}' manages the embedded server; MONK_DATABASE_URL is set"
        )


@app.command()
def start() -> None:
    """Start the embedded server (initialising it on first use) and the system database."""
    _embedded_only("start")
    target, _ = state().server.init()
    console.print(f"embedded PostgreSQL running on port {target.public_port}")


@app.command()
def stop() -> None:
    """Stop the embedded server."""
    _embedded_only("stop")
    embedded = state().server.embedded
    assert embedded is not None
    console.print("stopped" if embedded.stop() else "not running")


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Is the server up? Exit 0 when it accepts connections, 5 when not."""
    s = state()
    info = s.server.status()
    if as_json:
        print_json(info)
    else:
        print_mapping(info | {"file_cloning": _cloning_text(info.get("file_cloning"))})
    if not info["running"]:
        raise typer.Exit(SERVER_DOWN)


def _cloning_text(found: object) -> str | None:
    if not isinstance(found, dict):
        return None if found is None else str(found)
    return f"{'yes' if found.get('supported') else 'no'}: {found.get('detail')}"


@app.command()
def url() -> None:
    """Print a libpq URL connecting, with full rights, to the system database."""
    s = state()
    target, _ = s.server.init()
    typer.echo(target.url(s.settings.system_db_name))


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def psql(ctx: typer.Context) -> None:
    """Open psql on the system database; further arguments go to psql (e.g. -c 'SELECT 1')."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    s = state()
    target, _ = s.server.init()
    if s.server.embedded is not None:
        binary = str(s.server.embedded.tool("psql"))
    else:
        found = shutil.which("psql")
        if found is None:
            raise ConfigError("psql is not on PATH")
        binary = found
    # The password goes through the environment: on the command line, ps would show it.
    params = conninfo_to_dict(target.conninfo)
    password = params.pop("password", None)
    params["dbname"] = s.settings.system_db_name
    environ = dict(os.environ)
    if password is not None:
        environ["PGPASSWORD"] = str(password)
    dbname = make_conninfo(**{k: str(v) for k, v in params.items()})
    os.execve(binary, [binary, f"--dbname={dbname}", *ctx.args], environ)  # noqa: S606
