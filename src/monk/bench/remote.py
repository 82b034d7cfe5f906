"""``monk bench --remote``: provisioning on a host of the fleet, against the bare clone there.

In one run, beside this installation's own server:

    start     a second embedded PostgreSQL (same major, same durability) in a temp dir, on a
              free port, reached over TCP with a password as a managed server would be;
              ``monk host add`` it (which installs monk's functions and builds the template
              there from source)
    raw       ``CREATE DATABASE … TEMPLATE monk_template_<key>`` on that host, timed
    cold      ``monk tenant create --host`` that host with no spare there: a clone, its role
              (a spare role of that host, made ahead untimed, renamed there) and configure run
              there (monk's functions), the registry on the local server
    new_role  the same by a process without spare roles: the role made beside the clone
    warm      the same with spares made there first (untimed): the handout claims one in the
              registry, renames it on the host, activates
              raw, cold and new_role take turns round by round (in a shuffled
              order), so that all see the same load; the root passwords are hashed ahead and
              settled before each sample, as ``monk serve`` keeps them (not hashed beside
              the clone)

Everything made is removed at the end: the tenants' rows, the host, the second server.
"""

from __future__ import annotations

import contextlib
import logging
import random
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from psycopg import sql

from monk.adapters import registry
from monk.adapters.embedded import SUPERUSER, EmbeddedServer
from monk.adapters.postgres.connection import ServerTarget, connect
from monk.bench.stats import ratio, summarize
from monk.service import host_templates, hosts, pool, role_pool, root_users
from monk.service.tenants import TenantService
from monk.settings import Settings

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]

