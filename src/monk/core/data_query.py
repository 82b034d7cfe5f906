"""The tenant data API's rules, without I/O: who may do what, a model's fields and JSON Schema
(from the tenant's ``schemas``/``columns`` rows), record validation, and ``where``/``order``/
``select`` parsed against the model's registered fields into ``psycopg.sql`` pieces.

Every name from a request is looked up among the model's registered fields before it becomes an
``sql.Identifier``; every value becomes a query parameter (``sql.Placeholder``), never SQL text.
Bad input raises ``InvalidQuery`` (400) or ``RecordInvalid`` (400 ``VALIDATION_ERROR``).

``where`` is a JSON object: ``{"field": value}`` (equality; ``null`` is ``IS NULL``),
``{"field": {"$op": value, ...}}`` with ``$eq $ne $gt $gte $lt $lte $in $nin $like $ilike
$null``, and ``{"$and": [where, ...]}`` / ``{"$or": [where, ...]}``; keys side by side are ANDed.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from enum import Enum
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import ValidationError, best_match
from psycopg import sql
from psycopg.types.json import Jsonb

from monk.core.system_columns import SYSTEM_COLUMNS
from monk.errors import AccessDenied, AccessInsufficient, InvalidQuery, RecordInvalid

# --------------------------------------------------------------------------- access

ACCESS_LEVELS = ("deny", "read", "edit", "full", "root")


class Action(Enum):
    READ = "read"
    WRITE = "edit"  # create and change records
    DELETE = "full"  # soft delete (trash)
    PERMANENT_DELETE = "root"  # set deleted_at: never returned again


def require(access: str, action: Action) -> None:
    """AccessDenied for ``deny`` (or a level monk does not know), AccessInsufficient below the
    level ``action`` needs. Levels are ordered: read < edit < full < root."""
    if access not in ACCESS_LEVELS or access == "deny":
        raise AccessDenied(f"access {access!r} may not use the tenant's data")
    if ACCESS_LEVELS.index(access) < ACCESS_LEVELS.index(action.value):
        raise AccessInsufficient(
            f"access {access!r} may not {action.name.lower().replace('_', ' ')} records: "
            f"{action.value!r} access or higher is needed",
            needed=action.value,
        )


# --------------------------------------------------------------------------- limits

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
MAX_WHERE_DEPTH = 8
MAX_WHERE_TERMS = 200
MAX_IN_VALUES = 1000
MAX_ORDER_TERMS = 16
MAX_RECORDS = 1000  # records of one POST or PUT

# The system columns a record shows and a query may name: monk maintains them. The access_*
# arrays are not part of the data API (row-level access is not implemented): never shown.
VISIBLE_SYSTEM = ("id", "created_at", "updated_at", "trashed_at", "deleted_at")
_SYSTEM_TYPES = {
    "id": "uuid",
    "created_at": "timestamp with time zone",
    "updated_at": "timestamp with time zone",
    "trashed_at": "timestamp with time zone",
    "deleted_at": "timestamp with time zone",
}


# --------------------------------------------------------------------------- models


def _kind(pg_type: str) -> str:
    """The JSON kind of a column type: what a where value must be."""
    base = pg_type.split("(")[0].strip()
    if base.endswith("[]"):
        return "array"
    return {
        "text": "string",
        "character varying": "string",
        "character": "string",
        "citext": "string",
        "bigint": "integer",
        "integer": "integer",
        "smallint": "integer",
        "numeric": "number",
        "double precision": "number",
        "real": "number",
        "boolean": "boolean",
        "uuid": "uuid",
        "timestamp with time zone": "time",
        "timestamp without time zone": "time",
        "date": "time",
        "jsonb": "json",
        "json": "json",
    }.get(base, "other")


_SYNTHESIZED = {
    "string": {"type": "string"},
    "integer": {"type": "integer"},
    "number": {"type": "number"},
    "boolean": {"type": "boolean"},
    "uuid": {"type": "string", "format": "uuid"},
    "time": {"type": "string"},
    "array": {"type": "array"},
}


@dataclass(frozen=True)
class Field:
    name: str
    pg_type: str
    required: bool = False

    @property
    def kind(self) -> str:
        return _kind(self.pg_type)


@dataclass(frozen=True)
class Model:
    """A registered schema of a tenant: its table, its fields (the ``columns`` rows, which follow
    the catalog) and the JSON Schema records are validated against."""

    name: str
    table: str
    definition: Mapping[str, Any]
    fields: Mapping[str, Field]
    _validators: dict[bool, Draft202012Validator] = field(
        default_factory=dict, compare=False, repr=False
    )

    @classmethod
    def of(
        cls, name: str, table: str, definition: Mapping[str, Any], columns: Iterable[Field]
    ) -> Model:
        fields = {c.name: c for c in columns if c.name not in SYSTEM_COLUMNS}
        return cls(name=name, table=table, definition=definition, fields=fields)

    def field_type(self, name: str) -> str:
        if name in _SYSTEM_TYPES:
            return _SYSTEM_TYPES[name]
        return self.fields[name].pg_type

    def queryable(self) -> tuple[str, ...]:
        """Fields a where, order or select may name, in the order records show them."""
        return ("id", *self.fields, *VISIBLE_SYSTEM[1:])

    def record_schema(self) -> dict[str, Any]:
        """The JSON Schema a record's fields are validated against: the template's definition,
        its properties brought in line with the registered columns (a migration may add or drop
        a column): a column the definition lacks gets the schema of its type."""
        props_in = self.definition.get("properties", {})
        props: dict[str, Any] = {}
        for name, f in self.fields.items():
            props[name] = (
                copy.deepcopy(props_in[name])
                if name in props_in
                else dict(_SYNTHESIZED.get(f.kind, {}))
            )
        required = [r for r in self.definition.get("required", []) if r in self.fields]
        out = {k: copy.deepcopy(v) for k, v in self.definition.items() if k not in ("$id",)}
        out["type"] = "object"
        out["properties"] = props
        out["required"] = required
        out["additionalProperties"] = False
        return out

    def describe(self) -> dict[str, Any]:
        """The model's JSON Schema as ``GET /api/describe/{model}`` shows it: the record schema
        plus monk's system columns, read-only."""
        out = self.record_schema()
        system = {
            "id": {"type": "string", "format": "uuid", "readOnly": True},
            **{
                name: {
                    "type": ["string", "null"]
                    if name in ("trashed_at", "deleted_at")
                    else "string",
                    "format": "date-time",
                    "readOnly": True,
                }
                for name in VISIBLE_SYSTEM[1:]
            },
        }
        out["properties"] = {
            "id": system["id"],
            **out["properties"],
            **{k: v for k, v in system.items() if k != "id"},
        }
        out["x-monk-table"] = self.table
        return out

    def validator(self, *, partial: bool) -> Draft202012Validator:
        """For a new record (``partial`` False) or a change (True: nothing required)."""
        found = self._validators.get(partial)
        if found is None:
            schema = self.record_schema()
            # A required field with a default may be left out: the table fills it in.
            props = schema["properties"]
            schema["required"] = (
                []
                if partial
                else [r for r in schema["required"] if "default" not in props.get(r, {})]
            )
            found = Draft202012Validator(schema, format_checker=FormatChecker())
            self._validators[partial] = found
        return found


