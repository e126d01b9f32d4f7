"""The routes as a whole: the organization routes' guard is structural (a route under
/api/v1/orgs/{org} that is not on the org router, or declares no permission, stops the app
from starting), and the OpenAPI document says how each route authenticates."""

from __future__ import annotations

import httpx
import pytest
from litestar import Controller, Litestar, get

from api.access import check_routes, org_router
from tests.harness import ApiProcess


class _Stray(Controller):
    path = "/api/v1/orgs/{org:str}/stray"

    @get("/", opt={"perm": "devices.read"})
    async def stray(self) -> None:
        return None


class _NoPerm(Controller):
    path = "/stray"

    @get("/")
    async def stray(self) -> None:
        return None


class _Fine(Controller):
    path = "/fine"

    @get("/", opt={"perm": "devices.read"})
    async def fine(self) -> None:
        return None


def test_an_org_route_off_the_org_router_refuses_to_start() -> None:
    with pytest.raises(RuntimeError, match="is not guarded"):
        check_routes(Litestar(route_handlers=[_Stray]))


def test_an_org_route_without_a_permission_refuses_to_start() -> None:
    with pytest.raises(RuntimeError, match="declares no permission"):
        check_routes(Litestar(route_handlers=[org_router(_NoPerm)]))


def test_a_guarded_org_route_with_a_permission_starts() -> None:
    check_routes(Litestar(route_handlers=[org_router(_Fine)]))


def test_the_openapi_document_declares_how_to_authenticate(api: ApiProcess) -> None:
    spec = httpx.get(api.url + "/schema/openapi.json", timeout=10).json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["bearer"] == {**schemes["bearer"], "type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    assert schemes["session_cookie"] == {**schemes["session_cookie"], "type": "apiKey", "in": "cookie",
                                         "name": "lms_session"}
    assert schemes["api_key"] == {**schemes["api_key"], "type": "apiKey", "in": "header", "name": "X-API-Key"}
    anyone = [{"bearer": []}, {"session_cookie": []}, {"api_key": []}]
    paths = spec["paths"]
    for path, ops in paths.items():
        for method, op in ops.items():
            public = path in ("/api/v1/auth/register", "/api/v1/auth/login")
            assert op.get("security") == (None if public else anyone), (method, path)
