"""The web console in a real headless Chromium (Debian's chromium + chromium-driver, driven by
Selenium), against a real `monk serve` on a system database of its own. One browser and one
server for the module; the tests run in order and build on each other's state.

Each page's screenshot is written to docs/console/ (linked from README.md and docs/console.md).
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from monk.adapters.postgres.connection import ServerTarget
from monk.service import templates as template_service
from monk.settings import Settings
from monk.system.migrator import ensure_system_database
from tests.conftest import MONK_BIN, drop_installation, free_port, settings_env
from tests.integration import template_support

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.common.exceptions import (  # noqa: E402
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
    WebDriverException,
)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SHOTS = Path(__file__).resolve().parents[2] / "docs" / "console"
BULK = 10_000


@dataclass
class Console:
    base: str
    token: str
    settings: Settings
    template: str
    driver: Any

    def api(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token}"}
        return httpx.request(method, self.base + path, headers=headers, timeout=60, **kw)

    def open(self, path: str) -> None:
        self.driver.get(self.base + path)

    def shot(self, name: str) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(SHOTS / f"{name}.png"))

    def wait(self, what: str, check: Callable[[], bool], timeout: float = 20) -> None:
        try:
            # a polled fragment may be swapped between finding an element and reading it
            WebDriverWait(
                self.driver,
                timeout,
                poll_frequency=0.2,
                ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
            ).until(lambda _d: check())
        except TimeoutException:
            logs = [e.get("message") for e in self.driver.get_log("browser")][-5:]
            served = (self.settings.data_dir / "serve.log").read_text()[-3000:]
            pytest.fail(f"not within {timeout} s: {what}\nbrowser: {logs}\nserve: {served}")

    def text(self, css: str) -> str:
        return str(self.driver.find_element(By.CSS_SELECTOR, css).text)

    def click(self, css: str) -> None:
        self.driver.find_element(By.CSS_SELECTOR, css).click()

    def press(self, element_id: str, keys: str) -> None:
        """Keys sent to an element that the page's polling may swap between find and send."""
        for _ in range(20):
            try:
                self.driver.find_element(By.ID, element_id).send_keys(keys)
                return
            except (StaleElementReferenceException, WebDriverException) as exc:
                if not isinstance(exc, StaleElementReferenceException) and (
                    "does not belong to the document" not in str(exc)
                ):
                    raise
                time.sleep(0.1)
        self.driver.find_element(By.ID, element_id).send_keys(keys)

    def type(self, css: str, text: str) -> None:
        field = self.driver.find_element(By.CSS_SELECTOR, css)
        field.clear()
        field.send_keys(text)


