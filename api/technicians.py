"""/api/v1/orgs/{org}/mqtt-credentials: subscribe-only broker logins for field technicians."""

from __future__ import annotations

import asyncio
import logging
import shlex
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import msgspec
from litestar import Controller, delete, get, post
from litestar.params import JSONBody
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT
from msgspec import Meta

from api.access import Access
from api.deps import AuditLog, Id, Req
from api.devices import provisioner
from lms_core.errors import NotFound
from lms_core.settings import MqttUrl

log = logging.getLogger("lms.api.technicians")
#: How often expired technician logins are removed from the broker.
EXPIRY_SWEEP_S = 30


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


class TechniciansController(Controller):
    path = "/mqtt-credentials"
    tags = ["mqtt credentials"]

    @post("/", opt={"perm": "mqtt_credentials.manage"}, status_code=HTTP_201_CREATED)
    async def create(self, request: Req, access: Access, data: JSONBody[TechnicianCreate],
                     audit: AuditLog) -> TechnicianCreated:
        """A broker login that may subscribe to ``{root}/{org}/#`` and nothing else, and never
        publish; it stops working at ``expires_at`` or when revoked. The password is shown once."""
        settings = request.app.state.settings
        expires = datetime.now(UTC) + timedelta(hours=data.expires_in_hours)
        async with provisioner(request) as prov:
            cred_id, username, password = await prov.create_technician(
                access.org_id, access.slug, data.label, expires, access.principal.user_id,
                record=audit.record("mqtt_credential.created", actor=access.principal.user_id, org_id=access.org_id,
                                    detail={"expires_at": expires.isoformat()}))
        url = MqttUrl.parse(settings.device_mqtt_url)
        topic = f"{settings.topic_root}/{access.slug}/#"
        # The login's client id is pinned to its username (lms_core/broker.py): -i is required.
        sub = shlex.join(["mosquitto_sub", "-h", url.host, "-p", str(url.port), "-u", username, "-P", password,
                          "-i", username, "-t", topic, "-v"])
        return TechnicianCreated(id=cred_id, username=username, password=password, expires_at=expires,
                                 topic_filter=topic, mqtt_url=url.public(), mosquitto_sub=sub)

    @get("/", opt={"perm": "mqtt_credentials.manage"})
    async def list_credentials(self, request: Req, access: Access) -> list[TechnicianCredential]:
        rows = await request.app.state.pool.fetch(
            """SELECT id, username, label, created_at, expires_at, revoked_at FROM mqtt_credentials
               WHERE org_id = $1 ORDER BY id DESC LIMIT 1000""", access.org_id)
        return [TechnicianCredential(**dict(r)) for r in rows]

    @delete("/{credential_id:int}", opt={"perm": "mqtt_credentials.manage"}, status_code=HTTP_204_NO_CONTENT)
    async def revoke(self, request: Req, access: Access, credential_id: Id, audit: AuditLog) -> None:
        """Revoke: the login is removed from the broker and its sessions are disconnected."""
        async with provisioner(request) as prov:
            if not await prov.revoke_technician(access.org_id, credential_id, record=audit.record(
                    "mqtt_credential.revoked", actor=access.principal.user_id, org_id=access.org_id)):
                raise NotFound("no such active credential")


async def expiry_sweeper(app: Any) -> None:
    """Remove expired technician logins from the broker, forever (cancelled at shutdown)."""
    from lms_core.broker import BrokerAdmin
    from lms_core.errors import LmsError
    from lms_core.provisioning import Provisioner
    from lms_core.topics import TopicScheme

    settings = app.state.settings
    topics = TopicScheme(settings.topic_root)
    while True:
        await asyncio.sleep(EXPIRY_SWEEP_S)
        try:
            async with BrokerAdmin(settings.mqtt, topics) as admin:
                n = await Provisioner(app.state.pool, admin, topics, settings.secret_key,
                                      settings.device_mqtt_url).expire_technicians()
            if n:
                log.info("removed %d expired technician login(s) from the broker", n)
        except (LmsError, OSError) as exc:
            log.warning("technician expiry sweep failed (%s); retrying in %d s", exc, EXPIRY_SWEEP_S)
