"""Devices of an organization and their MQTT credentials: database rows and broker logins
kept in step by the :class:`~lms_core.provisioning.Provisioner`."""

from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

import asyncpg
import msgspec
from msgspec import Meta

from api.services.audit import Audit
from lms_core.errors import InvalidInput, NotFound
from lms_core.firmware import firmware_config
from lms_core.provisioning import DeviceCredentials, Provisioner
from lms_core.settings import Settings
from lms_core.topics import SLUG_PATTERN, TopicScheme

if TYPE_CHECKING:
    from api.access import OrgAccess

Slug = Annotated[str, Meta(pattern=SLUG_PATTERN)]
Tag = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
Name = Annotated[str, Meta(max_length=200)]


class DeviceCreate(msgspec.Struct, forbid_unknown_fields=True):
    slug: Slug
    name: Name = ""
    properties: dict[str, Any] = msgspec.field(default_factory=dict)
    tags: Annotated[list[Tag], Meta(max_length=50)] = msgspec.field(default_factory=list)


class DeviceUpdate(msgspec.Struct, forbid_unknown_fields=True):
    name: Name | None = None
    properties: dict[str, Any] | None = None
    tags: Annotated[list[Tag], Meta(max_length=50)] | None = None


class Device(msgspec.Struct):
    slug: str
    name: str
    properties: dict[str, Any]
    tags: list[str]
    enabled: bool
    status: str
    last_seen_at: datetime | None
    status_changed_at: datetime | None
    created_at: datetime
    topic_prefix: str


class DeviceCreated(msgspec.Struct):
    device: Device
    credentials: DeviceCredentials
    #: The firmware's lms_config.json for these credentials (lms_core.firmware), shown once
    #: like them: Wi-Fi placeholders, broker, credentials, topic prefix.
    firmware_config: dict[str, Any]


class FirmwareConfig(msgspec.Struct):
    credentials: DeviceCredentials
    firmware_config: dict[str, Any]


COLUMNS = ("d.slug, d.name, d.properties, d.tags, d.enabled, d.status, d.last_seen_at, d.status_changed_at, "
           "d.created_at")
MAX_PROPERTIES_BYTES = 16 * 1024


def device_from_row(r: Any, topics: TopicScheme, org: str) -> Device:
    props = r["properties"]
    return Device(slug=r["slug"], name=r["name"], properties=json.loads(props) if isinstance(props, str) else props,
                  tags=list(r["tags"]), enabled=r["enabled"], status=r["status"], last_seen_at=r["last_seen_at"],
                  status_changed_at=r["status_changed_at"], created_at=r["created_at"],
                  topic_prefix=topics.device_prefix(org, r["slug"]))


def properties_json(props: dict[str, Any]) -> str:
    text = json.dumps(props)
    if len(text) > MAX_PROPERTIES_BYTES:
        raise InvalidInput(f"properties are larger than {MAX_PROPERTIES_BYTES} bytes of JSON")
    if "\\u0000" in text:
        raise InvalidInput("properties may not contain NUL characters")
    return text


async def device_id(conn: asyncpg.Connection | asyncpg.Pool, org_id: int, device: str) -> int:
    """The id of device ``device`` of organization ``org_id``; NotFound (404) if there is none."""
    dev_id = await conn.fetchval("SELECT id FROM devices WHERE org_id = $1 AND slug = $2", org_id, device)
    if dev_id is None:
        raise NotFound(f"device {device!r} not found")
    return int(dev_id)


class DeviceService:
    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self.pool = pool
        self.settings = settings
        self.topics = TopicScheme(settings.topic_root)

    async def get(self, access: OrgAccess, device: str) -> Device:
        r = await self.pool.fetchrow(
            f"SELECT {COLUMNS} FROM devices d WHERE d.org_id = $1 AND d.slug = $2", access.org_id, device)
        if r is None:
            raise NotFound(f"device {device!r} not found")
        return device_from_row(r, self.topics, access.slug)

    async def list_devices(self, access: OrgAccess, *, limit: int, after: str | None, tag: str | None) -> list[Device]:
        rows = await self.pool.fetch(
            f"""SELECT {COLUMNS} FROM devices d WHERE d.org_id = $1 AND ($2::text IS NULL OR d.slug > $2)
                AND ($3::text IS NULL OR $3 = ANY (d.tags)) ORDER BY d.slug LIMIT $4""",
            access.org_id, after, tag, limit)
        return [device_from_row(r, self.topics, access.slug) for r in rows]

    async def create(self, access: OrgAccess, data: DeviceCreate, audit: Audit) -> DeviceCreated:
        props = properties_json(data.properties)
        async with Provisioner.open(self.settings, self.pool) as prov:
            creds = await prov.create_device(access.slug, data.slug, data.name, properties=props, tags=data.tags,
                                             create_org=False, record=audit.record(
                                                 "device.created", actor=access.principal.user_id,
                                                 org_id=access.org_id))
        return DeviceCreated(device=await self.get(access, data.slug), credentials=creds,
                             firmware_config=firmware_config(creds))

    async def update(self, access: OrgAccess, device: str, data: DeviceUpdate) -> Device:
        found = await self.pool.fetchval(
            """UPDATE devices SET name = coalesce($3, name), properties = coalesce($4::jsonb, properties),
                      tags = coalesce($5, tags), updated_at = now()
               WHERE org_id = $1 AND slug = $2 RETURNING id""",
            access.org_id, device, data.name,
            properties_json(data.properties) if data.properties is not None else None, data.tags)
        if found is None:
            raise NotFound(f"device {device!r} not found")
        return await self.get(access, device)

    async def set_enabled(self, access: OrgAccess, device: str, enabled: bool, audit: Audit) -> Device:
        await self.get(access, device)
        async with Provisioner.open(self.settings, self.pool) as prov:
            await prov.set_enabled(access.slug, device, enabled, record=audit.record(
                "device.enabled" if enabled else "device.disabled", actor=access.principal.user_id,
                org_id=access.org_id))
        return await self.get(access, device)

    async def rotate(self, access: OrgAccess, device: str, audit: Audit) -> DeviceCredentials:
        await self.get(access, device)
        async with Provisioner.open(self.settings, self.pool) as prov:
            return await prov.rotate_credentials(access.slug, device, record=audit.record(
                "device.credentials_rotated", actor=access.principal.user_id, org_id=access.org_id))

    async def rotate_for_firmware(self, access: OrgAccess, device: str, audit: Audit) -> FirmwareConfig:
        """New credentials and the firmware file holding them: the password is never stored,
        so a file for an existing device always comes with a rotation."""
        creds = await self.rotate(access, device, audit)
        return FirmwareConfig(credentials=creds, firmware_config=firmware_config(creds))

    async def delete(self, access: OrgAccess, device: str, *, purge: bool, audit: Audit) -> None:
        await self.get(access, device)
        async with Provisioner.open(self.settings, self.pool) as prov:
            await prov.delete_device(access.slug, device, purge=purge, record=audit.record(
                "device.deleted", actor=access.principal.user_id, org_id=access.org_id, detail={"purge": purge}))
