"""Template sources: the folders users (and monk itself) describe templates with.

    <key>/template.json               {"description": …, "version": label, "extends": parent key,
                                       "database_settings": {"work_mem": "8MB", …},
                                       "extensions": ["citext", "pg_trgm", …],
                                       "clone_strategy": "auto" | "wal_log" | "file_copy"}
    <key>/schemas/<name>.json         one JSON Schema per table; the file stem is the schema name
    <key>/data/<name>.json            a JSON array of seed records for schema <name>
    <key>/seed/<name>.csv|.jsonl      bulk seed rows for table <name>, loaded with COPY after
                                      the data records (CSV with a header row naming the
                                      columns, or JSON Lines: one object per line)
    <key>/migrations/NNNN_<name>.sql  SQL run in order after the seed data; 0001, 0002, …

Only these files belong to a source: other top-level entries (a README) and dotfiles are ignored
and do not affect the version. ``load_source`` reads one folder; ``resolve_parents`` merges the
templates it extends; ``content_hash`` gives the version a build of the merged source is known by.
Everything that is wrong with a folder raises ``InvalidTemplateSource`` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from monk.core.clone_strategy import StrategySetting, parse_strategy_setting
from monk.core.schema_compiler import COMPILER_VERSION
from monk.core.template_names import VERSION_HEX_LENGTH, validate_template_key
from monk.errors import InvalidName, InvalidTemplateSource

TEMPLATE_FILE = "template.json"
EXTENSION_NAME_PATTERN = "^[a-z][a-z0-9_-]{0,62}$"
"""An extension's name as PostgreSQL's contrib and common ones spell it (``uuid-ossp``)."""
_MIGRATION_RE = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")
_MANIFEST_VALIDATOR = Draft202012Validator(
    {
        "type": "object",
        "required": ["description"],
        "additionalProperties": False,
        "properties": {
            "description": {"type": "string"},
            "version": {"type": "string"},
            "extends": {"type": "string"},
            "database_settings": {"type": "object", "additionalProperties": {"type": "string"}},
            "extensions": {
                "type": "array",
                "uniqueItems": True,
                "items": {"type": "string", "pattern": EXTENSION_NAME_PATTERN},
            },
            "clone_strategy": {"type": "string"},
        },
    }
)


@dataclass(frozen=True)
class Migration:
    """One versioned SQL file; ``template`` is the key of the source that contributed it."""

    number: int
    name: str
    template: str
    path: str
    sql: str


@dataclass(frozen=True)
class TemplateSource:
    """A loaded template source; after ``resolve_parents``, merged with its ancestors.

    ``lineage`` is the key followed by the keys of the templates it extends, nearest first.
    ``files`` maps ``<key>/<relative path>`` to the bytes of every file that makes up the
    source (ancestors included once resolved): it is what ``content_hash`` covers.
    """

    key: str
    path: Path
    description: str
    version_label: str
    extends: str | None
    lineage: tuple[str, ...]
    schemas: Mapping[str, Mapping[str, Any]]
    data: Mapping[str, Sequence[Any]]
    migrations: tuple[Migration, ...]
    files: Mapping[str, bytes]
    database_settings: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    """``ALTER DATABASE … SET`` values for databases cloned from it (a clone does not copy them);
    a child's values override its parents'."""
    extensions: tuple[str, ...] = ()
    """``CREATE EXTENSION`` at build, before the tables (a clone copies them): the parents'
    first, then the child's own."""
    bulk: Mapping[str, Path] = field(default_factory=lambda: MappingProxyType({}))
    """Bulk seed files (``seed/<table>.csv`` or ``.jsonl``) by table, read at build time in
    chunks (never held in memory); ``files`` holds their sha256, not their bytes."""
    clone_strategy: StrategySetting | None = None
    """How its tenants are cloned (``monk.core.clone_strategy``): auto, wal_log or file_copy,
    over MONK_CLONE_STRATEGY; a child's value overrides its parent's."""


def builtin_sources_dir() -> Path:
    """The folder of the sources shipped with monk (``empty``, ``basic``, ``crm``, ``saas``)."""
    return Path(__file__).parent / "builtin"


def find_source(key: str, folders: Sequence[Path]) -> Path | None:
    """The first ``<folder>/<key>`` holding a template.json, or None; a lookup for parents."""
    for folder in folders:
        if (folder / key / TEMPLATE_FILE).is_file():
            return folder / key
    return None


