"""``monk tenant …``: the tenant lifecycle from the command line (``--json`` prints the same
objects as the HTTP API)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape

from monk.cli.context import state
from monk.cli.exits import PROBLEMS_FOUND
from monk.cli.output import (
    console,
    err_console,
    print_json,
    print_mapping,
    print_rows,
    print_whole,
)
from monk.core.lifecycle import TenantStatus
from monk.core.tenant_names import MAX_TENANT_CONNECTION_LIMIT
from monk.errors import MonkError, TemplateNotBuilt

# The service is imported by the commands that run it (fast start-up, see cli/main.py).
if TYPE_CHECKING:
    from monk.service.tenants import TenantService, TenantView

app = typer.Typer(help="Tenants: one PostgreSQL database each.", no_args_is_help=True)

JSON = typer.Option(False, "--json", help="Print JSON.")


def _show(view: TenantView, as_json: bool) -> None:
    data = view.as_dict()
    if as_json:
        print_json(data)
        return
    archive = data.pop("archive", None)
    url = data.pop("connection_url", None)
    note = data.pop("credentials_note", None)
    root_user = data.pop("root_user", None)
    print_mapping(data)
    if archive:
        print_mapping(archive, title="archive")
    if url is not None:
        print_whole("connection_url", url)
        console.print("[yellow]The password in connection_url is shown once.[/]")
    if root_user is not None:
        print_whole("root_user", root_user["username"])
        print_whole("root_password", root_user["password"])
        console.print("[yellow]The root user's password is shown once.[/]")
    if note is not None:
        console.print(f"[yellow]{escape(note)}[/]", soft_wrap=True)


@app.command()
def create(
    name: str | None = typer.Argument(None, help="Tenant name, e.g. 'Acme Corp'."),
    template: str = typer.Option("basic", "--template", "-t", help="Template key."),
    host: str | None = typer.Option(
        None, "--host", help="The host to place it on (default: placement chooses)."
    ),
    placement: list[str] = typer.Option(
        [], "--placement", help="k=v: a label the host must have (repeatable)."
    ),
    idempotency_key: str | None = typer.Option(
        None, "--idempotency-key", help="Retries with the same key get the first result."
    ),
    from_file: Path | None = typer.Option(
        None, "--from", help="Provision every name in this file (one per line; # comments)."
    ),
    parallel: int = typer.Option(4, "--parallel", min=1, max=64, help="With --from."),
    connection_limit: int | None = typer.Option(
        None,
        "--connection-limit",
        min=1,
        max=MAX_TENANT_CONNECTION_LIMIT,
        help="CONNECTION LIMIT of the tenant's role (default: MONK_TENANT_CONNECTION_LIMIT).",
    ),
    root_password_stdin: bool = typer.Option(
        False,
        "--root-password-stdin",
        help="Read the root user's password from stdin (default: generated, shown once).",
    ),
    as_json: bool = JSON,
) -> None:
    """Provision a tenant: clone its database from the template's current build, and its
    first user, root."""
    if (name is None) == (from_file is None):
        raise typer.BadParameter("give a NAME or --from FILE")
    from monk.core.hosts import parse_labels

    labels = parse_labels(placement) or None
    if from_file is not None:
        _create_many(
            from_file,
            template=template,
            host=host,
            labels=labels,
            parallel=parallel,
            as_json=as_json,
        )
        return
    assert name is not None
    root_password = _read_password() if root_password_stdin else None
    svc = state().tenants
    provision = functools.partial(
        svc.provision,
        name,
        root_password=root_password,
        template=template,
        host=host,
        idempotency_key=idempotency_key,
        connection_limit=connection_limit,
        placement=labels,
    )
    try:
        view = provision()
    except TemplateNotBuilt:
        _build_first(svc, template)
        view = provision()
    _show(view, as_json)


def _build_first(svc: TenantService, template: str) -> None:
    """The CLI builds a template that has no build yet (an HTTP request never does), saying so
    on stderr."""
    err_console.print(f"building template {escape(template)} first …")
    svc.templates.build(template, recorded_anywhere=True)


def _create_many(
    path: Path,
    *,
    template: str,
    host: str | None,
    labels: dict[str, str] | None,
    parallel: int,
    as_json: bool,
) -> None:
    """Bulk provisioning with a progress bar and a summary; exit 1 if any name failed."""
    from concurrent.futures import ThreadPoolExecutor

    from rich.progress import MofNCompleteColumn, Progress

    from monk.service.tenants import TenantService

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise typer.BadParameter(f"cannot read {path}: {exc.strerror}") from None
    names = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    s = state()
    settings = s.settings.model_copy(update={"pool_size": max(parallel, s.settings.pool_size)})
    results: list[dict[str, Any]] = []
    with (
        TenantService(settings, s.target) as svc,
        Progress(
            *Progress.get_default_columns(),
            MofNCompleteColumn(),
            console=err_console,
            disable=as_json or not err_console.is_terminal,
        ) as progress,
    ):
        task = progress.add_task("provisioning", total=len(names))
        if names:
            try:
                if svc.templates.current_build(template) is None:
                    _build_first(svc, template)
            except MonkError as exc:  # each name then reports what is wrong
                err_console.print(f"[red]{exc.code}[/red]: {escape(str(exc))}")

        def one(raw: str) -> dict[str, Any]:
            try:
                out = svc.provision(raw, template=template, host=host, placement=labels).as_dict()
                return {
                    "name": raw,
                    "ok": True,
                    "database": out["database"],
                    "connection_url": out.get("connection_url"),
                    "root_password": (out.get("root_user") or {}).get("password"),
                }
            except MonkError as exc:
                return {"name": raw, "ok": False, "error": exc.message, "error_code": exc.code}
            finally:
                progress.advance(task)

        with ThreadPoolExecutor(parallel) as pool:
            results = list(pool.map(one, names))
    failed = [r for r in results if not r["ok"]]
    if as_json:
        print_json(
            {"succeeded": len(results) - len(failed), "failed": len(failed), "results": results}
        )
    else:
        print_rows(results, ["name", "ok", "database", "error"])
        for r in results:
            if r.get("connection_url"):
                print_whole(f"{r['name']}:", r["connection_url"])
            if r.get("root_password"):
                print_whole(f"{r['name']} root password:", r["root_password"])
        console.print(f"{len(results) - len(failed)} provisioned, {len(failed)} failed")
        if len(results) > len(failed):
            console.print("[yellow]The passwords in these URLs are shown once.[/]")
    if failed:
        raise typer.Exit(PROBLEMS_FOUND)


@app.command("list")
def list_(
    status: list[TenantStatus] = typer.Option(
        [], "--status", help="Only these statuses (repeatable)."
    ),
    template: str | None = typer.Option(None, "--template", help="Only this template."),
    include_trashed: bool = typer.Option(False, "--include-trashed"),
    include_deleted: bool = typer.Option(False, "--include-deleted"),
    limit: int = typer.Option(100, "--limit", min=1, max=10_000),
    offset: int = typer.Option(0, "--offset", min=0),
    as_json: bool = JSON,
) -> None:
    """List tenants (paged)."""
    svc = state().tenants
    tenants = svc.list(
        statuses=[s.value for s in status] or None,
        template=template,
        include_trashed=include_trashed,
        include_deleted=include_deleted,
        limit=limit,
        offset=offset,
    )
    rows = [svc.view(t).as_dict() for t in tenants]
    if as_json:
        print_json(rows)
    else:
        print_rows(
            rows, ["name", "database", "status", "template", "template_version", "created_at"]
        )


@app.command()
def show(
    name: str,
    include_deleted: bool = typer.Option(
        False, "--include-deleted", help="A purged tenant too (its latest registry row)."
    ),
    as_json: bool = JSON,
) -> None:
    """One tenant's registry record."""
    svc = state().tenants
    _show(svc.view(svc.get(name, include_deleted=include_deleted)), as_json)


