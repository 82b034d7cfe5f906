"""Bulk seed files loaded into a template database with COPY, streamed in chunks.

A template may carry hundreds of MB of demo data (``seed/<table>.csv`` or ``.jsonl``): read
and sent 1 MB at a time through ``cursor.copy``, so memory stays bounded whatever the size,
and reported as it goes. The rows meet the table's types and constraints (PostgreSQL checks
them); they are not run through the JSON Schema validator row by row, which is what would make
a large seed slow.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from monk.errors import InvalidTemplateSource

Conn = psycopg.Connection[Any]
Progress = Callable[[int, int], None]
"""(bytes sent, bytes in the file)"""

CHUNK = 1 << 20
_LINES_TABLE = "monk_seed_lines"


def load(db: Conn, table: str, path: Path, progress: Progress) -> int:
    """COPY ``path`` into ``table`` (a ``.csv`` with a header row, or ``.jsonl``), in the
    caller's transaction; the rows loaded. No statement timeout for it: a seed of hundreds of
    MB takes what it takes (the build's other statements keep monk's timeout)."""
    db.execute("SET LOCAL statement_timeout = 0")
    if path.suffix == ".csv":
        return _load_csv(db, table, path, progress)
    return _load_jsonl(db, table, path, progress)


def _columns(path: Path, names: list[str]) -> list[str]:
    if not names or any(not n for n in names) or len(set(names)) != len(names):
        raise InvalidTemplateSource(
            f"{path}: the first row must name each column once (e.g. name,email)",
            file=f"seed/{path.name}",
        )
    return names


def _stream(copy: psycopg.Copy, f: Any, total: int, sent: int, progress: Progress) -> None:
    while chunk := f.read(CHUNK):
        copy.write(chunk)
        sent += len(chunk)
        progress(sent, total)


def _load_csv(db: Conn, table: str, path: Path, progress: Progress) -> int:
    total = path.stat().st_size
    with path.open("rb") as f:
        header = f.readline()
        names = next(csv.reader([header.decode("utf-8-sig").strip("\r\n")]), [])
        columns = _columns(path, [n.strip() for n in names])
        query = sql.SQL("COPY {} ({}) FROM STDIN WITH (FORMAT csv)").format(
            sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns))
        )
        with db.cursor() as cur:
            with cur.copy(query) as copy:
                _stream(copy, f, total, len(header), progress)
            return max(cur.rowcount, 0)


def _load_jsonl(db: Conn, table: str, path: Path, progress: Progress) -> int:
    """The lines go, as they are, into a temporary one-column table (CSV with a quote and a
    delimiter no JSON text holds: each line is one value), then into the table in one
    INSERT … SELECT that maps each object's keys to the columns the first line names."""
    total = path.stat().st_size
    with path.open("rb") as f:
        first = f.readline()
        try:
            keys = list(json.loads(first))
        except (ValueError, TypeError):
            raise InvalidTemplateSource(
                f"{path}: line 1 is not a JSON object", file=f"seed/{path.name}"
            ) from None
        columns = _columns(path, keys)
        f.seek(0)
        db.execute(
            sql.SQL("CREATE TEMPORARY TABLE {} (doc jsonb) ON COMMIT DROP").format(
                sql.Identifier(_LINES_TABLE)
            )
        )
        query = sql.SQL(
            "COPY {} (doc) FROM STDIN WITH (FORMAT csv, QUOTE E'\\x01', DELIMITER E'\\x02')"
        ).format(sql.Identifier(_LINES_TABLE))
        with db.cursor() as cur, cur.copy(query) as copy:
            _stream(copy, f, total, 0, progress)
    cols = sql.SQL(", ").join(map(sql.Identifier, columns))
    picked = sql.SQL(", ").join(sql.SQL("r.{}").format(sql.Identifier(c)) for c in columns)
    done = db.execute(
        sql.SQL(
            "INSERT INTO {table} ({cols}) SELECT {picked} FROM {lines} AS l,"
            " jsonb_populate_record(NULL::{table}, l.doc) AS r WHERE l.doc IS NOT NULL"
        ).format(
            table=sql.Identifier(table),
            cols=cols,
            picked=picked,
            lines=sql.Identifier(_LINES_TABLE),
        )
    )
    db.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(_LINES_TABLE)))
    return max(done.rowcount, 0)
