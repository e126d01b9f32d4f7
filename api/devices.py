"""/api/v1/orgs/{org}/devices: devices and their MQTT credentials."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Controller, delete, get, patch, post
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT
from msgspec import Meta

from api.access import Access
from api.deps import AuditLog, Req
from lms_core.broker import BrokerAdmin
from lms_core.errors import InvalidInput, NotFound
from lms_core.provisioning import DeviceCredentials, Provisioner
from lms_core.topics import TopicScheme

Slug = Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
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


_COLUMNS = ("d.slug, d.name, d.properties, d.tags, d.enabled, d.status, d.last_seen_at, d.status_changed_at, "
            "d.created_at")
MAX_PROPERTIES_BYTES = 16 * 1024


def _device(r: Any, topics: TopicScheme, org: str) -> Device:
    props = r["properties"]
    return Device(slug=r["slug"], name=r["name"], properties=json.loads(props) if isinstance(props, str) else props,
                  tags=list(r["tags"]), enabled=r["enabled"], status=r["status"], last_seen_at=r["last_seen_at"],
                  status_changed_at=r["status_changed_at"], created_at=r["created_at"],
                  topic_prefix=topics.device_prefix(org, r["slug"]))


def _properties(props: dict[str, Any]) -> str:
    text = json.dumps(props)
    if len(text) > MAX_PROPERTIES_BYTES:
        raise InvalidInput(f"properties are larger than {MAX_PROPERTIES_BYTES} bytes of JSON")
    if "\\u0000" in text:
        raise InvalidInput("properties may not contain NUL characters")
    return text


@contextlib.asynccontextmanager
async def provisioner(request: Req) -> AsyncIterator[Provisioner]:
    """A provisioner with its own short broker connection: device changes are rare."""
    settings = request.app.state.settings
    topics = TopicScheme(settings.topic_root)
    async with BrokerAdmin(settings.mqtt, topics) as admin:
        yield Provisioner(request.app.state.pool, admin, topics, settings.secret_key, settings.device_mqtt_url)


class DevicesController(Controller):
    path = "/devices"
    tags = ["devices"]

    async def _get(self, request: Req, access: Access, device: FromPath[str]) -> Device:
        r = await request.app.state.pool.fetchrow(
            f"SELECT {_COLUMNS} FROM devices d WHERE d.org_id = $1 AND d.slug = $2", access.org_id, device)
        if r is None:
            raise NotFound(f"device {device!r} not found")
        return _device(r, TopicScheme(request.app.state.settings.topic_root), access.slug)

    @get("/", opt={"perm": "devices.read"})
    async def list_devices(
        self, request: Req, access: Access,
        limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
        after: Annotated[str | None, QueryParameter(description="continue after this slug", max_length=63)] = None,
        tag: Annotated[str | None, QueryParameter(max_length=64)] = None,
    ) -> list[Device]:
        """Devices of the organization, by slug; continue with ``after`` = the last slug."""
        rows = await request.app.state.pool.fetch(
            f"""SELECT {_COLUMNS} FROM devices d WHERE d.org_id = $1 AND ($2::text IS NULL OR d.slug > $2)
                AND ($3::text IS NULL OR $3 = ANY (d.tags)) ORDER BY d.slug LIMIT $4""",
            access.org_id, after, tag, limit)
        topics = TopicScheme(request.app.state.settings.topic_root)
        return [_device(r, topics, access.slug) for r in rows]

    @post("/", opt={"perm": "devices.write"}, status_code=HTTP_201_CREATED)
    async def create_device(self, request: Req, access: Access,
                            data: JSONBody[DeviceCreate], audit: AuditLog) -> DeviceCreated:
        """Create a device; its MQTT credentials are in the answer, and only there."""
        props = _properties(data.properties)
        async with provisioner(request) as prov:
            creds = await prov.create_device(access.slug, data.slug, data.name, properties=props, tags=data.tags,
                                             create_org=False, record=audit.record(
                                                 "device.created", actor=access.principal.user_id,
                                                 org_id=access.org_id))
        return DeviceCreated(device=await self._get(request, access, data.slug), credentials=creds)

    @get("/{device:str}", opt={"perm": "devices.read"})
    async def get_device(self, request: Req, access: Access, device: FromPath[str]) -> Device:
        return await self._get(request, access, device)

    @patch("/{device:str}", opt={"perm": "devices.write"})
    async def update_device(self, request: Req, access: Access, device: FromPath[str],
                            data: JSONBody[DeviceUpdate]) -> Device:
        """Change name, properties (replaced whole) or tags."""
        found = await request.app.state.pool.fetchval(
            """UPDATE devices SET name = coalesce($3, name), properties = coalesce($4::jsonb, properties),
                      tags = coalesce($5, tags), updated_at = now()
               WHERE org_id = $1 AND slug = $2 RETURNING id""",
            access.org_id, device, data.name,
            _properties(data.properties) if data.properties is not None else None, data.tags)
        if found is None:
            raise NotFound(f"device {device!r} not found")
        return await self._get(request, access, device)

    async def _set_enabled(self, request: Req, access: Access, device: FromPath[str],
                           enabled: bool, audit: AuditLog) -> Device:
        await self._get(request, access, device)
        async with provisioner(request) as prov:
            await prov.set_enabled(access.slug, device, enabled, record=audit.record(
                "device.enabled" if enabled else "device.disabled", actor=access.principal.user_id,
                org_id=access.org_id))
        return await self._get(request, access, device)

    @post("/{device:str}/disable", opt={"perm": "devices.write"}, status_code=200)
    async def disable(self, request: Req, access: Access, device: FromPath[str], audit: AuditLog) -> Device:
        """Disable the device: the broker disconnects it and refuses it until enabled."""
        return await self._set_enabled(request, access, device, False, audit)

    @post("/{device:str}/enable", opt={"perm": "devices.write"}, status_code=200)
    async def enable(self, request: Req, access: Access, device: FromPath[str], audit: AuditLog) -> Device:
        return await self._set_enabled(request, access, device, True, audit)

    @post("/{device:str}/credentials", opt={"perm": "devices.write"}, status_code=200)
    async def rotate(self, request: Req, access: Access, device: FromPath[str], audit: AuditLog) -> DeviceCredentials:
        """New MQTT password (shown only now); the old one stops working."""
        await self._get(request, access, device)
        async with provisioner(request) as prov:
            creds = await prov.rotate_credentials(access.slug, device, record=audit.record(
                "device.credentials_rotated", actor=access.principal.user_id, org_id=access.org_id))
        return creds

    @delete("/{device:str}", opt={"perm": "devices.write"}, status_code=HTTP_204_NO_CONTENT)
    async def delete_device(self, request: Req, access: Access, device: FromPath[str],
                            audit: AuditLog, purge: FromQuery[bool] = False) -> None:
        """Delete the device and its broker credentials; ``purge=true`` deletes its data too."""
        await self._get(request, access, device)
        async with provisioner(request) as prov:
            await prov.delete_device(access.slug, device, purge=purge, record=audit.record(
                "device.deleted", actor=access.principal.user_id, org_id=access.org_id, detail={"purge": purge}))
