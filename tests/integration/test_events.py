"""Tenant events: written with the state change (trigger), delivered to real webhooks."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg
import pytest

from monk.errors import OperationFailed
from monk.service import doctor, events, pool, purge
from monk.service.tenants import TenantService
from monk.settings import Hook
from tests.integration.conftest import Env
from tests.integration.test_crash import run
from tests.integration.test_tenants import unique


class Receiver:
    """A real HTTP server that records what it is sent and answers ``status``."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.status = 204
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append((dict(self.headers.items()), body))
                self.send_response(receiver.status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.received]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


def tenant_events(env: Env, name_key: str) -> list[str]:
    with psycopg.connect(env.target.conninfo, dbname=env.settings.system_db_name) as conn:
        rows = conn.execute(
            "SELECT kind FROM events WHERE payload->>'name' = %s ORDER BY seq", (name_key,)
        ).fetchall()
    return [str(r[0]) for r in rows]


def drain_events(env: Env) -> None:
    """Mark everything delivered so a test only sees its own events."""
    with psycopg.connect(env.target.conninfo, dbname=env.settings.system_db_name) as conn:
        conn.execute("UPDATE events SET delivered_at = now() WHERE delivered_at IS NULL")


def test_every_state_change_leaves_one_event(env: Env, svc: TenantService) -> None:
    name = unique("Events")
    svc.provision(name, template=env.template)
    svc.disable(name)
    svc.enable(name)
    svc.trash(name)
    svc.restore(name)
    purge.request_purge(svc, name, archive=False)
    purge.work_queue(svc)
    assert tenant_events(env, name) == [
        "tenant.provisioned",
        "tenant.disabled",
        "tenant.enabled",
        "tenant.trashed",
        "tenant.restored",
        "tenant.purged",
    ]
    # a warm handout (the fast path's SQL function) and a forgotten purge announce themselves too
    pool.fill(svc, env.template, 1)
    warm = unique("Warm events")
    assert svc.provision(warm, template=env.template).provisioned_from == "pool"
    purge.request_purge(svc, warm, archive=False, forget=True)
    purge.work_queue(svc)
    assert tenant_events(env, warm) == ["tenant.provisioned", "tenant.purged"]


def test_an_undone_provision_leaves_no_event(env: Env, svc: TenantService) -> None:
    name = unique("Undone")
    with psycopg.connect(env.target.conninfo, dbname=env.settings.system_db_name) as conn:
        conn.execute(
            "INSERT INTO tenants (name, name_key, database, status, is_active)"
            " VALUES (%s, %s, %s, 'provisioning', false)",
            (name, svc.name(name).key, svc.name(name).database),
        )
    # the next provision of the name repairs (undoes) the stale intent, then provisions
    svc.provision(name, template=env.template)
    assert tenant_events(env, name) == ["tenant.provisioned"]


def test_delivery_is_signed_retried_and_at_least_once(
    env: Env, svc: TenantService, receiver: Receiver
) -> None:
    drain_events(env)
    settings = env.settings.model_copy(
        update={"hooks": [Hook(url=receiver.url, secret="s3cret")]}  # type: ignore[arg-type]
    )
    name = unique("Hooked")
    svc.provision(name, template=env.template)
    with svc.hosts.pools().system() as reg:
        receiver.status = 500
        first = events.deliver_due(reg, settings)
        assert (first.delivered, first.failed) == (0, 1)
        assert "HTTP 500" in first.errors[0]
        [pending] = events.list_events(reg, pending=True)
        assert pending.attempts == 1
        assert pending.last_error is not None
        assert pending.next_attempt_at > pending.created_at
        # not due yet: a pass now does nothing
        assert events.deliver_due(reg, settings).failed == 0
        reg.execute("UPDATE events SET next_attempt_at = now() WHERE id = %s", (pending.id,))
        receiver.status = 200
        second = events.deliver_due(reg, settings)
        assert (second.delivered, second.failed) == (1, 0)
        assert events.list_events(reg, pending=True) == []
    assert len(receiver.received) == 2  # at least once: the failed attempt, then the good one
    headers, body = receiver.received[-1]
    assert headers["Monk-Event-Type"] == "tenant.provisioned"
    assert headers["Monk-Event-Id"] == str(pending.id)
    expected = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert headers["Monk-Signature"] == f"sha256={expected}"
    payload = json.loads(body)
    assert payload["type"] == "tenant.provisioned"
    assert payload["attempt"] == 2
    assert payload["tenant"]["name"] == name
    assert payload["tenant"]["database"] == svc.name(name).database


