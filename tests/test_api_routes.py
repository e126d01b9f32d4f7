"""The organization routes' guard is structural: a route under /api/v1/orgs/{org} that is
not on the org router, or declares no permission, stops the app from starting."""

from __future__ import annotations

import pytest
from litestar import Controller, Litestar, get

from api.access import check_routes, org_router


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
