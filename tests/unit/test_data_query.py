"""The data API's pure rules (monk.core.data_query), without a database: access levels, where
JSON to SQL (every operator, and hostile input: unknown names, wrong types, deep nesting), order,
select, limits and record validation naming the record and field."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg import sql

from monk.core import data_query as q
from monk.core.data_query import Action, Field, Model
from monk.errors import AccessDenied, AccessInsufficient, InvalidQuery, RecordInvalid

DEFINITION: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "kind"],
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 50},
        "kind": {"type": "string", "enum": ["a", "b"], "default": "a"},
        "count": {"type": "integer", "minimum": 0},
        "price": {"type": "number"},
        "ok": {"type": "boolean"},
        "owner": {"type": "string", "format": "uuid"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "gone": {"type": "string"},  # dropped by a migration: not in the columns rows
    },
}
MODEL = Model.of(
    "item",
    "item",
    DEFINITION,
    [
        Field("name", "character varying(50)", True),
        Field("kind", "text", True),
        Field("count", "bigint"),
        Field("price", "numeric"),
        Field("ok", "boolean"),
        Field("owner", "uuid"),
        Field("tags", "jsonb"),
        Field("added", "text"),  # added by a migration: not in the definition
        Field("id", "uuid", True),  # system columns in the columns rows are not fields
    ],
)


def render(where: Any) -> tuple[str, list[Any]]:
    condition, params = q.compile_where(MODEL, where)
    return condition.as_string(None), params


# --------------------------------------------------------------------------- access


@pytest.mark.parametrize(
    ("access", "allowed"),
    [
        ("read", {Action.READ}),
        ("edit", {Action.READ, Action.WRITE}),
        ("full", {Action.READ, Action.WRITE, Action.DELETE}),
        ("root", set(Action)),
    ],
)
def test_access_levels(access: str, allowed: set[Action]) -> None:
    for action in Action:
        if action in allowed:
            q.require(access, action)
        else:
            with pytest.raises(AccessInsufficient):
                q.require(access, action)


@pytest.mark.parametrize("access", ["deny", "", "admin", "ROOT"])
def test_deny_and_unknown_levels_get_nothing(access: str) -> None:
    for action in Action:
        with pytest.raises(AccessDenied):
            q.require(access, action)


# --------------------------------------------------------------------------- model


def test_fields_follow_the_columns_rows_and_system_columns_are_apart() -> None:
    assert "gone" not in MODEL.fields
    assert "added" in MODEL.fields
    assert "id" not in MODEL.fields
    assert MODEL.queryable()[0] == "id"
    schema = MODEL.record_schema()
    assert "gone" not in schema["properties"]
    assert schema["properties"]["added"] == {"type": "string"}
    described = MODEL.describe()
    assert described["properties"]["created_at"]["readOnly"] is True


# --------------------------------------------------------------------------- where


@pytest.mark.parametrize(
    ("where", "text", "params"),
    [
        (None, "TRUE", []),
        ({}, "TRUE", []),
        ({"name": "x"}, '("name" = %s)', ["x"]),
        ({"name": None}, '("name" IS NULL)', []),
        ({"name": {"$eq": "x"}}, '("name" = %s)', ["x"]),
        ({"name": {"$ne": "x"}}, '("name" IS DISTINCT FROM %s)', ["x"]),
        ({"name": {"$ne": None}}, '("name" IS NOT NULL)', []),
        ({"count": {"$gt": 1, "$lte": 5}}, '("count" > %s AND "count" <= %s)', [1, 5]),
        ({"count": {"$gte": 1}}, '("count" >= %s)', [1]),
        ({"count": {"$lt": 1}}, '("count" < %s)', [1]),
        ({"kind": {"$in": ["a", "b"]}}, '("kind" IN (%s, %s))', ["a", "b"]),
        ({"kind": {"$in": []}}, "(FALSE)", []),
        ({"kind": {"$nin": ["a"]}}, '(("kind" IS NULL OR "kind" NOT IN (%s)))', ["a"]),
        ({"name": {"$like": "a%"}}, '("name" LIKE %s)', ["a%"]),
        ({"name": {"$ilike": "a%"}}, '("name" ILIKE %s)', ["a%"]),
        ({"owner": {"$null": True}}, '("owner" IS NULL)', []),
        ({"owner": {"$null": False}}, '("owner" IS NOT NULL)', []),
        ({"ok": True, "count": 2}, '("ok" = %s AND "count" = %s)', [True, 2]),
        (
            {"$or": [{"count": 1}, {"$and": [{"ok": False}, {"name": "n"}]}]},
            '((("count" = %s) OR ((("ok" = %s) AND ("name" = %s)))))',
            [1, False, "n"],
        ),
        ({"created_at": {"$gt": "2020-01-01"}}, '("created_at" > %s)', ["2020-01-01"]),
    ],
)
def test_where_operators(where: Any, text: str, params: list[Any]) -> None:
    assert render(where) == (text, params)


def test_a_float_becomes_an_exact_decimal() -> None:
    _text, params = render({"price": 0.1})
    assert str(params[0]) == "0.1"


@pytest.mark.parametrize(
    "where",
    [
        [],
        "name",
        {"nope": 1},
        {"Name": 1},
        {'name" OR 1=1 --': 1},
        {"password_hash": "x"},
        {"access_read": []},
        {"ctid": "(0,1)"},
        {"name": {"$regex": "."}},
        {"name": {"'; DROP TABLE item; --": 1}},
        {"name": {}},
        {"name": ["a"]},
        {"name": 1},
        {"count": "1"},
        {"count": True},
        {"count": 1.5},
        {"ok": "true"},
        {"owner": "not-a-uuid"},
        {"owner": 1},
        {"count": {"$like": "1%"}},
        {"name": {"$like": 1}},
        {"ok": {"$gt": True}},
        {"tags": {"$lt": 1}},
        {"count": {"$gt": None}},
        {"kind": {"$in": "a"}},
        {"kind": {"$in": [None]}},
        {"kind": {"$in": ["a"] * 1001}},
        {"owner": {"$null": "yes"}},
        {"$and": []},
        {"$or": {"name": "x"}},
        {"$not": {"name": "x"}},
        {"name": "nul\x00byte"},
    ],
)
def test_hostile_or_malformed_where_is_refused(where: Any) -> None:
    with pytest.raises(InvalidQuery):
        q.compile_where(MODEL, where)


def test_deep_or_wide_where_is_refused() -> None:
    deep: dict[str, Any] = {"name": "x"}
    for _ in range(q.MAX_WHERE_DEPTH + 1):
        deep = {"$and": [deep]}
    with pytest.raises(InvalidQuery, match="nested"):
        q.compile_where(MODEL, deep)
    wide = {"$or": [{"count": i} for i in range(q.MAX_WHERE_TERMS + 1)]}
    with pytest.raises(InvalidQuery, match="terms"):
        q.compile_where(MODEL, wide)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
_keys = st.sampled_from(
    ["name", "count", "owner", "$and", "$or", "$in", "$eq", "x", '"', "name;", ""]
) | st.text(max_size=10)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(_keys, _json, max_size=4))
def test_any_where_json_compiles_to_registered_identifiers_and_placeholders_or_is_refused(
    where: dict[str, Any],
) -> None:
    try:
        condition, params = q.compile_where(MODEL, where)
    except InvalidQuery:
        return
    text = condition.as_string(None)
    # Every quoted identifier is a registered field; every value went out as a parameter.
    for part in text.split('"')[1::2]:
        assert part in MODEL.queryable(), text
    assert text.count("%s") == len(params)
    for value in params:
        assert isinstance(value, str | int | float | bool) or value.__class__.__name__ in (
            "Decimal",
            "Jsonb",
        )


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30))
def test_order_and_select_accept_only_registered_fields(text: str) -> None:
    for parse in (q.compile_order, q.select_fields):
        try:
            out = parse(MODEL, text)
        except InvalidQuery:
            continue
        rendered = out.as_string(None) if isinstance(out, sql.Composable) else ",".join(out)
        names = rendered.split('"')[1::2] if isinstance(out, sql.Composable) else out
        assert all(n in MODEL.queryable() for n in names), (text, rendered)


# --------------------------------------------------------------------------- order, select, limit


def test_order_select_and_limit() -> None:
    assert q.compile_order(MODEL, None).as_string(None) == '"created_at", "id"'
    assert q.compile_order(MODEL, "name, -count,price desc").as_string(None) == (
        '"name" ASC, "count" DESC, "price" DESC'
    )
    for bad in ("name; DROP TABLE item", "name asc desc", "nope", "name sideways", ","):
        with pytest.raises(InvalidQuery):
            q.compile_order(MODEL, bad)
    assert q.select_fields(MODEL, "name, id,name") == ["name", "id"]
    with pytest.raises(InvalidQuery):
        q.select_fields(MODEL, "name,*")
    assert q.check_limit(None, None) == (q.DEFAULT_LIMIT, 0)
    assert q.check_limit(10**9, 5) == (q.MAX_LIMIT, 5)
    with pytest.raises(InvalidQuery):
        q.check_limit(-1, 0)
    with pytest.raises(InvalidQuery):
        q.parse_json("{", "where")


# --------------------------------------------------------------------------- records


def test_records_are_validated_and_errors_name_the_record_and_field() -> None:
    good = {"name": "n", "count": 1, "tags": ["a"], "owner": None}
    [(rid, values)] = q.validate_records(MODEL, [good], partial=False)
    assert rid is None
    assert values["owner"] is None
    assert values["tags"].__class__.__name__ == "Jsonb"

    cases = [
        ({"count": 1}, "field 'name'"),  # required ('kind' has a default: may be left out)
        ({"name": ""}, "field 'name'"),
        ({"name": "n", "count": -1}, "field 'count'"),
        ({"name": "n", "kind": "c"}, "field 'kind'"),
        ({"name": "n", "owner": "x"}, "field 'owner'"),
        ({"name": "n", "colour": 1}, "field 'colour'"),
        ({"name": "n", "gone": "x"}, "field 'gone'"),
        ({"name": "n", "id": "x"}, "field 'id'"),
        ({"name": "n", "trashed_at": None}, "field 'trashed_at'"),
        ({"name": None}, "field 'name'"),
        ({"name": "n\x00"}, "NUL"),
        ("text", "must be a JSON object"),
    ]
    for record, message in cases:
        with pytest.raises(RecordInvalid) as caught:
            q.validate_records(MODEL, [good, record], partial=False)
        assert caught.value.message.startswith("record 1: "), caught.value.message
        assert message in caught.value.message, caught.value.message
    with pytest.raises(RecordInvalid, match="array"):
        q.validate_records(MODEL, {"name": "n"}, partial=False)


def test_changes_and_ids() -> None:
    assert q.changes(MODEL, {"count": 2}) == {"count": 2}
    with pytest.raises(RecordInvalid):
        q.changes(MODEL, {})
    with pytest.raises(RecordInvalid):
        q.changes(MODEL, {"name": None})  # required: cannot be cleared
    [(rid, values)] = q.validate_records(
        MODEL,
        [{"id": "A0000000-0000-4000-8000-000000000001", "count": 3}],
        partial=True,
        with_id=True,
    )
    assert rid == "a0000000-0000-4000-8000-000000000001"
    assert values == {"count": 3}
    with pytest.raises(RecordInvalid, match="field 'id'"):
        q.validate_records(MODEL, [{"count": 3}], partial=True, with_id=True)
    assert q.parse_ids(["a0000000-0000-4000-8000-000000000001"]) == [
        "a0000000-0000-4000-8000-000000000001"
    ]
    for bad in ([], ["x"], [{"id": 1}], "x", [None]):
        with pytest.raises(InvalidQuery):
            q.parse_ids(bad)
    with pytest.raises(InvalidQuery):
        q.check_id("1 OR 1=1")
    assert json.dumps(MODEL.describe())  # JSON-serialisable
