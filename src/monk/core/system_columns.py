"""The columns monk puts on every table of a template, apart from the compiler so that code
reading a tenant's catalog need not load the compiler (and jsonschema with it)."""

from __future__ import annotations

# Their fixed definitions: constant SQL, no input in it.
SYSTEM_COLUMN_DEFS = (
    ("id", "uuid NOT NULL DEFAULT gen_random_uuid()"),
    ("access_read", "uuid[] NOT NULL DEFAULT '{}'"),
    ("access_edit", "uuid[] NOT NULL DEFAULT '{}'"),
    ("access_full", "uuid[] NOT NULL DEFAULT '{}'"),
    ("access_deny", "uuid[] NOT NULL DEFAULT '{}'"),
    ("created_at", "timestamp with time zone NOT NULL DEFAULT now()"),
    ("updated_at", "timestamp with time zone NOT NULL DEFAULT now()"),
    ("trashed_at", "timestamp with time zone"),
    ("deleted_at", "timestamp with time zone"),
)
SYSTEM_COLUMNS = tuple(name for name, _ in SYSTEM_COLUMN_DEFS)
