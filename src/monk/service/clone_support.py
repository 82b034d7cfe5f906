"""Per host: can its server clone a database's files (PostgreSQL 18's ``file_copy_method =
clone`` on a reflink filesystem)? Detected by trying, recorded in the host's row, and read by
every clone's choice of strategy (``Pipeline.clone_choice``).

Detection, in order:

1. PostgreSQL before 18 has no ``file_copy_method``: no.
2. A FILE_COPY clone of template0 with ``file_copy_method = clone``: an error (a server that
   refuses the setting, a platform without a clone call) is a no, with the server's words.
3. That clone succeeding proves little on Linux: ``copy_file_range`` copies byte by byte where
   the filesystem cannot share blocks (ext4, tmpfs). Where the server's data directory is
   visible from here (the embedded server, a server on this machine: same path, same cluster
   identifier in ``global/pg_control``), the filesystem is asked directly (``FICLONE``).
4. Elsewhere (a remote host) it is measured: a 64 MB probe database cloned with FILE_COPY,
   ``copy`` against ``clone``, each less the cost of a FILE_COPY of template0 (the two
   checkpoints every FILE_COPY forces): a clone at least 4x cheaper than the copy is a reflink.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from monk.adapters import reflink
from monk.adapters.postgres import admin
from monk.adapters.postgres.connection import ServerTarget, connect
from monk.adapters.registry import hosts as host_registry
from monk.adapters.registry.templates import TemplateBuild
from monk.core import clone_strategy
from monk.core.clone_strategy import CloneChoice
from monk.errors import MonkError
from monk.settings import Settings

log = logging.getLogger(__name__)

PROBE_PREFIX = "monk_clone_probe_"
_PROBE_MB = 64
_MEASURED_RATIO = 4.0


@dataclass(frozen=True)
class CloneSupport:
    supported: bool
    detail: str
    """How it was found, in a sentence (shown by ``monk host show`` and ``monk db status``)."""

    def as_dict(self) -> dict[str, Any]:
        return {"supported": self.supported, "detail": self.detail}


def detect(
    adm: psycopg.Connection[Any], target: ServerTarget, *, look_at_files: bool = True
) -> CloneSupport:
    """Detect the server's file cloning (see the module's docstring); ``adm`` is an autocommit
    admin connection to it. ``look_at_files=False`` skips step 3 (tests measure with it)."""
    facts = admin.clone_facts(adm)
    if facts.version_num < admin.FILE_COPY_METHOD_SINCE:
        major = facts.version_num // 10000
        return CloneSupport(
            False, f"PostgreSQL {major}: file_copy_method = clone needs PostgreSQL 18"
        )
    probe = f"{PROBE_PREFIX}{secrets.token_hex(4)}"
    clone = CloneChoice("file_copy", True, "probe")
    try:
        admin.try_clone(adm, probe, "template0", clone)
    except (psycopg.Error, MonkError) as exc:
        admin.drop_database(adm, probe)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return CloneSupport(
            False, f"a FILE_COPY clone with file_copy_method = clone failed: {first}"
        )
    if look_at_files and facts.data_directory and facts.system_identifier:
        where = Path(facts.data_directory)
        if reflink.cluster_identifier(where) == facts.system_identifier:
            shares = reflink.supports_reflink(where)
            if shares is not None:
                return CloneSupport(
                    shares,
                    f"the filesystem of {where} "
                    + (
                        "shares blocks between files (reflink)"
                        if shares
                        else "cannot share blocks (no reflink): a clone would copy every byte"
                    ),
                )
    return _measure(adm, target)


def choice(settings: Settings, build: TemplateBuild, *, supported: bool) -> CloneChoice:
    """The strategy of a clone of ``build`` on a host that does (not) clone files: the one
    decision (``monk.core.clone_strategy.choose``) with the settings and the build's size and
    template.json value. Every clone of a template asks here."""
    return clone_strategy.choose(
        setting=settings.clone_strategy,
        template_setting=(
            None
            if build.clone_strategy is None
            else clone_strategy.parse_strategy_setting(build.clone_strategy)
        ),
        clone_available=supported,
        size_bytes=build.size_bytes,
        file_copy_above=settings.file_copy_above,
    )


def detect_and_record(
    reg: psycopg.Connection[Any],
    adm: psycopg.Connection[Any],
    target: ServerTarget,
    *,
    is_local: bool,
) -> CloneSupport:
    """``detect``, then the answer in the host's row (the local host's made if needed)."""
    found = detect(adm, target)
    if is_local:
        host_registry.ensure_local(reg, target.name, host_registry.LOCAL_ID)
    host_registry.record_clone_support(
        reg, target.name, supported=found.supported, detail=found.detail
    )
    log.info("host %s: file cloning %s", target.name, found.detail)
    return found


def recorded(reg: psycopg.Connection[Any], name: str) -> CloneSupport | None:
    """What the host's row says (None: never detected)."""
    supported, detail = host_registry.clone_support(reg, name)
    if supported is None or detail is None:
        return None
    return CloneSupport(supported, detail)


def _measure(adm: psycopg.Connection[Any], target: ServerTarget) -> CloneSupport:
    source = f"{PROBE_PREFIX}{secrets.token_hex(4)}"
    copy = CloneChoice("file_copy", False, "probe")
    clone = CloneChoice("file_copy", True, "probe")
    try:
        admin.create_database(adm, source, template="template0")
        with connect(target, source, autocommit=True, purpose="clone-probe") as db:
            admin.fill_probe_database(db, _PROBE_MB)
        name = f"{source}_c"
        base = min(admin.try_clone(adm, name, "template0", copy) for _ in range(2))
        copied = min(admin.try_clone(adm, name, source, copy) for _ in range(2)) - base
        cloned = min(admin.try_clone(adm, name, source, clone) for _ in range(2)) - base
    finally:
        admin.drop_database(adm, f"{source}_c")
        admin.drop_database(adm, source)
    shares = cloned * _MEASURED_RATIO < copied
    return CloneSupport(
        shares,
        f"measured on a {_PROBE_MB} MB database: FILE_COPY took {copied:.0f} ms with copy and "
        f"{cloned:.0f} ms with clone beyond its checkpoints ("
        + ("a reflink" if shares else "no reflink: both copy the bytes")
        + ")",
    )
