"""monk's server-side functions as the system database defines them (migrations), read so that
they can be installed on the hosts of the fleet (``admin.install_functions``): one definition of
each step, wherever it runs."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import psycopg

Conn = psycopg.Connection[Any]


def definitions(conn: Conn, names: Sequence[str]) -> list[tuple[str, str]]:
    """(name, ``CREATE OR REPLACE FUNCTION`` text) of each of ``names``, in that order, as
    the system database has them (qualified with its schema, their ``search_path`` set)."""
    rows = conn.execute(
        "SELECT n, pg_get_functiondef(to_regproc(n)) FROM unnest(%s::text[]) WITH ORDINALITY"
        " AS f(n, i) ORDER BY i",
        (list(names),),
    ).fetchall()
    missing = [str(n) for n, d in rows if d is None]
    if missing:
        raise LookupError(f"the system database lacks function(s) {', '.join(missing)}")
    return [(str(n), str(d)) for n, d in rows]


def version(definitions: Sequence[tuple[str, str]]) -> str:
    """A short hash of the definitions: a host whose installed version differs gets them again."""
    digest = hashlib.sha256("\n".join(d for _, d in definitions).encode()).hexdigest()
    return digest[:16]
