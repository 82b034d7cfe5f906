"""Builds after they are made: show them, drop one, prune the retired ones nobody needs."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import psycopg

from monk.adapters.postgres import admin
from monk.adapters.postgres.connection import ServerTarget
from monk.adapters.registry import templates as builds
from monk.adapters.registry.templates import TemplateBuild
from monk.core.template_names import validate_version
from monk.errors import InvalidState, TemplateInUse, TemplateNotFound

Conn = psycopg.Connection[Any]


def show(reg: Conn, host: str, key: str, version: str | None) -> TemplateBuild:
    """The current build of ``key``, or its latest build of ``version``."""
    if version is None:
        build = builds.current_build(reg, key, host)
        if build is None:
            raise TemplateNotFound(f"template {key!r} has no current build", template=key)
        return build
    rows = builds.builds_of_version(reg, key, host, validate_version(version))
    if not rows:
        raise TemplateNotFound(f"template {key!r} has no build {version}", template=key)
    return rows[0]


def needed_by_tenants(reg: Conn, build: TemplateBuild) -> int:
    """Live tenants cloned from this build's version, unless the current build serves it."""
    if not build.is_current:
        current = builds.current_build(reg, build.key, build.host)
        if current is not None and current.version == build.version:
            return 0
    return builds.live_tenants_of(reg, build.key, build.version, build.host)


def drop(
    reg: Conn, adm: Conn, target: ServerTarget, key: str, version: str | None, *, force: bool
) -> TemplateBuild:
    """With the key's lock held: drop a build (default: the current one) and its database.

    Refuses, unless ``force``, the current build and a build whose version live tenants record.
    """
    if version is None:
        found = builds.current_build(reg, key, target.name)
        candidates = [found] if found else []
    else:
        candidates = builds.live_builds_of_version(reg, key, target.name, validate_version(version))
    if not candidates:
        what = "current build" if version is None else f"live build {version}"
        raise TemplateNotFound(f"template {key!r} has no {what}", template=key)
    build = candidates[0]
    if build.is_current and not force:
        raise TemplateInUse(
            f"{build.database} ({key} {build.version}) is the current build of {key!r}: "
            "new tenants are cloned from it; use --force to drop it anyway",
            template=key,
        )
    tenants = needed_by_tenants(reg, build)
    if tenants and not force:
        raise TemplateInUse(
            f"{tenants} live tenant(s) were cloned from {key} {build.version}; "
            "use --force to drop it anyway",
            template=key,
        )
    admin.drop_database(adm, build.database)
    builds.mark_dropped(reg, build.id)
    return builds.get(reg, build.id)


def prune_key(
    reg: Conn,
    adm: Conn,
    target: ServerTarget,
    key: str,
    *,
    retired_before: datetime | None = None,
    kept: list[str],
) -> list[TemplateBuild]:
    """With the key's lock held: drop its retired builds that nothing needs (no tenant that
    holds a database, trashed ones included; no archive of a purged tenant, which a restore
    brings back at that build; no spare), retired before ``retired_before`` if given; and
    forget its failed builds but the latest (they have no database left; the latest still
    tells ``template list --all`` why the key's last build failed).

    A build whose database cannot be dropped now (a session holds a lock on it) stays retired
    and is named in ``kept``; the builds after it are still dropped, so one busy database never
    holds the others' disk hostage."""
    dropped = []
    for build in builds.retired_unneeded(reg, key, target.name):
        if retired_before is not None and (
            build.retired_at is None or build.retired_at > retired_before
        ):
            continue
        try:
            admin.drop_database(adm, build.database)
        except InvalidState as exc:
            kept.append(f"{build.key} {build.version}: {exc.message}")
            continue
        builds.mark_dropped(reg, build.id)
        dropped.append(builds.get(reg, build.id))
    dropped.extend(builds.forget_failed_but_latest(reg, key, target.name))
    return dropped
