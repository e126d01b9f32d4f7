"""Sites and other assets: named groups of an organization's devices."""

from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

import asyncpg
import msgspec
from msgspec import Meta

from api.services.devices import COLUMNS, Device, device_from_row, properties_json
from api.services.errors import Conflict
from lms_core.errors import AlreadyExists, NotFound
from lms_core.settings import Settings
from lms_core.topics import SLUG_PATTERN, TopicScheme

if TYPE_CHECKING:
    from api.access import OrgAccess

Slug = Annotated[str, Meta(pattern=SLUG_PATTERN)]


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


class AssetService:
    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self.pool = pool
        self.topics = TopicScheme(settings.topic_root)

    async def _asset_id(self, access: OrgAccess, asset: str) -> int:
        asset_id = await self.pool.fetchval("SELECT id FROM assets WHERE org_id = $1 AND slug = $2",
                                            access.org_id, asset)
        if asset_id is None:
            raise NotFound(f"asset {asset!r} not found")
        return int(asset_id)

    async def list_assets(self, access: OrgAccess, asset: str | None = None) -> list[Asset]:
        rows = await self.pool.fetch(
            """SELECT a.slug, a.name, a.kind, a.properties, a.created_at,
                      (SELECT count(*) FROM device_assets da WHERE da.asset_id = a.id) AS devices
               FROM assets a WHERE a.org_id = $1 AND ($2::text IS NULL OR a.slug = $2) ORDER BY a.slug""",
            access.org_id, asset)
        return [Asset(slug=r["slug"], name=r["name"], kind=r["kind"], properties=json.loads(r["properties"]),
                      created_at=r["created_at"], devices=r["devices"]) for r in rows]

    async def get(self, access: OrgAccess, asset: str) -> Asset:
        found = await self.list_assets(access, asset)
        if not found:
            raise NotFound(f"asset {asset!r} not found")
        return found[0]

    async def create(self, access: OrgAccess, data: AssetCreate) -> Asset:
        try:
            await self.pool.execute(
                "INSERT INTO assets (org_id, slug, name, kind, properties) VALUES ($1, $2, $3, $4, $5::jsonb)",
                access.org_id, data.slug, data.name or data.slug, data.kind, properties_json(data.properties))
        except asyncpg.UniqueViolationError:
            raise AlreadyExists(f"asset {data.slug!r} exists") from None
        return (await self.list_assets(access, data.slug))[0]

    async def delete(self, access: OrgAccess, asset: str) -> None:
        """Delete the asset; its devices stay, detached. Refused (409) while alert rules watch
        it: the database would delete them with it (``ON DELETE CASCADE``) without resolving
        their firing alerts, which nothing would ever resolve then. Deleting a rule resolves them
        (api/services/rules.py)."""
        async with self.pool.acquire() as conn, conn.transaction():
            # The row lock makes a rule created meanwhile either counted here or refused by its
            # foreign key once the asset is gone.
            asset_id = await conn.fetchval("SELECT id FROM assets WHERE org_id = $1 AND slug = $2 FOR UPDATE",
                                           access.org_id, asset)
            if asset_id is None:
                raise NotFound(f"asset {asset!r} not found")
            rules = await conn.fetch("SELECT id, name FROM alert_rules WHERE scope_asset_id = $1 ORDER BY id LIMIT 11",
                                     asset_id)
            if rules:
                named = ", ".join(f"{r['id']} ({r['name'][:40]!r})" for r in rules[:10])
                more = ", ..." if len(rules) > 10 else ""
                raise Conflict(f"asset {asset!r} is the scope of alert rule(s) {named}{more}: change their scope "
                               f"or delete them first")
            await conn.execute("DELETE FROM assets WHERE id = $1", asset_id)

    async def devices(self, access: OrgAccess, asset: str) -> list[Device]:
        asset_id = await self._asset_id(access, asset)
        rows = await self.pool.fetch(
            f"""SELECT {COLUMNS} FROM devices d JOIN device_assets da ON da.device_id = d.id
                WHERE da.asset_id = $1 ORDER BY d.slug""", asset_id)
        return [device_from_row(r, self.topics, access.slug) for r in rows]

    async def attach(self, access: OrgAccess, asset: str, device: str) -> None:
        asset_id = await self._asset_id(access, asset)
        dev_id = await self.pool.fetchval("SELECT id FROM devices WHERE org_id = $1 AND slug = $2",
                                          access.org_id, device)
        if dev_id is None:
            raise NotFound(f"device {device!r} not found")
        await self.pool.execute(
            "INSERT INTO device_assets (asset_id, device_id) VALUES ($1, $2) ON CONFLICT DO NOTHING", asset_id, dev_id)

    async def detach(self, access: OrgAccess, asset: str, device: str) -> None:
        asset_id = await self._asset_id(access, asset)
        done = await self.pool.fetchval(
            """DELETE FROM device_assets da USING devices d WHERE da.device_id = d.id AND da.asset_id = $1
               AND d.org_id = $2 AND d.slug = $3 RETURNING da.device_id""", asset_id, access.org_id, device)
        if done is None:
            raise NotFound(f"device {device!r} is not attached to {asset!r}")
