"""Helpers of the template tests: unique keys, source copies, scratch clones, clean-up."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from monk.adapters.postgres.connection import ServerTarget
from monk.service.templates import BuildResult, TemplateBuild, TemplateService
from monk.settings import Settings
from monk.templates.source import builtin_sources_dir


def new_key(prefix: str = "t") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def copy_builtin(tmp_path: Path, name: str, key: str | None = None) -> Path:
    """A writable copy of a built-in source at ``tmp_path/<key or name>``."""
    dest = tmp_path / (key or name)
    shutil.copytree(builtin_sources_dir() / name, dest)
    return dest


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def key_databases(admin_url: str, key: str) -> list[str]:
    """Every database a build, check or staging of ``key`` may occupy."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname = %s OR datname ~ %s OR datname ~ %s"
            " ORDER BY 1",
            (
                f"monk_template_{key}",
                f"^monk_(staging|retired)_{key}_[0-9a-f]{{16}}$",
                f"^monk_check_{key}_[0-9a-f]{{8}}$",
            ),
        ).fetchall()
    return [str(r[0]) for r in rows]


def staging_databases(admin_url: str, key: str) -> list[str]:
    return [name for name in key_databases(admin_url, key) if name.startswith("monk_staging_")]


def drop_databases(admin_url: str, names: list[str]) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        for name in names:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if exists.fetchone() is None:
                continue
            ident = sql.Identifier(name)
            conn.execute(sql.SQL("ALTER DATABASE {} IS_TEMPLATE false").format(ident))
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))


def drop_key(admin_url: str, key: str) -> None:
    drop_databases(admin_url, key_databases(admin_url, key))


@contextmanager
def scratch_clone(admin_url: str, template_db: str) -> Iterator[psycopg.Connection[Any]]:
    """A connection to a fresh clone of ``template_db`` (the template itself is never opened)."""
    name = f"scratch_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template_db)
            )
        )
    try:
        with psycopg.connect(admin_url, dbname=name, autocommit=True) as db:
            yield db
    finally:
        drop_databases(admin_url, [name])


def database_flags(admin_url: str, name: str) -> dict[str, Any]:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT datistemplate, datallowconn, has_database_privilege('public', datname,"
            " 'CONNECT'), pg_get_userbyid(datdba) = current_user,"
            " (SELECT count(*) FROM pg_stat_activity a WHERE a.datname = d.datname"
            "  AND a.backend_type = 'client backend')"
            " FROM pg_database d WHERE datname = %s",
            (name,),
        ).fetchone()
    assert row is not None, f"database {name} does not exist"
    return {
        "is_template": row[0],
        "allow_connections": row[1],
        "public_connect": row[2],
        "owned_by_admin": row[3],
        "sessions": row[4],
    }


def assert_closed_template(admin_url: str, name: str) -> None:
    assert database_flags(admin_url, name) == {
        "is_template": True,
        "allow_connections": False,
        "public_connect": False,
        "owned_by_admin": True,
        "sessions": 0,
    }


def build_template(
    target: ServerTarget, settings: Settings, key: str, **options: Any
) -> BuildResult:
    """Build ``key`` through the public TemplateService, on pools of its own."""
    with TemplateService.open(settings, target) as templates:
        return templates.build(key, **options)


def build(target: ServerTarget, settings: Settings, key: str, **options: Any) -> TemplateBuild:
    """``build_template``'s build (new or already current)."""
    return build_template(target, settings, key, **options).build


def rebuild_after_first_prepare(
    prepare: Callable[..., tuple[int, bool]],
    target: ServerTarget,
    settings: Settings,
    key: str,
    source: Path,
    rebuilt: list[str],
) -> Callable[..., tuple[int, bool]]:
    """``prepare`` (a service's step after the clone), followed the first time by a real
    rebuild of ``key`` from a changed ``source``: the rebuild lands between a clone and the
    commit that uses it. The new build's version is appended to ``rebuilt``."""

    def prepare_then_rebuild(*args: object, **kwargs: object) -> tuple[int, bool]:
        done = prepare(*args, **kwargs)
        if not rebuilt:
            manifest = json.loads((source / "template.json").read_text())
            manifest["description"] = "rebuilt between a clone and its commit"
            (source / "template.json").write_text(json.dumps(manifest))
            rebuilt.append(build(target, settings, key, source_dir=source).version)
        return done

    return prepare_then_rebuild
