"""The web console over HTTP (the real app, a real system database): sessions, CSRF, sign-in
with a root token or an operator's argon2 hash, assets served from the package. The browser
tests (tests/integration/test_console_browser.py) drive the same pages in Chromium."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from argon2 import PasswordHasher
from fastapi.testclient import TestClient
from psycopg import sql

from monk.api.app import create_app
from monk.api.auth import issue_root_token
from tests.integration.conftest import Env

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def client(env: Env) -> Iterator[TestClient]:
    hasher = PasswordHasher()
    users = {"alice": hasher.hash(PASSWORD), "bob": hasher.hash(PASSWORD)}
    settings = env.settings.model_copy(update={"console_users": users, "login_max_failures": 3})
    with TestClient(create_app(settings), follow_redirects=False) as c:
        yield c


def sign_in(client: TestClient, env: Env) -> tuple[str, str]:
    """A fresh session (its cookie kept by the client) and its CSRF token."""
    client.cookies.clear()
    r = client.post("/console/login", data={"token": issue_root_token(env.settings)})
    assert r.status_code == 303, r.text
    cookie = r.cookies["monk_console"]
    page = client.get("/console")
    assert page.status_code == 200
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found
    return cookie, found.group(1)


def test_nothing_is_served_without_a_session(client: TestClient) -> None:
    client.cookies.clear()
    assert client.get("/").headers["location"] == "/console"
    for page in ("/console", "/console/tenants", "/console/templates", "/console/events"):
        r = client.get(page)
        assert (r.status_code, r.headers["location"]) == (303, "/console/login"), page
    for fragment in ("/console/fragment/overview", "/console/fragment/tenants"):
        r = client.get(fragment, headers={"HX-Request": "true"})
        assert r.status_code == 401
        assert r.headers["HX-Redirect"] == "/console/login"
    client.cookies.set("monk_console", "forged")
    assert client.get("/console/fragment/overview").status_code == 401
    assert client.get("/console/operations?fragment=1").status_code == 401
    client.cookies.clear()
    assert client.post("/console/tenants/x/disable", data={"csrf": "x"}).status_code == 401
    assert client.get("/console/login").status_code == 200


def test_the_session_cookie_is_httponly_and_strict(client: TestClient, env: Env) -> None:
    client.cookies.clear()
    r = client.post("/console/login", data={"token": issue_root_token(env.settings)})
    header = r.headers["set-cookie"]
    assert "HttpOnly" in header
    assert "SameSite=strict" in header.replace("Strict", "strict")
    assert "Secure" not in header  # plain HTTP here; over HTTPS it is set:
    # (no `with`: the app's runtime is the one `client` started; this client only borrows it)
    tls = TestClient(client.app, base_url="https://testserver", follow_redirects=False)
    r = tls.post("/console/login", data={"token": issue_root_token(env.settings)})
    assert "Secure" in r.headers["set-cookie"]


def test_a_wrong_csrf_token_changes_nothing_and_sign_out_ends_the_session(
    client: TestClient, env: Env, monk_tenant: str
) -> None:
    cookie, csrf = sign_in(client, env)
    for bad in ({"csrf": "wrong"}, {}):
        r = client.post(f"/console/tenants/{monk_tenant}/disable", data=bad)
        assert r.status_code == 403, r.text
    assert "active" in client.get(f"/console/tenants/{monk_tenant}").text
    r = client.post(f"/console/tenants/{monk_tenant}/disable", data={"csrf": csrf})
    assert r.status_code == 303
    page = client.get(r.headers["location"])
    assert 'class="st st-disabled"' in page.text
    assert client.post("/console/logout", data={"csrf": csrf}).status_code == 303
    client.cookies.set("monk_console", cookie)  # the old cookie, replayed
    assert client.get("/console").status_code == 303
    r = client.post(f"/console/tenants/{monk_tenant}/enable", data={"csrf": csrf})
    assert r.status_code == 401


def test_operators_sign_in_with_their_argon2_hash(client: TestClient) -> None:
    client.cookies.clear()
    for user, password in (("alice", "wrong"), ("carol", PASSWORD), ("", "")):
        r = client.post("/console/login", data={"user": user, "password": password})
        assert r.status_code == 401, (user, r.status_code)
        assert "sign-in failed" in r.text
    assert client.post("/console/login", data={"token": "not.a.token"}).status_code == 401
    r = client.post("/console/login", data={"user": "alice", "password": PASSWORD})
    assert r.status_code == 303
    page = client.get("/console")
    assert page.status_code == 200
    assert "alice" in page.text


def test_assets_and_api_docs_come_from_the_package(client: TestClient) -> None:
    js = client.get("/console/static/htmx-2.0.11.min.js")
    assert js.status_code == 200
    assert "htmx" in js.text[:2000]
    assert client.get("/console/static/htmx-LICENSE.txt").status_code == 200
    assert client.get("/console/static/console.css").status_code == 200
    docs = client.get("/docs").text
    assert "cdn" not in docs.lower()
    assert "unpkg" not in docs.lower()
    scripts = re.findall(r'src="([^"]+)"', docs)
    assert scripts
    assert all(s.startswith("/") for s in scripts), scripts
    for s in scripts:
        assert client.get(s).status_code == 200, s


def test_a_failed_action_shows_its_error(client: TestClient, env: Env, monk_tenant: str) -> None:
    _cookie, csrf = sign_in(client, env)
    r = client.post(
        "/console/tenants", data={"csrf": csrf, "name": monk_tenant, "template": env.template}
    )
    assert r.status_code == 409
    assert 'role="alert"' in r.text
    assert "TENANT_EXISTS" in r.text
    assert client.post(f"/console/tenants/{monk_tenant}/trash", data={"csrf": csrf}).is_redirect
    r = client.post(f"/console/tenants/{monk_tenant}/disable", data={"csrf": csrf})
    assert r.status_code == 409
    assert "INVALID_STATE" in r.text
    assert client.post(f"/console/tenants/{monk_tenant}/restore", data={"csrf": csrf}).is_redirect
    r = client.post(
        f"/console/tenants/{monk_tenant}/purge", data={"csrf": csrf, "confirm": "not-the-name"}
    )
    assert r.status_code == 422
    assert "type the tenant" in r.text
    assert 'class="st st-active"' in client.get(f"/console/tenants/{monk_tenant}").text


@pytest.fixture
def monk_tenant(client: TestClient, env: Env) -> str:
    name = f"con-{uuid.uuid4().hex[:8]}"
    token = issue_root_token(env.settings)
    r = client.post(
        "/api/root/tenant",
        json={"name": name, "template": env.template},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert r.status_code == 201, r.text
    return name


def test_every_page_and_fragment_renders_with_a_session(client: TestClient, env: Env) -> None:
    sign_in(client, env)
    for path in (
        "/console",
        "/console/fragment/overview",
        "/console/tenants?q=con-&sort=name&order=asc",
        "/console/fragment/tenants?status=active",
        "/console/templates",
        "/console/fragment/templates",
        "/console/operations?kind=provision",
        "/console/operations?fragment=1",
        "/console/events?undelivered=1",
        "/console/events?fragment=1",
    ):
        r = client.get(path)
        assert r.status_code == 200, (path, r.text[-2000:])


def test_pages_never_open_a_tenant_database(client: TestClient, env: Env, monk_tenant: str) -> None:
    """The tenant's database refuses every connection while the console draws its page, the
    overview and the lists: its size and sessions come from the server's statistics."""
    sign_in(client, env)
    database = client.get(
        f"/api/root/tenant/{monk_tenant}",
        headers={"Authorization": f"Bearer {issue_root_token(env.settings)}"},
    ).json()["data"]["database"]
    with psycopg.connect(
        env.target.conninfo, dbname=env.target.maintenance_db, autocommit=True
    ) as admin:
        admin.execute(
            sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(sql.Identifier(database))
        )
        try:
            # A session opened before is not the console's: the root user written just after
            # the provision's answer (CI caught one still open). None can open from here.
            deadline = time.monotonic() + 10
            while admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (database,)
            ).fetchone() != (0,):
                assert time.monotonic() < deadline, "a session stayed on the tenant's database"
                time.sleep(0.05)
            page = client.get(f"/console/tenants/{monk_tenant}")
            assert page.status_code == 200, page.text[-2000:]
            assert re.search(r"Size</th><td>\d+\.\d MB", page.text)
            assert re.search(r"Connections now</th><td>0<", page.text)
            for path in ("/console", "/console/tenants", "/console/templates"):
                assert client.get(path).status_code == 200
        finally:
            admin.execute(
                sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(sql.Identifier(database))
            )


