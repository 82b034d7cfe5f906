"""/docs and /redoc load with no network (issue 10, item 19): every asset comes from the app,
and the OpenAPI document lists each route's real statuses."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.testclient import TestClient

from monk.api.app import create_app
from monk.errors import ERROR_TABLE
from monk.settings import Settings


@pytest.fixture(scope="module")
def client() -> TestClient:
    # The pages and the document need no database: the lifespan (which connects) is not run.
    return TestClient(create_app(Settings(_env_file=None)))  # type: ignore[call-arg]


@pytest.fixture(scope="module")
def doc(client: TestClient) -> dict[str, Any]:
    r = client.get("/openapi.json")
    assert r.status_code == 200
    body: dict[str, Any] = r.json()
    return body


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_offline(client: TestClient, page: str) -> None:
    r = client.get(page)
    assert r.status_code == 200
    html = r.text
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", html), "names an outside host"
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert any(a.endswith(".js") for a in assets), html
    for asset in assets:
        assert asset.startswith("/"), asset
        got = client.get(asset)
        assert got.status_code == 200, asset
        assert len(got.content) > 1000, asset
    spec = re.search(r"url: '([^']+)'|spec-url=\"([^\"]+)\"", html)
    assert spec is not None
    assert client.get(spec.group(1) or spec.group(2)).status_code == 200


def test_each_route_lists_its_own_statuses(doc: dict[str, Any]) -> None:
    def statuses(method: str, path: str) -> set[str]:
        return set(doc["paths"][path][method]["responses"])

    for method, path in [
        ("get", "/api/root/tenant"),
        ("get", "/api/root/operations"),
        ("get", "/api/root/events"),
        ("get", "/api/root/template"),
    ]:
        assert not statuses(method, path) & {"404", "409", "507"}, path
    assert {"404", "409", "507"} <= statuses("post", "/api/root/tenant")
    assert "404" in statuses("get", "/api/root/tenant/{name}")
    assert "409" not in statuses("get", "/api/root/tenant/{name}")
    assert statuses("get", "/health") == {"200", "503"}


def test_retry_after_is_declared_on_every_retryable_status(doc: dict[str, Any]) -> None:
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            for status in {"503", "507"} & set(op["responses"]):
                assert "Retry-After" in op["responses"][status].get("headers", {}), (
                    method,
                    path,
                    status,
                )


def test_error_code_is_an_enum_of_every_code(doc: dict[str, Any]) -> None:
    enum = set(doc["components"]["schemas"]["Failure"]["properties"]["error_code"]["enum"])
    assert {cls.code for cls in ERROR_TABLE} <= enum
    assert {"DISK_FULL", "DATABASE_UNAVAILABLE", "VALIDATION_ERROR", "INTERNAL_ERROR"} <= enum
