"""The fleet's hosts: the PostgreSQL servers monk may place tenants on (issue 13, item 1).

The server monk starts with (embedded, or MONK_DATABASE_URL) is the local host, named
MONK_HOST_NAME: it keeps the system database and is listed without being added. Other
servers are added with a URL whose password is kept apart (adapters/host_secrets.py) and
never shown: lists, answers, errors and logs name the URL without it.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg

from monk.adapters.postgres import admin
from monk.adapters.postgres.connection import (
    ServerTarget,
    open_checked,
    split_password,
    with_password,
)
from monk.adapters.registry import fleet as drift_rows
from monk.adapters.registry import hosts as host_registry
from monk.adapters.registry import spare_roles as spare_role_rows
from monk.adapters.registry import spares as spare_rows
from monk.adapters.registry import templates as template_builds
from monk.adapters.registry.hosts import HostRow
from monk.core import hosts as rules
from monk.errors import (
    HostExists,
    HostInUse,
    HostNotFound,
    HostUnavailable,
    HostUnsuitable,
    InvalidRequest,
    MonkError,
)
from monk.service import host_templates, pool, role_pool
from monk.service.host_templates import HostBuild, HostProgress
from monk.service.pipeline import Pipeline, pause_at

log = logging.getLogger(__name__)

_LOCAL_ID = host_registry.LOCAL_ID


@dataclass(frozen=True)
class HostView:
    """What callers see of a host: ``monk host list|show`` and the API's host object."""

    name: str
    is_local: bool
    url: str
    state: str
    capacity: int | None
    labels: dict[str, str]
    tenants: int
    server_version: str | None
    added_at: datetime | None
    checked_at: datetime | None
    check_ok: bool | None
    check_error: str | None
    check_latency_ms: float | None
    clone_support: bool | None = None
    clone_detail: str | None = None
    clone_checked_at: datetime | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "local": self.is_local,
            "url": self.url,
            "state": self.state,
            "capacity": self.capacity,
            "tenants": self.tenants,
            "free": None if self.capacity is None else max(self.capacity - self.tenants, 0),
            "labels": dict(self.labels),
            "server_version": self.server_version,
            "added_at": _iso(self.added_at),
            "last_check": {
                "at": _iso(self.checked_at),
                "ok": self.check_ok,
                "error": self.check_error,
                "latency_ms": self.check_latency_ms,
            },
            # Can the server clone files (file_copy_method = clone on a reflink filesystem)?
            # None until detected (host add, host check, db start).
            "file_cloning": {
                "supported": self.clone_support,
                "detail": self.clone_detail,
                "at": _iso(self.clone_checked_at),
            },
        }


@dataclass(frozen=True)
class CheckResult:
    """``monk host check``: reachability, version, latency, tenants against capacity."""

    name: str
    reachable: bool
    state: str
    tenants: int
    capacity: int | None
    server_version: str | None = None
    connect_ms: float | None = None
    latency_ms: float | None = None
    error: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.reachable and not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ok": self.ok,
            "reachable": self.reachable,
            "state": self.state,
            "server_version": self.server_version,
            "connect_ms": self.connect_ms,
            "latency_ms": self.latency_ms,
            "tenants": self.tenants,
            "capacity": self.capacity,
            "free": None if self.capacity is None else max(self.capacity - self.tenants, 0),
            "error": self.error,
            "problems": list(self.problems),
        }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


# ---------------------------------------------------------------- reads


def list_hosts(svc: Pipeline) -> list[HostView]:
    """Every host, the local one first; each with its live tenants and its last check."""
    with svc.hosts.pools().system() as reg:
        rows = host_registry.list_all(reg)
        counts = host_registry.live_tenant_counts(reg)
        _sweep(svc, reg)
        local_version = admin.server_version(reg)
    local_name = svc.hosts.local.name
    local_row = next((r for r in rows if r.name == local_name), None)
    views = [_local_view(svc, local_row, counts.get(local_name, 0), local_version)]
    views += [_view(r, counts.get(r.name, 0)) for r in rows if r.name != local_name]
    return views


def get(svc: Pipeline, name: str) -> HostView:
    for view in list_hosts(svc):
        if view.name == name:
            return view
    raise HostNotFound(f"host {name!r} is not registered ('monk host list')", host=name)


