"""Organizations and their members."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Annotated

import asyncpg
import msgspec
from litestar.params import FromPath
from msgspec import Meta

from api.access import MATRIX
from api.auth.service import Principal, Session
from api.roles import Role
from api.services.audit import Audit
from api.services.errors import Forbidden
from lms_core.errors import AlreadyExists, NotFound
from lms_core.provisioning import Provisioner
from lms_core.settings import Settings
from lms_core.topics import SLUG_PATTERN

if TYPE_CHECKING:
    from api.access import OrgAccess

#: The permission a member needs to keep the technician broker logins they created
#: (api/access.py MATRIX); the logins are revoked when it is taken away.
TECH_PERM = "mqtt_credentials.manage"

Slug = Annotated[str, Meta(pattern=SLUG_PATTERN, examples=[])]


class OrgCreate(msgspec.Struct, forbid_unknown_fields=True):
    slug: Slug
    name: Annotated[str, Meta(min_length=1, max_length=200)] | None = None


class Org(msgspec.Struct):
    slug: str
    name: str
    role: str
    created_at: datetime


class MemberSet(msgspec.Struct, forbid_unknown_fields=True):
    role: Role


class Member(msgspec.Struct):
    user_id: int
    email: FromPath[str]
    role: str


class OrgService:
    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self.pool = pool
        self.settings = settings

    async def create(self, me: Session, data: OrgCreate, audit: Audit) -> Org:
        """Create an organization owned by ``me``."""
        async with self.pool.acquire() as conn, conn.transaction():
            try:
                row = await conn.fetchrow(
                    "INSERT INTO organizations (slug, name) VALUES ($1, $2) RETURNING id, created_at",
                    data.slug, data.name or data.slug)
            except asyncpg.UniqueViolationError:
                raise AlreadyExists(f"organization {data.slug!r} exists") from None
            await conn.execute("INSERT INTO memberships (org_id, user_id, role) VALUES ($1, $2, 'owner')",
                               row["id"], me.user_id)
            await audit.write(conn, "org.created", actor=me.user_id, org_id=row["id"], target=data.slug)
        return Org(slug=data.slug, name=data.name or data.slug, role="owner", created_at=row["created_at"])

    async def list_mine(self, me: Principal) -> list[Org]:
        rows = await self.pool.fetch(
            """SELECT o.slug, o.name, o.created_at, coalesce(m.role, 'superuser') AS role
               FROM organizations o LEFT JOIN memberships m ON m.org_id = o.id AND m.user_id = $1
               WHERE m.user_id IS NOT NULL OR $2 ORDER BY o.slug""",
            me.user_id, isinstance(me, Session) and me.is_superuser)
        return [Org(slug=r["slug"], name=r["name"], role=r["role"], created_at=r["created_at"]) for r in rows]

    async def get(self, access: OrgAccess) -> Org:
        r = await self.pool.fetchrow("SELECT slug, name, created_at FROM organizations WHERE id = $1", access.org_id)
        return Org(slug=r["slug"], name=r["name"], role=access.role, created_at=r["created_at"])

    async def delete(self, access: OrgAccess, audit: Audit) -> None:
        async with Provisioner.open(self.settings, self.pool) as prov:
            await prov.delete_org(access.org_id, access.slug,
                                  record=audit.record("org.deleted", actor=access.principal.user_id))

    async def members(self, access: OrgAccess) -> list[Member]:
        rows = await self.pool.fetch(
            """SELECT u.id, u.email, m.role FROM memberships m JOIN users u ON u.id = m.user_id
               WHERE m.org_id = $1 ORDER BY u.email""", access.org_id)
        return [Member(user_id=r["id"], email=r["email"], role=r["role"]) for r in rows]

    async def set_member(self, access: OrgAccess, email: str, role: str, audit: Audit) -> Member:
        if role == "owner" and access.role not in ("owner", "superuser"):
            raise Forbidden("only an owner may make an owner")
        async with self.pool.acquire() as conn, conn.transaction():
            user = await conn.fetchrow("SELECT id, email FROM users WHERE lower(email) = lower($1)", email)
            if user is None:
                raise NotFound(f"no user {email!r}")
            before = await conn.fetchval("SELECT role FROM memberships WHERE org_id = $1 AND user_id = $2",
                                         access.org_id, user["id"])
            if before == "owner" and access.role not in ("owner", "superuser"):
                raise Forbidden("only an owner may change an owner's role")
            await conn.execute(
                """INSERT INTO memberships (org_id, user_id, role) VALUES ($1, $2, $3)
                   ON CONFLICT (org_id, user_id) DO UPDATE SET role = EXCLUDED.role""",
                access.org_id, user["id"], role)
            await _keep_an_owner(conn, access.org_id)
            await audit.write(conn, "member.role_changed", actor=access.principal.user_id, org_id=access.org_id,
                              target=user["email"], detail={"from": before, "to": role})
            if not may_keep_technician_logins(role):
                await self._revoke_technician_logins(conn, access, user["id"], audit, f"member demoted to {role}")
        return Member(user_id=user["id"], email=user["email"], role=role)

    async def remove_member(self, access: OrgAccess, email: str, audit: Audit) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """DELETE FROM memberships m USING users u
                   WHERE m.user_id = u.id AND m.org_id = $1 AND lower(u.email) = lower($2)
                   RETURNING m.role, m.user_id""", access.org_id, email)
            if row is None:
                raise NotFound(f"{email!r} is not a member")
            if row["role"] == "owner" and access.role not in ("owner", "superuser"):
                raise Forbidden("only an owner may remove an owner")
            await _keep_an_owner(conn, access.org_id)
            await audit.write(conn, "member.removed", actor=access.principal.user_id, org_id=access.org_id,
                              target=email, detail={"role": row["role"]})
            await self._revoke_technician_logins(conn, access, row["user_id"], audit, "member removed")

    async def _revoke_technician_logins(self, conn: asyncpg.Connection, access: OrgAccess, user_id: int,
                                        audit: Audit, reason: str) -> None:
        """Revoke (and disconnect) the technician broker logins ``user_id`` created here, in the
        membership change's transaction: a login must not outlive its creator's right to make
        it. The broker is only contacted when there is something to revoke."""
        if not await conn.fetchval(
                """SELECT EXISTS (SELECT 1 FROM mqtt_credentials
                   WHERE org_id = $1 AND created_by = $2 AND revoked_at IS NULL)""", access.org_id, user_id):
            return
        async with Provisioner.open(self.settings, self.pool) as prov:
            await prov.revoke_technicians_created_by(conn, access.org_id, user_id, record=audit.record(
                "mqtt_credential.revoked", actor=access.principal.user_id, org_id=access.org_id,
                detail={"reason": reason}))


def may_keep_technician_logins(role: str) -> bool:
    return role in MATRIX[TECH_PERM]


async def _keep_an_owner(conn: asyncpg.Connection, org_id: int) -> None:
    if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM memberships WHERE org_id = $1 AND role = 'owner')",
                               org_id):
        raise Forbidden("an organization keeps at least one owner")
