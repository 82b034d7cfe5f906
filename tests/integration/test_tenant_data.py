"""The describe and data routes (issue 14, item 4) through the real app and a real server, on
the built-in ``basic`` template's models (``account``, ``contact``): CRUD with every where
operator, soft and permanent delete, validation that writes nothing, SQL injection attempts
that are 4xx and change nothing, access levels, and a token reaching only its own tenant."""

from __future__ import annotations

import json
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg import sql

from monk.api.app import create_app
from monk.api.auth import issue_root_token, issue_tenant_token, signing_secret
from monk.service import upgrades
from monk.service.server import Server
from monk.service.templates import TemplateService
from monk.service.tenants import TenantService
from monk.service.upgrades import UpgradeOptions
from monk.settings import Settings
from tests.integration.conftest import Env
from tests.integration.template_support import copy_builtin, drop_key, new_key

PASSWORD = "data route password"


@dataclass
class Tenant:
    name: str
    id: str
    database: str
    tokens: dict[str, str]  # access level -> token

    def h(self, access: str = "root") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[access]}"}


@pytest.fixture(scope="module")
def client(env: Env) -> Iterator[TestClient]:
    with TestClient(create_app(env.settings)) as c:
        yield c


@pytest.fixture(scope="module")
def root(env: Env) -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_root_token(env.settings, ttl_seconds=600)}"}


def _tenant(client: TestClient, root: dict[str, str], env: Env) -> Tenant:
    name = f"Data Corp {uuid.uuid4().hex[:8]}"
    body = {"name": name, "template": env.template, "root_password": PASSWORD}
    made = client.post("/api/root/tenant", json=body, headers=root)
    assert made.status_code == 201, made.text
    data = made.json()["data"]
    tokens = {}
    for access in ("read", "edit", "full"):
        user = {"username": f"u_{access}", "access": access, "password": PASSWORD}
        r = client.post(f"/api/root/tenant/{name}/user", json=user, headers=root)
        assert r.status_code == 201, r.text
    for access, username in [
        ("root", "root"),
        ("read", "u_read"),
        ("edit", "u_edit"),
        ("full", "u_full"),
    ]:
        r = client.post(
            "/auth/login", json={"tenant": name, "username": username, "password": PASSWORD}
        )
        assert r.status_code == 200, r.text
        tokens[access] = r.json()["data"]["token"]
    return Tenant(name, data["id"], data["database"], tokens)


@pytest.fixture(scope="module")
def tenant(client: TestClient, root: dict[str, str], env: Env) -> Tenant:
    return _tenant(client, root, env)


@pytest.fixture(scope="module")
def other(client: TestClient, root: dict[str, str], env: Env) -> Tenant:
    return _tenant(client, root, env)


def table(env: Env, t: Tenant, model: str = "account") -> list[dict[str, Any]]:
    """The model's table as the database has it (every row, trashed and deleted ones too)."""
    with psycopg.connect(env.target.conninfo, dbname=t.database, autocommit=True) as conn:
        cur = conn.execute(
            sql.SQL("SELECT * FROM {} ORDER BY created_at, id").format(sql.Identifier(model))
        )
        names = [d.name for d in cur.description or []]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def ok(r: httpx.Response, status: int = 200) -> Any:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["success"] is True
    return body["data"]