def _view(row: HostRow, tenants: int) -> HostView:
    return HostView(
        name=row.name,
        is_local=False,
        url=row.url or "",
        state=row.state,
        capacity=row.capacity,
        labels=dict(row.labels),
        tenants=tenants,
        server_version=row.server_version,
        added_at=row.added_at,
        checked_at=row.checked_at,
        check_ok=row.check_ok,
        check_error=row.check_error,
        check_latency_ms=row.check_latency_ms,
        clone_support=row.clone_support,
        clone_detail=row.clone_detail,
        clone_checked_at=row.clone_checked_at,
    )


def _local_view(svc: Pipeline, row: HostRow | None, tenants: int, version: str) -> HostView:
    local = svc.hosts.local
    return HostView(
        name=local.name,
        is_local=True,
        url=local_url(local),
        state=row.state if row else "active",
        capacity=row.capacity if row else None,
        labels=dict(row.labels) if row else {},
        tenants=tenants,
        server_version=version,
        added_at=row.added_at if row else None,
        checked_at=row.checked_at if row else None,
        check_ok=row.check_ok if row else None,
        check_error=row.check_error if row else None,
        check_latency_ms=row.check_latency_ms if row else None,
        clone_support=row.clone_support if row else None,
        clone_detail=row.clone_detail if row else None,
        clone_checked_at=row.clone_checked_at if row else None,
    )


def local_url(local: ServerTarget) -> str:
    """The local server's admin URL without its password; one reached over a unix socket
    (the embedded server) is shown at the address it also listens on."""
    return split_password(local.url(local.maintenance_db), public=local)[0]


def _sweep(svc: Pipeline, reg: psycopg.Connection[Any]) -> None:
    """Remove the password files a killed ``host add`` left (no row, no add in flight)."""
    secrets = svc.hosts.secrets
    if secrets is None:
        return
    for host_id in host_registry.abandoned(reg, secrets.ids()):
        secrets.remove(host_id)
        log.warning("removed the password file of an unfinished host add (%s)", host_id)


# ---------------------------------------------------------------- metrics


@dataclass(frozen=True)
class FleetCounts:
    """What /metrics labels by host: live tenants per (host, status), spares per (host,
    status), read from the registry in one session; and the ready (unclaimed) spare roles per
    host as ``monk pool status`` shows them (every host that takes them, 0 included)."""

    tenants: list[tuple[str, str, int]]
    spares: list[tuple[str, str, int]]
    spare_roles: list[tuple[str, int]] = field(default_factory=list)


def fleet_counts(svc: Pipeline) -> FleetCounts:
    with svc.hosts.pools().system() as reg:
        tenants = host_registry.tenant_status_counts(reg)
        spares = host_registry.spare_status_counts(reg)
        roles = [(str(r["host"]), int(r["ready"])) for r in role_pool.status_in(svc, reg)]
    return FleetCounts(tenants, spares, roles)


# ---------------------------------------------------------------- add


def add_with_templates(
    svc: Pipeline,
    name: str,
    url: str,
    *,
    password: str | None = None,
    capacity: int | None = None,
    labels: Mapping[str, str] | Iterable[str] = (),
    templates: bool = True,
    on_added: Callable[[HostView], None] | None = None,
    progress: HostProgress | None = None,
) -> tuple[HostView, list[HostBuild]]:
    """``add``, then (``templates``) build the local host's current templates there, as
    ``monk host add`` and ``POST /api/root/host`` both do. The host stands whatever its builds
    do: a failed one is in the answer (and in 'template list --host'), not raised.
    ``on_added``: told once the host is registered, before the builds."""
    view = add(svc, name, url, password=password, capacity=capacity, labels=labels)
    if on_added is not None:
        on_added(view)
    received = host_templates.receive(svc, view.name, progress) if templates else []
    return view, received


