"""The HTTP API's response models and the service's records stay one shape (no database):
the journal's and the template builds' models derive from the dataclasses; the tenant and event
models are checked against what the service renders."""

from __future__ import annotations

import dataclasses
import types
import typing
import uuid
from datetime import UTC, datetime
from typing import Any

from monk.api.models import ArchiveOut, EventOut, OperationOut, TemplateBuildOut, TenantOut
from monk.service.events import Event
from monk.service.operations import Operation, operation_dict
from monk.service.templates import TemplateBuild
from monk.service.tenants import Credentials, Tenant, TenantView

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def sample(record: type[Any]) -> Any:
    """An instance of the dataclass ``record`` with a value of each field's type."""
    values: dict[str, Any] = {}
    for name, hint in typing.get_type_hints(record).items():
        if name not in {f.name for f in dataclasses.fields(record)}:
            continue
        if isinstance(hint, types.UnionType):  # X | None: a value of X
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        kind = typing.get_origin(hint) or hint
        values[name] = {
            uuid.UUID: uuid.uuid4(),
            datetime: NOW,
            str: f"{name}-value",
            int: 7,
            bool: True,
            dict: {},
            list: [],
        }[kind]
    return record(**values)


def test_the_journal_model_has_the_operation_fields_and_takes_its_rendering() -> None:
    assert list(OperationOut.model_fields) == [f.name for f in dataclasses.fields(Operation)]
    op = sample(Operation)
    out = OperationOut.model_validate(operation_dict(op))
    assert out.model_dump()["id"] == str(op.id)
    assert out.model_dump()["created_at"] == NOW.isoformat()


def test_the_template_build_model_has_the_build_fields() -> None:
    assert list(TemplateBuildOut.model_fields) == [
        f.name for f in dataclasses.fields(TemplateBuild)
    ]
    build = dataclasses.replace(sample(TemplateBuild), status="ready", source="builtin")
    assert TemplateBuildOut.model_validate(build.as_dict()).model_dump()["key"] == "key-value"


def test_the_event_model_is_what_the_service_renders() -> None:
    rendered = sample(Event).as_dict()
    assert list(EventOut.model_fields) == list(rendered)
    EventOut.model_validate(rendered)


def test_the_tenant_model_is_what_the_service_renders() -> None:
    tenant = dataclasses.replace(sample(Tenant), archive_path="<archives>/x.dump")
    fullest = TenantView(
        tenant=tenant,
        host="localhost",
        port=5432,
        credentials=Credentials(role="r", password="p"),
        provisioned_from="pool",
        replayed=True,
        connection_limit=20,
        root_password="rp",
    ).as_dict()
    plain = TenantView(tenant=sample(Tenant), host="localhost", port=5432).as_dict()
    assert set(TenantOut.model_fields) == set(fullest)
    # Every field the model does not default is in every answer.
    required = {n for n, f in TenantOut.model_fields.items() if f.is_required()}
    assert required <= set(plain)
    assert list(ArchiveOut.model_fields) == list(fullest["archive"])
    TenantOut.model_validate(fullest)
    TenantOut.model_validate(plain)
