"""pg_dump / pg_restore, run from the embedded package's PostgreSQL 18 binaries (a newer pg_dump
reads any older server, so one set of tools serves embedded and external servers alike).

Passwords go through the environment (PGPASSWORD), never the command line, where ``ps`` would
show them.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

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


def copy(
    source: ServerTarget,
    target: ServerTarget,
    database: str,
    *,
    role: str,
    jobs: int = 1,
    work_dir: Path | None = None,
) -> None:
    """Copy ``database`` from ``source`` into the empty database of that name on ``target``,
    objects owned by ``role`` there. ``jobs`` 1: ``pg_dump -Fc | pg_restore``, streamed
    through a pipe (no file). More: ``pg_dump -Fd -j`` into a private folder of ``work_dir``,
    then ``pg_restore -j`` (a parallel restore needs a seekable archive; the folder is removed
    after). The PostgreSQL 18 tools read any older server and write into one."""
    validate_database_name(database)
    validate_role_name(role)
    dump_args, dump_env = _command(source, database)
    restore_args, restore_env = _command(target, database)
    restore_opts = ["--no-owner", "--no-privileges", f"--role={role}", *restore_args]
    if jobs > 1:
        assert work_dir is not None, "a parallel copy needs a work folder"
        files.private_dir(work_dir)
        with tempfile.TemporaryDirectory(dir=work_dir, prefix="move-") as tmp:
            folder = Path(tmp) / "dump"
            _run(
                [
                    str(bin_dir() / "pg_dump"),
                    "-Fd",
                    f"-j{jobs}",
                    "--no-owner",
                    f"--file={folder}",
                    *dump_args,
                ],
                dump_env,
                "copy",
            )
            _restore_tolerant(
                [str(bin_dir() / "pg_restore"), f"-j{jobs}", *restore_opts, str(folder)],
                restore_env,
            )
        return
    dumper = subprocess.Popen(
        [str(bin_dir() / "pg_dump"), "-Fc", "-Z0", "--no-owner", *dump_args],
        env=dump_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    restore_error: OperationFailed | None = None
    try:
        assert dumper.stdout is not None
        try:
            _restore_tolerant(
                [str(bin_dir() / "pg_restore"), *restore_opts], restore_env, stdin=dumper.stdout
            )
        except OperationFailed as exc:
            restore_error = exc
        finally:
            dumper.stdout.close()
        _, dump_err = dumper.communicate(timeout=_TIMEOUT_S)
    finally:
        if dumper.poll() is None:
            dumper.kill()
            dumper.wait()
    # pg_dump's own failure first: pg_restore then only saw its input end.
    if dumper.returncode != 0:
        tail = "\n".join(dump_err.decode(errors="replace").strip().splitlines()[-5:])
        raise OperationFailed(f"pg_dump failed: {tail}", step="copy")
    if restore_error is not None:
        raise restore_error


def _restore_tolerant(
    argv: list[str], env: dict[str, str], *, stdin: IO[bytes] | None = None
) -> None:
    try:
        _run(argv, env, "copy", stdin=stdin)
    except OperationFailed as exc:
        if not _only_known_harmless(exc.details.get("stderr", "")):
            raise


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _run(
    argv: list[str], env: dict[str, str], step: str, *, stdin: IO[bytes] | None = None
) -> None:
    try:
        done = subprocess.run(
            argv,
            env=env,
            stdin=stdin,
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
