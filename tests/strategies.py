"""Hypothesis strategies for template schemas the compiler must accept.

``template_schemas()`` draws a whole template: several JSON Schema documents (name → document)
whose properties cover every mapped type and constraint, with defaults that satisfy their own
property and references that only point at schemas drawn earlier (so there is never a cycle).
Everything drawn is valid for ``compile_template`` and, compiled, is meant to run on PostgreSQL:
patterns come from a list that means the same in ECMA-262 and PostgreSQL regular expressions.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from monk.core.schema_compiler import (
    CORE_TABLES,
    POSTGRES_SYSTEM_COLUMNS,
    RESERVED_WORDS,
    SYSTEM_COLUMNS,
)

Schema = dict[str, Any]

_TAKEN = RESERVED_WORDS | POSTGRES_SYSTEM_COLUMNS | set(SYSTEM_COLUMNS) | set(CORE_TABLES)

# Valid in both dialects, and each matched by a sample value used for defaults.
PATTERNS = {
    "^[a-z]+$": "abc",
    "^[A-Z]{2,4}[0-9]*$": "AB12",
    "^\\d{3}-\\d{4}$": "555-0100",
    "^(red|green|blue)$": "green",
    "x": "box",
}

# Table names without "_", so they never equal an index name (which always contains one).
table_names = st.from_regex(r"[a-z][a-z0-9]{0,20}", fullmatch=True).filter(
    lambda name: name not in _TAKEN
)
column_names = st.from_regex(r"[a-z_][a-z0-9_]{0,40}", fullmatch=True).filter(
    lambda name: name not in _TAKEN
)
_words = st.text("abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=12)


@st.composite
def string_properties(draw: st.DrawFn) -> Schema:
    """A string: a DB-typed format, a checked format, or plain text with length/pattern/enum."""
    kind = draw(st.sampled_from(["uuid", "date-time", "date", "email", "uri", "text", "enum"]))
    if kind in ("uuid", "date-time", "date", "email", "uri"):
        return {"type": "string", "format": kind}
    if kind == "enum":
        values = draw(st.lists(_words, min_size=1, max_size=5, unique=True))
        prop: Schema = {"type": "string", "enum": values}
        if draw(st.booleans()):
            prop["default"] = draw(st.sampled_from(values))
        return prop
    prop = {"type": "string"}
    if draw(st.booleans()):
        pattern = draw(st.sampled_from(sorted(PATTERNS)))
        prop["pattern"] = pattern
        prop["default"] = PATTERNS[pattern]
    else:
        min_length = draw(st.integers(0, 5))
        max_length = draw(st.one_of(st.integers(max(min_length, 1), 300), st.just(2000)))
        prop |= {"minLength": min_length, "maxLength": max_length}
        if draw(st.booleans()):
            prop["default"] = "a" * max(min_length, 1)
    return prop


@st.composite
def number_properties(draw: st.DrawFn) -> Schema:
    """An integer or number with any combination of (exclusive) bounds and a default inside them."""
    json_type = draw(st.sampled_from(["integer", "number"]))
    low = draw(st.integers(-1000, 1000))
    high = low + draw(st.integers(2, 1000))
    prop: Schema = {"type": json_type}
    if draw(st.booleans()):
        prop["exclusiveMinimum" if draw(st.booleans()) else "minimum"] = low
    if draw(st.booleans()):
        prop["exclusiveMaximum" if draw(st.booleans()) else "maximum"] = high
    if json_type == "number" and draw(st.booleans()):
        prop["maximum"] = high + 0.5
    if draw(st.booleans()):
        prop["default"] = low + 1
    return prop


@st.composite
def other_properties(draw: st.DrawFn) -> Schema:
    """Booleans, arrays, objects, nullable types, untyped and mixed enums."""
    return draw(
        st.sampled_from(
            [
                {"type": "boolean"},
                {"type": "boolean", "default": True},
                {"type": "array", "items": {"type": "string"}},
                {"type": "object", "properties": {"a": {"type": "integer"}}},
                {"type": "object", "default": {"a": 1}},
                {"type": ["string", "null"], "maxLength": 10},
                {"type": ["integer", "null"], "enum": [1, 2, None]},
                {"enum": [1, 2.5, 3]},
                {"enum": ["a", 1, True, None]},
                {"description": "any JSON"},
            ]
        )
    )


properties = st.one_of(string_properties(), number_properties(), other_properties())


@st.composite
def reference_properties(draw: st.DrawFn, targets: list[str]) -> Schema:
    """A uuid property referencing one of ``targets``, in both spellings of the keyword."""
    target = draw(st.sampled_from(targets))
    if draw(st.booleans()):
        return {"type": "string", "format": "uuid", "x-monk-reference": target}
    on_delete = draw(st.sampled_from(["cascade", "restrict", "set null"]))
    spec = {"schema": target, "on_delete": on_delete}
    return {"type": "string", "format": "uuid", "x-monk-reference": spec}


@st.composite
def schema_documents(draw: st.DrawFn, targets: list[str]) -> Schema:
    """One schema document; it may reference any of ``targets``."""
    names = draw(st.lists(column_names, min_size=0, max_size=8, unique=True))
    props = {}
    for name in names:
        use_reference = targets and draw(st.integers(0, 4)) == 0
        props[name] = draw(reference_properties(targets) if use_reference else properties)
    # "set null" cannot be combined with NOT NULL, so referencing columns stay optional.
    required = [
        name for name in names if "x-monk-reference" not in props[name] and draw(st.booleans())
    ]
    document: Schema = {"type": "object", "properties": props}
    if required:
        document["required"] = required
    if draw(st.booleans()):
        document["additionalProperties"] = False
    return document


@st.composite
def template_schemas(draw: st.DrawFn, max_tables: int = 4) -> dict[str, Schema]:
    """A template's schemas; each may reference itself or a schema drawn before it."""
    names = draw(st.lists(table_names, min_size=1, max_size=max_tables, unique=True))
    return {name: draw(schema_documents(names[: index + 1])) for index, name in enumerate(names)}
