"""Real faults for tests: a PostgreSQL server of a test's own (to stop and restart without
touching the session's shared one), and a small filesystem that really fills up."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from monk.adapters.embedded import EmbeddedServer
from monk.settings import Settings
from tests.conftest import free_port


@dataclass
class OwnServer:
    """An embedded server in a temp dir, and monk settings pointing at it (external mode)."""

    server: EmbeddedServer
    url: str
    settings: Settings

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        self.server.ensure_running()


@contextmanager
def own_server(
    data_dir: Path,
    *,
    wal_dir: Path | None = None,
    monk_dir: Path | None = None,
    **settings: object,
) -> Iterator[OwnServer]:
    """``wal_dir``: the server's WAL goes there (as ``initdb --waldir`` does it: pg_wal is a
    link), so a full ``data_dir`` fails writes with disk_full instead of a PANIC. ``monk_dir``:
    MONK_DATA_DIR (default: beside the server's)."""
    server = EmbeddedServer(data_dir / "pg", port=free_port(), durable=False)
    server.ensure_running()
    if wal_dir is not None:
        server.stop()
        pg_wal = server.pgdata / "pg_wal"
        shutil.move(pg_wal, wal_dir)
        pg_wal.symlink_to(wal_dir)
        server.ensure_running()
    try:
        url = server.target(name="localhost", connect_timeout=10, statement_timeout_ms=60_000).url(
            "postgres"
        )
        s = Settings(
            database_url=url,  # type: ignore[arg-type]
            system_db_name=f"monk_f_{uuid.uuid4().hex[:8]}",
            data_dir=monk_dir or data_dir / "monk",
            pool_spares={},
            pool_roles=0,
            _env_file=None,  # type: ignore[call-arg]
            **settings,  # type: ignore[arg-type]
        )
        yield OwnServer(server, url, s)
    finally:
        server.stop()


@dataclass
class SmallDisk:
    path: Path
    size_mb: int

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.path).free

    def fill(self, leave_bytes: int = 0) -> Path:
        """Take all free space but ``leave_bytes`` with a filler file; returns it."""
        filler = self.path / f"filler-{uuid.uuid4().hex[:6]}"
        # unbuffered: a write the disk refuses is not retried (and raised) by close()
        with filler.open("wb", buffering=0) as fh:
            chunk = b"\0" * (1 << 20)
            while (free := self.free_bytes()) > leave_bytes:
                try:
                    fh.write(chunk[: max(1, min(len(chunk), free - leave_bytes))])
                except OSError:
                    break
        return filler


@contextmanager
def small_disk(where: Path, size_mb: int) -> Iterator[SmallDisk]:
    """A real tmpfs of ``size_mb`` MiB mounted at ``where``; skips where mounting is not
    permitted (not root, no CAP_SYS_ADMIN)."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield SmallDisk(where, size_mb)
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)