def load_source(path: Path, key: str | None = None) -> TemplateSource:
    """Read the source folder ``path``, known as ``key`` (default: the folder's name).

    Parents named by ``extends`` are not loaded here; see ``resolve_parents``.
    """
    key = validate_template_key(key if key is not None else path.name)
    if not (path / TEMPLATE_FILE).is_file():
        raise InvalidTemplateSource(f"{path / TEMPLATE_FILE}: missing; a template source needs one")
    files: dict[str, bytes] = {}
    manifest = _load_manifest(path, files)
    schemas = {stem: _load_json(path, rel, files) for stem, rel in _json_files(path, "schemas")}
    data = {stem: _load_records(path, rel, files) for stem, rel in _json_files(path, "data")}
    migrations = _load_migrations(path, key, files, complete="extends" not in manifest)
    bulk = _load_bulk(path, files)
    return TemplateSource(
        key=key,
        path=path,
        description=manifest["description"],
        version_label=manifest.get("version", ""),
        extends=manifest.get("extends"),
        lineage=(key,),
        schemas=MappingProxyType(schemas),
        data=MappingProxyType(data),
        migrations=migrations,
        files=MappingProxyType({f"{key}/{rel}": content for rel, content in files.items()}),
        database_settings=MappingProxyType(dict(manifest.get("database_settings", {}))),
        extensions=tuple(manifest.get("extensions", ())),
        clone_strategy=manifest.get("clone_strategy"),
        bulk=MappingProxyType(bulk),
    )


def resolve_parents(source: TemplateSource, lookup: Callable[[str], Path | None]) -> TemplateSource:
    """Merge the templates ``source`` extends into it, nearest parent last to be overridden.

    ``lookup`` maps a template key to its source folder (None: unknown). A child's schema, data
    file or migration replaces its parent's of the same name or number; the merged migrations must
    still be numbered 1..n without gaps. Cycles and unknown parents raise InvalidTemplateSource.
    """
    chain = [source]
    while (parent_key := chain[-1].extends) is not None:
        manifest = chain[-1].path / TEMPLATE_FILE
        if parent_key in (member.key for member in chain):
            cycle = " -> ".join([*(member.key for member in chain), parent_key])
            raise InvalidTemplateSource(f"{manifest}: extends forms a cycle {cycle}")
        parent_path = lookup(parent_key)
        if parent_path is None:
            raise InvalidTemplateSource(
                f"{manifest}: extends {parent_key!r}, which is not a known template"
            )
        chain.append(load_source(parent_path, parent_key))
    merged = chain.pop()
    while chain:
        merged = _merge(merged, chain.pop())
    return merged


def content_hash(source: TemplateSource) -> str:
    """The version of a build: 16 hex of a sha256 over the compiler version and every file.

    Each name and content is length-prefixed so that no two different sources hash the same
    stream; a change to any file, to the set of files or to ``COMPILER_VERSION`` changes it.
    """
    digest = hashlib.sha256()
    digest.update(_framed(b"compiler_version", COMPILER_VERSION.encode()))
    for name in sorted(source.files):
        digest.update(_framed(name.encode(), source.files[name]))
    return digest.hexdigest()[:VERSION_HEX_LENGTH]


def _framed(name: bytes, content: bytes) -> bytes:
    return b"".join([len(name).to_bytes(8, "big"), name, len(content).to_bytes(8, "big"), content])


def _merge(parent: TemplateSource, child: TemplateSource) -> TemplateSource:
    migrations = {m.number: m for m in parent.migrations} | {m.number: m for m in child.migrations}
    ordered = tuple(migrations[number] for number in sorted(migrations))
    _check_numbering(ordered, child.path / "migrations", complete=True)
    return TemplateSource(
        key=child.key,
        path=child.path,
        description=child.description,
        version_label=child.version_label,
        extends=child.extends,
        lineage=child.lineage + parent.lineage,
        schemas=MappingProxyType({**parent.schemas, **child.schemas}),
        data=MappingProxyType({**parent.data, **child.data}),
        migrations=ordered,
        files=MappingProxyType({**parent.files, **child.files}),
        database_settings=MappingProxyType({**parent.database_settings, **child.database_settings}),
        extensions=tuple(dict.fromkeys(parent.extensions + child.extensions)),
        clone_strategy=child.clone_strategy or parent.clone_strategy,
        bulk=MappingProxyType({**parent.bulk, **child.bulk}),
    )


def _read(root: Path, relative: str, files: dict[str, bytes]) -> bytes:
    """Read ``root/relative`` and remember its bytes for the content hash."""
    try:
        content = (root / relative).read_bytes()
    except OSError as exc:
        raise InvalidTemplateSource(f"{root / relative}: cannot be read: {exc.strerror}") from None
    files[relative] = content
    return content


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _load_json(root: Path, relative: str, files: dict[str, bytes]) -> Any:
    content = _read(root, relative, files)
    try:
        return json.loads(content, parse_constant=_reject_constant)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, NaN/Infinity
        raise InvalidTemplateSource(f"{root / relative}: invalid JSON: {exc}") from None


