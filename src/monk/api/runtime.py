"""What a running ``monk serve`` holds: settings, the tenant service, the purge worker, metrics."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from monk.adapters.postgres.connection import ServerTarget, translate
from monk.api.auth import signing_secret
from monk.errors import MonkError
from monk.service import (
    events,
    hosts,
    moves,
    pool,
    purge,
    role_pool,
    root_users,
    tenant_auth,
    tenant_data,
    upgrades,
)
from monk.service.health import HostProbes, Recent, ServerProbe
from monk.service.pipeline import Hosts
from monk.service.server import Server
from monk.service.supervisor import Supervisor
from monk.service.tenants import TenantService, TenantView
from monk.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.provisions = Counter(
            "monk_provisions",
            "Tenant provisions by result and host (a refused one: the host asked for, or none)",
            ["result", "host"],
            registry=r,
        )
        self.provision_seconds = Histogram(
            "monk_provision_seconds",
            "Provisioning latency, by host",
            ["host"],
            # warm handouts take a few milliseconds, cold clones tens to hundreds
            buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.template_builds = Counter(
            "monk_template_builds", "Template builds by result", ["result"], registry=r
        )
        self.purge_queue = Gauge(
            "monk_purge_queue_depth", "Purges queued for the background worker", registry=r
        )
        self.purge_failing = Gauge(
            "monk_purge_failing",
            "Queued purges whose last attempt failed (retried with backoff)",
            registry=r,
        )
        self.server_restarts = Counter(
            "monk_embedded_server_restarts",
            "Restarts of the embedded PostgreSQL server after it died, by result",
            ["result"],
            registry=r,
        )
        self.event_deliveries = Counter(
            "monk_event_deliveries",
            "Tenant event delivery attempts by result",
            ["result"],
            registry=r,
        )


class BudgetCollector(Collector):
    """The connection budgets of this process, one series per host, read at each scrape.
    ``rate(monk_budget_connections_opened_total[1m])`` is the opens per second."""

    def __init__(self, hosts: Hosts) -> None:
        self.hosts = hosts

    def collect(self) -> Iterator[Metric]:
        every = [b.stats() for b in self.hosts.budgets()]
        gauges = {
            "open": ("monk_budget_connections_open", "Tenant data connections open"),
            "busy": ("monk_budget_connections_busy", "Tenant data connections in use"),
            "waiting": ("monk_budget_waiting", "Requests waiting for a tenant data connection"),
        }
        for attr, (name, doc) in gauges.items():
            g = GaugeMetricFamily(name, doc, labels=["host"])
            for st in every:
                g.add_metric([st.host], getattr(st, attr))
            yield g
        counters = {
            "opens": ("monk_budget_connections_opened", "Tenant data connections opened"),
            "discarded": ("monk_budget_connections_discarded", "Broken connections dropped"),
            "waits": ("monk_budget_waits", "Requests that waited for a connection"),
            "wait_seconds": ("monk_budget_wait_seconds", "Time requests spent waiting"),
            "exhausted": ("monk_budget_exhausted", "Requests answered BUDGET_EXHAUSTED"),
            "exit_wait_seconds": (
                "monk_budget_exit_wait_seconds",
                "Time evictions waited for the evicted backend to exit",
            ),
        }
        for attr, (name, doc) in counters.items():
            c = CounterMetricFamily(name, doc, labels=["host"])
            for st in every:
                c.add_metric([st.host], getattr(st, attr))
            yield c
        ev = CounterMetricFamily(
            "monk_budget_evictions",
            "Idle connections closed: lru (room for another database), tenant (its disable, "
            "purge or move)",
            labels=["host", "reason"],
        )
        for st in every:
            ev.add_metric([st.host, "lru"], st.evictions)
            ev.add_metric([st.host, "tenant"], st.closed_for_tenant)
        yield ev


class FleetCollector(Collector):
    """Tenants, warm spares and spare roles per host and status, from the registry's last
    read (taken by /metrics at most once a second): a host or status that is gone leaves no
    series."""

    def __init__(self) -> None:
        self.counts: hosts.FleetCounts | None = None

    def collect(self) -> Iterator[Metric]:
        found = self.counts
        tenants = GaugeMetricFamily(
            "monk_tenants", "Live tenants by host and status", labels=["host", "status"]
        )
        spares = GaugeMetricFamily(
            "monk_pool_spares", "Warm spares by host and status", labels=["host", "status"]
        )
        for family, rows in (
            (tenants, found.tenants if found else []),
            (spares, found.spares if found else []),
        ):
            for host, status, n in rows:
                family.add_metric([host, status], n)
            yield family
        # Spare roles are counted unclaimed only ("ready"): a claimed one is a tenant's role
        # within the provision that took it. The status label keeps monk_pool_spares' shape.
        roles = GaugeMetricFamily(
            "monk_pool_spare_roles", "Spare roles by host and status", labels=["host", "status"]
        )
        for host, ready in found.spare_roles if found else []:
            roles.add_metric([host, "ready"], ready)
        yield roles


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # First: a secret that cannot be read or stored stops the start before anything else.
        self.secret = signing_secret(settings)
        self.server = Server.from_settings(settings)
        self.target: ServerTarget
        self.target, _ = self.server.init()
        self.tenants = TenantService(settings, self.target)
        self.tenants.root_after_answer = True  # written by _write_root, after the answer
        self.metrics = Metrics()
        self.tenants.hosts.budget()  # the local host's, in /metrics from the start
        self.metrics.registry.register(BudgetCollector(self.tenants.hosts))
        self.fleet_gauges = FleetCollector()
        self.metrics.registry.register(self.fleet_gauges)
        self.tenant_states = tenant_auth.TenantStates(
            self.tenants, ttl=settings.tenant_state_ttl_ms / 1000
        )
        self.tenant_data = tenant_data.TenantData(self.tenants.hosts)
        self.login_policy = tenant_auth.LoginPolicy(
            max_failures=settings.login_max_failures, window=settings.login_failure_window
        )
        self.probe = ServerProbe(self.target)
        self.host_probes = HostProbes(self.tenants.hosts, self.probe)
        # /metrics asks at most once a second, however many scrapers poll it.
        # One computation for both reads: one registry session at a time, whoever scrapes.
        self.registry_gauges = Recent(
            lambda: (purge.queue_counts(self.tenants), hosts.fleet_counts(self.tenants)), ttl=1.0
        )
        self._last_warning: dict[str, str] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._worker = threading.Thread(target=self._work, name="monk-purge", daemon=True)
        self._after_answer = ThreadPoolExecutor(2, thread_name_prefix="monk-after")
        self._refill_wake = threading.Event()
        self._refiller = threading.Thread(target=self._refill, name="monk-pool", daemon=True)
        self._notifier = threading.Thread(target=self._notify, name="monk-events", daemon=True)
        self._retainer = threading.Thread(target=self._retain, name="monk-retention", daemon=True)
        self._state_refresher = threading.Thread(
            target=self._refresh_states, name="monk-tenant-states", daemon=True
        )
        # Only the server monk itself started: an external one is its operator's to restart.
        self.supervisor = (
            Supervisor(self.server.embedded, on_restart=self._count_restart)
            if self.server.embedded is not None
            else None
        )

    def _count_restart(self, ok: bool) -> None:
        self.metrics.server_restarts.labels("ok" if ok else "failed").inc()

    def start(self) -> None:
        # Root passwords hashed ahead: a cold provision does not wait for argon2 either.
        tenant_auth.warm_up(self.tenants, 4)
        try:
            # The keyholder lock's session, named as a serve's: monk bench refuses beside it.
            self.tenants.presence.serve()
        except Exception as exc:
            log.warning("could not mark this server as running: %s", exc)
        if self.supervisor is not None:
            self.supervisor.start()
        self._worker.start()
        self._refiller.start()
        self._notifier.start()
        if self.settings.retention is not None:
            self._retainer.start()
        if self.settings.tenant_state_ttl_ms > 0:
            self._state_refresher.start()

    def registry_ready(self) -> bool:
        """A registry call now needs no wait: its server not known down, an idle connection
        in its pool (``monk.api.inline``)."""
        return self.tenants.hosts.pools().system_idle()

    def warm_handout_ready(
        self,
        template: str,
        *,
        host: str | None,
        placement: dict[str, str] | None,
        root_password: str | None,
    ) -> bool:
        """A provision with these parameters will be a local warm handout (registry work
        only): no caller's root password (that one is always cold), a spare of ``template``
        whose secrets this process holds, no fleet to place on (``Hosts.alone`` may read the
        hosts: ask with the registry ready)."""
        hosts = self.tenants.hosts
        local = hosts.local.name
        return (
            root_password is None
            and not placement
            and host in (None, local)
            and self.tenants.spare_secrets.has_for(template, local)
            and hosts.alone()
        )

    def wake_worker(self) -> None:
        self._wake.set()

    def wake_refiller(self) -> None:
        self._refill_wake.set()

    def provision(
        self,
        name: str,
        *,
        template: str,
        host: str | None = None,
        idempotency_key: str | None = None,
        connection_limit: int | None = None,
        root_password: str | None = None,
        placement: dict[str, str] | None = None,
        later: Callable[[Callable[[], None]], object] | None = None,
    ) -> TenantView:
        """A provision through the service (with its root user), counted in the metrics; the
        pool refiller is woken when it took a spare, or when the spare roles run low, and the
        root passwords hashed ahead are made again: at once, or through ``later`` (the
        route's: once its answer is sent, so that neither competes with sending it)."""
        view = self._counted(
            lambda: self.tenants.provision(
                name,
                root_password=root_password,
                template=template,
                host=host,
                idempotency_key=idempotency_key,
                connection_limit=connection_limit,
                placement=placement,
            ),
            host,
            later,
        )
        assert view is not None  # the service's provision always answers a tenant
        return view

    def hand_out(
        self,
        name: str,
        *,
        template: str,
        host: str | None = None,
        idempotency_key: str | None = None,
        connection_limit: int | None = None,
        placement: dict[str, str] | None = None,
        later: Callable[[Callable[[], None]], object] | None = None,
    ) -> TenantView | None:
        """``provision`` if a spare is ready now (the service's ``hand_out``: registry
        statements only); None, with nothing written or counted, when none is."""
        return self._counted(
            lambda: self.tenants.hand_out(
                name,
                template=template,
                host=host,
                idempotency_key=idempotency_key,
                connection_limit=connection_limit,
                placement=placement,
            ),
            host,
            later,
        )

    def _counted(
        self,
        call: Callable[[], TenantView | None],
        host: str | None,
        later: Callable[[Callable[[], None]], object] | None,
    ) -> TenantView | None:
        """``call`` (a provision of the service) with its metrics and its after-work (see
        ``provision``); None from ``call`` is passed on, uncounted."""
        started = time.perf_counter()
        hashing = self.tenants.root_passwords
        try:
            with hashing.held() if later is not None else contextlib.nullcontext():
                view = call()
        except MonkError as exc:
            hashing.refill()
            self.metrics.provisions.labels(result=exc.code, host=host or "").inc()
            raise
        except BaseException:
            hashing.refill()
            raise
        if view is None:
            return None
        took = time.perf_counter() - started
        self.metrics.provision_seconds.labels(host=view.tenant.host).observe(took)
        # Spare roles are made again in batches, once half are gone: not beside every provision.
        roles_low = (
            self.tenants.role_secrets.count(view.tenant.host) < self.settings.pool_roles // 2
        )
        run_later = later or (lambda work: work())
        run_later(hashing.refill)
        if view.provisioned_from == "pool" or roles_low:
            run_later(self.wake_refiller)
        if view.provisioned_from == "clone":
            run_later(lambda: self._write_root_soon(view))
        self.metrics.provisions.labels(result="ok", host=view.tenant.host).inc()
        return view

    def _write_root_soon(self, view: TenantView) -> None:
        self._after_answer.submit(self._write_root, view)

    def _write_root(self, view: TenantView) -> None:
        """A cold provision's root user, written into its database once it was answered (the
        purge worker's pass retries one that fails here)."""
        try:
            root_users.write_pending(self.tenants, view.tenant)
        except Exception as exc:
            log.warning("root user of tenant %s not written yet: %s", view.tenant.name, exc)

    def start_upgrade(self, key: str, options: upgrades.UpgradeOptions) -> upgrades.Run:
        """Start (or resume) a fleet upgrade of ``key``, run on a thread of its own: the caller
        answers at once. Its lock is held by the run's own connection; if ``monk serve`` stops
        first, the run is dead and the next upgrade of the key resumes it."""
        run = upgrades.begin(self.tenants, key, options)

        def execute() -> None:
            try:
                run.execute()
            except Exception as exc:
                self._failed(f"upgrade of {key}", exc)

        threading.Thread(target=execute, name=f"monk-upgrade-{key}", daemon=True).start()
        return run

    def start_move(self, name: str, to: str, *, jobs: int | None = None) -> moves.Move:
        """Check, lock and journal a tenant's move, then run it on a thread of its own: the
        caller answers at once. If ``monk serve`` stops first, the move is dead and ``monk
        doctor --repair`` (or the next move of the tenant) takes it to an end."""
        move = moves.begin(self.tenants, name, to, jobs=jobs)

        def execute() -> None:
            try:
                move.execute()
            except Exception as exc:
                self._failed(f"move of {name}", exc)

        threading.Thread(target=execute, name="monk-move", daemon=True).start()
        return move

    def start_drain(self, host: str, *, parallel: int) -> moves.Drain:
        """Check, lock and journal a host's drain (marking it draining), then move its tenants
        off on a thread of its own: the caller answers at once."""
        drain = moves.begin_drain(self.tenants, host, parallel=parallel)

        def execute() -> None:
            try:
                drain.execute()
            except Exception as exc:
                self._failed(f"drain of {host}", exc)

        threading.Thread(target=execute, name="monk-drain", daemon=True).start()
        return drain

    def request_purge(self, name: str, *, archive: bool, forget: bool) -> TenantView:
        """Queue a tenant's purge and wake the purge worker for it."""
        view, _op = purge.request_purge(self.tenants, name, archive=archive, forget=forget)
        self.wake_worker()
        return view

    def _notify(self) -> None:
        """Deliver tenant events to the observers (MONK_HOOKS) every second; forget old
        delivered ones hourly."""
        last_cleanup = 0.0
        while not self._stop.is_set():
            try:
                with self.tenants.hosts.pools().system() as reg:
                    report = events.deliver_due(reg, self.settings)
                    if report.delivered:
                        self.metrics.event_deliveries.labels("delivered").inc(report.delivered)
                    if report.failed:
                        self.metrics.event_deliveries.labels("failed").inc(report.failed)
                    if time.monotonic() - last_cleanup > 3600:
                        events.forget_old(reg, self.settings)
                        tenant_auth.forget_old_failures(reg, self.login_policy)
                        last_cleanup = time.monotonic()
                self._last_warning.pop("event delivery", None)
            except Exception as exc:
                self._failed("event delivery", exc)
            self._stop.wait(timeout=1.0)

    def _refresh_states(self) -> None:
        """Keep the busy tenants' states fresh, every half of MONK_TENANT_STATE_TTL_MS, so that
        their requests do not each read their tenant's row (``TenantStates.refresh``)."""
        every = self.settings.tenant_state_ttl_ms / 2000
        while not self._stop.wait(timeout=every):
            try:
                self.tenant_states.refresh()
                self._last_warning.pop("tenant state refresh", None)
            except Exception as exc:
                self._failed("tenant state refresh", exc)

    def _retain(self) -> None:
        """Drop the retired template builds nothing needs any more once they have been retired
        for MONK_TEMPLATE_RETENTION (what ``monk template prune`` does, for the older ones);
        a pass every half of it, at least every hour. A key being built is left for the next."""
        retention = self.settings.retention
        assert retention is not None
        interval = min(max(retention.total_seconds() / 2, 1.0), 3600.0)
        while not self._stop.is_set():
            try:
                from monk.service import host_templates

                dropped = host_templates.prune_everywhere(
                    self.tenants, retired_before=datetime.now(UTC) - retention, wait=False
                )
                for build in dropped:
                    if build.status == "dropped":
                        log.info(
                            "dropped retired template build %s %s (%s), retired since %s",
                            build.key,
                            build.version,
                            build.database,
                            build.retired_at,
                        )
                self._last_warning.pop("template retention", None)
            except Exception as exc:
                self._failed("template retention", exc)
            self._stop.wait(timeout=interval)

    def _refill(self) -> None:
        """Keep the warm pool topped up. It runs beside provisioning on its own connections,
        so a cold provision never waits for it."""
        try:
            # Live processes hold this lock: their spares and spare roles are never ours.
            self.tenants.hold_keyholder_lock()
        except Exception:
            log.exception("taking the keyholder lock failed")
        try:
            hosts = [name for name, active in self.tenants.hosts.spare_hosts() if active]
        except Exception:
            hosts = [self.tenants.hosts.local.name]
        for host in hosts:
            try:
                adopted = pool.adopt(self.tenants, host=host)
                if adopted:
                    log.info("adopted %d spare(s) of an earlier process on %s", adopted, host)
            except Exception as exc:
                # Served on the full path meanwhile (a new password at the handout).
                self._failed(f"adopting spares on {host}", exc)
        try:
            dropped = role_pool.drop_others(self.tenants)
            if dropped:
                log.info("dropped %d spare role(s) of an earlier process", dropped)
        except Exception:
            log.exception("dropping earlier spare roles failed")
        while not self._stop.is_set():
            try:
                self.tenants.hold_keyholder_lock(check=True)
            except Exception as exc:
                log.warning("keyholder lock: %s", exc)
            # Roles first: a second each for dozens, where a spare database is a clone.
            try:
                role_pool.refill(self.tenants, self.settings.pool_roles)
            except Exception as exc:
                self._failed("pool refiller", exc)
            try:
                pool.refill(self.tenants)
            except Exception as exc:
                self._failed("pool refiller", exc)
            self._refill_wake.wait(timeout=10)
            self._refill_wake.clear()

    def stop(self) -> None:
        """Let the worker finish its job in hand; queued ones stay queued for the next start."""
        self._stop.set()
        self._wake.set()
        self._refill_wake.set()
        self._worker.join(timeout=60)
        self._refiller.join(timeout=60)
        self._notifier.join(timeout=60)
        if self._retainer.is_alive():
            self._retainer.join(timeout=60)
        if self._state_refresher.is_alive():
            self._state_refresher.join(timeout=60)
        # Root users being written after their answers are finished first.
        self._after_answer.shutdown(wait=True)
        if self.supervisor is not None:
            self.supervisor.stop()
        try:
            # Their passwords die with this process: of no use to the next one.
            role_pool.drop_own(self.tenants)
        except Exception as exc:
            log.warning("could not drop this server's spare roles: %s", exc)
        self.host_probes.close()
        self.probe.close()
        self.tenants.close()

    def refresh_registry_gauges(self) -> None:
        """The purge queue and the fleet's gauges, as read at most once a second."""
        purge_counts, self.fleet_gauges.counts = self.registry_gauges.get()
        self.set_purge_metrics(purge_counts)

    def set_purge_metrics(self, counts: tuple[int, int]) -> None:
        queued, failing = counts
        self.metrics.purge_queue.set(queued)
        self.metrics.purge_failing.set(failing)

    def _failed(self, worker: str, exc: Exception) -> None:
        """A background worker's pass failed; it retries on its next turn. A known failure (the
        server down, a full disk) is one warning line, not repeated while it lasts; anything
        else is a bug and logged with its traceback."""
        known = exc if isinstance(exc, MonkError) else translate(exc)
        if known is None:
            log.exception("%s failed; retrying", worker)
            self._last_warning.pop(worker, None)
            return
        if self._last_warning.get(worker) != known.message:
            log.warning("%s: %s", worker, known.message)
            self._last_warning[worker] = known.message

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                purge.work_queue(self.tenants)
                moves.work_drops(self.tenants)
                # Root users a cold provision left to write (its process died, its host was
                # down): the ones just answered are being written by _write_root.
                root_users.write_all_pending(self.tenants, older_than_seconds=2.0)
                self.set_purge_metrics(purge.queue_counts(self.tenants))
                self._last_warning.pop("purge worker", None)
            except Exception as exc:
                self._failed("purge worker", exc)
            self._wake.wait(timeout=5)
            self._wake.clear()