def test_template_build_check_and_prune_from_the_console(client: TestClient, env: Env) -> None:
    _cookie, csrf = sign_in(client, env)
    key = env.template
    r = client.post(f"/console/templates/{key}/check", data={"csrf": csrf})
    assert r.status_code == 303, r.text
    assert f"check of {key}" in client.get(r.headers["location"]).text
    r = client.post(f"/console/templates/{key}/prune", data={"csrf": csrf})
    assert r.status_code == 303, r.text
    assert f"prune of {key}" in client.get(r.headers["location"]).text
    r = client.post(f"/console/templates/{key}/build", data={"csrf": csrf})
    assert r.status_code == 303
    deadline = time.monotonic() + 60
    while "running…" in (page := client.get("/console/fragment/templates").text):
        assert time.monotonic() < deadline, "the build did not finish within 60 s"
        time.sleep(0.2)
    outcome = re.search(rf'id="outcome-{key}">([^<]*)<', page)
    assert outcome, page
    print(outcome.group(1))
    assert "<li>" in page  # its steps, as they came


def test_failed_operator_sign_ins_are_throttled(client: TestClient) -> None:
    """Past MONK_LOGIN_MAX_FAILURES failures, even the right password waits (429)."""
    client.cookies.clear()
    for _ in range(3):
        r = client.post("/console/login", data={"user": "bob", "password": "guess"})
        assert r.status_code == 401
    r = client.post("/console/login", data={"user": "bob", "password": PASSWORD})
    assert r.status_code == 429
    assert "too many failed sign-ins" in r.text
    assert int(r.headers["Retry-After"]) > 0
    # another operator is not held up
    assert client.post("/console/login", data={"user": "alice", "password": PASSWORD}).is_redirect


def test_sessions_live_in_the_system_database_shared_by_every_process(
    client: TestClient, env: Env
) -> None:
    """A session opened on one `monk serve` works on another (and after a restart: a new app);
    a sign-out on either ends it on both; the table holds only a hash of the session id."""
    cookie, csrf = sign_in(client, env)
    with TestClient(create_app(env.settings), follow_redirects=False) as other:
        other.cookies.set("monk_console", cookie)
        page = other.get("/console")
        assert page.status_code == 200
        assert f'name="csrf" value="{csrf}"' in page.text
        with psycopg.connect(env.target.conninfo, dbname=env.settings.system_db_name) as conn:
            stored = conn.execute(
                "SELECT id_hash, operator, expires_at > now() + interval '1 hour'"
                " FROM console_sessions"
            ).fetchall()
        assert all(bytes(h) != cookie.encode() and cookie not in str(h) for h, _, _ in stored)
        assert ("root token", True) in {(op, later) for _, op, later in stored}
        assert other.post("/console/logout", data={"csrf": csrf}).status_code == 303
    assert client.get("/console").status_code == 303  # signed out here too