def _load_manifest(root: Path, files: dict[str, bytes]) -> Mapping[str, Any]:
    manifest = _load_json(root, TEMPLATE_FILE, files)
    error = best_match(_MANIFEST_VALIDATOR.iter_errors(manifest))
    if error is not None:
        raise InvalidTemplateSource(f"{root / TEMPLATE_FILE}: {error.message}")
    manifest = dict(manifest)
    strategy = manifest.get("clone_strategy")
    if strategy is not None:
        try:
            manifest["clone_strategy"] = parse_strategy_setting(strategy)
        except ValueError as exc:
            raise InvalidTemplateSource(
                f"{root / TEMPLATE_FILE}: clone_strategy: {exc}", file=TEMPLATE_FILE
            ) from None
    parent = manifest.get("extends")
    if parent is not None:
        try:
            validate_template_key(parent)
        except InvalidName as exc:
            raise InvalidTemplateSource(f"{root / TEMPLATE_FILE}: extends: {exc}") from None
    return manifest


def _entries(folder: Path) -> list[Path]:
    """The non-hidden entries of ``folder``, sorted; none if it does not exist."""
    if not folder.is_dir():
        return []
    return sorted(entry for entry in folder.iterdir() if not entry.name.startswith("."))


def _json_files(root: Path, folder: str) -> list[tuple[str, str]]:
    """(stem, relative path) of each ``<folder>/<stem>.json``; anything else there is an error."""
    found = []
    for entry in _entries(root / folder):
        if entry.suffix != ".json" or not entry.is_file():
            raise InvalidTemplateSource(f"{entry}: {folder}/ may only contain <name>.json files")
        found.append((entry.stem, f"{folder}/{entry.name}"))
    return found


def _load_records(root: Path, relative: str, files: dict[str, bytes]) -> tuple[Any, ...]:
    records = _load_json(root, relative, files)
    if not isinstance(records, list):
        raise InvalidTemplateSource(f"{root / relative}: must contain a JSON array of records")
    return tuple(records)


BULK_SUFFIXES = (".csv", ".jsonl")
_BULK_CHUNK = 1 << 20


def _load_bulk(root: Path, files: dict[str, bytes]) -> dict[str, Path]:
    """``seed/<table>.csv|.jsonl`` by table; each file's sha256 (read in 1 MB chunks) stands
    for it in the content hash: a seed of hundreds of MB is never held in memory."""
    found: dict[str, Path] = {}
    for entry in _entries(root / "seed"):
        if entry.suffix not in BULK_SUFFIXES or not entry.is_file():
            raise InvalidTemplateSource(
                f"{entry}: seed/ may only contain <table>.csv or <table>.jsonl files"
            )
        if entry.stem in found:
            raise InvalidTemplateSource(
                f"{entry}: seed/{found[entry.stem].name} seeds table {entry.stem!r} already"
            )
        digest = hashlib.sha256()
        try:
            with entry.open("rb") as f:
                while chunk := f.read(_BULK_CHUNK):
                    digest.update(chunk)
        except OSError as exc:
            raise InvalidTemplateSource(f"{entry}: cannot be read: {exc.strerror}") from None
        files[f"seed/{entry.name}"] = f"sha256:{digest.hexdigest()}".encode()
        found[entry.stem] = entry
    return found


def _load_migrations(
    root: Path, key: str, files: dict[str, bytes], *, complete: bool
) -> tuple[Migration, ...]:
    """The migrations of one folder; ``complete`` when no parent's migrations will precede them."""
    migrations = []
    for entry in _entries(root / "migrations"):
        match = _MIGRATION_RE.fullmatch(entry.name)
        if match is None or not entry.is_file():
            raise InvalidTemplateSource(
                f"{entry}: migrations are files named NNNN_<name>.sql (e.g. 0001_add_stage.sql)"
            )
        relative = f"migrations/{entry.name}"
        try:
            text = _read(root, relative, files).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidTemplateSource(f"{entry}: not UTF-8 text") from None
        migrations.append(Migration(int(match[1]), match[2], key, relative, text))
    _check_numbering(migrations, root / "migrations", complete=complete)
    return tuple(migrations)


def _check_numbering(migrations: Sequence[Migration], folder: Path, *, complete: bool) -> None:
    """Migrations (sorted by number) must not share a number, and a complete set is 1, 2, … n.

    A child's own migrations continue its parent's numbering, so gaps are only judged once the
    set is complete: a source without parent, or the merge. Duplicates are judged at once, since
    merging by number would silently keep only one of them.
    """
    for index, migration in enumerate(migrations):
        if index and migration.number == migrations[index - 1].number:
            raise InvalidTemplateSource(
                f"{folder}: {migrations[index - 1].path} and {migration.path} have the same number"
            )
        if complete and migration.number != index + 1:
            raise InvalidTemplateSource(
                f"{folder}: {migration.path} should be number {index + 1:04d}; "
                "migrations are numbered from 0001 without gaps"
            )
