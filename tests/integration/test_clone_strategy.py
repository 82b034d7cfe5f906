"""Clone strategies (issue 16, items 1-2): file cloning detected per host on real filesystems
(a loop-mounted XFS with reflink, tmpfs, the disk), clones identical to their template with
every strategy, and the overrides seen in the WAL each provision writes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from monk.adapters.embedded import EmbeddedServer
from monk.adapters.postgres import admin
from monk.adapters.postgres.connection import ServerTarget, connect
from monk.adapters.registry import templates as template_builds
from monk.core.clone_strategy import CloneChoice
from monk.service import clone_support
from monk.service.tenants import TenantService
from monk.settings import Settings
from tests.conftest import MONK_BIN, RunMonk, free_port
from tests.integration import template_support
from tests.integration.conftest import Env

MB = 1024 * 1024


# ------------------------------------------------------------------ real filesystems


def _fs_type(path: Path) -> str:
    done = subprocess.run(
        ["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


@contextlib.contextmanager
def xfs_with_reflink(tmp_path: Path) -> Iterator[Path]:
    """A loop-mounted XFS image made with reflink=1 (as docs/clone-strategy.md shows)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a loop-device XFS image needs root")
    if shutil.which("mkfs.xfs") is None:
        pytest.skip("mkfs.xfs is missing (apt-get install xfsprogs)")
    image, mnt = tmp_path / "xfs.img", tmp_path / "xfs"
    mnt.mkdir()
    with image.open("wb") as f:
        f.truncate(600 * MB)  # sparse; XFS needs 300 MB at least
    made = subprocess.run(
        ["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], capture_output=True, text=True
    )
    if made.returncode != 0:
        pytest.skip(f"mkfs.xfs -m reflink=1 failed: {made.stderr.strip()}")
    mounted = subprocess.run(
        ["mount", "-o", "loop", str(image), str(mnt)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"no loop device to mount the XFS image: {mounted.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
        image.unlink(missing_ok=True)


@contextlib.contextmanager
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@contextlib.contextmanager
def embedded_in(folder: Path) -> Iterator[tuple[EmbeddedServer, ServerTarget]]:
    server = EmbeddedServer(folder / "monk", port=free_port(), durable=False)
    server.ensure_running()
    try:
        yield server, server.target(name="fs", connect_timeout=10, statement_timeout_ms=60_000)
    finally:
        server.stop()


def _conf(server: EmbeddedServer) -> str:
    return (server.pgdata / "monk.conf").read_text()


def test_on_xfs_with_reflink_the_embedded_server_clones_files_and_detection_says_so(
    tmp_path: Path,
) -> None:
    with xfs_with_reflink(tmp_path) as mnt, embedded_in(mnt) as (server, target):
        assert "file_copy_method = clone" in _conf(server)
        with connect(target, autocommit=True) as adm:
            assert adm.execute("SHOW file_copy_method").fetchone() == ("clone",)
            found = clone_support.detect(adm, target)
            assert found.supported, found.detail
            assert "reflink" in found.detail
            # Seen from elsewhere (the data directory not visible): measured, same answer.
            measured = clone_support.detect(adm, target, look_at_files=False)
            assert measured.supported, measured.detail
            assert "measured" in measured.detail
            assert admin.list_databases(adm, f"{clone_support.PROBE_PREFIX}%") == []
            _assert_every_strategy_copies_the_template(adm, target, with_clone=True)


@pytest.mark.parametrize("where", ["tmpfs", "disk"])
def test_on_tmpfs_and_ext4_file_cloning_is_not_available(tmp_path: Path, where: str) -> None:
    with contextlib.ExitStack() as stack:
        folder = stack.enter_context(tmpfs(tmp_path)) if where == "tmpfs" else tmp_path
        kind = _fs_type(folder)
        if kind not in ("tmpfs", "ext2/ext3"):  # stat -f names ext4 so
            pytest.skip(f"{folder} is on {kind}, neither tmpfs nor ext4")
        server, target = stack.enter_context(embedded_in(folder))
        assert "file_copy_method" not in _conf(server)
        with connect(target, autocommit=True) as adm:
            # PostgreSQL's clone there does not fail: it copies in the kernel. Still "no".
            admin.try_clone(adm, "fs_probe", "template0", CloneChoice("file_copy", True, "t"))
            found = clone_support.detect(adm, target)
            assert not found.supported
            assert "cannot share blocks" in found.detail


def test_the_session_server_cannot_clone_files_and_says_why(settings: Settings) -> None:
    """The suite's server: embedded 18 on the disk, or Debian's 15 (CI's second run)."""
    assert settings.database_url is not None
    target = ServerTarget.from_url(settings.database_url.get_secret_value(), name="localhost")
    with connect(target, autocommit=True) as adm:
        found = clone_support.detect(adm, target)
        version = adm.info.server_version
    if found.supported:
        pytest.skip(f"the suite's server is on a filesystem that clones files: {found.detail}")
    if version < 180000:
        assert found.detail == (
            f"PostgreSQL {version // 10000}: file_copy_method = clone needs PostgreSQL 18"
        )


# ------------------------------------------------------------------ content, every strategy


def _checksums(conn: psycopg.Connection[Any]) -> dict[str, tuple[int, str]]:
    """Rows and an md5 of every row's text, per table of every schema but the catalogs."""
    tables = conn.execute(
        "SELECT schemaname, tablename FROM pg_tables"
        " WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2"
    ).fetchall()
    out = {}
    for schema, table in tables:
        ident = sql.Identifier(str(schema), str(table))
        row = conn.execute(
            sql.SQL(
                "SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), ''))"
                " FROM {} t"
            ).format(ident)
        ).fetchone()
        assert row is not None
        out[f"{schema}.{table}"] = (int(str(row[0])), str(row[1]))
    return out


def _assert_every_strategy_copies_the_template(
    adm: psycopg.Connection[Any], target: ServerTarget, *, with_clone: bool
) -> None:
    """A template with data (its own, made here), then a clone per strategy: each holds
    exactly the template's rows."""
    source = f"cs_src_{uuid.uuid4().hex[:8]}"
    admin.create_database(adm, source)
    made = [source]
    try:
        with connect(target, source, autocommit=True) as db:
            db.execute(
                "CREATE TABLE account (id int PRIMARY KEY, name text, balance numeric);"
                "INSERT INTO account SELECT g, md5(g::text), g * 1.5"
                " FROM generate_series(1, 20000) g;"
                "CREATE TABLE note (id bigserial PRIMARY KEY, body jsonb);"
                "INSERT INTO note (body) SELECT"
                " jsonb_build_object('n', g, 'x', repeat('y', g % 50))"
                " FROM generate_series(1, 5000) g;"
            )
            expected = _checksums(db)
        assert expected["public.account"][0] == 20000
        choices = [
            CloneChoice("wal_log", False, "t"),
            CloneChoice("file_copy", False, "t"),
        ]
        if with_clone:
            choices.append(CloneChoice("file_copy", True, "t"))
        for choice in choices:
            clone = f"cs_{choice.label.replace('+', '_')}_{uuid.uuid4().hex[:6]}"
            admin.create_database(adm, clone, template=source, choice=choice)
            made.append(clone)
            with connect(target, clone, autocommit=True) as db:
                assert _checksums(db) == expected, choice.label
    finally:
        for name in made:
            admin.drop_database(adm, name)


def test_a_clone_with_each_strategy_holds_what_its_template_holds(settings: Settings) -> None:
    assert settings.database_url is not None
    target = ServerTarget.from_url(settings.database_url.get_secret_value(), name="localhost")
    with connect(target, autocommit=True) as adm:
        _assert_every_strategy_copies_the_template(adm, target, with_clone=False)


# ------------------------------------------------------------------ the choice, per provision


def _wal_of_provision(settings: Settings, env: Env, **extra: Any) -> tuple[int, str]:
    """WAL bytes the server wrote during one provision with ``settings``, and the tenant's
    database. WAL_LOG writes the template's every page into the WAL; FILE_COPY nearly none."""
    key = extra.pop("key", env.template)
    with (
        TenantService(settings.model_copy(update=extra), env.target) as svc,
        connect(env.target, autocommit=True) as adm,
    ):
        svc.clone_support(adm, env.target)  # detected before, not inside the measurement
        before = admin.wal_lsn(adm)
        view = svc.provision(f"cs-{uuid.uuid4().hex[:8]}", template=key)
        return admin.wal_bytes_since(adm, before), view.tenant.database


def _template_size(env: Env, key: str) -> int:
    with psycopg.connect(env.target.conninfo, dbname=env.settings.system_db_name) as reg:
        build = template_builds.current_build(reg, key, env.target.name)
    assert build is not None
    assert build.size_bytes is not None
    return build.size_bytes


def test_the_override_settings_choose_the_strategy_of_each_provision(env: Env) -> None:
    size = _template_size(env, env.template)
    assert size < 32 * MB  # the built-in basic: under the default threshold
    # auto on a host that cannot clone files, under the threshold: WAL_LOG, the template's
    # pages in the WAL.
    auto_small, _ = _wal_of_provision(env.settings, env)
    wal_log, _ = _wal_of_provision(env.settings, env, clone_strategy="wal_log")
    file_copy, _ = _wal_of_provision(env.settings, env, clone_strategy="file_copy")
    # auto with a threshold under the template's size: FILE_COPY.
    auto_large, _ = _wal_of_provision(env.settings, env, clone_file_copy_above="1kB")
    pages = size // 2  # most of the template's bytes are pages WAL_LOG logs
    assert wal_log > pages, (size, wal_log)
    assert auto_small > pages, (size, auto_small)
    assert file_copy < MB, file_copy
    assert auto_large < MB, auto_large


def test_a_templates_own_clone_strategy_wins_over_the_setting(env: Env, tmp_path: Path) -> None:
    key = template_support.new_key("cs")
    source = template_support.copy_builtin(tmp_path, "basic", key)
    manifest = template_support.read_json(source / "template.json")
    template_support.write_json(
        source / "template.json", manifest | {"clone_strategy": "file_copy"}
    )
    build = template_support.build(env.target, env.settings, key, source_dir=source)
    assert build.clone_strategy == "file_copy"
    # (The session's clean-up drops its databases with the installation's.)
    wal, _ = _wal_of_provision(env.settings, env, clone_strategy="wal_log", key=key)
    assert wal < MB, wal


def _wal_of_catalog_read(env: Env, key: str, **extra: Any) -> int:
    """WAL bytes the server wrote while ``build_catalog`` read the catalog of ``key``'s current
    build from a scratch clone (its recorded catalog erased first, as a build made before
    builds recorded theirs)."""
    from monk.service.templates import TemplateService

    with psycopg.connect(
        env.target.conninfo, dbname=env.settings.system_db_name, autocommit=True
    ) as reg:
        build = template_builds.current_build(reg, key, env.target.name)
        assert build is not None
        reg.execute("UPDATE template_builds SET catalog = NULL WHERE id = %s", (build.id,))
    with (
        TemplateService.open(env.settings.model_copy(update=extra), env.target) as templates,
        connect(env.target, autocommit=True) as adm,
    ):
        before = admin.wal_lsn(adm)
        found = templates.build_catalog(key, build.version)
        wal = admin.wal_bytes_since(adm, before)
    assert found is not None
    assert found[1].tables  # read from the clone, and recorded again
    return wal


def test_a_builds_catalog_is_read_from_a_clone_made_with_the_templates_strategy(
    env: Env, tmp_path: Path
) -> None:
    """``build_catalog``'s scratch clone follows the one choice (it cloned with the server's
    default, WAL_LOG, whatever the template or the settings said)."""
    key = template_support.new_key("cs")
    source = template_support.copy_builtin(tmp_path, "basic", key)
    template_support.build(env.target, env.settings, key, source_dir=source)
    pages = _template_size(env, key) // 2
    assert _wal_of_catalog_read(env, key, clone_strategy="wal_log") > pages
    assert _wal_of_catalog_read(env, key, clone_strategy="file_copy") < MB


def test_a_bad_value_is_a_config_error_and_changes_nothing(
    monk: RunMonk, settings: Settings, tmp_path: Path
) -> None:
    done = monk("tenant", "list", env={"MONK_CLONE_STRATEGY": "turbo"})
    assert done.returncode != 0
    assert (
        "MONK_CLONE_STRATEGY: 'turbo' is not a clone strategy; use one of auto, wal_log, "
        "file_copy" in done.stderr
    )
    assert "Traceback" not in done.stderr
    source = template_support.copy_builtin(tmp_path, "basic", template_support.new_key("cs"))
    manifest = template_support.read_json(source / "template.json")
    template_support.write_json(source / "template.json", manifest | {"clone_strategy": "fast"})
    done = monk("template", "build", source.name, "--source", str(source))
    assert done.returncode == 2, done.stderr
    assert "clone_strategy: 'fast' is not a clone strategy" in done.stderr
    with psycopg.connect(settings.database_url.get_secret_value()) as conn:  # type: ignore[union-attr]
        assert admin.list_databases(conn, f"monk_%{source.name}%") == []


def test_xfs_data_dir_a_cold_provision_clones_files(tmp_path: Path) -> None:
    """``monk`` itself with MONK_DATA_DIR on XFS: db status shows it, and a cold provision of a
    template is a FILE_COPY + clone (no WAL for its pages) holding the template's content."""
    with xfs_with_reflink(tmp_path) as mnt:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MONK_")} | {
            "MONK_DATA_DIR": str(mnt / "monk"),
            "MONK_EMBEDDED_PORT": str(free_port()),
            "MONK_EMBEDDED_DURABLE": "false",
            "MONK_POOL_SPARES": "{}",
            # basic is 8 MB, under the default threshold (where WAL_LOG is faster): lowered,
            # so that auto clones it as it would a large template.
            "MONK_CLONE_FILE_COPY_ABOVE": "1MB",
        }

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [MONK_BIN, *args], env=env, capture_output=True, text=True, timeout=180
            )

        try:
            assert run("db", "start").returncode == 0
            status = json.loads(run("db", "status", "--json").stdout)
            assert status["file_cloning"]["supported"] is True
            host = json.loads(run("host", "show", "localhost", "--json").stdout)
            assert host["file_cloning"]["supported"] is True
            assert run("template", "build", "basic").returncode == 0
            url = run("db", "url").stdout.strip()
            with psycopg.connect(url, autocommit=True) as conn:
                before = admin.wal_lsn(conn)
                made = run("tenant", "create", "xfs-acme")
                assert made.returncode == 0, made.stderr
                wal = admin.wal_bytes_since(conn, before)
            assert wal < MB, wal
        finally:
            run("db", "stop")
