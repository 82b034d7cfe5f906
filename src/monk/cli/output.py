"""Rendering for the CLI: rich tables for people, JSON for scripts, one-line errors."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from monk.errors import MonkError

console = Console()
err_console = Console(stderr=True)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str, sort_keys=False) + "\n")


def print_mapping(data: Mapping[str, Any], *, title: str | None = None) -> None:
    table = Table(title=title, show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    # Folded, never cut with "…": a narrow terminal or a pipe (80 columns) loses nothing.
    table.add_column(overflow="fold")
    for key, value in data.items():
        table.add_row(str(key), "" if value is None else str(value))
    console.print(table)


def print_rows(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str], *, title: str | None = None
) -> None:
    table = Table(title=title)
    for column in columns:
        # A build version (16 hex) folded in two reads as two values: kept whole.
        table.add_column(column, overflow="fold", no_wrap=column == "version")
    for row in rows:
        table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in columns))
    console.print(table)


def print_whole(label: str, value: str) -> None:
    """A secret or URL on a line of its own, written past rich: never wrapped, folded or cut at
    any terminal width, so it can be copied as it is."""
    console.file.flush()
    sys.stdout.write(f"{label} {value}\n")
    sys.stdout.flush()


def print_error(err: MonkError) -> None:
    # One line (plus a log tail where the error carries one), never a traceback.
    err_console.print(
        f"[bold red]error[/] [dim]{err.code}[/]: {escape(err.message)}",
        highlight=False,
        soft_wrap=True,
    )
