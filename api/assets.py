"""/api/v1/orgs/{org}/assets: sites and other assets as named groups of devices."""

from __future__ import annotations

from litestar import Controller, delete, get, post, put
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT

from api.access import Access
from api.services.assets import Asset, AssetCreate, AssetService
from api.services.devices import Device

Assets = NamedDependency[AssetService]


class AssetsController(Controller):
    path = "/assets"
    tags = ["assets"]

    @get("/", opt={"perm": "devices.read"})
    async def list_assets(self, access: Access, assets: Assets) -> list[Asset]:
        return await assets.list_assets(access)

    @post("/", opt={"perm": "devices.write"}, status_code=HTTP_201_CREATED)
    async def create(self, access: Access, assets: Assets, data: JSONBody[AssetCreate]) -> Asset:
        return await assets.create(access, data)

    @get("/{asset:str}", opt={"perm": "devices.read"})
    async def get_asset(self, access: Access, assets: Assets, asset: FromPath[str]) -> Asset:
        return await assets.get(access, asset)

    @delete("/{asset:str}", opt={"perm": "devices.write"}, status_code=HTTP_204_NO_CONTENT)
    async def delete_asset(self, access: Access, assets: Assets, asset: FromPath[str]) -> None:
        """Delete the asset; its devices stay, detached."""
        await assets.delete(access, asset)

    @get("/{asset:str}/devices", opt={"perm": "devices.read"})
    async def devices(self, access: Access, assets: Assets, asset: FromPath[str]) -> list[Device]:
        return await assets.devices(access, asset)

    @put("/{asset:str}/devices/{device:str}", opt={"perm": "devices.write"}, status_code=HTTP_204_NO_CONTENT)
    async def attach(self, access: Access, assets: Assets, asset: FromPath[str], device: FromPath[str]) -> None:
        """Attach a device to the asset (a device may belong to several)."""
        await assets.attach(access, asset, device)

    @delete("/{asset:str}/devices/{device:str}", opt={"perm": "devices.write"}, status_code=HTTP_204_NO_CONTENT)
    async def detach(self, access: Access, assets: Assets, asset: FromPath[str], device: FromPath[str]) -> None:
        await assets.detach(access, asset, device)