def add(
    svc: Pipeline,
    name: str,
    url: str,
    *,
    password: str | None = None,
    capacity: int | None = None,
    labels: Mapping[str, str] | Iterable[str] = (),
) -> HostView:
    """Register a server as a host, after checking that monk can use it: reachable, a
    supported major version, a role with CREATEDB and CREATEROLE (or a superuser), not
    registered already under another name or URL. Refused, it changes nothing.

    ``password``: given apart (``--password-stdin``), for a URL without one."""
    rules.validate_host_name(name)
    rules.validate_capacity(capacity)
    label_map = (
        {rules.validate_label(k, v): v for k, v in labels.items()}
        if isinstance(labels, Mapping)
        else rules.parse_labels(labels)
    )
    local = svc.hosts.local
    if name == local.name:
        raise HostExists(
            f"host {name!r} is the local server (MONK_HOST_NAME), listed without being added",
            host=name,
        )
    clean_url, in_url = split_password(url, what="--url")
    if password is not None and in_url is not None:
        raise InvalidRequest("the password is given twice: in the URL and apart", field="url")
    password = in_url if password is None else password
    try:
        return _add(svc, name, clean_url, password, capacity, label_map)
    except MonkError as exc:
        # The last guard: whatever a server or parser said, the password is not repeated.
        exc.message = rules.without_secret(exc.message, password)
        raise


def _add(
    svc: Pipeline,
    name: str,
    clean_url: str,
    password: str | None,
    capacity: int | None,
    labels: dict[str, str],
) -> HostView:
    settings = svc.settings
    with svc.hosts.pools().system() as reg:
        _refuse_taken(reg, name, clean_url, None)
        local_ident = admin.server_facts(reg).system_identifier
    target = _target(svc, name, clean_url, password)
    facts, latency_ms = _probe(target)
    problem = rules.unsupported_major(facts.version_num)
    if problem is not None:
        raise HostUnsuitable(f"host {name!r}: {problem} (it runs {facts.version})", host=name)
    missing = rules.missing_privileges(
        superuser=facts.superuser, createdb=facts.createdb, createrole=facts.createrole
    )
    if missing:
        raise HostUnsuitable(
            f"host {name!r}: role {facts.user!r} lacks {' and '.join(missing)}; monk needs a "
            "superuser or a role with CREATEDB and CREATEROLE",
            host=name,
            missing=missing,
        )
    if facts.system_identifier == local_ident:
        raise HostExists(
            f"host {name!r}: that URL reaches the local server {svc.hosts.local.name!r}",
            host=name,
        )
    pause_at(settings, "host-add.checked")
    host_id = uuid.uuid4()
    secrets = svc.hosts.secrets
    stored = False
    try:
        with svc.hosts.pools().system() as reg, reg.transaction():
            host_registry.hold_add_lock(reg, host_id)
            _refuse_taken(reg, name, clean_url, facts.system_identifier)
            try:
                row = host_registry.insert(
                    reg,
                    name=name,
                    host_id=host_id,
                    url=clean_url,
                    system_identifier=facts.system_identifier,
                    capacity=capacity,
                    labels=labels,
                    server_version=facts.version,
                    latency_ms=latency_ms,
                )
            except psycopg.errors.UniqueViolation as exc:
                # Another add of this name (URL, cluster) committed first: it won.
                raise _taken(name, exc.diag.constraint_name) from None
            if password is not None and secrets is not None:
                secrets.put(host_id, password)
                stored = True
            pause_at(settings, "host-add.stored")
            # Read back what was stored, and connect with it: the server is still there,
            # and the row commits only with credentials that work.
            _probe(svc.hosts.remote_target(row))
            # monk's functions there (the provision's steps, as the system database has
            # them): a host where they cannot be installed is refused with the reason.
            svc.hosts.install_functions(svc.hosts.remote_target(row))
    except BaseException:
        if stored and secrets is not None:
            secrets.remove(host_id)
        raise
    log.info("added host %s (%s, PostgreSQL %s)", name, clean_url, facts.version)
    _detect_cloning(svc, name)
    return get(svc, name)


def _detect_cloning(svc: Pipeline, name: str) -> None:
    """Whether the host clones files, recorded in its row (the strategy of its clones); a
    failure is logged and leaves it undetected (the first clone there detects it again)."""
    target = svc.hosts.target(name)
    try:
        with svc.hosts.pools(name).admin() as adm:
            svc.clone_support(adm, target, refresh=True)
    except (MonkError, psycopg.Error) as exc:
        log.warning("host %s: file cloning not detected: %s", name, exc)


