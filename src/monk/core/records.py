"""Records as the edges render them: a dataclass as a JSON-ready dict (pure)."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any
from uuid import UUID


def plain(record: Any) -> dict[str, Any]:
    """The dataclass ``record`` as a dict of its fields, in order: UUIDs as strings, datetimes
    in ISO 8601; nested values as they are."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        if isinstance(value, UUID):
            value = str(value)
        elif isinstance(value, datetime):
            value = value.isoformat()
        out[f.name] = value
    return out