HOST = "bench-remote"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RemoteBench:
    def __init__(
        self,
        settings: Settings,
        target: ServerTarget,
        *,
        template: str = "saas",
        iterations: int = 30,
        progress: Progress | None = None,
    ) -> None:
        self.run_id = secrets.token_hex(3)
        # No refill of this key beside the timed rounds: the warm rounds make their own.
        self.settings = settings.model_copy(update={"pool_spares": {}, "pool_roles": 0})
        self.target = target
        self.template = template
        self.n = iterations
        self.progress = progress or (lambda phase, done, total: None)
        self.dir = Path(tempfile.mkdtemp(prefix="monk-bench-remote-"))
        self.server = EmbeddedServer(
            self.dir / "server", port=_free_port(), durable=settings.embedded_durable
        )
        self._tenants: list[str] = []

    def run(self) -> dict[str, Any]:
        self.progress("starting a second server", 0, 1)
        self.server.ensure_running()
        try:
            with TenantService(self.settings, self.target) as svc:
                try:
                    return self._measure(svc)
                finally:
                    self._cleanup(svc)
        finally:
            self.server.stop()
            shutil.rmtree(self.dir, ignore_errors=True)

    def _measure(self, svc: TenantService) -> dict[str, Any]:
        svc.templates.ensure_built(self.template)
        password = self.server.password_file.read_text().strip()
        url = (
            f"postgresql://{SUPERUSER}:{quote(password, safe='')}"
            f"@127.0.0.1:{self.server.port}/postgres"
        )
        hosts.add(svc, HOST, url)
        self.progress("building the template there", 0, 1)
        host_templates.receive(svc, HOST)
        build = svc.current_build(self.template, svc.hosts.target(HOST))
        remote = svc.hosts.pools(HOST)
        raw_ms: list[float] = []
        cold_ms: list[float] = []
        new_role_ms: list[float] = []
        cold_from: list[str] = []
        roles_used = 0
        raws: list[str] = []
        # Spare roles of the host, made untimed (as ``monk serve``'s refiller does in idle
        # time); ``plain`` has none: its provisions make their role beside the clone.
        role_pool.fill(svc, 2 * self.n + 2, host=HOST)
        # As under monk serve: the root user written after the answer (untimed, below), the
        # root passwords hashed ahead (tenant_auth's keep).
        svc.root_after_answer = True
        svc.root_passwords.keep(2)
        with (
            connect(remote.target, autocommit=True, purpose="bench") as adm,
            TenantService(self.settings, self.target) as plain,
        ):
            plain.root_after_answer = True
            plain.root_passwords.keep(2)
            # A shuffled order each round (seeded: repeatable): none always follows the
            # same one (the one after raw meets its writes still being flushed).
            order = random.Random(self.n)  # noqa: S311 - an order of samples, not a secret
            for i in range(self.n):
                self.progress("raw, cold and new_role, in turns", i, self.n)
                variants = ["raw", "cold", "new_role"]
                order.shuffle(variants)
                for variant in variants:
                    svc.root_passwords.settle(5)
                    plain.root_passwords.settle(5)
                    if variant == "raw":
                        name = f"bench_rraw_{self.run_id}_{i}"
                        started = time.perf_counter()
                        adm.execute(
                            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                                sql.Identifier(name), sql.Identifier(build.database)
                            )
                        )
                        raw_ms.append((time.perf_counter() - started) * 1000)
                        raws.append(name)
                        continue
                    tenant = f"bench remote {variant} {self.run_id} {i}"
                    who = plain if variant == "new_role" else svc
                    held = who.role_secrets.count(HOST)
                    started = time.perf_counter()
                    view = who.provision(tenant, template=self.template, host=HOST)
                    took = (time.perf_counter() - started) * 1000
                    root_users.write_pending(who, view.tenant)
                    self._tenants.append(tenant)
                    if variant == "new_role":
                        new_role_ms.append(took)
                        continue
                    cold_ms.append(took)
                    roles_used += held - who.role_secrets.count(HOST)
                    cold_from.append(view.provisioned_from or "")
            for name in raws:
                adm.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))
        self.progress("making spares there", 0, 1)
        pool.fill(svc, self.template, self.n, host=HOST)
        warm_ms: list[float] = []
        warm_from: list[str] = []
        for i in range(self.n):
            self.progress("warm", i, self.n)
            tenant = f"bench remote warm {self.run_id} {i}"
            started = time.perf_counter()
            view = svc.provision(tenant, template=self.template, host=HOST)
            warm_ms.append((time.perf_counter() - started) * 1000)
            warm_from.append(view.provisioned_from or "")
            self._tenants.append(tenant)
        raw, cold, warm = summarize(raw_ms), summarize(cold_ms), summarize(warm_ms)
        new_role = summarize(new_role_ms)
        return {
            "template": self.template,
            "iterations": self.n,
            "host": {"port": self.server.port, "durable": self.server.durable},
            "raw": raw,
            "cold": cold | {"from_pool": cold_from.count("pool"), "spare_roles": roles_used},
            "new_role": new_role,
            "warm": warm | {"from_pool": warm_from.count("pool")},
            "cold_over_raw": ratio(cold.get("p50_ms"), raw.get("p50_ms")),
            "new_role_over_raw": ratio(new_role.get("p50_ms"), raw.get("p50_ms")),
            "raw_over_warm": ratio(raw.get("p50_ms"), warm.get("p50_ms")),
            "target": "cold_over_raw <= 1.15",
        }

    def _cleanup(self, svc: TenantService) -> None:
        """The host goes away whole (its server is deleted): its tenants' rows are deleted,
        then the host removed."""
        with svc.hosts.pools().system() as reg:
            for name in self._tenants:
                with contextlib.suppress(Exception):
                    tenant = registry.get_live(reg, svc.name(name).key)
                    if tenant is not None:
                        registry.delete_row(reg, tenant.id)
        with contextlib.suppress(Exception):
            pool.drain(svc, host=HOST)
        with contextlib.suppress(Exception):
            role_pool.drain(svc, host=HOST)
        try:
            hosts.remove(svc, HOST)
        except Exception as exc:
            log.warning("could not remove the bench's host %s: %s", HOST, exc)
