"""The HTTP API through the real ASGI app (httpx via TestClient, lifespan included)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import jwt
import psycopg
import pytest
from fastapi.testclient import TestClient

from monk.api.app import create_app
from monk.api.auth import issue_root_token, signing_secret
from tests.integration.conftest import Env


@pytest.fixture(scope="module")
def client(env: Env) -> Iterator[TestClient]:
    with TestClient(create_app(env.settings)) as c:
        yield c


@pytest.fixture(scope="module")
def auth(env: Env) -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_root_token(env.settings, ttl_seconds=600)}"}


def name() -> str:
    return f"Api Corp {uuid.uuid4().hex[:8]}"


def test_health_and_metrics_need_no_token(client: TestClient) -> None:
    r = client.get("/health")
    assert r.status_code == 200
    assert r.json()["data"]["status"] == "ok"
    m = client.get("/metrics")
    assert m.status_code == 200
    assert "monk_purge_queue_depth" in m.text
    assert "monk_purge_failing" in m.text


def test_metrics_count_no_delivery_without_hooks(
    client: TestClient, auth: dict[str, str], env: Env
) -> None:
    n = name()
    made = client.post("/api/root/tenant", json={"name": n, "template": env.template}, headers=auth)
    assert made.status_code == 201, made.text

    def settled() -> bool:
        found = client.get("/api/root/events", headers=auth).json()["data"]
        return any(e["tenant"]["name"] == n and e["delivered_at"] for e in found)

    deadline = time.monotonic() + 10
    while not settled():
        assert time.monotonic() < deadline, "the event worker did not settle the event in 10 s"
        time.sleep(0.2)
    # Settled (an audit trail), but with no hook configured nothing was delivered.
    assert 'monk_event_deliveries_total{result="delivered"}' not in client.get("/metrics").text


def test_root_routes_need_a_root_token(env: Env, client: TestClient) -> None:
    r = client.get("/api/root/tenant")
    assert r.status_code == 401
    assert r.json()["success"] is False
    bad = jwt.encode({"access": "root", "exp": time.time() + 60}, "wrong-secret", algorithm="HS256")
    assert (
        client.get("/api/root/tenant", headers={"Authorization": f"Bearer {bad}"}).status_code
        == 401
    )
    secret = signing_secret(env.settings)
    expired = jwt.encode({"access": "root", "exp": time.time() - 10}, secret, algorithm="HS256")
    r = client.get("/api/root/tenant", headers={"Authorization": f"Bearer {expired}"})
    assert r.status_code == 401
    assert "expired" in r.json()["error"]
    user = jwt.encode({"access": "full", "exp": time.time() + 60}, secret, algorithm="HS256")
    r = client.get("/api/root/tenant", headers={"Authorization": f"Bearer {user}"})
    assert r.status_code == 403
    assert r.json()["error_code"] == "ROOT_ACCESS_REQUIRED"


def test_tenant_lifecycle_over_http(env: Env, client: TestClient, auth: dict[str, str]) -> None:
    n = name()
    created = client.post(
        "/api/root/tenant", json={"name": n, "template": env.template}, headers=auth
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["success"] is True
    tenant = body["data"]
    assert tenant["name"] == n
    assert tenant["status"] == "active"
    with psycopg.connect(tenant["connection_url"]) as conn:
        assert conn.execute("SELECT count(*) FROM account").fetchone() == (5,)

    path = f"/api/root/tenant/{n}"
    assert client.get(path, headers=auth).json()["data"]["database"] == tenant["database"]
    assert "connection_url" not in client.get(path, headers=auth).json()["data"] or (
        client.get(path, headers=auth).json()["data"]["connection_url"] is None
    )
    listed = client.get("/api/root/tenant", params={"limit": 10_000}, headers=auth).json()["data"]
    assert n in [t["name"] for t in listed]

    again = client.post(
        "/api/root/tenant", json={"name": n.lower(), "template": env.template}, headers=auth
    )
    assert again.status_code == 409
    assert again.json()["error_code"] == "TENANT_EXISTS"

    disabled = client.patch(path, json={"is_active": False}, headers=auth)
    assert disabled.json()["data"]["status"] == "disabled"
    enabled = client.patch(path, json={"is_active": True}, headers=auth)
    assert enabled.json()["data"]["status"] == "active"

    health = client.get(f"{path}/health", headers=auth)
    assert health.json()["data"]["status"] == "healthy"

    trashed = client.delete(path, headers=auth)
    assert trashed.json()["data"]["status"] == "trashed"
    assert n not in [t["name"] for t in client.get("/api/root/tenant", headers=auth).json()["data"]]
    with_trashed = client.get(
        "/api/root/tenant", params={"include_trashed": True, "limit": 10_000}, headers=auth
    )
    assert n in [t["name"] for t in with_trashed.json()["data"]]
    restored = client.put(path, headers=auth)
    assert restored.json()["data"]["status"] == "active"

    purged = client.delete(path, params={"force": True}, headers=auth)
    assert purged.status_code == 200
    assert purged.json()["data"]["status"] == "deleting"
    deadline = time.time() + 30
    while time.time() < deadline:
        if client.get(path, headers=auth).status_code == 404:
            break
        time.sleep(0.2)
    gone = client.get(path, headers=auth)
    assert gone.status_code == 404
    assert gone.json()["error_code"] == "TENANT_NOT_FOUND"
    # As the list shows it with include_deleted, so does the tenant's own route.
    deleted = client.get(path, params={"include_deleted": True}, headers=auth)
    assert deleted.status_code == 200, deleted.text
    assert (deleted.json()["data"]["id"], deleted.json()["data"]["status"]) == (
        tenant["id"],
        "deleted",
    )
    listed_deleted = client.get(
        "/api/root/tenant",
        params={"include_deleted": True, "include_trashed": True, "limit": 10_000},
        headers=auth,
    ).json()["data"]
    assert deleted.json()["data"] in listed_deleted
    # Its archive is named without the server's folders, here and in the journal.
    assert deleted.json()["data"]["archive"]["path"].startswith("<archives>/tenant_")
    journal = client.get("/api/root/operations", params={"limit": 10_000}, headers=auth)
    for answer in (deleted.text, journal.text):
        assert str(env.settings.data_dir) not in answer
        assert str(env.settings.archives) not in answer
    ops = client.get("/api/root/operations", params={"kind": "purge"}, headers=auth).json()["data"]
    assert any(op["database"] == tenant["database"] and op["state"] == "done" for op in ops)


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"name": ""}, 400, "INVALID_NAME"),
        ({"name": "x\x00y"}, 400, "INVALID_NAME"),
        ({"name": "ok", "template": "Bad Key!"}, 400, "INVALID_NAME"),
        ({"name": "ok", "template": "nope_missing"}, 404, "TEMPLATE_NOT_FOUND"),
        ({"nom": "x"}, 422, "VALIDATION_ERROR"),
        ({"name": 5}, 422, "VALIDATION_ERROR"),
    ],
)
def test_bad_input_is_a_clear_4xx(
    client: TestClient, auth: dict[str, str], body: dict[str, object], status: int, code: str
) -> None:
    r = client.post("/api/root/tenant", json=body, headers=auth)
    assert r.status_code == status, r.text
    assert r.json() == {"success": False, "error": r.json()["error"], "error_code": code}


def test_status_filter_takes_known_statuses_only(
    env: Env, client: TestClient, auth: dict[str, str]
) -> None:
    n = name()
    made = client.post("/api/root/tenant", json={"name": n, "template": env.template}, headers=auth)
    assert made.status_code == 201, made.text
    client.patch(f"/api/root/tenant/{n}", json={"is_active": False}, headers=auth)
    query = {"status": ["disabled", "trashed"], "include_trashed": True, "limit": 10_000}
    listed = client.get("/api/root/tenant", params=query, headers=auth).json()["data"]
    assert n in [t["name"] for t in listed]
    assert {t["status"] for t in listed} <= {"disabled", "trashed"}
    # An unknown status was accepted and matched nothing; now it names the allowed values.
    for bad in ("bogus", "failed", "Active"):
        r = client.get("/api/root/tenant", params={"status": ["active", bad]}, headers=auth)
        assert r.status_code == 422, r.text
        assert r.json()["error_code"] == "VALIDATION_ERROR"
        for allowed in ("provisioning", "active", "disabled", "trashed", "deleting", "deleted"):
            assert f"'{allowed}'" in r.json()["error"]
    client.delete(f"/api/root/tenant/{n}", params={"force": True}, headers=auth)


def test_not_found_routes_use_the_envelope(client: TestClient, auth: dict[str, str]) -> None:
    r = client.get("/api/root/tenant/nobody-here-xyz", headers=auth)
    assert r.status_code == 404
    assert r.json()["error_code"] == "TENANT_NOT_FOUND"
    assert client.get("/nope").json()["success"] is False


def test_events_over_http(env: Env, client: TestClient, auth: dict[str, str]) -> None:
    n = name()
    created = client.post(
        "/api/root/tenant", json={"name": n, "template": env.template}, headers=auth
    )
    assert created.status_code == 201, created.text
    disabled = client.patch(f"/api/root/tenant/{n}", json={"is_active": False}, headers=auth)
    assert disabled.status_code == 200, disabled.text
    listed = client.get("/api/root/events", params={"limit": 10_000}, headers=auth)
    assert listed.status_code == 200, listed.text
    mine = [e for e in listed.json()["data"] if e["tenant"]["name"] == n]
    assert [e["type"] for e in mine] == ["tenant.disabled", "tenant.provisioned"]  # newest first
    assert mine[0]["seq"] > mine[1]["seq"]
    assert mine[1]["tenant"]["database"] == created.json()["data"]["database"]
    assert client.get("/api/root/events").status_code == 401
    bad = client.get("/api/root/events", params={"limit": 0}, headers=auth)
    assert bad.status_code == 422
    assert bad.json()["success"] is False


def test_idempotency_key_replays_or_refuses_another_request(
    env: Env, client: TestClient, auth: dict[str, str]
) -> None:
    key = {"Idempotency-Key": f"signup-{uuid.uuid4().hex}"}
    n = name()

    def post(body: dict[str, str], headers: dict[str, str] = key) -> httpx.Response:
        return client.post("/api/root/tenant", json=body, headers=auth | headers)

    first = post({"name": n, "template": env.template})
    assert first.status_code == 201, first.text
    made = first.json()["data"]
    assert made["connection_url"]

    replay = post({"name": n, "template": env.template})
    assert replay.status_code == 201, replay.text
    again = replay.json()["data"]
    assert again["id"] == made["id"]
    assert again["replayed"] is True
    assert again["connection_url"] is None  # shown once; the answer says how to get one
    assert "credentials" in again["credentials_note"]
    assert "--rotate" in again["credentials_note"]

    # The key with another name, or another template: refused, nothing made.
    before = client.get("/api/root/tenant", params={"limit": 10_000}, headers=auth).json()
    other = name()
    for body in ({"name": other, "template": env.template}, {"name": n, "template": "basic"}):
        refused = post(body)
        assert refused.status_code == 422, refused.text
        assert refused.json()["error_code"] == "IDEMPOTENCY_KEY_REUSED"
    after = client.get("/api/root/tenant", params={"limit": 10_000}, headers=auth).json()
    assert after == before
    assert client.get(f"/api/root/tenant/{other}", headers=auth).status_code == 404

    # A key whose first request failed (it made nothing) may carry the corrected request.
    retry_key = {"Idempotency-Key": f"retry-{uuid.uuid4().hex}"}
    fixed = name()
    assert post({"name": fixed, "template": "no_such_tpl"}, retry_key).status_code == 404
    assert post({"name": fixed, "template": env.template}, retry_key).status_code == 201


def test_one_idempotency_key_many_names_at_once_makes_one_tenant(
    env: Env, auth: dict[str, str]
) -> None:
    key = f"race-{uuid.uuid4().hex}"
    names = [name() for _ in range(6)]
    s = env.settings.model_copy(update={"pool_size": 8})
    with TestClient(create_app(s)) as c, ThreadPoolExecutor(6) as pool:
        answers = list(
            pool.map(
                lambda n: c.post(
                    "/api/root/tenant",
                    json={"name": n, "template": env.template},
                    headers=auth | {"Idempotency-Key": key},
                ),
                names,
            )
        )
        codes = sorted(a.status_code for a in answers)
        assert codes == [201] + [422] * 5, [a.text for a in answers]
        made = [n for n in names if c.get(f"/api/root/tenant/{n}", headers=auth).status_code == 200]
        assert len(made) == 1
