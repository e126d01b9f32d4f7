"""/api/v1/orgs: organizations and their members."""

from __future__ import annotations

from litestar import Controller, delete, get, post, put
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, JSONBody
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT

from api.access import Access
from api.auth.backend import SECURITY
from api.deps import AuditLog, Me, UserSession, provide_principal, provide_user_session
from api.services.orgs import Member, MemberSet, Org, OrgCreate, OrgService

Orgs = NamedDependency[OrgService]


class OrgsController(Controller):
    path = "/api/v1/orgs"
    tags = ["organizations"]
    security = SECURITY

    @post("/", status_code=HTTP_201_CREATED, dependencies={"me": Provide(provide_user_session)})
    async def create(self, orgs: Orgs, me: UserSession, audit: AuditLog, data: JSONBody[OrgCreate]) -> Org:
        """Create an organization; the caller becomes its owner."""
        return await orgs.create(me, data, audit)

    @get("/", dependencies={"me": Provide(provide_principal)})
    async def list_mine(self, orgs: Orgs, me: Me) -> list[Org]:
        """The organizations the caller belongs to (all of them for a superuser)."""
        return await orgs.list_mine(me)


class OrgController(Controller):
    path = "/"
    tags = ["organizations"]

    @get("/", opt={"perm": "org.read"})
    async def get_org(self, access: Access, orgs: Orgs) -> Org:
        """One organization and the caller's role in it."""
        return await orgs.get(access)

    @delete("/", opt={"perm": "org.manage"}, status_code=HTTP_204_NO_CONTENT)
    async def delete_org(self, access: Access, orgs: Orgs, audit: AuditLog) -> None:
        """Delete the organization with its devices, members and data. Every broker login of
        it (devices, technicians) is removed and disconnected before the answer."""
        await orgs.delete(access, audit)

    @get("/members", opt={"perm": "org.read"})
    async def members(self, access: Access, orgs: Orgs) -> list[Member]:
        return await orgs.members(access)

    @put("/members/{email:str}", opt={"perm": "members.manage"})
    async def set_member(self, access: Access, orgs: Orgs, audit: AuditLog, email: FromPath[str],
                         data: JSONBody[MemberSet]) -> Member:
        """Add a user (by email) to the organization or change their role."""
        return await orgs.set_member(access, email, data.role, audit)

    @delete("/members/{email:str}", opt={"perm": "members.manage"}, status_code=HTTP_204_NO_CONTENT)
    async def remove_member(self, access: Access, orgs: Orgs, audit: AuditLog, email: FromPath[str]) -> None:
        await orgs.remove_member(access, email, audit)
