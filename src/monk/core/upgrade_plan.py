"""What a build keeps so that its successor can compute the upgrade step, and the rules the
successor checks against it. Pure: no I/O.

Each build records the JSON Schemas it compiled (schema name → document) and its migration
manifest (number, name, sha256 of each file). The next build of the key recompiles those schemas,
diffs them with its own (``monk.core.schema_diff``) and refuses a migration file the predecessor
already applied (number ≤ its level) whose content changed or that disappeared: tenants at the
predecessor ran the old text, and a fresh build would run the new one, so the two would differ
for good.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from monk.errors import InvalidTemplateSource


@dataclass(frozen=True)
class MigrationEntry:
    """One migration file as a build applied it."""

    number: int
    name: str
    sha256: str

    @classmethod
    def of(cls, number: int, name: str, text: str) -> MigrationEntry:
        return cls(number, name, hashlib.sha256(text.encode()).hexdigest())

    @property
    def file(self) -> str:
        return f"migrations/{self.number:04d}_{self.name}.sql"

    def as_json(self) -> dict[str, Any]:
        return {"number": self.number, "name": self.name, "sha256": self.sha256}

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> MigrationEntry:
        return cls(int(value["number"]), str(value["name"]), str(value["sha256"]))


def check_applied_migrations(
    applied: Sequence[MigrationEntry], current: Sequence[MigrationEntry], predecessor: str
) -> None:
    """Refuse ``current`` if a file of ``applied`` (the predecessor's manifest, every file of
    which its databases ran) changed or disappeared from it."""
    now = {entry.number: entry for entry in current}
    next_number = max((entry.number for entry in (*applied, *current)), default=0) + 1
    for entry in applied:
        found = now.get(entry.number)
        if found is not None and found.sha256 == entry.sha256:
            continue
        what = "disappeared" if found is None else "changed"
        if found is not None and found.name != entry.name:
            what = f"was replaced by {found.file}"
        raise InvalidTemplateSource(
            f"{entry.file} {what} since build {predecessor} applied it, and the tenants of that "
            f"build ran the old text: restore the file as it was and add a new migration file "
            f"({next_number:04d}_….sql) with the change instead",
            file=entry.file,
        )
