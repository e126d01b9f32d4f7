"""Technician MQTT credentials: subscribe-only broker logins for one organization."""

from __future__ import annotations

import shlex
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Annotated

import asyncpg
import msgspec
from msgspec import Meta

from api.services.audit import Audit
from api.services.errors import Forbidden
from api.services.orgs import may_keep_technician_logins
from lms_core.errors import NotFound
from lms_core.provisioning import Provisioner
from lms_core.settings import MqttUrl, Settings

if TYPE_CHECKING:
    from api.access import OrgAccess


class TechnicianCreate(msgspec.Struct, forbid_unknown_fields=True):
    label: Annotated[str, Meta(max_length=200)] = ""
    expires_in_hours: Annotated[int, Meta(ge=1, le=24 * 90)] = 24


class TechnicianCredential(msgspec.Struct):
    id: int
    username: str
    label: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None


class TechnicianCreated(msgspec.Struct):
    id: int
    username: str
    password: str
    expires_at: datetime
    topic_filter: str
    mqtt_url: str
    mosquitto_sub: str


class TechnicianService:
    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self.pool = pool
        self.settings = settings

    async def create(self, access: OrgAccess, data: TechnicianCreate, audit: Audit) -> TechnicianCreated:
        expires = datetime.now(UTC) + timedelta(hours=data.expires_in_hours)
        write_audit = audit.record("mqtt_credential.created", actor=access.principal.user_id,
                                   org_id=access.org_id, detail={"expires_at": expires.isoformat()})

        async def record(conn: asyncpg.Connection, target: str) -> None:
            # The creator's membership, locked until this login commits: a demotion or removal
            # running at the same time waits for it, then revokes it with the creator's other
            # logins (api/services/orgs.py), or went first and is seen here.
            if access.role != "superuser":
                role = await conn.fetchval(
                    "SELECT role FROM memberships WHERE org_id = $1 AND user_id = $2 FOR SHARE",
                    access.org_id, access.principal.user_id)
                if not may_keep_technician_logins(role or ""):
                    raise Forbidden("your role in this organization changed; you may no longer create broker logins")
            await write_audit(conn, target)

        async with Provisioner.open(self.settings, self.pool) as prov:
            cred_id, username, password = await prov.create_technician(
                access.org_id, access.slug, data.label, expires, access.principal.user_id, record=record)
        url = MqttUrl.parse(self.settings.device_mqtt_url)
        topic = f"{self.settings.topic_root}/{access.slug}/#"
        # The login's client id is pinned to its username (lms_core/broker.py): -i is required.
        sub = shlex.join(["mosquitto_sub", "-h", url.host, "-p", str(url.port), "-u", username, "-P", password,
                          "-i", username, "-t", topic, "-v"])
        return TechnicianCreated(id=cred_id, username=username, password=password, expires_at=expires,
                                 topic_filter=topic, mqtt_url=url.public(), mosquitto_sub=sub)

    async def list_credentials(self, access: OrgAccess) -> list[TechnicianCredential]:
        rows = await self.pool.fetch(
            """SELECT id, username, label, created_at, expires_at, revoked_at FROM mqtt_credentials
               WHERE org_id = $1 ORDER BY id DESC LIMIT 1000""", access.org_id)
        return [TechnicianCredential(**dict(r)) for r in rows]

    async def revoke(self, access: OrgAccess, credential_id: int, audit: Audit) -> None:
        async with Provisioner.open(self.settings, self.pool) as prov:
            if not await prov.revoke_technician(access.org_id, credential_id, record=audit.record(
                    "mqtt_credential.revoked", actor=access.principal.user_id, org_id=access.org_id)):
                raise NotFound("no such active credential")

    async def expire(self) -> int:
        """Remove expired technician logins from the broker; returns how many."""
        async with Provisioner.open(self.settings, self.pool) as prov:
            return await prov.expire_technicians()
