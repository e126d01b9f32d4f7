"""API keys: for scripts and integrations, one organization each."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Annotated

import asyncpg
import msgspec
from msgspec import Meta

from api.auth.service import ApiKeyPrincipal, new_api_key
from api.roles import Role
from api.services.audit import Audit
from api.services.errors import Forbidden
from lms_core.errors import NotFound

if TYPE_CHECKING:
    from api.access import OrgAccess


class KeyCreate(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, Meta(min_length=1, max_length=200)]
    role: Role = "viewer"


class ApiKey(msgspec.Struct):
    id: int
    name: str
    role: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class ApiKeyCreated(msgspec.Struct):
    id: int
    name: str
    role: str
    key: str  # shown once; send it as "Authorization: Bearer <key>" or "X-API-Key: <key>"


class KeyService:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def create(self, access: OrgAccess, data: KeyCreate, audit: Audit) -> ApiKeyCreated:
        if data.role == "owner" and access.role not in ("owner", "superuser"):
            raise Forbidden("only an owner may create an owner key")
        if isinstance(access.principal, ApiKeyPrincipal):
            raise Forbidden("an API key cannot create API keys")
        key, prefix, hashed = new_api_key()
        async with self.pool.acquire() as conn, conn.transaction():
            key_id = await conn.fetchval(
                """INSERT INTO api_keys (org_id, user_id, name, role, prefix, key_hash)
                   VALUES ($1, $2, $3, $4, $5, $6) RETURNING id""",
                access.org_id, access.principal.user_id, data.name, data.role, prefix, hashed)
            await audit.write(conn, "api_key.created", actor=access.principal.user_id, org_id=access.org_id,
                              target=f"{data.name} ({prefix})", detail={"role": data.role})
        return ApiKeyCreated(id=key_id, name=data.name, role=data.role, key=key)

    async def list_keys(self, access: OrgAccess) -> list[ApiKey]:
        rows = await self.pool.fetch(
            """SELECT id, name, role, prefix, created_at, last_used_at, revoked_at FROM api_keys
               WHERE org_id = $1 ORDER BY id DESC LIMIT 1000""", access.org_id)
        return [ApiKey(**dict(r)) for r in rows]

    async def revoke(self, access: OrgAccess, key_id: int, audit: Audit) -> None:
        """The key stops working at once."""
        async with self.pool.acquire() as conn, conn.transaction():
            prefix = await conn.fetchval(
                """UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND org_id = $2 AND revoked_at IS NULL
                   RETURNING prefix""", key_id, access.org_id)
            if prefix is None:
                raise NotFound("no such active key")
            await audit.write(conn, "api_key.revoked", actor=access.principal.user_id, org_id=access.org_id,
                              target=prefix)