# --------------------------------------------------------------------------- names


def shown(name: object) -> str:
    """A name from a request, for a message: repr, cut short (an error is one line)."""
    text = repr(name)
    return text if len(text) <= 60 else text[:57] + "..."


def check_field(model: Model, name: object, what: str = "field") -> str:
    if not isinstance(name, str) or name not in model.queryable():
        raise InvalidQuery(
            f"{what} {shown(name)} is not a field of model {model.name!r}",
            field=name if isinstance(name, str) else None,
        )
    return name


# --------------------------------------------------------------------------- values


def _no_nul(value: Any) -> None:
    """PostgreSQL text cannot hold NUL: refused here, not deep inside a query."""
    if isinstance(value, str) and "\x00" in value:
        raise InvalidQuery("NUL characters are not allowed in values")
    if isinstance(value, dict):
        for k, v in value.items():
            _no_nul(k)
            _no_nul(v)
    elif isinstance(value, list):
        for v in value:
            _no_nul(v)


def param(model: Model, name: str, value: Any) -> Any:
    """A JSON value as the parameter for field ``name``: jsonb takes a ``Jsonb``, a float a
    ``Decimal`` from its shortest repr (numeric keeps the number as written)."""
    _no_nul(value)
    if value is None:
        return None
    if _kind(model.field_type(name)) == "json":
        return Jsonb(value)
    if isinstance(value, float):
        return Decimal(repr(value))
    return value


