"""Files monk keeps (secrets, archives, configuration): written atomically and private.

Full disks are real: a small tmpfs filled up (tests/faults.py)."""

from __future__ import annotations

import os
import stat
import subprocess
import uuid
from pathlib import Path

import jwt
import pytest

from monk.adapters import files
from monk.api.auth import ALGORITHM
from monk.service.tenants import TenantService
from monk.settings import Settings
from tests.conftest import MONK_BIN, free_port, settings_env
from tests.faults import small_disk
from tests.integration.conftest import Env
from tests.integration.test_embedded import Embedded


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _run(
    args: list[str], env: dict[str, str], cwd: Path, *, umask: int = 0o022, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [MONK_BIN, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        umask=umask,
    )
    assert "Traceback" not in done.stderr, done.stderr
    assert "internal error" not in done.stderr, done.stderr
    return done


def _no_db_env(data_dir: Path) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MONK_")}
    return environ | {"MONK_DATA_DIR": str(data_dir)}


# ------------------------------------------------------------------------------ the helper


def test_write_private_is_0600_and_leaves_the_old_file_on_a_full_disk(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", 1) as disk:
        kept = disk.path / "deep" / "folder" / "kept.conf"
        old = os.umask(0)  # the widest umask: modes must not depend on it
        try:
            files.write_private(kept, "old = 1\n")
        finally:
            os.umask(old)
        assert _mode(kept) == 0o600
        assert _mode(kept.parent) == 0o700
        assert _mode(kept.parent.parent) == 0o700
        disk.fill()
        with pytest.raises(OSError, match="No space left"):
            files.write_private(kept, "new = 2\n" * 1000)
        assert kept.read_text() == "old = 1\n"
        assert sorted(p.name for p in kept.parent.iterdir()) == ["kept.conf"]  # no temp file


# ------------------------------------------------------------------------------ jwt_secret


def test_a_full_disk_never_leaves_an_empty_jwt_secret(tmp_path: Path) -> None:
    """The first user's crash: a full disk while the secret was written left a 0-byte file, and
    every token failed from then on. Now: one clear line, nothing left, and it works once
    there is room again."""
    with small_disk(tmp_path / "disk", 1) as disk:
        data_dir = disk.path / "data"
        data_dir.mkdir(mode=0o700)
        filler = disk.fill()
        environ = _no_db_env(data_dir)
        full = _run(["token", "--root"], environ, tmp_path)
        assert full.returncode == 6, full.stderr
        assert len(full.stderr.strip().splitlines()) == 1, full.stderr
        assert str(data_dir / "jwt_secret") in full.stderr
        assert "No space left on device" in full.stderr
        assert list(data_dir.iterdir()) == []  # no empty secret, no temp file
        filler.unlink()
        ok = _run(["token", "--root"], environ, tmp_path)
        assert ok.returncode == 0, ok.stderr
        secret = (data_dir / "jwt_secret").read_text().strip()
        assert len(secret) >= 32
        assert _mode(data_dir / "jwt_secret") == 0o600
        claims = jwt.decode(ok.stdout.strip(), secret, algorithms=[ALGORITHM])
        assert claims["access"] == "root"


def test_concurrent_first_tokens_agree_on_one_secret(tmp_path: Path) -> None:
    """The secret is created exclusively: of processes racing to create it, the first one's
    stays, and every token any of them issued verifies with it."""
    data_dir = tmp_path / "data"
    environ = _no_db_env(data_dir)
    procs = [
        subprocess.Popen(
            [MONK_BIN, "token", "--root"],
            env=environ,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    tokens = [proc.communicate(timeout=60)[0].strip() for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 6
    secret = (data_dir / "jwt_secret").read_text().strip()
    for token in tokens:
        assert jwt.decode(token, secret, algorithms=[ALGORITHM])["access"] == "root"
    assert sorted(p.name for p in data_dir.iterdir()) == ["jwt_secret"]
    assert _mode(data_dir) == 0o700


@pytest.mark.parametrize("content", [b"", b"\n", b"\0" * 65], ids=["empty", "newline", "zeros"])
def test_an_empty_or_damaged_jwt_secret_is_exit_6_naming_the_file(
    tmp_path: Path, content: bytes, settings: Settings
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    (data_dir / "jwt_secret").write_bytes(content)
    token = _run(["token", "--root"], _no_db_env(data_dir), tmp_path)
    assert token.returncode == 6, token.stderr
    line = token.stderr.strip()
    assert len(line.splitlines()) == 1, line
    assert str(data_dir / "jwt_secret") in line
    assert "delete it" in line
    assert "stops working" in line  # what deleting it costs
    # monk serve refuses to start (before binding its system database), not 500 on every call
    environ = settings_env(settings) | {"MONK_DATA_DIR": str(data_dir)}
    serve = _run(["serve", "--port", str(free_port()), "--templates", ""], environ, tmp_path)
    assert serve.returncode == 6, serve.stderr
    assert str(data_dir / "jwt_secret") in serve.stderr
    assert (data_dir / "jwt_secret").read_bytes() == content  # left for the user to decide


def test_an_empty_jwt_secret_setting_is_refused(tmp_path: Path) -> None:
    environ = _no_db_env(tmp_path / "data") | {"MONK_JWT_SECRET": ""}
    done = _run(["token", "--root"], environ, tmp_path)
    assert done.returncode == 6, done.stderr
    assert "MONK_JWT_SECRET: is empty" in done.stderr


# ------------------------------------------------------------------------------ archives


def _tenant(env: Env) -> str:
    name = f"Files {uuid.uuid4().hex[:8]}"
    with TenantService(env.settings, env.target) as svc:
        svc.provision(name, template=env.template)
    return name


def test_archives_are_private_outside_the_data_dir(env: Env, tmp_path: Path) -> None:
    name = _tenant(env)
    archive_dir = tmp_path / "outside" / "archives"
    environ = settings_env(env.settings) | {"MONK_ARCHIVE_DIR": str(archive_dir)}
    done = _run(["tenant", "archive", name, "--json"], environ, tmp_path, umask=0o022)
    assert done.returncode == 0, done.stderr
    dumps = list(archive_dir.iterdir())
    assert len(dumps) == 1, dumps
    assert dumps[0].suffix == ".dump"
    assert _mode(dumps[0]) == 0o600
    assert _mode(archive_dir) == 0o700
    assert _mode(archive_dir.parent) == 0o700  # monk made it too


def test_a_full_archive_disk_leaves_no_partial_archive(env: Env, tmp_path: Path) -> None:
    name = _tenant(env)
    with small_disk(tmp_path / "disk", 1) as disk:
        archive_dir = disk.path / "archives"
        environ = settings_env(env.settings) | {"MONK_ARCHIVE_DIR": str(archive_dir)}
        archive_dir.mkdir(mode=0o700)
        filler = disk.fill()
        full = _run(["tenant", "archive", name], environ, tmp_path)
        # DISK_FULL: exit 5, one line saying what to free
        assert full.returncode == 5, full.stderr
        assert "disk is full" in full.stderr.lower() or "no space" in full.stderr.lower()
        assert len(full.stderr.strip().splitlines()) == 1
        assert list(archive_dir.iterdir()) == []
        filler.unlink()
        ok = _run(["tenant", "archive", name], environ, tmp_path)
        assert ok.returncode == 0, ok.stderr
        assert [_mode(p) for p in archive_dir.iterdir()] == [0o600]


# ------------------------------------------------------------------------------ embedded server


@pytest.mark.slow
def test_embedded_files_are_private_and_an_empty_admin_password_is_named(
    tmp_path: Path,
) -> None:
    embedded = Embedded(tmp_path / "monk-data")
    try:
        done = embedded.run("init")
        assert done.returncode == 0, done.stderr
        data_dir = embedded.data_dir
        assert _mode(data_dir) == 0o700
        assert _mode(data_dir / "pgdata" / "monk.conf") == 0o600
        # everything monk keeps beside the cluster (whose modes are PostgreSQL's) is private
        assert embedded.run("token", "--root").returncode == 0
        kept = [p for p in data_dir.rglob("*") if "pgdata" not in p.relative_to(data_dir).parts]
        assert {p.name for p in kept} >= {"admin_password", "jwt_secret", "server.lock", "run"}
        assert {p.name: oct(_mode(p)) for p in kept if _mode(p) & 0o077} == {}
        assert (
            "include_if_exists = 'monk.conf'"
            in (data_dir / "pgdata" / "postgresql.conf").read_text()
        )
        password = (data_dir / "admin_password").read_bytes()
        (data_dir / "admin_password").write_bytes(b"")
        url = embedded.run("db", "url")
        assert url.returncode == 6, url.stderr
        assert str(data_dir / "admin_password") in url.stderr
        assert "superuser" in url.stderr
        (data_dir / "admin_password").write_bytes(password)
        assert embedded.run("db", "url").returncode == 0
    finally:
        embedded.run("db", "stop")


@pytest.mark.slow
def test_a_full_disk_at_server_start_keeps_monk_conf(tmp_path: Path) -> None:
    """monk.conf is written at every start: on a full disk the old one stays whole (a
    truncated one would start PostgreSQL on its defaults), one line names it, and the next
    start after space returns works."""
    with small_disk(tmp_path / "disk", 96) as disk:
        embedded = Embedded(disk.path / "monk-data")
        try:
            assert embedded.run("init").returncode == 0
            assert embedded.run("db", "stop").returncode == 0
            conf = embedded.data_dir / "pgdata" / "monk.conf"
            before = conf.read_text()
            filler = disk.fill()
            start = embedded.run("db", "start")
            assert start.returncode == 6, start.stderr
            assert len(start.stderr.strip().splitlines()) == 1, start.stderr
            assert f"cannot write {conf}: No space left on device" in start.stderr
            assert conf.read_text() == before
            assert sorted(p.name for p in conf.parent.glob(".monk.conf*")) == []
            filler.unlink()
            assert embedded.run("db", "start").returncode == 0
            assert conf.read_text() == before
        finally:
            embedded.run("db", "stop")
