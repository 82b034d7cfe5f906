"""``monk events …``: the tenant events observers receive (and the audit trail they leave)."""

from __future__ import annotations

import typer

from monk.cli.context import state
from monk.cli.output import console, print_json, print_rows
from monk.errors import OperationFailed

app = typer.Typer(
    help="Tenant events: what observers (MONK_HOOKS) receive, delivered or pending.",
    no_args_is_help=True,
)


@app.command("list")
def list_(
    pending: bool = typer.Option(False, "--pending", help="Only events not delivered yet."),
    limit: int = typer.Option(50, "--limit", min=1, max=10_000, help="How many, newest first."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """The newest tenant events, with their delivery state."""
    from monk.service import operations

    found = operations.list_events(state().tenants, pending=pending, limit=limit)
    rows = [e.as_dict() for e in found]
    if as_json:
        print_json(rows)
        return
    print_rows(
        [
            {
                "seq": r["seq"],
                "type": r["type"],
                "tenant": r["tenant"].get("name"),
                "created": r["created_at"][:19],
                "delivered": (r["delivered_at"] or "")[:19],
                "attempts": r["attempts"],
                "last error": r["last_error"] or "",
            }
            for r in rows
        ],
        ["seq", "type", "tenant", "created", "delivered", "attempts", "last error"],
    )


@app.command()
def deliver(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """One delivery pass over the due events (monk serve does this every second); exit 1 if
    any delivery failed (it is retried later with backoff)."""
    from monk.service import operations

    report = operations.deliver_events(state().tenants, limit=1000)
    if as_json:
        print_json(
            {"delivered": report.delivered, "failed": report.failed, "errors": report.errors}
        )
    else:
        console.print(f"delivered {report.delivered}, failed {report.failed}")
    if report.failed:
        raise OperationFailed(
            f"{report.failed} event(s) not delivered: {'; '.join(report.errors)}", step="deliver"
        )