def _scalar(model: Model, name: str, value: Any, op: str) -> Any:
    """A where value for ``name``, checked against the field's kind."""
    kind = _kind(model.field_type(name))
    ok = {
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
        "uuid": isinstance(value, str),
        "time": isinstance(value, str),
        "json": True,
    }.get(kind, isinstance(value, str | int | float | bool))
    if not ok:
        raise InvalidQuery(
            f"where {name!r} {op}: {shown(value)} is not a value of the field's type "
            f"({model.field_type(name)})"
        )
    if kind == "uuid":
        try:
            uuid.UUID(value)
        except ValueError:
            raise InvalidQuery(f"where {name!r} {op}: {shown(value)} is not a UUID") from None
    return param(model, name, value)


# --------------------------------------------------------------------------- where


@dataclass
class _Where:
    model: Model
    params: list[Any] = field(default_factory=list)
    terms: int = 0

    def value(self, v: Any) -> sql.Composable:
        self.params.append(v)
        return sql.Placeholder()

    def node(self, where: Any, depth: int) -> sql.Composable:
        if not isinstance(where, dict):
            raise InvalidQuery("where must be a JSON object")
        if depth > MAX_WHERE_DEPTH:
            raise InvalidQuery(f"where is nested deeper than {MAX_WHERE_DEPTH} levels")
        parts: list[sql.Composable] = []
        for key, value in where.items():
            self.terms += 1
            if self.terms > MAX_WHERE_TERMS:
                raise InvalidQuery(f"where has more than {MAX_WHERE_TERMS} terms")
            if key in ("$and", "$or"):
                if not isinstance(value, list) or not value:
                    raise InvalidQuery(f"where {key} takes a non-empty array of where objects")
                subs = [self.node(sub, depth + 1) for sub in value]
                joiner = sql.SQL(" AND " if key == "$and" else " OR ")
                parts.append(sql.SQL("({})").format(joiner.join(subs)))
            else:
                name = check_field(self.model, key, "where key")
                parts.append(self.field(name, value))
        if not parts:
            return sql.SQL("TRUE")
        return sql.SQL("({})").format(sql.SQL(" AND ").join(parts))

    def field(self, name: str, value: Any) -> sql.Composable:
        if isinstance(value, dict):
            if not value:
                raise InvalidQuery(f"where {name!r}: an empty operator object")
            parts = [self.op(name, op, arg) for op, arg in value.items()]
            return sql.SQL(" AND ").join(parts)
        if isinstance(value, list):
            raise InvalidQuery(f"where {name!r}: an array is matched with $in")
        return self.op(name, "$eq", value)

    def op(self, name: str, op: Any, arg: Any) -> sql.Composable:
        col = sql.Identifier(name)
        kind = _kind(self.model.field_type(name))
        if op in ("$eq", "$ne"):
            if arg is None:
                return sql.SQL("{} IS NULL" if op == "$eq" else "{} IS NOT NULL").format(col)
            # $ne keeps the rows where the field is null (they are not equal to the value).
            template = "{} = {}" if op == "$eq" else "{} IS DISTINCT FROM {}"
            return sql.SQL(template).format(col, self.value(_scalar(self.model, name, arg, op)))
        if op in _COMPARE:
            if arg is None or kind in ("json", "boolean", "array"):
                raise InvalidQuery(f"where {name!r} {op}: not comparable")
            v = self.value(_scalar(self.model, name, arg, op))
            return sql.SQL("{} {} {}").format(col, sql.SQL(_COMPARE[op]), v)
        if op in ("$in", "$nin"):
            if not isinstance(arg, list):
                raise InvalidQuery(f"where {name!r} {op} takes an array")
            if len(arg) > MAX_IN_VALUES:
                raise InvalidQuery(f"where {name!r} {op}: more than {MAX_IN_VALUES} values")
            if any(a is None for a in arg):
                raise InvalidQuery(f"where {name!r} {op}: null is matched with $null")
            if not arg:
                return sql.SQL("FALSE" if op == "$in" else "TRUE")
            values = sql.SQL(", ").join(self.value(_scalar(self.model, name, a, op)) for a in arg)
            if op == "$in":
                return sql.SQL("{} IN ({})").format(col, values)
            return sql.SQL("({} IS NULL OR {} NOT IN ({}))").format(col, col, values)
        if op in ("$like", "$ilike"):
            if kind != "string" or not isinstance(arg, str):
                raise InvalidQuery(f"where {name!r} {op}: a text field and a string pattern")
            _no_nul(arg)
            word = "LIKE" if op == "$like" else "ILIKE"
            return sql.SQL("{} {} {}").format(col, sql.SQL(word), self.value(arg))
        if op == "$null":
            if not isinstance(arg, bool):
                raise InvalidQuery(f"where {name!r} $null takes true or false")
            return sql.SQL("{} IS NULL" if arg else "{} IS NOT NULL").format(col)
        raise InvalidQuery(f"where {name!r}: unknown operator {shown(op)}")


