"""/api/v1/orgs/{org}/api-keys: keys for scripts and integrations, one organization each."""

from __future__ import annotations

from litestar import Controller, delete, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT

from api.access import Access
from api.deps import AuditLog, Id
from api.services.keys import ApiKey, ApiKeyCreated, KeyCreate, KeyService

Keys = NamedDependency[KeyService]


class ApiKeysController(Controller):
    path = "/api-keys"
    tags = ["api keys"]

    @post("/", opt={"perm": "members.manage"}, status_code=HTTP_201_CREATED)
    async def create(self, access: Access, keys: Keys, audit: AuditLog, data: JSONBody[KeyCreate]) -> ApiKeyCreated:
        """Create a key acting in this organization with ``role``; the key is shown only now."""
        return await keys.create(access, data, audit)

    @get("/", opt={"perm": "members.manage"})
    async def list_keys(self, access: Access, keys: Keys) -> list[ApiKey]:
        return await keys.list_keys(access)

    @delete("/{key_id:int}", opt={"perm": "members.manage"}, status_code=HTTP_204_NO_CONTENT)
    async def revoke(self, access: Access, keys: Keys, audit: AuditLog, key_id: Id) -> None:
        """Revoke a key: it stops working at once."""
        await keys.revoke(access, key_id, audit)