@app.command()
def health(name: str, as_json: bool = JSON) -> None:
    """Check a tenant: registry row, database, connection, core tables, role, size."""
    from monk.service.health import tenant_health

    report = tenant_health(state().tenants, name)
    if as_json:
        print_json(report)
    else:
        checks = report.pop("checks")
        print_mapping(report)
        print_rows(checks, ["check", "ok", "detail"])
    if report["status"] == "error":
        raise typer.Exit(PROBLEMS_FOUND)


@app.command("connection-limit")
def connection_limit_(
    name: str,
    limit: int | None = typer.Argument(
        None,
        min=1,
        max=MAX_TENANT_CONNECTION_LIMIT,
        help="The role's own CONNECTION LIMIT; omit with --default.",
    ),
    default: bool = typer.Option(False, "--default", help="Back to MONK_TENANT_CONNECTION_LIMIT."),
    as_json: bool = JSON,
) -> None:
    """Set the CONNECTION LIMIT of a tenant's role (its own, or back to the default)."""
    if (limit is None) != default:
        raise typer.BadParameter("give a LIMIT or --default")
    _show(state().tenants.set_connection_limit(name, limit), as_json)


@app.command()
def disable(name: str, as_json: bool = JSON) -> None:
    """Close the database to new connections, end its sessions, make its role NOLOGIN."""
    _show(state().tenants.disable(name), as_json)


