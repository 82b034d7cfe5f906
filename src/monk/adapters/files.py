"""Files monk keeps (secrets, archives, configuration): private, and written atomically.

A file is written to a temporary name in its own folder (mode 0600), flushed to disk, renamed
over its final name, and the folder is flushed too, so a crash or a full disk leaves either the
old file or the new one, never a truncated or empty one. Folders monk makes are 0700.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from monk.errors import ConfigError

PRIVATE_DIR = 0o700


def private_dir(path: Path) -> Path:
    """Create ``path`` and each missing parent as 0700 (whatever the umask); an existing
    folder is left as it is (it may be the user's, or the embedded server's)."""
    missing: list[Path] = []
    probe = path
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=PRIVATE_DIR)
        except FileExistsError:
            continue  # another process made it first
        os.chmod(folder, PRIVATE_DIR)  # the umask may have taken bits off mkdir's mode
    return path


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def replacing(path: Path, *, exclusive: bool = False) -> Iterator[Path]:
    """Yield a private temporary file beside ``path`` for the caller (or a tool it runs) to
    fill; when the block ends normally the file is flushed and renamed to ``path``, else it is
    removed. ``exclusive``: never replace an existing ``path`` (FileExistsError instead)."""
    private_dir(path.parent)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)  # mkstemp makes it 0600
    partial = Path(name)
    try:
        yield partial
        fd = os.open(partial, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            _link_or_rename(partial, path)
        else:
            os.replace(partial, path)
        fsync_dir(path.parent)
    finally:
        partial.unlink(missing_ok=True)


def _link_or_rename(partial: Path, path: Path) -> None:
    """Put ``partial`` at ``path`` unless something is there already (FileExistsError)."""
    try:
        os.link(partial, path)  # atomic, and fails if path exists: the first writer wins
    except FileExistsError:
        raise
    except OSError:
        # a file system without hard links (some FUSE or FAT ones): check, then rename
        if path.exists():
            raise FileExistsError(path) from None
        os.replace(partial, path)


def write_private(path: Path, text: str, *, exclusive: bool = False) -> None:
    """Write ``text`` to ``path`` atomically, mode 0600 (see ``replacing``); OSError (a full
    disk, a read-only folder) leaves ``path`` as it was."""
    with replacing(path, exclusive=exclusive) as partial, partial.open("w") as fh:
        fh.write(text)


def read_secret(path: Path, *, fix: str) -> str | None:
    """The secret stored in ``path``, None if there is none; an empty or damaged file (a
    crash or a full disk under an older monk) is a ConfigError naming the file and ``fix``."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    secret = raw.strip()
    # monk writes 32 or more URL-safe characters: anything else is damage (a power loss can
    # leave zeros; a full disk, nothing)
    if len(secret) < 32 or not all(0x21 <= b < 0x7F for b in secret):
        state = "empty" if not secret else "damaged"
        raise ConfigError(f"{path} is {state} ({len(raw)} bytes): {fix}")
    return secret.decode("ascii")
