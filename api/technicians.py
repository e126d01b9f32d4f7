"""/api/v1/orgs/{org}/mqtt-credentials: subscribe-only broker logins for field technicians."""

from __future__ import annotations

import asyncio
import logging

from litestar import Controller, delete, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT

from api.access import Access
from api.deps import AuditLog, Id
from api.services.technicians import (
    TechnicianCreate,
    TechnicianCreated,
    TechnicianCredential,
    TechnicianService,
)
from lms_core.errors import LmsError

log = logging.getLogger("lms.api.technicians")
#: How often expired technician logins are removed from the broker.
EXPIRY_SWEEP_S = 30

Technicians = NamedDependency[TechnicianService]


class TechniciansController(Controller):
    path = "/mqtt-credentials"
    tags = ["mqtt credentials"]

    @post("/", opt={"perm": "mqtt_credentials.manage"}, status_code=HTTP_201_CREATED)
    async def create(self, access: Access, technicians: Technicians, audit: AuditLog,
                     data: JSONBody[TechnicianCreate]) -> TechnicianCreated:
        """A broker login that may subscribe to ``{root}/{org}/#`` and nothing else, and never
        publish; it stops working at ``expires_at`` or when revoked. The password is shown once."""
        return await technicians.create(access, data, audit)

    @get("/", opt={"perm": "mqtt_credentials.manage"})
    async def list_credentials(self, access: Access, technicians: Technicians) -> list[TechnicianCredential]:
        return await technicians.list_credentials(access)

    @delete("/{credential_id:int}", opt={"perm": "mqtt_credentials.manage"}, status_code=HTTP_204_NO_CONTENT)
    async def revoke(self, access: Access, technicians: Technicians, audit: AuditLog, credential_id: Id) -> None:
        """Revoke: the login is removed from the broker and its sessions are disconnected."""
        await technicians.revoke(access, credential_id, audit)


async def expiry_sweeper(service: TechnicianService) -> None:
    """Remove expired technician logins from the broker, forever (cancelled at shutdown)."""
    while True:
        await asyncio.sleep(EXPIRY_SWEEP_S)
        try:
            n = await service.expire()
            if n:
                log.info("removed %d expired technician login(s) from the broker", n)
        except (LmsError, OSError) as exc:
            log.warning("technician expiry sweep failed (%s); retrying in %d s", exc, EXPIRY_SWEEP_S)