def fails(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["success"] is False
    assert body["error_code"] == code, body
    return str(body["error"])


def account(name: str, **more: Any) -> dict[str, Any]:
    return {"name": name, "email": f"{name.lower().replace(' ', '.')}@x.example", **more}


def find(client: TestClient, t: Tenant, **params: Any) -> list[dict[str, Any]]:
    q = {k: json.dumps(v) if k == "where" else v for k, v in params.items()}
    return list(ok(client.get("/api/data/account", params=q, headers=t.h())))


# --------------------------------------------------------------------------- describe


def test_describe_lists_the_models_and_gives_each_ones_json_schema(
    client: TestClient, tenant: Tenant
) -> None:
    models = ok(client.get("/api/describe", headers=tenant.h("read")))
    by_name = {m["name"]: m for m in models}
    assert set(by_name) == {"account", "contact"}
    assert "email" in by_name["account"]["fields"]

    schema = ok(client.get("/api/describe/account", headers=tenant.h("read")))
    assert schema["type"] == "object"
    assert set(schema["required"]) == {"name", "email", "account_type"}
    assert schema["properties"]["email"]["format"] == "email"
    assert schema["properties"]["id"]["readOnly"] is True
    assert schema["properties"]["trashed_at"]["readOnly"] is True

    fails(client.get("/api/describe/nope", headers=tenant.h()), 404, "MODEL_NOT_FOUND")
    fails(client.get("/api/describe/users", headers=tenant.h()), 404, "MODEL_NOT_FOUND")


# --------------------------------------------------------------------------- CRUD


def test_crud_round_trip_with_every_where_operator(
    client: TestClient, tenant: Tenant, env: Env
) -> None:
    tag = uuid.uuid4().hex[:6]
    records = [
        account(f"Alpha {tag}", account_type="business", balance=10, phone="+1 555 0001"),
        account(f"Beta {tag}", account_type="personal", balance=20.5),
        account(f"Gamma {tag}", account_type="trial", balance=30, is_verified=True),
    ]
    made = ok(client.post("/api/data/account", json=records, headers=tenant.h("edit")), 201)
    assert [m["name"] for m in made] == [r["name"] for r in records]
    assert all(uuid.UUID(m["id"]) and m["created_at"] and m["trashed_at"] is None for m in made)
    assert made[1]["balance"] == 20.5
    assert made[0]["credit_limit"] == 500.5
    ids = {m["name"].split()[0]: m["id"] for m in made}

    mine = {"name": {"$like": f"% {tag}"}}

    def names(where: dict[str, Any], **params: Any) -> list[str]:
        rows = find(client, tenant, where={"$and": [mine, where]}, order="name", **params)
        return [r["name"].split()[0] for r in rows]

    assert names({"account_type": "business"}) == ["Alpha"]
    assert names({"account_type": {"$eq": "business"}}) == ["Alpha"]
    assert names({"account_type": {"$ne": "business"}}) == ["Beta", "Gamma"]
    assert names({"balance": {"$gt": 10}}) == ["Beta", "Gamma"]
    assert names({"balance": {"$gte": 20.5}}) == ["Beta", "Gamma"]
    assert names({"balance": {"$lt": 20.5}}) == ["Alpha"]
    assert names({"balance": {"$lte": 20.5}}) == ["Alpha", "Beta"]
    assert names({"balance": {"$gt": 5, "$lt": 25}}) == ["Alpha", "Beta"]
    assert names({"account_type": {"$in": ["trial", "personal"]}}) == ["Beta", "Gamma"]
    assert names({"account_type": {"$nin": ["trial", "personal"]}}) == ["Alpha"]
    assert names({"account_type": {"$in": []}}) == []
    assert names({"name": {"$like": "A%"}}) == ["Alpha"]
    assert names({"name": {"$ilike": "g%"}}) == ["Gamma"]
    assert names({"phone": {"$null": True}}) == ["Beta", "Gamma"]
    assert names({"phone": {"$null": False}}) == ["Alpha"]
    assert names({"phone": None}) == ["Beta", "Gamma"]
    assert names({"is_verified": True}) == ["Gamma"]
    assert names({"id": ids["Beta"]}) == ["Beta"]
    assert names({"$or": [{"balance": 10}, {"is_verified": True}]}) == ["Alpha", "Gamma"]
    assert names({"$or": [{"balance": 10}, {"$and": [{"balance": 30}, {"phone": None}]}]}) == [
        "Alpha",
        "Gamma",
    ]

    # order, limit, offset, select
    rows = find(client, tenant, where=mine, order="balance desc", limit=2)
    assert [r["name"].split()[0] for r in rows] == ["Gamma", "Beta"]
    rows = find(client, tenant, where=mine, order="-balance", limit=2, offset=2)
    assert [r["name"].split()[0] for r in rows] == ["Alpha"]
    rows = find(client, tenant, where=mine, select="name,balance", order="name")
    assert rows[0] == {"name": f"Alpha {tag}", "balance": 10}
    assert len(find(client, tenant, limit=100_000)) <= 1000  # capped

    # one record: GET, PUT /{id}, PUT array, PATCH ?where=
    one = ok(client.get(f"/api/data/account/{ids['Alpha']}", headers=tenant.h("read")))
    assert one["email"] == records[0]["email"]
    put = ok(
        client.put(
            f"/api/data/account/{ids['Alpha']}",
            json={"balance": 11, "phone": None},
            headers=tenant.h("edit"),
        )
    )
    assert (put["balance"], put["phone"]) == (11, None)
    assert put["updated_at"] > one["updated_at"]
    many = ok(
        client.put(
            "/api/data/account",
            json=[{"id": ids["Beta"], "balance": 21}, {"id": ids["Gamma"], "balance": 31}],
            headers=tenant.h("edit"),
        )
    )
    assert [m["balance"] for m in many] == [21, 31]
    patched = ok(
        client.patch(
            "/api/data/account",
            params={"where": json.dumps({"$and": [mine, {"balance": {"$gt": 20}}]})},
            json={"is_active": False},
            headers=tenant.h("edit"),
        )
    )
    assert sorted(p["name"].split()[0] for p in patched) == ["Beta", "Gamma"]
    assert names({"is_active": False}) == ["Beta", "Gamma"]

    # soft delete, include_trashed, permanent delete
    gone = ok(client.delete(f"/api/data/account/{ids['Beta']}", headers=tenant.h("full")))
    assert gone["trashed_at"] is not None
    assert names({}) == ["Alpha", "Gamma"]
    assert names({}, include_trashed="true") == ["Alpha", "Beta", "Gamma"]
    fails(
        client.get(f"/api/data/account/{ids['Beta']}", headers=tenant.h()), 404, "RECORD_NOT_FOUND"
    )
    trashed = ok(
        client.get(
            f"/api/data/account/{ids['Beta']}",
            params={"include_trashed": "true"},
            headers=tenant.h(),
        )
    )
    assert trashed["trashed_at"] == gone["trashed_at"]
    # a trashed record cannot be changed
    fails(
        client.put(f"/api/data/account/{ids['Beta']}", json={"balance": 1}, headers=tenant.h()),
        404,
        "RECORD_NOT_FOUND",
    )
    # soft delete by where
    ok(
        client.delete(
            "/api/data/account",
            params={"where": json.dumps({"$and": [mine, {"name": {"$like": "Gamma%"}}]})},
            headers=tenant.h("full"),
        )
    )
    assert names({}) == ["Alpha"]
    # permanent: root only; the rows stay in the table with deleted_at, never returned again
    fails(
        client.delete(
            f"/api/data/account/{ids['Beta']}",
            params={"permanent": "true"},
            headers=tenant.h("full"),
        ),
        403,
        "ACCESS_INSUFFICIENT",
    )
    perm = ok(
        client.request(
            "DELETE",
            "/api/data/account",
            params={"permanent": "true"},
            json=[ids["Beta"], {"id": ids["Gamma"]}],
            headers=tenant.h("root"),
        )
    )
    assert sorted(p["name"].split()[0] for p in perm) == ["Beta", "Gamma"]
    assert all(p["deleted_at"] for p in perm)
    assert names({}, include_trashed="true") == ["Alpha"]
    rows = {r["name"]: r for r in table(env, tenant) if r["name"].endswith(tag)}
    assert rows[f"Beta {tag}"]["deleted_at"] is not None
    assert rows[f"Gamma {tag}"]["deleted_at"] is not None
    assert rows[f"Alpha {tag}"]["deleted_at"] is None


def test_invalid_records_leave_nothing_written(
    client: TestClient, tenant: Tenant, env: Env
) -> None:
    before = table(env, tenant)
    contacts_before = table(env, tenant, "contact")
    tag = uuid.uuid4().hex[:6]
    cases: list[tuple[Any, str]] = [
        (
            [account(f"Ok {tag}"), account(f"Bad {tag}", email="not an email")],
            "record 1: field 'email'",
        ),
        ([account(f"Ok {tag}"), {"name": f"No mail {tag}"}], "record 1: field 'email'"),
        ([account(f"Ok {tag}"), account(f"T {tag}", account_type="gold")], "field 'account_type'"),
        ([account(f"Ok {tag}"), account(f"X {tag}", colour="red")], "record 1: field 'colour'"),
        ([account(f"Ok {tag}"), account(f"N {tag}", balance=-1)], "record 1: field 'balance'"),
        ([account(f"Ok {tag}"), account(f"I {tag}", id=str(uuid.uuid4()))], "record 1: field 'id'"),
        (
            [account(f"Ok {tag}"), account(f"C {tag}", created_at="2020-01-01T00:00:00Z")],
            "field 'created_at'",
        ),
        ([account(f"Ok {tag}"), account("")], "record 1: field 'name'"),
        ([account(f"Ok {tag}"), "a string"], "record 1: must be a JSON object"),
        ({"name": "not an array"}, "array"),
    ]
    for body, message in cases:
        error = fails(
            client.post("/api/data/account", json=body, headers=tenant.h()), 400, "VALIDATION_ERROR"
        )
        assert message in error, (message, error)
    # refused by the database (a foreign key), after a good record in the same request
    contacts = [
        {"account_id": "a0000000-0000-4000-8000-000000000001", "first_name": "A", "last_name": "B"},
        {"account_id": str(uuid.uuid4()), "first_name": "C", "last_name": "D"},
    ]
    error = fails(
        client.post("/api/data/contact", json=contacts, headers=tenant.h()), 400, "VALIDATION_ERROR"
    )
    assert error.startswith("record 1:"), error
    # a bad change in a PUT array: the good one before it is not kept either
    first = before[0]
    error = fails(
        client.put(
            "/api/data/account",
            json=[{"id": str(first["id"]), "balance": 1}, {"id": str(first["id"]), "email": 5}],
            headers=tenant.h(),
        ),
        400,
        "VALIDATION_ERROR",
    )
    assert "record 1: field 'email'" in error
    fails(
        client.put(
            "/api/data/account",
            json=[{"id": str(first["id"]), "balance": 1}, {"id": str(uuid.uuid4()), "balance": 2}],
            headers=tenant.h(),
        ),
        404,
        "RECORD_NOT_FOUND",
    )
    assert table(env, tenant) == before
    assert table(env, tenant, "contact") == contacts_before


# --------------------------------------------------------------------------- injection


INJECTIONS = [
    'account"; DROP TABLE account; --',
    "account; DELETE FROM account",
    "name) OR (1=1",
    "name = name OR TRUE --",
    "pg_sleep(1)",
    "(SELECT 1)",
    '"name"',
    "users",
    "password_hash",
    "access_read",
    "ctid",
    "xmin",
    "Name",
    "name\u0000",
    "",
]


def test_injection_attempts_are_4xx_and_change_nothing(
    client: TestClient, tenant: Tenant, env: Env
) -> None:
    before = table(env, tenant)
    users_before = table(env, tenant, "users")
    h = tenant.h()
    for bad in INJECTIONS:
        # model names
        path = "/api/data/" + urllib.parse.quote(bad, safe="")
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            r = client.request(method, path, json=[account("x")], params={"where": "{}"}, headers=h)
            assert 400 <= r.status_code < 500, (method, bad, r.text)
        # field names in records, where keys, order, select
        r = client.post("/api/data/account", json=[{**account("Inj"), bad: 1}], headers=h)
        assert r.status_code == 400, (bad, r.text)
        for where in ({bad: 1}, {bad: {"$eq": 1}}, {"$or": [{bad: 1}]}, {"name": {bad: 1}}):
            r = client.get("/api/data/account", params={"where": json.dumps(where)}, headers=h)
            assert r.status_code == 400, (where, r.text)
        orders = [{"order": bad or ","}, {"select": bad or ","}]
        if bad.strip():
            orders.append({"order": f"name {bad}"})
        for params in orders:
            r = client.get("/api/data/account", params=params, headers=h)
            assert r.status_code == 400, (params, r.text)
        r = client.patch(
            "/api/data/account", params={"where": json.dumps({bad: 1})}, json={"balance": 1}
        )
        assert r.status_code in (400, 401), r.text
    # values are parameters: they match nothing, or are stored as text
    for value in ("' OR '1'='1", "x'; DROP TABLE account; --", "%' OR 1=1 --"):
        for where in ({"name": value}, {"name": {"$like": value}}, {"name": {"$in": [value]}}):
            assert find(client, tenant, where=where) == []
        fails(
            client.get("/api/data/account", params={"where": json.dumps({"id": value})}, headers=h),
            400,
            "INVALID_QUERY",
        )
    # malformed where, order, limit
    for where_text in ("{", "[]", '"x"', '{"name": {"$regex": "."}}', '{"balance": {"$gt": "1"}}'):
        r = client.get("/api/data/account", params={"where": where_text}, headers=h)
        fails(r, 400, "INVALID_QUERY")
    deep: dict[str, Any] = {"name": "x"}
    for _ in range(20):
        deep = {"$and": [deep]}
    fails(
        client.get("/api/data/account", params={"where": json.dumps(deep)}, headers=h),
        400,
        "INVALID_QUERY",
    )
    fails(client.get("/api/data/account", params={"limit": -1}, headers=h), 400, "INVALID_QUERY")
    assert table(env, tenant) == before
    assert table(env, tenant, "users") == users_before


# --------------------------------------------------------------------------- access


def test_access_levels(client: TestClient, tenant: Tenant, env: Env) -> None:
    before = table(env, tenant)
    any_id = str(before[0]["id"])
    # read: reads, cannot write or delete
    assert find(client, tenant)
    assert ok(client.get("/api/data/account", headers=tenant.h("read")))
    r = client.post("/api/data/account", json=[account("R")], headers=tenant.h("read"))
    fails(r, 403, "ACCESS_INSUFFICIENT")
    r = client.put(f"/api/data/account/{any_id}", json={"balance": 1}, headers=tenant.h("read"))
    fails(r, 403, "ACCESS_INSUFFICIENT")
    r = client.patch(
        "/api/data/account", params={"where": "{}"}, json={"balance": 1}, headers=tenant.h("read")
    )
    fails(r, 403, "ACCESS_INSUFFICIENT")
    # edit: writes, cannot delete
    r = client.delete(f"/api/data/account/{any_id}", headers=tenant.h("edit"))
    fails(r, 403, "ACCESS_INSUFFICIENT")
    r = client.delete("/api/data/account", params={"where": "{}"}, headers=tenant.h("edit"))
    fails(r, 403, "ACCESS_INSUFFICIENT")
    # deny: nothing at all (its token is made here: a deny user cannot log in)
    secret = signing_secret(env.settings)
    claims = json_claims(client, tenant) | {"access": "deny"}
    deny = {"Authorization": f"Bearer {issue_tenant_token(secret, claims, ttl_seconds=60)}"}
    for method, path in [
        ("GET", "/api/describe"),
        ("GET", "/api/describe/account"),
        ("GET", "/api/data/account"),
        ("GET", f"/api/data/account/{any_id}"),
    ]:
        fails(client.request(method, path, headers=deny), 403, "ACCESS_DENIED")
    fails(client.post("/api/data/account", json=[account("D")], headers=deny), 403, "ACCESS_DENIED")
    assert table(env, tenant) == before


def _within(seconds: float, check: Any) -> httpx.Response:
    """The first answer ``check`` accepts within ``seconds`` (or the last one)."""
    deadline = time.monotonic() + seconds
    while True:
        r: httpx.Response = check()
        if r.status_code == 403 or time.monotonic() > deadline:
            return r
        time.sleep(0.05)


def test_a_lowered_or_removed_user_loses_access_within_a_second_with_the_old_token(
    client: TestClient, root: dict[str, str], env: Env
) -> None:
    t = _tenant(client, root, env)
    assert ok(client.post("/api/data/account", json=[account("Low")], headers=t.h("edit")), 201)
    with psycopg.connect(env.target.conninfo, dbname=t.database, autocommit=True) as conn:
        conn.execute("UPDATE users SET access = 'read' WHERE auth = 'u_edit'")
    started = time.monotonic()
    r = _within(
        1.0,
        lambda: client.post("/api/data/account", json=[account("Low2")], headers=t.h("edit")),
    )
    fails(r, 403, "ACCESS_INSUFFICIENT")
    assert time.monotonic() - started < 1.0
    assert ok(client.get("/api/data/account", headers=t.h("edit")))  # still reads

    removed = client.delete(f"/api/root/tenant/{t.name}/user/u_full", headers=root)
    assert removed.status_code == 200, removed.text
    started = time.monotonic()
    r = _within(1.0, lambda: client.get("/api/data/account", headers=t.h("full")))
    fails(r, 403, "ACCESS_DENIED")
    assert time.monotonic() - started < 1.0


def test_a_lowered_user_is_refused_on_the_very_next_request(
    client: TestClient, root: dict[str, str], env: Env
) -> None:
    """The user's access is read in the round trip that opens each request's transaction, so
    no copy of it is trusted for a while (there was one for MONK_TENANT_STATE_TTL_MS)."""
    t = _tenant(client, root, env)
    for _ in range(3):
        assert ok(client.post("/api/data/account", json=[account("Now")], headers=t.h("edit")), 201)
    with psycopg.connect(env.target.conninfo, dbname=t.database, autocommit=True) as conn:
        conn.execute("UPDATE users SET access = 'read' WHERE auth = 'u_edit'")
        r = client.post("/api/data/account", json=[account("Now2")], headers=t.h("edit"))
        fails(r, 403, "ACCESS_INSUFFICIENT")
        conn.execute("UPDATE users SET access = 'edit' WHERE auth = 'u_edit'")
    assert ok(client.post("/api/data/account", json=[account("Now3")], headers=t.h("edit")), 201)


def json_claims(client: TestClient, t: Tenant) -> dict[str, Any]:
    who = ok(client.get("/api/whoami", headers=t.h("read")))
    return {
        "user_id": who["user_id"],
        "username": who["username"],
        "tenant": who["tenant"],
        "tenant_id": who["tenant_id"],
        "db": who["database"],
    }


def test_a_tenant_token_reaches_only_its_own_tenant(
    client: TestClient, tenant: Tenant, other: Tenant, env: Env
) -> None:
    tag = uuid.uuid4().hex[:6]
    mine = ok(
        client.post("/api/data/account", json=[account(f"Own {tag}")], headers=tenant.h()), 201
    )
    rid = mine[0]["id"]
    # the other tenant's token does not see, change or delete it
    assert find(client, other, where={"name": f"Own {tag}"}) == []
    fails(client.get(f"/api/data/account/{rid}", headers=other.h()), 404, "RECORD_NOT_FOUND")
    r = client.put(f"/api/data/account/{rid}", json={"balance": 7}, headers=other.h())
    fails(r, 404, "RECORD_NOT_FOUND")
    fails(client.delete(f"/api/data/account/{rid}", headers=other.h()), 404, "RECORD_NOT_FOUND")
    # a token whose db claim names the other tenant's database still reaches its own tenant:
    # the database comes from the system database's row of the token's tenant_id
    secret = signing_secret(env.settings)
    forged = json_claims(client, other) | {"db": tenant.database, "access": "root"}
    h = {"Authorization": f"Bearer {issue_tenant_token(secret, forged, ttl_seconds=60)}"}
    assert (
        find(
            client,
            Tenant(other.name, other.id, other.database, {"root": h["Authorization"][7:]}),
            where={"name": f"Own {tag}"},
        )
        == []
    )
    row = next(r for r in table(env, tenant) if r["name"] == f"Own {tag}")
    assert row["balance"] == 0
    assert row["trashed_at"] is None
    # a root token is refused on the tenant routes
    root_token = issue_root_token(env.settings, ttl_seconds=60)
    r = client.get("/api/data/account", headers={"Authorization": f"Bearer {root_token}"})
    fails(r, 401, "AUTH_TOKEN_INVALID")


# --------------------------------------------------------------------------- the model cache


def test_the_model_cache_follows_an_upgrade(
    settings: Settings, admin_url: str, tmp_path: Path
) -> None:
    """A field added by an upgrade is accepted, and described, within the tenant state's
    refresh: the models are cached per build, and the upgrade moves the tenant's build."""
    target, _ = Server.from_settings(settings).init()
    key = new_key("dm")
    source = copy_builtin(tmp_path, "basic", key)
    with TemplateService.open(settings, target) as templates:
        templates.build(key, source_dir=source)
    try:
        with TestClient(create_app(settings)) as c:
            root = {"Authorization": f"Bearer {issue_root_token(settings, ttl_seconds=600)}"}
            body = {"name": f"Cache {uuid.uuid4().hex[:6]}", "template": key}
            made = ok(
                c.post("/api/root/tenant", json={**body, "root_password": PASSWORD}, headers=root),
                201,
            )
            login = {"tenant": made["name"], "username": "root", "password": PASSWORD}
            token = ok(c.post("/auth/login", json=login))["token"]
            h = {"Authorization": f"Bearer {token}"}
            record = [account(f"Nick {uuid.uuid4().hex[:6]}", nickname="nick")]
            error = fails(
                c.post("/api/data/account", json=record, headers=h), 400, "VALIDATION_ERROR"
            )
            assert "field 'nickname'" in error
            assert "nickname" not in ok(c.get("/api/describe/account", headers=h))["properties"]

            schema_file = source / "schemas" / "account.json"
            schema = json.loads(schema_file.read_text())
            schema["properties"]["nickname"] = {"type": "string", "maxLength": 40}
            schema_file.write_text(json.dumps(schema))
            with TemplateService.open(settings, target) as templates:
                templates.build(key, source_dir=source)
            with TenantService(settings, target) as svc:
                report = upgrades.begin(svc, key, UpgradeOptions()).execute()
            assert report.state == "done", report

            deadline = time.monotonic() + settings.tenant_state_ttl_ms / 1000 + 2
            while True:
                r = c.post("/api/data/account", json=record, headers=h)
                if r.status_code == 201 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert ok(r, 201)[0]["nickname"] == "nick"
            described = ok(c.get("/api/describe/account", headers=h))
            assert described["properties"]["nickname"]["maxLength"] == 40
    finally:
        drop_key(admin_url, key)
