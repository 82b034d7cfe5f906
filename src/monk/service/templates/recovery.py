"""What crashed builds and checks leave behind, and settling it.

Every build, check, drop and prune of a key holds a session advisory lock on the key in the
system database. A ``building`` row whose key lock nobody holds belongs to a dead process; the
next build of the key (and ``cleanup_leftovers``, run by ``monk doctor``) drops its staging
database and marks it failed, or, when the process died after the renames committed but before
the registry caught up (journal step ``swap``, staging name gone), finishes the registry
update. Advisory locks live in the system database, so they serialise the monk processes of one
installation; database names are cluster-wide, so two installations sharing a server must not
use the same template keys.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg

from monk.adapters.postgres import admin
from monk.adapters.postgres.connection import ServerTarget
from monk.adapters.registry import templates as builds
from monk.core.template_names import STAGING_DB_PREFIX, template_db_name
from monk.service.templates.health import CHECK_DB_PREFIX, check_mark
from monk.settings import Settings

log = logging.getLogger(__name__)

Conn = psycopg.Connection[Any]


def recover_key(reg: Conn, adm: Conn, target: ServerTarget, key: str) -> list[str]:
    """With the key's lock held: settle every 'building' row of ``key`` (their process is
    dead). Returns the staging databases handled."""
    handled = []
    for row in builds.builds_in_status(reg, key, target.name, "building"):
        op = builds.build_operation(reg, row.id)
        staging_exists = admin.database_exists(adm, row.database)
        if (
            op is not None
            and op.step == "swap"
            and not staging_exists
            and row.database.startswith(STAGING_DB_PREFIX)
            and admin.database_exists(adm, template_db_name(key))
        ):
            # Died after the renames committed: the registry only has to catch up.
            log.warning("finishing the interrupted swap of %s", row.database)
            builds.finish_swap(reg, key, target.name, row.id, op.id, op.result)
            handled.append(row.database)
            continue
        if staging_exists and row.database.startswith(STAGING_DB_PREFIX):
            admin.drop_database(adm, row.database)
        builds.mark_failed(
            reg,
            row.id,
            op.id if op is not None else None,
            "interrupted: the building process died",
            "process died; undone",
        )
        handled.append(row.database)
    return handled


def _dead_keys(reg: Conn, host: str, lock_host: str | None) -> list[str]:
    """Keys with a 'building' row whose build process is gone (nobody holds the key lock)."""
    return [
        k
        for k in builds.keys_in_status(reg, host, ["building"])
        if builds.key_is_free(reg, k, lock_host)
    ]


def _orphan_checks(adm: Conn, settings: Settings) -> list[str]:
    """Scratch databases of a ``check`` killed before it dropped them (ours, by their mark)."""
    return admin.databases_commented(adm, CHECK_DB_PREFIX, check_mark(settings))


def _check_key(name: str) -> str:
    """The key of a scratch check database ``monk_check_<key>_<8 hex>``."""
    return name.removeprefix(CHECK_DB_PREFIX)[: -(1 + 8)]


def find_leftovers(
    reg: Conn, adm: Conn, target: ServerTarget, settings: Settings, lock_host: str | None = None
) -> list[str]:
    """What interrupted builds and checks left behind: the staging databases of dead builds
    (present or not, their rows still say 'building') and orphaned check databases."""
    found = []
    for key in _dead_keys(reg, target.name, lock_host):
        found += [
            row.database for row in builds.builds_in_status(reg, key, target.name, "building")
        ]
    found += [
        name
        for name in _orphan_checks(adm, settings)
        if builds.key_is_free(reg, _check_key(name), lock_host)
    ]
    return sorted(found)


def cleanup_leftovers(
    reg: Conn, adm: Conn, target: ServerTarget, settings: Settings, lock_host: str | None = None
) -> list[str]:
    """Settle what ``find_leftovers`` reports; returns the names handled. Builds and checks
    running right now are left alone (their key lock is held)."""
    handled: list[str] = []
    for key in builds.keys_in_status(reg, target.name, ["building"]):
        with builds.key_lock_if_free(reg, key, lock_host) as mine:
            if mine:
                handled += recover_key(reg, adm, target, key)
    for name in _orphan_checks(adm, settings):
        with builds.key_lock_if_free(reg, _check_key(name), lock_host) as mine:
            if mine:
                admin.drop_database(adm, name)
                handled.append(name)
    return sorted(handled)