_COMPARE = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}


def parse_json(text: str | None, what: str) -> Any:
    if text is None or text == "":
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidQuery(f"{what} is not valid JSON: {exc.msg}") from None


def compile_where(model: Model, where: Any) -> tuple[sql.Composable, list[Any]]:
    """A where JSON value (already parsed; None: everything) as a condition and its
    parameters."""
    if where is None:
        return sql.SQL("TRUE"), []
    w = _Where(model)
    return w.node(where, 0), w.params


# --------------------------------------------------------------------------- order, select


def compile_order(model: Model, order: str | None) -> sql.Composable:
    """``order``: comma-separated ``field``, ``field asc``, ``field desc`` or ``-field``;
    default ``created_at, id`` (stable pages)."""
    if not order:
        return sql.SQL("{}, {}").format(sql.Identifier("created_at"), sql.Identifier("id"))
    terms = [t.strip() for t in order.split(",")]
    if len(terms) > MAX_ORDER_TERMS:
        raise InvalidQuery(f"order has more than {MAX_ORDER_TERMS} terms")
    out: list[sql.Composable] = []
    for term in terms:
        words = term.split()
        direction = "ASC"
        if len(words) == 2 and words[1].lower() in ("asc", "desc"):
            direction = words[1].upper()
            name = words[0]
        elif len(words) == 1 and words[0].startswith("-"):
            direction, name = "DESC", words[0][1:]
        elif len(words) == 1:
            name = words[0]
        else:
            raise InvalidQuery(f"order term {shown(term)}: write field, field asc|desc or -field")
        check_field(model, name, "order field")
        out.append(sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(direction)))
    return sql.SQL(", ").join(out)


def select_fields(model: Model, select: str | None) -> list[str]:
    """``select``: comma-separated field names; default every field."""
    if not select:
        return list(model.queryable())
    names = [s.strip() for s in select.split(",")]
    out: list[str] = []
    for name in names:
        check_field(model, name, "select field")
        if name not in out:
            out.append(name)
    return out


def check_limit(limit: int | None, offset: int | None) -> tuple[int, int]:
    lim = DEFAULT_LIMIT if limit is None else limit
    off = 0 if offset is None else offset
    if lim < 0 or off < 0:
        raise InvalidQuery("limit and offset must not be negative")
    return min(lim, MAX_LIMIT), off


# --------------------------------------------------------------------------- records