def _target(svc: Pipeline, name: str, clean_url: str, password: str | None) -> ServerTarget:
    s = svc.settings
    return ServerTarget.from_url(
        with_password(clean_url, password),
        name=name,
        connect_timeout=s.connect_timeout,
        statement_timeout_ms=s.statement_timeout_ms,
        source=f"host {name!r}",
    )


def _probe(target: ServerTarget) -> tuple[admin.ServerFacts, float]:
    """The server's facts and a round trip's time (ms)."""
    conn = open_checked(target, purpose="host-check")
    try:
        latency_ms = admin.round_trip_ms(conn)
        return admin.server_facts(conn), round(latency_ms, 3)
    except psycopg.OperationalError as exc:
        raise HostUnavailable(
            f"{target.source}: the server stopped answering: {str(exc).strip().splitlines()[0]}",
            host=target.name,
        ) from None
    finally:
        conn.close()


def _refuse_taken(
    reg: psycopg.Connection[Any], name: str, url: str, system_identifier: str | None
) -> None:
    existing = host_registry.get(reg, name)
    if existing is not None:
        raise HostExists(f"host {name!r} is registered already", host=name)
    other = host_registry.find_server(reg, url=url, system_identifier=system_identifier or "")
    if other is not None:
        what = "that URL" if other.url == url else "that server (same cluster, another URL)"
        raise HostExists(f"{what} is registered already as host {other.name!r}", host=other.name)


def _taken(name: str, constraint: str | None) -> HostExists:
    what = {
        "hosts_url": "its URL is registered already",
        "hosts_system_identifier_key": "its server is registered already",
    }.get(constraint or "", "a host of that name was added at the same time")
    return HostExists(f"host {name!r} not added: {what}", host=name)


# ---------------------------------------------------------------- check, drain, remove


def check(svc: Pipeline, name: str) -> CheckResult:
    """Connect (within MONK_CONNECT_TIMEOUT), measure, count; recorded as its last check."""
    local = svc.hosts.local
    with svc.hosts.pools().system() as reg:
        row = host_registry.get(reg, name)
        if name != local.name and (row is None or row.is_local):
            raise HostNotFound(f"host {name!r} is not registered ('monk host list')", host=name)
        tenants = host_registry.live_tenant_counts(reg).get(name, 0)
    target = local if name == local.name else svc.hosts.target(name)
    state = row.state if row else "active"
    capacity = row.capacity if row else None
    started = time.perf_counter()
    try:
        facts, latency_ms = _probe(target)
    except (HostUnavailable, HostUnsuitable) as exc:
        result = CheckResult(name, False, state, tenants, capacity, error=exc.message)
    else:
        connect_ms = round((time.perf_counter() - started) * 1000 - latency_ms, 3)
        problems = []
        if (why := rules.unsupported_major(facts.version_num)) is not None:
            problems.append(why)
        if missing := rules.missing_privileges(
            superuser=facts.superuser, createdb=facts.createdb, createrole=facts.createrole
        ):
            problems.append(f"role {facts.user!r} lacks {' and '.join(missing)}")
        if capacity is not None and tenants > capacity:
            problems.append(f"{tenants} tenants over its capacity of {capacity}")
        result = CheckResult(
            name,
            True,
            state,
            tenants,
            capacity,
            server_version=facts.version,
            connect_ms=connect_ms,
            latency_ms=latency_ms,
            problems=problems,
        )
    if result.reachable:
        _detect_cloning(svc, name)
    with svc.hosts.pools().system() as reg:
        if name == local.name:
            host_registry.ensure_local(reg, name, _LOCAL_ID)
        host_registry.record_check(
            reg,
            name,
            ok=result.ok,
            error=result.error or ("; ".join(result.problems) or None),
            latency_ms=result.latency_ms,
            server_version=result.server_version,
        )
    return result


def set_state(svc: Pipeline, name: str, state: str) -> HostView:
    """``draining`` (placement will skip it; moving its tenants off comes with moves) or
    ``active``."""
    if state not in rules.HOST_STATES:
        raise InvalidRequest(f"host state must be one of {rules.HOST_STATES}, not {state!r}")
    with svc.hosts.pools().system() as reg:
        if name == svc.hosts.local.name:
            host_registry.ensure_local(reg, name, _LOCAL_ID)
        if host_registry.set_state(reg, name, state) is None:
            raise HostNotFound(f"host {name!r} is not registered ('monk host list')", host=name)
    return get(svc, name)


