"""pg_dump / pg_restore, run from the embedded package's PostgreSQL 18 binaries (a newer pg_dump
reads any older server, so one set of tools serves embedded and external servers alike).

Passwords go through the environment (PGPASSWORD), never the command line, where ``ps`` would
show them.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from psycopg import conninfo as pg_conninfo

from monk.adapters import files
from monk.adapters.embedded import bin_dir
from monk.adapters.postgres.connection import ServerTarget, disk_full
from monk.core.identifiers import validate_database_name, validate_role_name
from monk.errors import ConfigError, OperationFailed

_TIMEOUT_S = 3600


@dataclass(frozen=True)
class Archive:
    path: Path
    size: int
    sha256: str


def _command(target: ServerTarget, database: str) -> tuple[list[str], dict[str, str]]:
    params = pg_conninfo.conninfo_to_dict(target.conninfo)
    password = params.pop("password", None)
    params["dbname"] = database
    params["application_name"] = "monk:dump"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if password is not None:
        env["PGPASSWORD"] = str(password)
    conninfo = pg_conninfo.make_conninfo(**{k: str(v) for k, v in params.items()})
    return [f"--dbname={conninfo}"], env


def dump(target: ServerTarget, database: str, path: Path) -> Archive:
    """pg_dump -Fc of ``database`` into ``path``: written private (0600, in a 0700 folder when
    monk makes it: a dump is a tenant's whole data) under a temporary name, flushed to disk,
    then renamed, so a failure (a full disk) leaves no partial archive."""
    validate_database_name(database)
    try:
        files.private_dir(path.parent)
    except OSError as exc:
        raise ConfigError(
            f"MONK_ARCHIVE_DIR {path.parent}: cannot create it: {exc.strerror or exc}"
        ) from None
    args, env = _command(target, database)
    try:
        with files.replacing(path) as partial:
            _run(
                [str(bin_dir() / "pg_dump"), "-Fc", "--no-owner", f"--file={partial}", *args],
                env,
                "archive",
            )
    except OSError as exc:
        raise OperationFailed(
            f"cannot write the archive {path}: {exc.strerror or exc}", step="archive"
        ) from None
    return Archive(path=path, size=path.stat().st_size, sha256=sha256_file(path))


def restore(target: ServerTarget, database: str, path: Path, *, role: str) -> None:
    """pg_restore ``path`` into the empty ``database``; objects end up owned by ``role``.

    pg_restore 18 opens every session with ``SET transaction_timeout = 0``, which servers
    before 17 reject. That one error is harmless (the setting does not exist there), so the
    restore runs on past errors and then fails if any other error was reported.
    """
    validate_database_name(database)
    validate_role_name(role)
    args, env = _command(target, database)
    argv = [
        str(bin_dir() / "pg_restore"),
        "--no-owner",
        "--no-privileges",
        f"--role={role}",
        *args,
        str(path),
    ]
    try:
        _run(argv, env, "restore")
    except OperationFailed as exc:
        if not _only_known_harmless(exc.details.get("stderr", "")):
            raise


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _run(argv: list[str], env: dict[str, str], step: str) -> None:
    try:
        done = subprocess.run(
            argv,
            env=env,
            capture_output=True,
            text=True,
            timeout=_TIMEOUT_S,
            check=False,
            umask=0o077,  # whatever pg_dump creates is private too
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise OperationFailed(f"{Path(argv[0]).name} failed: {exc}", step=step) from None
    if done.returncode != 0:
        full = [line for line in done.stderr.splitlines() if "No space left on device" in line]
        if full:
            raise disk_full(f"{Path(argv[0]).name}: {full[0].strip()}")
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise OperationFailed(f"{Path(argv[0]).name} failed: {tail}", step=step, stderr=done.stderr)


_HARMLESS = ('unrecognized configuration parameter "transaction_timeout"',)


def _only_known_harmless(stderr: str) -> bool:
    """True if every error pg_restore reported is one of ``_HARMLESS``."""
    errors = [line for line in stderr.splitlines() if "error:" in line]
    real = [e for e in errors if "errors ignored on restore" not in e]
    return bool(real) and all(any(h in e for h in _HARMLESS) for e in real)
