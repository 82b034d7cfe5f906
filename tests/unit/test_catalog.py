"""The catalog's canonical form, fingerprint and differences (pure, no database)."""

from __future__ import annotations

import json

from monk.core.catalog import Catalog, Column, Named, differences, meta_row


def _catalog(**changes: object) -> Catalog:
    parts: dict[str, object] = {
        "tables": ["account", "contact"],
        "columns": [
            Column("contact", "id", "uuid", True, "gen_random_uuid()"),
            Column("contact", "email", "text", False, None),
            Column("contact", "first_name", "character varying(50)", True, None),
            Column("account", "id", "uuid", True, "gen_random_uuid()"),
        ],
        "constraints": [
            Named("contact", "contact_pkey", "PRIMARY KEY (id)"),
            Named("contact", "contact_first_name_minlen", "CHECK (char_length(first_name) >= 1)"),
        ],
        "indexes": [Named("contact", "contact_email_idx", "CREATE INDEX … (email)")],
        "triggers": [Named("contact", "contact_touch", "CREATE TRIGGER …")],
        "schema_rows": [meta_row("contact", {"table_name": "contact", "field_count": 3})],
        "column_rows": [meta_row("contact.email", {"pg_type": "text", "is_required": False})],
    }
    parts.update(changes)
    return Catalog.of(**parts)  # type: ignore[arg-type]


def test_column_order_is_not_part_of_the_fingerprint() -> None:
    base = _catalog()
    # As ALTER TABLE … ADD COLUMN leaves them: the new column last, not in sorted order.
    appended = [c for c in base.columns if c.name != "email"] + [
        c for c in base.columns if c.name == "email"
    ]
    assert appended != list(base.columns)
    assert _catalog(columns=appended).fingerprint() == base.fingerprint()
    assert len(base.fingerprint()) == 64


def test_the_stored_form_comes_back_equal() -> None:
    base = _catalog()
    stored = json.loads(json.dumps(base.as_dict()))
    again = Catalog.from_dict(stored)
    assert again == base
    assert again.fingerprint() == base.fingerprint()
    assert differences(base, again) == []


def test_each_kind_of_change_is_named() -> None:
    base = _catalog()
    changed = _catalog(
        columns=[
            *base.columns,
            Column("contact", "note", "text", False, None),
        ],
        indexes=[],
        constraints=[
            Named("contact", "contact_pkey", "PRIMARY KEY (id)"),
            Named("contact", "contact_first_name_minlen", "CHECK (char_length(first_name) >= 2)"),
        ],
    )
    found = [str(d) for d in differences(base, changed)]
    assert found[0] == "column contact.note: added (text)"
    assert found[1].startswith("constraint contact_first_name_minlen: definition differs")
    assert found[2].startswith("index contact_email_idx: missing")
    assert len(found) == 3
    assert base.fingerprint() != changed.fingerprint()


def test_column_type_nullability_default_and_metadata() -> None:
    base = _catalog()
    cols = [
        Column("contact", "email", "character varying(10)", True, "'x'::text")
        if c.name == "email"
        else c
        for c in base.columns
    ]
    changed = _catalog(
        columns=cols,
        schema_rows=[meta_row("contact", {"table_name": "contact", "field_count": 4})],
        column_rows=[],
    )
    found = [str(d) for d in differences(base, changed)]
    assert found == [
        "column contact.email: type differs (text → character varying(10))",
        "column contact.email: nullability differs (NOT NULL added)",
        "column contact.email: default differs (none → 'x'::text)",
        "schemas row contact: differs (field_count)",
        "columns row contact.email: missing",
    ]


def test_a_missing_table_is_named_once() -> None:
    base = _catalog()
    gone = _catalog(
        tables=["account"],
        columns=[c for c in base.columns if c.table != "contact"],
        constraints=[],
        indexes=[],
        triggers=[],
    )
    assert [str(d) for d in differences(base, gone)] == ["table contact: missing"]
    assert [str(d) for d in differences(gone, base)] == ["table contact: added"]
