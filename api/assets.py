"""/api/v1/orgs/{org}/assets: sites and other assets as named groups of devices."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

import asyncpg
import msgspec
from litestar import Controller, delete, get, post, put
from litestar.params import FromPath, JSONBody
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT
from msgspec import Meta

from api.access import Access
from api.deps import Req
from api.devices import _COLUMNS, Device, _device, _properties
from lms_core.errors import AlreadyExists, NotFound
from lms_core.topics import TopicScheme

Slug = Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]


class AssetCreate(msgspec.Struct, forbid_unknown_fields=True):
    slug: Slug
    name: Annotated[str, Meta(max_length=200)] = ""
    kind: Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_-]{0,31}$")] = "site"
    properties: dict[str, Any] = msgspec.field(default_factory=dict)


class Asset(msgspec.Struct):
    slug: str
    name: str
    kind: str
    properties: dict[str, Any]
    created_at: datetime
    devices: int


class AssetsController(Controller):
    path = "/assets"
    tags = ["assets"]

    async def _asset_id(self, request: Req, access: Access, asset: str) -> int:
        asset_id = await request.app.state.pool.fetchval(
            "SELECT id FROM assets WHERE org_id = $1 AND slug = $2", access.org_id, asset)
        if asset_id is None:
            raise NotFound(f"asset {asset!r} not found")
        return int(asset_id)

    async def _list(self, request: Req, access: Access, asset: str | None = None) -> list[Asset]:
        rows = await request.app.state.pool.fetch(
            """SELECT a.slug, a.name, a.kind, a.properties, a.created_at,
                      (SELECT count(*) FROM device_assets da WHERE da.asset_id = a.id) AS devices
               FROM assets a WHERE a.org_id = $1 AND ($2::text IS NULL OR a.slug = $2) ORDER BY a.slug""",
            access.org_id, asset)
        return [Asset(slug=r["slug"], name=r["name"], kind=r["kind"], properties=json.loads(r["properties"]),
                      created_at=r["created_at"], devices=r["devices"]) for r in rows]

    @get("/", opt={"perm": "devices.read"})
    async def list_assets(self, request: Req, access: Access) -> list[Asset]:
        return await self._list(request, access)

    @post("/", opt={"perm": "devices.write"}, status_code=HTTP_201_CREATED)
    async def create(self, request: Req, access: Access, data: JSONBody[AssetCreate]) -> Asset:
        try:
            await request.app.state.pool.execute(
                "INSERT INTO assets (org_id, slug, name, kind, properties) VALUES ($1, $2, $3, $4, $5::jsonb)",
                access.org_id, data.slug, data.name or data.slug, data.kind, _properties(data.properties))
        except asyncpg.UniqueViolationError:
            raise AlreadyExists(f"asset {data.slug!r} exists") from None
        return (await self._list(request, access, data.slug))[0]

    @get("/{asset:str}", opt={"perm": "devices.read"})
    async def get_asset(self, request: Req, access: Access, asset: FromPath[str]) -> Asset:
        found = await self._list(request, access, asset)
        if not found:
            raise NotFound(f"asset {asset!r} not found")
        return found[0]

    @delete("/{asset:str}", opt={"perm": "devices.write"}, status_code=HTTP_204_NO_CONTENT)
    async def delete_asset(self, request: Req, access: Access, asset: FromPath[str]) -> None:
        """Delete the asset; its devices stay, detached."""
        await request.app.state.pool.execute("DELETE FROM assets WHERE id = $1",
                                             await self._asset_id(request, access, asset))

    @get("/{asset:str}/devices", opt={"perm": "devices.read"})
    async def devices(self, request: Req, access: Access, asset: FromPath[str]) -> list[Device]:
        asset_id = await self._asset_id(request, access, asset)
        rows = await request.app.state.pool.fetch(
            f"""SELECT {_COLUMNS} FROM devices d JOIN device_assets da ON da.device_id = d.id
                WHERE da.asset_id = $1 ORDER BY d.slug""", asset_id)
        topics = TopicScheme(request.app.state.settings.topic_root)
        return [_device(r, topics, access.slug) for r in rows]

    @put("/{asset:str}/devices/{device:str}", opt={"perm": "devices.write"}, status_code=HTTP_204_NO_CONTENT)
    async def attach(self, request: Req, access: Access, asset: FromPath[str], device: FromPath[str]) -> None:
        """Attach a device to the asset (a device may belong to several)."""
        asset_id = await self._asset_id(request, access, asset)
        dev_id = await request.app.state.pool.fetchval(
            "SELECT id FROM devices WHERE org_id = $1 AND slug = $2", access.org_id, device)
        if dev_id is None:
            raise NotFound(f"device {device!r} not found")
        await request.app.state.pool.execute(
            "INSERT INTO device_assets (asset_id, device_id) VALUES ($1, $2) ON CONFLICT DO NOTHING", asset_id, dev_id)

    @delete("/{asset:str}/devices/{device:str}", opt={"perm": "devices.write"}, status_code=HTTP_204_NO_CONTENT)
    async def detach(self, request: Req, access: Access, asset: FromPath[str], device: FromPath[str]) -> None:
        asset_id = await self._asset_id(request, access, asset)
        done = await request.app.state.pool.fetchval(
            """DELETE FROM device_assets da USING devices d WHERE da.device_id = d.id AND da.asset_id = $1
               AND d.org_id = $2 AND d.slug = $3 RETURNING da.device_id""", asset_id, access.org_id, device)
        if done is None:
            raise NotFound(f"device {device!r} is not attached to {asset!r}")