@app.command()
def enable(name: str, as_json: bool = JSON) -> None:
    """Reverse ``disable``."""
    _show(state().tenants.enable(name), as_json)


@app.command()
def delete(
    name: str,
    purge_: bool = typer.Option(False, "--purge", help="Drop the database (archived first)."),
    no_archive: bool = typer.Option(False, "--no-archive", help="With --purge: no archive."),
    forget: bool = typer.Option(False, "--forget", help="With --purge: remove the registry row."),
    no_wait: bool = typer.Option(
        False, "--no-wait", help="With --purge: leave the drop queued for the service."
    ),
    as_json: bool = JSON,
) -> None:
    """Soft-delete (restorable); with --purge, archive and drop it."""
    from monk.service import purge

    svc = state().tenants
    if not purge_:
        if no_archive or forget or no_wait:
            raise typer.BadParameter("--no-archive, --forget and --no-wait go with --purge")
        _show(svc.trash(name), as_json)
        return
    view, forgotten = purge.purge(
        svc, name, archive=not no_archive, forget=forget, wait=not no_wait
    )
    if forgotten and as_json:
        print_json(
            {"name": view.tenant.name, "database": view.tenant.database, "status": "forgotten"}
        )
        return
    _show(view, as_json)


@app.command()
def restore(
    name: str,
    host: str | None = typer.Option(
        None, "--host", help="A purged tenant: the host to restore it on (default: placement)."
    ),
    as_json: bool = JSON,
) -> None:
    """A trashed tenant back to active; a purged one back from its archive."""
    _show(state().tenants.restore(name, host=host), as_json)


@app.command()
def archive(name: str, as_json: bool = JSON) -> None:
    """pg_dump the tenant (custom format) into the archive folder; recorded in the registry."""
    from monk.service import purge

    _show(purge.archive(state().tenants, name), as_json)


@app.command()
def move(
    name: str,
    to: str = typer.Option(..., "--to", help="The host to move it to ('monk host list')."),
    jobs: int | None = typer.Option(
        None, "--jobs", min=1, max=16, help="pg_dump/pg_restore -j (default: by size)."
    ),
    as_json: bool = JSON,
) -> None:
    """Move a tenant to another host: freeze, copy, verify, switch, unfreeze; its credentials
    keep working (else new ones are printed, once)."""
    from monk.service import moves

    result = moves.move(state().tenants, name, to, jobs=jobs)
    if as_json:
        print_json(result.as_dict())
        return
    r = result.result
    console.print(
        f"moved {escape(result.view.tenant.name)} from {escape(result.from_host)} to "
        f"{escape(result.to_host)}: downtime {r.get('downtime_ms')} ms, total {r.get('total_ms')}"
        f" ms, {r.get('tables')} tables, {r.get('rows')} rows verified"
    )
    if r.get("credentials") == "rotated":
        console.print(
            "[yellow]The source's admin cannot read pg_authid (not a superuser): the tenant's "
            "password was rotated.[/]"
        )
        _show(result.view, False)