def test_hooks_only_get_the_types_they_asked_for(
    env: Env, svc: TenantService, receiver: Receiver
) -> None:
    drain_events(env)
    settings = env.settings.model_copy(
        update={"hooks": [Hook(url=receiver.url, events=["tenant.disabled"])]}
    )
    name = unique("Picky")
    svc.provision(name, template=env.template)
    svc.disable(name)
    with svc.hosts.pools().system() as reg:
        report = events.deliver_due(reg, settings)
    # both settled, one sent: the other had no observer, so it is not a delivery
    assert (report.delivered, report.failed, report.unobserved) == (1, 0, 1)
    assert [b["type"] for b in receiver.bodies()] == ["tenant.disabled"]


def test_an_event_that_cannot_be_sent_never_holds_back_the_next(
    env: Env, svc: TenantService, receiver: Receiver
) -> None:
    """A hook whose URL passes the settings' check but that httpx refuses to parse (it raises
    InvalidURL, not a transport error): its event's attempt fails and is retried later, and
    the event leased after it in the same pass is delivered (today the pass stops at the
    first one, on every pass, and the next event is never sent)."""
    drain_events(env)
    settings = env.settings.model_copy(
        update={
            "hooks": [
                Hook(url="http://[::1/hook", events=["tenant.provisioned"]),
                Hook(url=receiver.url, events=["tenant.disabled"]),
            ]
        }
    )
    name = unique("Poisoned")
    svc.provision(name, template=env.template)
    svc.disable(name)
    with svc.hosts.pools().system() as reg:
        report = events.deliver_due(reg, settings)
        assert (report.delivered, report.failed) == (1, 1)
        [pending] = events.list_events(reg, pending=True)
    assert pending.kind == "tenant.provisioned"
    assert pending.last_error is not None
    assert "InvalidURL" in pending.last_error
    assert [b["type"] for b in receiver.bodies()] == ["tenant.disabled"]
    drain_events(env)


def test_unknown_event_type_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="unknown event type"):
        Hook(url="http://x/", events=["tenant.exploded"])


def test_events_cli(env: Env, svc: TenantService, receiver: Receiver) -> None:
    drain_events(env)
    name = unique("Cli events")
    svc.provision(name, template=env.template)
    hooks_env = {"MONK_HOOKS": json.dumps([{"url": receiver.url}])}
    listed = run(env, "events", "list", "--pending", "--json", extra=hooks_env)
    assert listed.returncode == 0, listed.stderr
    assert [e["type"] for e in json.loads(listed.stdout)] == ["tenant.provisioned"]
    receiver.status = 503
    failed = run(env, "events", "deliver", "--json", extra=hooks_env)
    assert failed.returncode == 1
    assert json.loads(failed.stdout)["failed"] == 1
    assert OperationFailed.code in failed.stderr


def test_doctor_reports_a_stuck_backlog(env: Env, svc: TenantService, receiver: Receiver) -> None:
    drain_events(env)
    settings = env.settings.model_copy(update={"hooks": [Hook(url=receiver.url)]})
    svc.provision(unique("Backlog"), template=env.template)
    receiver.status = 500
    with TenantService(settings, env.target) as hooked, hooked.hosts.pools().system() as reg:
        assert events.deliver_due(reg, settings).failed == 1
        # fresh failures are not a problem yet: delivery retries by itself
        assert not [
            p
            for p in doctor.diagnose(doctor.take_snapshot(hooked))
            if p.kind == "undelivered_events"
        ]
        reg.execute(
            "UPDATE events SET created_at = now() - interval '1 hour' WHERE delivered_at IS NULL"
        )
        [problem] = [
            p
            for p in doctor.diagnose(doctor.take_snapshot(hooked))
            if p.kind == "undelivered_events"
        ]
    assert "1 tenant event(s)" in problem.detail
    assert "HTTP 500" in problem.detail
    # without observers configured the outbox is an audit trail, never a problem
    assert not [
        p for p in doctor.diagnose(doctor.take_snapshot(svc)) if p.kind == "undelivered_events"
    ]
    drain_events(env)