def _error_field(
    error: ValidationError, record: Mapping[str, Any], schema: Mapping[str, Any]
) -> str:
    if error.absolute_path:
        return str(error.absolute_path[0])
    if error.validator == "required":
        missing = [r for r in schema.get("required", []) if r not in record]
        return missing[0] if missing else "?"
    if error.validator == "additionalProperties":
        extra = [k for k in record if k not in schema.get("properties", {})]
        return extra[0] if extra else "?"
    return "?"


def validate_records(
    model: Model, records: Any, *, partial: bool, with_id: bool = False
) -> list[tuple[str | None, dict[str, Any]]]:
    """Each record checked against the model's JSON Schema, as (id, its fields as parameters).
    ``partial``: a change (no field required). ``with_id``: each record names its ``id`` (PUT).
    A client value for another system column is refused. RecordInvalid names the record's index
    and the field."""
    if not isinstance(records, list):
        raise RecordInvalid("the body must be a JSON array of records")
    if len(records) > MAX_RECORDS:
        raise RecordInvalid(f"at most {MAX_RECORDS} records at once")
    out: list[tuple[str | None, dict[str, Any]]] = []
    for i, record in enumerate(records):
        out.append(validate_record(model, record, partial=partial, with_id=with_id, index=i))
    return out


def validate_record(
    model: Model, record: Any, *, partial: bool, with_id: bool = False, index: int | None = None
) -> tuple[str | None, dict[str, Any]]:
    where = f"record {index}" if index is not None else "record"
    if not isinstance(record, dict):
        raise RecordInvalid(f"{where}: must be a JSON object", record=index)
    record = dict(record)
    record_id: str | None = None
    if with_id:
        raw = record.pop("id", None)
        if not isinstance(raw, str):
            raise RecordInvalid(
                f"{where}: field 'id': required to find the record", record=index, field="id"
            )
        try:
            record_id = str(uuid.UUID(raw))
        except ValueError:
            raise RecordInvalid(
                f"{where}: field 'id': not a UUID", record=index, field="id"
            ) from None
    for name in record:
        if name in SYSTEM_COLUMNS:
            raise RecordInvalid(
                f"{where}: field {name!r}: a system column, maintained by monk",
                record=index,
                field=name,
            )
    try:
        _no_nul(record)
    except InvalidQuery:
        raise RecordInvalid(f"{where}: NUL characters are not allowed", record=index) from None
    validator = model.validator(partial=partial)
    # null on an optional field clears it: checked as absent, written as NULL.
    present = {k: v for k, v in record.items() if not (v is None and k in model.fields)}
    error = best_match(validator.iter_errors(present))
    if error is None:
        for k, v in record.items():
            if v is None and model.fields[k].required:
                error = ValidationError(f"{k!r} may not be null", validator="required", path=[k])
                break
    if error is not None:
        schema = validator.schema
        assert isinstance(schema, Mapping)
        name = _error_field(error, present, schema)
        raise RecordInvalid(
            f"{where}: field {name!r}: {error.message}"[:300], record=index, field=name
        )
    return record_id, {k: param(model, k, v) for k, v in record.items()}


def changes(model: Model, body: Any) -> dict[str, Any]:
    """A PATCH body: the fields to set on every matched record (validated as a change)."""
    _id, values = validate_record(model, body, partial=True)
    if not values:
        raise RecordInvalid("the changes object sets no field")
    return values


def parse_ids(body: Any) -> list[str]:
    """A DELETE body: an array of ids or of records with an ``id``."""
    if not isinstance(body, list) or not body:
        raise InvalidQuery("the body must be a non-empty JSON array of ids or records with id")
    if len(body) > MAX_RECORDS:
        raise InvalidQuery(f"at most {MAX_RECORDS} ids at once")
    out = []
    for i, item in enumerate(body):
        raw = item.get("id") if isinstance(item, dict) else item
        try:
            out.append(str(uuid.UUID(raw)))
        except (ValueError, TypeError, AttributeError):
            raise InvalidQuery(f"item {i}: {shown(raw)} is not a record id") from None
    return out


def check_id(raw: str) -> str:
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise InvalidQuery(f"{shown(raw)} is not a record id") from None


def columns_of(names: Sequence[str]) -> sql.Composable:
    return sql.SQL(", ").join(sql.Identifier(n) for n in names)
