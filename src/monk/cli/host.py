"""``monk host …``: the fleet's PostgreSQL servers (``--json`` prints the API's objects)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape

from monk.cli.context import state
from monk.cli.exits import PROBLEMS_FOUND
from monk.cli.output import console, err_console, print_json, print_mapping, print_rows

if TYPE_CHECKING:
    from monk.service.hosts import HostView

app = typer.Typer(help="Hosts: the PostgreSQL servers tenants live on.", no_args_is_help=True)

JSON = typer.Option(False, "--json", help="Print JSON.")


def _show(view: HostView, as_json: bool) -> None:
    data = view.as_dict()
    if as_json:
        print_json(data)
        return
    last = data.pop("last_check")
    cloning = data.pop("file_cloning")
    data["labels"] = _labels(data["labels"])
    print_mapping(data)
    print_mapping(last, title="last check")
    print_mapping(
        {
            "supported": {True: "yes", False: "no"}.get(cloning["supported"], "not detected"),
            "detail": cloning["detail"],
            "at": cloning["at"],
        },
        title="file cloning",
    )


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


@app.command()
def add(
    name: str = typer.Argument(..., help="Host name, e.g. 'pg-eu-2'."),
    url: str = typer.Option(
        ..., "--url", help="Admin URL: postgresql://USER:PASSWORD@HOST:PORT/postgres."
    ),
    password_stdin: bool = typer.Option(
        False, "--password-stdin", help="Read the password from stdin (not in the URL)."
    ),
    capacity: int | None = typer.Option(
        None, "--capacity", min=0, help="Tenants it may hold (default: no limit)."
    ),
    label: list[str] = typer.Option([], "--label", help="k=v, repeatable."),
    templates: bool = typer.Option(
        True, "--templates/--no-templates", help="Build the current templates there."
    ),
    as_json: bool = JSON,
) -> None:
    """Register a server, after checking it: reachable, PostgreSQL 15-18, CREATEDB and
    CREATEROLE; then build the local host's current templates there."""
    from monk.service import hosts

    def added(view: hosts.HostView) -> None:
        if not as_json:
            console.print(
                f"added host {escape(view.name)} (PostgreSQL {escape(view.server_version or '?')})"
            )

    password = sys.stdin.readline().rstrip("\n") if password_stdin else None
    # The host stands whatever its builds do: a failed one says why in 'template list --host'.
    view, received = hosts.add_with_templates(
        state().tenants,
        name,
        url,
        password=password,
        capacity=capacity,
        labels=label,
        templates=templates,
        on_added=added,
    )
    if as_json:
        print_json(view.as_dict() | {"templates": [a.as_dict() for a in received]})
        return
    for a in received:
        if a.result is not None:
            b = a.result.build
            console.print(f"  built template {escape(b.key)} {b.version} ({b.duration_ms} ms)")
        elif a.error is not None:
            err_console.print(f"  [red]template build failed[/red]: {escape(str(a.error))}")


@app.command("list")
def list_(as_json: bool = JSON) -> None:
    """Every host with its state, tenants against capacity, and its last check."""
    from monk.service import hosts

    views = hosts.list_hosts(state().tenants)
    if as_json:
        print_json([v.as_dict() for v in views])
        return
    rows: list[dict[str, Any]] = []
    for v in views:
        d = v.as_dict()
        last = d["last_check"]
        d["tenants"] = f"{v.tenants}/{v.capacity}" if v.capacity is not None else v.tenants
        d["labels"] = _labels(v.labels)
        d["last_check"] = (
            None if last["at"] is None else ("ok" if last["ok"] else f"failed: {last['error']}")
        )
        rows.append(d)
    print_rows(rows, ["name", "state", "tenants", "server_version", "labels", "url", "last_check"])


@app.command()
def show(name: str = typer.Argument(...), as_json: bool = JSON) -> None:
    """One host."""
    from monk.service import hosts

    _show(hosts.get(state().tenants, name), as_json)


@app.command()
def check(name: str = typer.Argument(...), as_json: bool = JSON) -> None:
    """Connect (within MONK_CONNECT_TIMEOUT), measure latency, count tenants; exit 1 if the
    host is unreachable or has problems."""
    from monk.service import hosts

    result = hosts.check(state().tenants, name)
    if as_json:
        print_json(result.as_dict())
    else:
        data = result.as_dict()
        data["problems"] = "; ".join(data["problems"]) or None
        print_mapping(data)
    if not result.ok:
        raise typer.Exit(PROBLEMS_FOUND)


@app.command()
def drain(
    name: str = typer.Argument(...),
    parallel: int = typer.Option(2, "--parallel", min=1, max=32, help="Moves at once."),
    move: bool = typer.Option(
        True, "--move/--no-move", help="Move its tenants off (--no-move: only mark it)."
    ),
    as_json: bool = JSON,
) -> None:
    """Mark a host draining (placement puts no new tenant there) and move every tenant off it,
    each where placement puts it; exit 1 if any stays."""
    from monk.service import hosts, moves

    if not move:
        _show(hosts.set_state(state().tenants, name, "draining"), as_json)
        return
    with _bar(f"draining {name}") as progress:
        result = moves.drain(state().tenants, name, parallel=parallel, progress=progress)
    view = hosts.get(state().tenants, name)
    if as_json:
        print_json(view.as_dict() | {"moved": result.moved, "failed": result.failed})
    else:
        _show(view, False)
        for m in result.moved:
            console.print(
                f"moved {escape(m['tenant'])} to {escape(m['to'])} (downtime {m['downtime_ms']} ms)"
            )
        for f in result.failed:
            err_console.print(f"[red]not moved[/red] {escape(f['tenant'])}: {escape(f['error'])}")
        console.print(f"{len(result.moved)} moved, {len(result.failed)} not moved")
    if not result.ok:
        raise typer.Exit(PROBLEMS_FOUND)


@contextmanager
def _bar(label: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr (terminals only); yields the ``(done, total)`` callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(
        TextColumn(escape(label)),
        BarColumn(),
        MofNCompleteColumn(),
        console=err_console,
        transient=True,
        disable=not err_console.is_terminal,
    ) as bar:
        task = bar.add_task(label, total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield progress


@app.command()
def undrain(name: str = typer.Argument(...), as_json: bool = JSON) -> None:
    """Mark a draining host active again."""
    from monk.service import hosts

    _show(hosts.set_state(state().tenants, name, "active"), as_json)


@app.command("set")
def set_(
    name: str = typer.Argument(...),
    capacity: int | None = typer.Option(None, "--capacity", min=0, help="Tenants it may hold."),
    unlimited: bool = typer.Option(False, "--unlimited", help="No capacity limit."),
    label: list[str] | None = typer.Option(
        None, "--label", help="k=v, repeatable: replaces every label."
    ),
    no_labels: bool = typer.Option(False, "--no-labels", help="Remove every label."),
    as_json: bool = JSON,
) -> None:
    """Change a host's capacity or labels (the local host's too)."""
    from monk.service import hosts

    labels: list[str] | None = [] if no_labels else (label or None)
    view = hosts.update(
        state().tenants, name, capacity=capacity, unlimited=unlimited, labels=labels
    )
    _show(view, as_json)


@app.command()
def remove(name: str = typer.Argument(...), as_json: bool = JSON) -> None:
    """Unregister a host that holds no live tenant, and forget its password."""
    from monk.service import hosts

    view = hosts.remove(state().tenants, name)
    if as_json:
        print_json(view.as_dict())
    else:
        console.print(f"removed host {escape(view.name)}")