@pytest.fixture(scope="module")
def console(admin_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip(
            "no headless browser here: install Debian's chromium and chromium-driver "
            "(.ci/run does) to run the console's browser tests"
        )
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    key = template_support.new_key("tcon")
    settings = Settings(
        database_url=admin_url,  # type: ignore[arg-type]
        system_db_name=f"monk_c_{uuid.uuid4().hex[:10]}",
        data_dir=tmp_path_factory.mktemp("console"),
        pool_spares={key: 1},
        _env_file=None,  # type: ignore[call-arg]
    )
    target = ServerTarget.from_url(admin_url, name="localhost")
    ensure_system_database(target, settings.system_db_name)
    template_support.build(
        target, settings, key, source_dir=template_service.builtin_source_dir("basic")
    )
    environ = settings_env(settings) | {"MONK_POOL_ROLES": "4"}
    port = free_port()
    log = (settings.data_dir / "serve.log").open("w")
    proc = subprocess.Popen(
        [MONK_BIN, "serve", "--port", str(port), "--templates", key],
        env=environ,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1280,1000")
    driver = None
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("monk serve did not answer /health within 60 s")
            time.sleep(0.2)
        token = subprocess.run(
            [MONK_BIN, "token", "--root"], env=environ, capture_output=True, text=True, check=True
        ).stdout.strip()
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        yield Console(base, token, settings, key, driver)
    finally:
        if driver is not None:
            driver.quit()
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        drop_installation(admin_url, settings.system_db_name)


def _sign_in(c: Console) -> None:
    c.open("/console/login")
    c.type("#token", c.token)
    c.click("#token-form button")
    c.wait("the overview after sign-in", lambda: c.driver.current_url.endswith("/console"))


@pytest.fixture
def signed_in(console: Console) -> Console:
    """The module's browser with a session: a test that failed before signing in (or signed out)
    does not take every later test down with it."""
    if console.driver.get_cookie("monk_console") is None:
        _sign_in(console)
    return console


def test_sign_in(console: Console) -> None:
    c = console
    c.open("/")
    assert c.driver.current_url.endswith("/console/login")  # no session: sent to sign in
    c.shot("login")
    c.type("#token", "not-a-token")
    c.click("#token-form button")
    # the refusal is a new page: wait for it, a loaded machine answers the POST after click returns
    c.wait("the refusal", lambda: "sign-in failed" in c.text("#error"))
    _sign_in(c)
    assert c.text("h1") == "Overview"
    # the cookie is out of the page's reach (HttpOnly)
    assert c.driver.execute_script("return document.cookie") == ""


def test_a_tenant_provisioned_through_the_api_appears_without_a_reload(signed_in: Console) -> None:
    c = signed_in
    c.open("/console")
    c.driver.execute_script("window.__notReloaded = true")
    name = f"api-{uuid.uuid4().hex[:6]}"
    assert c.api("POST", "/api/root/tenant", json={"name": name, "template": c.template}).is_success
    c.wait(f"{name} on the overview", lambda: name in c.text("#recent"))
    assert c.driver.execute_script("return window.__notReloaded") is True

    c.open("/console/tenants")
    c.driver.execute_script("window.__notReloaded = true")
    other = f"api-{uuid.uuid4().hex[:6]}"
    assert c.api(
        "POST", "/api/root/tenant", json={"name": other, "template": c.template}
    ).is_success
    c.wait(f"{other} in the list", lambda: other in c.text("#tenant-list"))
    assert c.driver.execute_script("return window.__notReloaded") is True


def test_provision_disable_and_purge_from_the_ui(signed_in: Console) -> None:
    c = signed_in
    name = f"ui-{uuid.uuid4().hex[:6]}"
    c.open("/console/tenants")
    c.click("details summary")
    c.type("#p-name", name)
    c.type("#p-template", c.template)
    c.click("#provision")
    c.wait("the new tenant's page", lambda: name in c.text("h1"))
    url = c.driver.find_element(By.ID, "connection-url").get_attribute("value")
    assert url.startswith("postgresql://")
    assert c.api("GET", f"/api/root/tenant/{name}").json()["data"]["status"] == "active"
    # the whole URL, never cut: it connects
    with psycopg.connect(url, connect_timeout=10) as conn:
        assert conn.execute("SELECT current_database()").fetchone() is not None

    # a new password, its URL shown once and whole: the old one stops working
    c.click("#act-rotate")
    c.wait("the new URL", lambda: "New credentials" in c.text("main"))
    rotated = c.driver.find_element(By.ID, "connection-url").get_attribute("value")
    assert rotated != url
    with psycopg.connect(rotated, connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=10).close()

    c.click("#act-disable")
    c.wait("disabled", lambda: "disabled" in c.text("#status"))
    data = c.api("GET", f"/api/root/tenant/{name}").json()["data"]
    assert (data["status"], data["is_active"]) == ("disabled", False)
    c.shot("tenant")

    # a failed action shows its error: a name that is taken
    c.open("/console/tenants")
    c.click("details summary")
    c.type("#p-name", name)
    c.type("#p-template", c.template)
    c.click("#provision")
    c.wait("the error", lambda: "TENANT_EXISTS" in c.text("#error"))

    # purge wants the name typed; a wrong one changes nothing
    c.open(f"/console/tenants/{name}")
    c.type("#confirm", "wrong")
    c.click("#act-purge")
    c.wait("the refusal", lambda: "type the tenant" in c.text("#error"))
    assert c.api("GET", f"/api/root/tenant/{name}").json()["data"]["status"] == "disabled"
    c.type("#confirm", name)
    c.click("#act-purge")
    c.wait("the purge queued", lambda: "purge of" in c.text("#done"))

    def purged() -> bool:
        r = c.api("GET", f"/api/root/tenant/{name}", params={"include_deleted": "true"})
        return bool(r.json()["data"]["status"] == "deleted")

    c.wait("the purge done (API)", purged, timeout=60)
    ops = c.api("GET", "/api/root/operations", params={"kind": "purge", "subject": name})
    assert [op["state"] for op in ops.json()["data"]] == ["done"]


def test_a_request_without_a_session_or_with_a_wrong_csrf_token_is_refused(
    signed_in: Console,
) -> None:
    c = signed_in
    c.open("/console")
    status = c.driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch('/console/tenants/x/disable', {method: 'POST', headers:"
        " {'X-CSRF-Token': 'forged'}}).then(r => done(r.status));"
    )
    assert status == 403
    r = httpx.get(c.base + "/console/fragment/overview", timeout=10)
    assert r.status_code == 401


def test_the_list_with_10000_tenants(
    signed_in: Console, capsys: pytest.CaptureFixture[str]
) -> None:
    """10,000 registry rows (no databases behind them: the list reads the registry only)."""
    c = signed_in
    s = c.settings
    assert s.database_url is not None
    with psycopg.connect(s.database_url.get_secret_value(), dbname=s.system_db_name) as conn:
        conn.execute(
            "INSERT INTO tenants (name, database, status, template_key, template_version,"
            " created_at)"
            " SELECT 'bulk-' || i, 'monk_bulk_' || i, 'active', %s, 'v', now() - i * interval '1s'"
            " FROM generate_series(1, %s) AS i",
            (c.template, BULK),
        )
        conn.execute("ANALYZE tenants")
    c.open("/console/tenants")  # warm: the first request of a path compiles its template
    started = time.perf_counter()
    c.open("/console/tenants?sort=name&order=asc")
    wall = time.perf_counter() - started
    nav = c.driver.execute_script(
        "const n = performance.getEntriesByType('navigation')[0];"
        "return [n.responseEnd - n.requestStart, n.loadEventEnd - n.startTime];"
    )
    assert f"{BULK + 2}" in c.text("#count") or f"{BULK}" in c.text("#count")
    assert len(c.driver.find_elements(By.CSS_SELECTOR, "#tenant-list tbody tr")) == 50
    c.shot("tenants")
    c.open("/console/tenants?q=bulk-9999")
    assert "bulk-9999" in c.text("#tenant-list")
    # server-side search, sorting and paging: newest name last in descending name order
    c.open("/console/tenants?q=BULK-&sort=name&order=desc")
    assert c.text("#count").startswith(f"{BULK} tenants")
    first = c.driver.find_element(By.CSS_SELECTOR, "#tenant-list tbody td a").text
    assert first == "bulk-9999"
    c.click("a[rel=next]")
    c.wait("page 2", lambda: "page 2 of 200" in c.text("#count"))
    second = [e.text for e in c.driver.find_elements(By.CSS_SELECTOR, "#tenant-list tbody td a")]
    assert len(second) == 50
    assert first not in second
    assert second == sorted(second, reverse=True)
    c.open("/console/tenants?status=disabled&q=bulk-")
    assert c.text("#count").startswith("0 tenants")
    with capsys.disabled():
        print(
            f"\nconsole list, {BULK:,} registry rows, first page: {wall * 1000:.0f} ms in the "
            f"browser (server answer {nav[0]:.0f} ms, load event {nav[1]:.0f} ms)"
        )
    SHOTS.mkdir(parents=True, exist_ok=True)
    (SHOTS / "list-timing.txt").write_text(
        f"{BULK} rows: {wall * 1000:.0f} ms wall, server {nav[0]:.0f} ms, load {nav[1]:.0f} ms\n"
    )


UNLABELLED = """
return [...document.querySelectorAll('input:not([type=hidden]), select, textarea')]
    .filter(e => !(e.id && document.querySelector(`label[for="${e.id}"]`)))
    .map(e => e.outerHTML);
"""


def test_templates_operations_and_events_pages(signed_in: Console) -> None:
    c = signed_in
    c.open("/console")
    assert int(c.text("#tenant-total")) >= BULK
    c.shot("overview")
    c.open("/console/templates")
    assert c.template in c.text("#builds")
    c.shot("templates")
    c.open("/console/operations?kind=provision")
    assert "provision" in c.text("main")
    c.shot("operations")
    c.open("/console/events")
    assert "tenant.provisioned" in c.text("main")
    c.shot("events")
    # every control of every page has its label
    for path in (
        "/console/tenants",
        "/console/tenants/bulk-1",
        "/console/operations",
        "/console/events",
    ):
        c.open(path)
        assert c.driver.execute_script(UNLABELLED) == [], path


def test_actions_work_from_the_keyboard(signed_in: Console) -> None:
    from selenium.webdriver.common.keys import Keys

    c = signed_in
    listed = c.api("GET", "/api/root/tenant", params={"limit": 10_000}).json()["data"]
    name = next(t["name"] for t in listed if t["name"].startswith("api-"))
    c.open(f"/console/tenants/{name}")
    c.press("act-disable", Keys.ENTER)
    c.wait("disabled", lambda: "disabled" in c.text("#status"))
    c.press("act-enable", Keys.ENTER)
    c.wait("enabled again", lambda: "active" in c.text("#status"))
    assert c.api("GET", f"/api/root/tenant/{name}").json()["data"]["is_active"] is True


def test_sign_out_ends_the_session(signed_in: Console) -> None:
    c = signed_in
    c.open("/console")
    cookie = c.driver.get_cookie("monk_console")["value"]
    c.click("#signout")
    c.wait("the sign-in page", lambda: c.driver.current_url.endswith("/console/login"))
    c.open("/console/tenants")
    assert c.driver.current_url.endswith("/console/login")
    replayed = httpx.get(
        c.base + "/console", cookies={"monk_console": cookie}, follow_redirects=False
    )
    assert replayed.status_code == 303
