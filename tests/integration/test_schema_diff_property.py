"""For generated templates and generated safe edits of them, the schema change applied to a
database of the old template (then the metadata sync) gives the catalog and registry rows of a
fresh build of the new one, on a real server."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, assume, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from psycopg import sql

from monk.adapters.postgres import template_db
from monk.core.schema_compiler import CompiledTemplate, compile_template, core_tables_ddl
from monk.core.schema_diff import schema_change
from monk.errors import InvalidTemplateSource
from tests.integration.schema_change_support import catalog, differences
from tests.integration.template_support import drop_databases
from tests.strategies import (
    column_names,
    properties,
    reference_properties,
    schema_documents,
    table_names,
    template_schemas,
)

Conn = psycopg.Connection[Any]


@pytest.fixture(scope="module")
def two_databases(admin_url: str) -> Iterator[tuple[Conn, Conn]]:
    names = [f"diffprop_{uuid.uuid4().hex[:10]}" for _ in range(2)]
    with psycopg.connect(admin_url, autocommit=True) as adm:
        for name in names:
            adm.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        with (
            psycopg.connect(admin_url, dbname=names[0], autocommit=True) as upgraded,
            psycopg.connect(admin_url, dbname=names[1], autocommit=True) as fresh,
        ):
            yield upgraded, fresh
    finally:
        drop_databases(admin_url, names)


@st.composite
def safe_edits(draw: st.DrawFn, schemas: dict[str, Any]) -> dict[str, Any]:
    """``schemas`` with edits the diff must apply: new tables and properties (optional, or
    required with a default), references to old and new tables, required made optional,
    enum values added, defaults changed."""
    new = copy.deepcopy(schemas)
    names = list(new)
    for name in draw(st.lists(table_names, max_size=2, unique=True)):
        if name not in new:
            new[name] = draw(schema_documents(names))
            names.append(name)
    for table in list(schemas):
        document = new[table]
        props = document["properties"]
        for column in draw(st.lists(column_names, max_size=3, unique=True)):
            if column in props:
                continue
            if draw(st.integers(0, 3)) == 0:
                props[column] = draw(reference_properties(names))
            else:
                props[column] = draw(properties)
                if "default" in props[column] and draw(st.booleans()):
                    document.setdefault("required", []).append(column)
        if document.get("required") and draw(st.booleans()):
            document["required"] = document["required"][1:]
            if not document["required"]:
                del document["required"]
        for prop in props.values():
            string_enum = isinstance(prop.get("enum"), list) and prop.get("type") == "string"
            if string_enum and draw(st.booleans()):
                prop["enum"] = [*prop["enum"], "zz"]
    return new


def rebuild(db: Conn, compiled: CompiledTemplate) -> None:
    """A template database's content from scratch: core tables, tables, registry rows."""
    db.execute("DROP SCHEMA public CASCADE")
    db.execute("CREATE SCHEMA public")
    for statement in [*core_tables_ddl(), *compiled.ddl()]:
        db.execute(statement)
    for query, params in compiled.registry_inserts():
        db.execute(query, params)


@pytest.mark.slow
@hsettings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data(), schemas=template_schemas(max_tables=3))
def test_a_safe_edit_applied_equals_a_fresh_build(
    two_databases: tuple[Conn, Conn], data: st.DataObject, schemas: dict[str, Any]
) -> None:
    upgraded, fresh = two_databases
    edited = data.draw(safe_edits(schemas))
    old = compile_template(schemas)
    try:
        new = compile_template(edited)
    except InvalidTemplateSource:
        assume(False)  # e.g. a new table whose name another table's index already takes
        raise
    change = schema_change(old, new)
    rebuild(upgraded, old)
    with upgraded.transaction():
        for statement in change.statements:
            upgraded.execute(statement)
        template_db.sync_columns(upgraded)
    rebuild(fresh, new)
    template_db.sync_columns(fresh)
    assert differences(catalog(upgraded), catalog(fresh)) == []
