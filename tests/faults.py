"""Real faults for tests: a small filesystem that really fills up.

(Helper B's branch has a file of this name too, with the same ``small_disk``/``SmallDisk``.)
"""

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
