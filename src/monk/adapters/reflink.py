"""Can a folder's filesystem clone files (reflink)? Asked of the filesystem itself.

PostgreSQL 18's ``file_copy_method = clone`` copies a database's files with
``copy_file_range()`` on Linux. On XFS (``reflink=1``) and btrfs that shares the blocks: a
metadata operation. On ext4 or tmpfs it succeeds too, but copies every byte in the kernel, so
a clone that did not fail says nothing: the ``FICLONE`` ioctl, which only shares and never
copies, tells them apart.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import struct
from pathlib import Path

FICLONE = 0x40049409
"""linux/fs.h: _IOW(0x94, 9, int)"""


def supports_reflink(folder: Path) -> bool | None:
    """True if two files in ``folder`` can share blocks (FICLONE succeeds), False if the
    filesystem refuses, None if monk cannot write there to try (then nothing is known)."""
    tag = secrets.token_hex(4)
    source = folder / f".monk-reflink-probe-{tag}"
    clone = folder / f".monk-reflink-probe-{tag}.clone"
    try:
        with source.open("wb") as src:
            src.write(b"\0" * 4096)
            src.flush()
            os.fsync(src.fileno())
        with source.open("rb") as src, clone.open("wb") as dst:
            try:
                fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
            except OSError:
                # EOPNOTSUPP (ext4, tmpfs), EINVAL (XFS without reflink), EXDEV, ENOTTY
                return False
        return True
    except OSError:
        return None
    finally:
        for path in (clone, source):
            with contextlib.suppress(OSError):
                path.unlink()


def cluster_identifier(data_directory: Path) -> str | None:
    """The system identifier in ``global/pg_control`` of the cluster at ``data_directory`` (its
    first 8 bytes, native order), or None if it cannot be read here: whether a server's data
    directory, as the server names it, is the one this machine sees at that path."""
    try:
        with (data_directory / "global" / "pg_control").open("rb") as control:
            head = control.read(8)
    except OSError:
        return None
    if len(head) != 8:
        return None
    return str(struct.unpack("=Q", head)[0])