@app.command()
def credentials(
    name: str,
    rotate: bool = typer.Option(False, "--rotate", help="Set a new password and print it."),
    as_json: bool = JSON,
) -> None:
    """Tenant connection details; --rotate issues a new password (shown once)."""
    svc = state().tenants
    view = svc.rotate_credentials(name) if rotate else svc.view(svc.get(name))
    _show(view, as_json)


@app.command()
def drift(name: str, as_json: bool = JSON) -> None:
    """Compare the tenant's schema with the build it claims to be at; exit 1 when it drifted
    (the result is kept: 'monk template status' and 'monk doctor' report it)."""
    from monk.service import drift as drift_service

    result = drift_service.tenant_drift(state().tenants, name)
    if as_json:
        print_json(result.as_dict())
    else:
        print_drift(result)
    if result.drifted:
        raise typer.Exit(PROBLEMS_FOUND)


def print_drift(result: Any) -> None:
    """One tenant's drift check, for people (``result``: a ``drift.DriftResult``)."""
    build = f"{result.template_key} {result.template_version} (per its {result.claimed_by})"
    if result.drifted is None:
        console.print(f"{escape(result.name)}: {escape(result.error or 'not checked')}")
    elif not result.drifted:
        console.print(f"{escape(result.name)}: no drift from {escape(build)}")
    else:
        console.print(
            f"{escape(result.name)}: {len(result.differences)} difference(s) from {escape(build)}"
        )
        for difference in result.differences:
            console.print(f"  - {escape(str(difference))}", soft_wrap=True)


def _read_password() -> str:
    """A password from stdin (one line; never an argument, which other users see in ps)."""
    import sys

    line = sys.stdin.readline().rstrip("\r\n")
    if not line:
        raise typer.BadParameter("no password on stdin")
    return line


user_app = typer.Typer(help="A tenant's users (who log in with POST /auth/login).")
app.add_typer(user_app, name="user")

PASSWORD_STDIN = typer.Option(
    False, "--password-stdin", help="Read the password from stdin (default: generated, shown once)."
)


def _show_user(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(data)
        return
    password = data.pop("password", None)
    print_mapping(data)
    if password is not None:
        print_whole("password", password)
        console.print("[yellow]The password is shown once.[/]")


@user_app.command("add")
def user_add(
    tenant: str,
    user: str,
    access: str = typer.Option("read", "--access", help="root, full, edit, read or deny."),
    password_stdin: bool = PASSWORD_STDIN,
    as_json: bool = JSON,
) -> None:
    """Add a user to the tenant (password from stdin, or generated and shown once)."""
    from monk.service import tenant_auth

    password = _read_password() if password_stdin else None
    view = tenant_auth.add_user(state().tenants, tenant, user, access, password)
    _show_user(view.as_dict(), as_json)


@user_app.command("list")
def user_list(tenant: str, as_json: bool = JSON) -> None:
    """The tenant's users (never their passwords)."""
    from monk.service import tenant_auth

    rows = [u.as_dict() for u in tenant_auth.list_users(state().tenants, tenant)]
    if as_json:
        print_json(rows)
    else:
        print_rows(rows, ["username", "access", "id", "created_at"])


@user_app.command("passwd")
def user_passwd(
    tenant: str, user: str, password_stdin: bool = PASSWORD_STDIN, as_json: bool = JSON
) -> None:
    """Set a user's password (from stdin, or generated and shown once)."""
    from monk.service import tenant_auth

    password = _read_password() if password_stdin else None
    view = tenant_auth.set_password(state().tenants, tenant, user, password)
    _show_user(view.as_dict(), as_json)


@user_app.command("remove")
def user_remove(tenant: str, user: str, as_json: bool = JSON) -> None:
    """Remove a user from the tenant (their tokens stop refreshing)."""
    from monk.service import tenant_auth

    tenant_auth.remove_user(state().tenants, tenant, user)
    if as_json:
        print_json({"username": user, "status": "removed"})
    else:
        console.print(f"removed user {escape(user)}")