def update(
    svc: Pipeline,
    name: str,
    *,
    capacity: int | None = None,
    unlimited: bool = False,
    labels: Mapping[str, str] | Iterable[str] | None = None,
) -> HostView:
    """Change a host's capacity (``unlimited``: none) and/or replace its labels; the local
    host's too (placement weighs it like the others)."""
    if capacity is not None and unlimited:
        raise InvalidRequest("give a capacity or no limit, not both", field="capacity")
    rules.validate_capacity(capacity)
    label_map: dict[str, str] | None = None
    if labels is not None:
        label_map = (
            {rules.validate_label(k, v): v for k, v in labels.items()}
            if isinstance(labels, Mapping)
            else rules.parse_labels(labels)
        )
    with svc.hosts.pools().system() as reg:
        if name == svc.hosts.local.name:
            host_registry.ensure_local(reg, name, _LOCAL_ID)
        changed = host_registry.update(
            reg,
            name,
            capacity=capacity,
            set_capacity=capacity is not None or unlimited,
            labels=label_map,
        )
        if changed is None:
            raise HostNotFound(f"host {name!r} is not registered ('monk host list')", host=name)
    return get(svc, name)


def remove(svc: Pipeline, name: str) -> HostView:
    """Unregister a host that no live tenant records, with every row the registry keeps of
    it (template builds and their upgrade steps, spares, spare roles, drift checks) in the
    same transaction; then drop its template databases there and forget its password."""
    if name == svc.hosts.local.name:
        raise InvalidRequest(
            f"host {name!r} is the local server: it keeps the system database and cannot be "
            "removed",
            host=name,
        )
    target: ServerTarget | None
    try:
        target = svc.hosts.target(name)
    except HostNotFound:
        raise
    except MonkError as exc:
        # A damaged password file says to remove the host: that must still work (its
        # template databases then stay there).
        log.warning("host %s: %s", name, exc.message)
        target = None
    try:
        # Its warm spares go first (dropped there while it answers; a refill is harmless if
        # the removal is then refused).
        pool.drain(svc, host=name)
        role_pool.drain(svc, host=name)
    except MonkError as exc:
        log.warning("could not drop the spares of host %s: %s", name, exc.message)
    databases: list[str] = []
    with svc.hosts.pools().system() as reg:
        with reg.transaction():
            gone = host_registry.delete_unused(reg, name)
            if gone is not None:
                spare_rows.forget_host(reg, name)
                spare_role_rows.forget_host(reg, name)
                drift_rows.forget_host(reg, name)
                databases = template_builds.forget_host(reg, name)
        if gone is None:
            row = host_registry.get(reg, name)
            if row is None:
                raise HostNotFound(f"host {name!r} is not registered ('monk host list')", host=name)
            n = host_registry.live_tenant_counts(reg).get(name, 0)
            raise HostInUse(
                f"host {name!r} has {n} live tenant(s): move or purge them first", host=name
            )
    pause_at(svc.settings, "host-remove.committed")
    _drop_templates(target, databases)
    if svc.hosts.secrets is not None:
        svc.hosts.secrets.remove(gone.id)
    svc.hosts.forget(name)
    log.info("removed host %s", name)
    return _view(gone, 0)


def _drop_templates(target: ServerTarget | None, databases: list[str]) -> None:
    """The template databases of a removed host, dropped there while it answers: a server
    added again later receives its builds anew. One that is down keeps them (logged): an add
    of it then refuses to build over them, naming each."""
    if target is None or not databases:
        return
    try:
        conn = open_checked(target, purpose="host-remove")
    except MonkError as exc:
        log.warning("host %s removed; its template databases stay there: %s", target.name, exc)
        return
    try:
        for database in databases:
            try:
                admin.drop_database(conn, database)
            except (MonkError, psycopg.Error) as exc:
                log.warning("host %s removed; %s not dropped there: %s", target.name, database, exc)
    finally:
        conn.close()
