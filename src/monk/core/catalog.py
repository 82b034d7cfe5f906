"""The catalog of a template or tenant database, its fingerprint, and the differences between two
(pure: the adapter ``monk.adapters.postgres.catalog`` reads it).

A catalog is what the schema of ``public`` is made of, as PostgreSQL prints it: tables, columns
(type as ``format_type`` prints it, NOT NULL, default expression), constraints
(``pg_get_constraintdef``), indexes (``pg_get_indexdef``) and triggers (``pg_get_triggerdef``),
each by name; plus monk's own metadata, the ``schemas`` and ``columns`` rows without their ids
and timestamps. Column order is not part of it: ``ALTER TABLE … ADD COLUMN`` appends, so a tenant
upgraded to a build has its columns in another order than a fresh clone of that build, and the
same schema.

The canonical form is JSON with every list sorted and every key sorted; the fingerprint is the
sha256 of it. Two databases with the same fingerprint have the same schema.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, order=True)
class Column:
    table: str
    name: str
    type: str
    not_null: bool
    default: str | None


@dataclass(frozen=True, order=True)
class Named:
    """A constraint, index or trigger: its table, name and definition as the server prints it."""

    table: str
    name: str
    definition: str


@dataclass(frozen=True, order=True)
class MetaRow:
    """A ``schemas`` or ``columns`` row: its key, and each other field as canonical JSON."""

    key: str
    fields: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Catalog:
    tables: tuple[str, ...]
    columns: tuple[Column, ...]
    constraints: tuple[Named, ...]
    indexes: tuple[Named, ...]
    triggers: tuple[Named, ...]
    schema_rows: tuple[MetaRow, ...]
    column_rows: tuple[MetaRow, ...]

    @classmethod
    def of(
        cls,
        *,
        tables: Iterable[str],
        columns: Iterable[Column],
        constraints: Iterable[Named] = (),
        indexes: Iterable[Named] = (),
        triggers: Iterable[Named] = (),
        schema_rows: Iterable[MetaRow] = (),
        column_rows: Iterable[MetaRow] = (),
    ) -> Catalog:
        """A catalog in canonical order, whatever order the parts came in."""
        return cls(
            tables=tuple(sorted(set(tables))),
            columns=tuple(sorted(columns)),
            constraints=tuple(sorted(constraints)),
            indexes=tuple(sorted(indexes)),
            triggers=tuple(sorted(triggers)),
            schema_rows=tuple(sorted(schema_rows)),
            column_rows=tuple(sorted(column_rows)),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "tables": list(self.tables),
            "columns": [
                {"table": c.table, "name": c.name, "type": c.type, "not_null": c.not_null}
                | {"default": c.default}
                for c in self.columns
            ],
            "constraints": [_named(n) for n in self.constraints],
            "indexes": [_named(n) for n in self.indexes],
            "triggers": [_named(n) for n in self.triggers],
            "schema_rows": [{"key": r.key, "fields": dict(r.fields)} for r in self.schema_rows],
            "column_rows": [{"key": r.key, "fields": dict(r.fields)} for r in self.column_rows],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Catalog:
        """The catalog ``as_dict`` gave (as stored in the registry)."""
        return cls.of(
            tables=data["tables"],
            columns=(
                Column(c["table"], c["name"], c["type"], bool(c["not_null"]), c["default"])
                for c in data["columns"]
            ),
            constraints=(Named(**n) for n in data["constraints"]),
            indexes=(Named(**n) for n in data["indexes"]),
            triggers=(Named(**n) for n in data["triggers"]),
            schema_rows=(_stored_row(r) for r in data["schema_rows"]),
            column_rows=(_stored_row(r) for r in data["column_rows"]),
        )

    def canonical(self) -> str:
        """Sorted JSON: equal for equal schemas, whatever the column order."""
        return json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))

    def fingerprint(self) -> str:
        return hashlib.sha256(self.canonical().encode()).hexdigest()


def meta_row(key: str, fields: Mapping[str, Any]) -> MetaRow:
    """A metadata row from its fields (any JSON values), each kept as canonical JSON text."""
    return MetaRow(
        key,
        tuple(
            sorted(
                (name, json.dumps(value, sort_keys=True, separators=(",", ":")))
                for name, value in fields.items()
            )
        ),
    )


def _stored_row(data: Mapping[str, Any]) -> MetaRow:
    """A row as ``as_dict`` gave it: its fields are already canonical JSON text."""
    return MetaRow(
        str(data["key"]), tuple(sorted((str(k), str(v)) for k, v in data["fields"].items()))
    )


def _named(n: Named) -> dict[str, str]:
    return {"table": n.table, "name": n.name, "definition": n.definition}


@dataclass(frozen=True)
class Difference:
    """One way a database differs from the catalog it should have."""

    kind: str  # table | column | constraint | index | trigger | schemas row | columns row
    subject: str  # the object's name (``table.column`` for a column)
    change: str  # added | missing | differs
    detail: str = ""

    def __str__(self) -> str:
        text = f"{self.kind} {self.subject}: {self.change}"
        return f"{text} ({self.detail})" if self.detail else text

    def as_dict(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "subject": self.subject,
            "change": self.change,
            "detail": self.detail,
            "text": str(self),
        }


def differences(expected: Catalog, actual: Catalog) -> list[Difference]:
    """What ``actual`` has that ``expected`` has not (added), lacks (missing), or has otherwise
    (differs), in a stable order: tables, columns, constraints, indexes, triggers, metadata.
    The objects of a table that is added or missing are not listed again one by one."""
    out: list[Difference] = []
    want_tables, have_tables = set(expected.tables), set(actual.tables)
    out += [Difference("table", t, "missing") for t in sorted(want_tables - have_tables)]
    out += [Difference("table", t, "added") for t in sorted(have_tables - want_tables)]
    odd_tables = want_tables ^ have_tables

    want_cols = {(c.table, c.name): c for c in expected.columns if c.table not in odd_tables}
    have_cols = {(c.table, c.name): c for c in actual.columns if c.table not in odd_tables}
    for key in sorted(want_cols.keys() | have_cols.keys()):
        want, have = want_cols.get(key), have_cols.get(key)
        subject = f"{key[0]}.{key[1]}"
        if have is None:
            assert want is not None
            out.append(Difference("column", subject, "missing", want.type))
        elif want is None:
            out.append(Difference("column", subject, "added", have.type))
        else:
            out += _column_changes(subject, want, have)

    for kind, want_named, have_named in (
        ("constraint", expected.constraints, actual.constraints),
        ("index", expected.indexes, actual.indexes),
        ("trigger", expected.triggers, actual.triggers),
    ):
        out += _named_changes(kind, want_named, have_named, odd_tables)

    out += _row_changes("schemas row", expected.schema_rows, actual.schema_rows)
    out += _row_changes("columns row", expected.column_rows, actual.column_rows)
    return out


def _column_changes(subject: str, want: Column, have: Column) -> list[Difference]:
    out = []
    if want.type != have.type:
        out.append(Difference("column", subject, "type differs", f"{want.type} → {have.type}"))
    if want.not_null != have.not_null:
        detail = "NOT NULL dropped" if want.not_null else "NOT NULL added"
        out.append(Difference("column", subject, "nullability differs", detail))
    if want.default != have.default:
        out.append(
            Difference(
                "column",
                subject,
                "default differs",
                f"{want.default or 'none'} → {have.default or 'none'}",
            )
        )
    return out


def _named_changes(
    kind: str, expected: Iterable[Named], actual: Iterable[Named], odd_tables: set[str]
) -> list[Difference]:
    want = {n.name: n for n in expected if n.table not in odd_tables}
    have = {n.name: n for n in actual if n.table not in odd_tables}
    out = []
    for name in sorted(want.keys() | have.keys()):
        w, h = want.get(name), have.get(name)
        if h is None:
            assert w is not None
            out.append(Difference(kind, name, "missing", f"on {w.table}: {w.definition}"))
        elif w is None:
            out.append(Difference(kind, name, "added", f"on {h.table}: {h.definition}"))
        elif (w.table, w.definition) != (h.table, h.definition):
            out.append(
                Difference(
                    kind,
                    name,
                    "definition differs",
                    f"{w.table}: {w.definition} → {h.table}: {h.definition}",
                )
            )
    return out


def _row_changes(
    kind: str, expected: Iterable[MetaRow], actual: Iterable[MetaRow]
) -> list[Difference]:
    want = {r.key: dict(r.fields) for r in expected}
    have = {r.key: dict(r.fields) for r in actual}
    out = []
    for key in sorted(want.keys() | have.keys()):
        w, h = want.get(key), have.get(key)
        if h is None:
            out.append(Difference(kind, key, "missing"))
        elif w is None:
            out.append(Difference(kind, key, "added"))
        elif w != h:
            fields = sorted(name for name in w.keys() | h.keys() if w.get(name) != h.get(name))
            out.append(Difference(kind, key, "differs", ", ".join(fields)))
    return out
