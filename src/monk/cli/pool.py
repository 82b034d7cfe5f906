"""``monk pool …``: the warm pool of pre-cloned spare databases."""

from __future__ import annotations

import typer
from rich.markup import escape

from monk.cli.context import state
from monk.cli.output import console, err_console, print_json, print_rows
from monk.errors import TemplateNotBuilt

app = typer.Typer(help="The warm pool: spare databases cloned ahead of time.", no_args_is_help=True)


@app.command()
def fill(
    template: str = typer.Argument("basic", help="Template key."),
    count: int = typer.Option(2, "--count", "-n", min=0, max=1000, help="Spares to keep."),
) -> None:
    """Create spares of the template's current build until COUNT are ready."""
    from monk.service import pool

    svc = state().tenants
    try:
        made = pool.fill(svc, template, count)
    except TemplateNotBuilt:
        # The CLI may build it (an HTTP request never does), saying so.
        err_console.print(f"building template {escape(template)} first …")
        svc.templates.build(template, recorded_anywhere=True)
        made = pool.fill(svc, template, count)
    console.print(f"made {made} spare(s) of {template}")


@app.command("status")
def status_(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Spares per template build and state; spare roles per host."""
    from monk.service import pool, role_pool

    svc = state().tenants
    rows = pool.status(svc)
    roles = role_pool.status(svc)
    if as_json:
        print_json({"spares": rows, "spare_roles": roles})
    else:
        print_rows(rows, ["template", "version", "status", "count", "target"])
        print_rows(roles, ["host", "ready", "target"], title="spare roles")


@app.command()
def drain(template: str | None = typer.Argument(None, help="Only this template.")) -> None:
    """Drop every ready spare (and, for all templates, every spare role)."""
    from monk.service import pool, role_pool

    svc = state().tenants
    console.print(f"dropped {pool.drain(svc, key=template)} spare(s)")
    if template is None:
        dropped = role_pool.drain_all(svc)
        console.print(f"dropped {sum(dropped.values())} spare role(s)")
