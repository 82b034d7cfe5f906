"""The embedded server, through the real CLI: init, reuse, stop/start, crashes, races, auth."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from monk.adapters.embedded import EmbeddedServer
from monk.system.migrator import bundled_migrations
from tests.conftest import MONK_BIN, free_port

Run = Callable[..., subprocess.CompletedProcess[str]]


class Embedded:
    def __init__(self, data_dir: Path, *, durable: bool = False) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MONK_")}
        self.env |= {
            "MONK_DATA_DIR": str(data_dir),
            "MONK_EMBEDDED_PORT": str(self.port),
            "MONK_EMBEDDED_DURABLE": str(durable).lower(),
        }

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [MONK_BIN, *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            check=False,
        )

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [MONK_BIN, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
        )

    def url(self) -> str:
        done = self.run("db", "url")
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def postmasters(self) -> list[int]:
        pgdata = str(self.data_dir / "pgdata")
        out = subprocess.run(
            ["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True, check=True
        ).stdout
        return [
            int(line.split()[0])
            for line in out.splitlines()
            if "/postgres -D" in line or "bin/postgres" in line
            if pgdata in line
        ]


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[Embedded]:
    e = Embedded(tmp_path / "monk-data")
    yield e
    EmbeddedServer(e.data_dir, port=e.port).stop()


def test_first_use_initialises_and_later_runs_reuse(embedded: Embedded) -> None:
    first = embedded.run("init")
    assert first.returncode == 0, first.stderr
    status = embedded.run("db", "status", "--json")
    assert status.returncode == 0, status.stderr
    assert '"running": true' in status.stdout
    with psycopg.connect(embedded.url(), autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (v int)")
        conn.execute("INSERT INTO kept VALUES (42)")
    assert embedded.run("db", "stop").returncode == 0
    stopped = embedded.run("db", "status")
    assert stopped.returncode == 5
    assert embedded.run("db", "start").returncode == 0
    with psycopg.connect(embedded.url()) as conn:
        assert conn.execute("SELECT v FROM kept").fetchone() == (42,)
    assert len(embedded.postmasters()) == 1


def test_every_role_needs_a_password(embedded: Embedded) -> None:
    assert embedded.run("init").returncode == 0
    password_file = embedded.data_dir / "admin_password"
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    password = password_file.read_text().strip()
    # TCP on 127.0.0.1 with the password works, a wrong one is refused (SCRAM, no trust).
    with psycopg.connect(
        host="127.0.0.1", port=embedded.port, user="monk", password=password, dbname="postgres"
    ) as conn:
        assert conn.execute("SHOW password_encryption").fetchone() == ("scram-sha-256",)
    for host in ("127.0.0.1", str(embedded.data_dir / "run")):
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(
                host=host, port=embedded.port, user="monk", password="wrong", dbname="postgres"
            )


def test_psql_opens_on_the_system_database(embedded: Embedded) -> None:
    assert embedded.run("init").returncode == 0
    done = subprocess.run(
        [MONK_BIN, "db", "psql"],
        input="SELECT current_database();\n",
        capture_output=True,
        text=True,
        env=embedded.env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "monk_main" in done.stdout


def test_kill9_of_the_server_is_recovered_without_loss(tmp_path: Path) -> None:
    # Durable settings (the default): a committed row must survive the postmaster's kill -9.
    embedded = Embedded(tmp_path / "monk-data", durable=True)
    try:
        _kill_postmaster_and_recover(embedded)
    finally:
        EmbeddedServer(embedded.data_dir, port=embedded.port).stop()


def _kill_postmaster_and_recover(embedded: Embedded) -> None:
    assert embedded.run("init").returncode == 0
    with psycopg.connect(embedded.url(), autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (v int)")
        conn.execute("INSERT INTO kept VALUES (7)")
    [pid] = embedded.postmasters()
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    again = embedded.run("init")
    assert again.returncode == 0, again.stderr
    with psycopg.connect(embedded.url()) as conn:
        assert conn.execute("SELECT v FROM kept").fetchone() == (7,)


@pytest.mark.parametrize("delay", [0.3, 0.6, 1.0])
def test_kill9_of_monk_during_init_leaves_nothing_blocking(
    embedded: Embedded, delay: float
) -> None:
    proc = embedded.popen("init")
    time.sleep(delay)
    proc.kill()
    proc.wait()
    again = embedded.run("init", "--json")
    assert again.returncode == 0, again.stderr
    assert len(embedded.postmasters()) == 1
    with psycopg.connect(embedded.url()) as conn:
        applied = conn.execute("SELECT count(*) FROM schema_migrations").fetchone()
    assert applied == (len(bundled_migrations()),)


def test_two_inits_at_once_share_one_server(embedded: Embedded) -> None:
    procs = [embedded.popen("init", "--json") for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum('"created_database": true' in out for out, _ in outs) == 1
    assert len(embedded.postmasters()) == 1
    with psycopg.connect(embedded.url()) as conn:
        rows = conn.execute("SELECT number FROM schema_migrations").fetchall()
    assert len(rows) == len(set(rows))


def test_unwritable_data_dir_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    e = Embedded(blocker / "data")
    done = e.run("init")
    assert done.returncode == 6
    assert "MONK_DATA_DIR" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (blocker / "data").exists()


def _uid_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    [line] = [x for x in status.splitlines() if x.startswith("Uid:")]
    return int(line.split()[1])


@pytest.mark.skipif(os.geteuid() != 0, reason="the privilege drop happens only when monk is root")
def test_the_server_runs_unprivileged_and_cannot_read_roots_files(embedded: Embedded) -> None:
    assert embedded.run("init").returncode == 0
    [pid] = embedded.postmasters()
    assert _uid_of(pid) != 0
    children = subprocess.run(
        ["ps", "--ppid", str(pid), "-o", "uid="], capture_output=True, text=True, check=True
    ).stdout.split()
    assert children
    assert all(int(uid) != 0 for uid in children)
    # A root-only file in a folder anyone may pass: only the file's mode protects it.
    fd, secret = tempfile.mkstemp(dir="/var/tmp")
    os.write(fd, b"root only\n")
    os.close(fd)
    os.chmod(secret, 0o600)
    (embedded.data_dir / "jwt_secret").write_text("signing key\n")
    (embedded.data_dir / "jwt_secret").chmod(0o600)
    try:
        with psycopg.connect(embedded.url(), autocommit=True) as conn:
            assert conn.execute("SELECT pg_read_file('/etc/hostname')").fetchone()
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="Permission denied"):
                conn.execute("SELECT pg_read_file(%s)", (secret,))
            # monk's secrets beside the cluster are out of the server's sight altogether.
            for name in ("admin_password", "jwt_secret"):
                with pytest.raises(psycopg.DatabaseError, match=r"No such file|Permission denied"):
                    conn.execute("SELECT pg_read_file(%s)", (str(embedded.data_dir / name),))
    finally:
        os.unlink(secret)


@pytest.mark.skipif(os.geteuid() != 0, reason="the privilege drop happens only when monk is root")
def test_a_cluster_of_root_owned_files_is_handed_over(embedded: Embedded) -> None:
    # What an older monk left: every file root's (its server ran as root in a user namespace).
    assert embedded.run("init").returncode == 0
    with psycopg.connect(embedded.url(), autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (v int)")
        conn.execute("INSERT INTO kept VALUES (3)")
    assert embedded.run("db", "stop").returncode == 0
    for name in ("pgdata", "run", "postgres.log"):
        subprocess.run(["chown", "-R", "0:0", str(embedded.data_dir / name)], check=True)
    again = embedded.run("init")
    assert again.returncode == 0, again.stderr
    with psycopg.connect(embedded.url()) as conn:
        assert conn.execute("SELECT v FROM kept").fetchone() == (3,)
    assert (embedded.data_dir / "pgdata" / "base").stat().st_uid != 0
    assert (embedded.data_dir / "admin_password").stat().st_uid == 0


def test_a_removed_cluster_is_made_again(embedded: Embedded) -> None:
    # Its run/ folder is the server's by then: initdb must still read the password it gets.
    assert embedded.run("init").returncode == 0
    assert embedded.run("db", "stop").returncode == 0
    shutil.rmtree(embedded.data_dir / "pgdata")
    (embedded.data_dir / "admin_password").unlink()
    again = embedded.run("init")
    assert again.returncode == 0, again.stderr
    with psycopg.connect(embedded.url()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_cluster_with_its_wal_elsewhere_runs(embedded: Embedded, tmp_path: Path) -> None:
    # initdb --waldir makes pg_wal a link; the server must reach (and own) its target too.
    assert embedded.run("init").returncode == 0
    assert embedded.run("db", "stop").returncode == 0
    pg_wal = embedded.data_dir / "pgdata" / "pg_wal"
    wal_dir = tmp_path / "elsewhere" / "wal"
    wal_dir.parent.mkdir(mode=0o700)
    shutil.move(pg_wal, wal_dir)
    pg_wal.symlink_to(wal_dir)
    if os.geteuid() == 0:
        subprocess.run(["chown", "-R", "0:0", str(wal_dir)], check=True)
    again = embedded.run("init")
    assert again.returncode == 0, again.stderr
    with psycopg.connect(embedded.url(), autocommit=True) as conn:
        conn.execute("CREATE TABLE kept AS SELECT generate_series(1, 1000) AS v")
        conn.execute("CHECKPOINT")
    assert any(wal_dir.iterdir())
