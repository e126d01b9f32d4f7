"""Who may do what in an organization: the role matrix, written once, and the guard that
enforces it on every route under ``/api/v1/orgs/{org}``.

Every organization route hangs on the one router of :func:`org_router`, which carries the
guard and the ``access`` dependency. A route declares the permission it needs as
``opt={"perm": "..."}``; the app refuses to start if an organization route declares none,
or was registered outside that router (``check_routes``), so a new route cannot ship
unguarded. Callers who are not members of the organization get 404, as if it did
not exist; members without the permission get 403. Platform superusers may do anything.
An API key acts with its role capped by its creator's current role (``key_role``) and never
manages members, keys or technician broker logins (``KEY_FORBIDDEN``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from litestar import Litestar, Request, Router
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency, Provide
from litestar.exceptions import NotFoundException, PermissionDeniedException
from litestar.handlers import BaseRouteHandler

from api.auth.backend import SECURITY
from api.auth.service import ApiKeyPrincipal, Principal, Session
from api.roles import ROLES

#: permission -> roles that hold it
MATRIX: dict[str, frozenset[str]] = {
    "org.read": frozenset(ROLES),
    "org.manage": frozenset({"owner"}),
    "members.manage": frozenset({"owner", "admin"}),
    "devices.read": frozenset(ROLES),
    "devices.write": frozenset({"owner", "admin"}),
    "commands.send": frozenset({"owner", "admin", "operator"}),
    "rules.manage": frozenset({"owner", "admin"}),  # alert rules and webhooks
    "alerts.acknowledge": frozenset({"owner", "admin", "operator"}),
    "data.read": frozenset(ROLES),
    "quarantine.read": frozenset({"owner", "admin"}),
    "mqtt_credentials.manage": frozenset({"owner", "admin", "technician"}),
    "audit.read": frozenset({"owner", "admin"}),
}


#: Never for an API key, whatever its role, each with why (the answer's 403 message): what a
#: key could do here would outlive the key's revocation. A leaked key could otherwise make a
#: real account admin (or mint keys), or mint technician broker logins (up to 90 days), which
#: live in the broker whatever becomes of the key.
KEY_FORBIDDEN: dict[str, str] = {
    "members.manage": "an API key cannot manage members or API keys; log in as a user",
    "mqtt_credentials.manage": "an API key cannot create, list or revoke technician broker logins (they would "
                               "outlive the key); log in as a user",
}


def key_role(key: str, creator: str) -> str:
    """An API key's effective role: the strongest role whose permissions both the key's role
    and its creator's current role ("superuser": no bound) hold. Roles are not a chain
    (an operator sends commands, a technician manages broker logins), so this is the
    meet of the two permission sets, not a min over a ranking."""
    if creator == "superuser":
        return key
    allowed = {p for p, roles in MATRIX.items() if key in roles and creator in roles}
    fits = [r for r in ROLES if {p for p, roles in MATRIX.items() if r in roles} <= allowed]
    return max(fits, key=lambda r: sum(r in roles for roles in MATRIX.values()))


@dataclass(frozen=True, slots=True)
class OrgAccess:
    """The organization a request is about and the caller's role in it."""

    org_id: int
    slug: str
    role: str  # "superuser" for platform superusers who are not members
    principal: Principal


Access = NamedDependency[OrgAccess]


async def resolve_access(pool: Any, principal: Principal, slug: str, perm: str) -> OrgAccess:
    """The caller's access to organization ``slug`` for ``perm``: NotFoundException when the
    caller may not know it exists, PermissionDeniedException when it may not do ``perm``.
    The guard of every route, and the periodic check of long-lived WebSocket streams."""
    key = principal if isinstance(principal, ApiKeyPrincipal) else None
    row = await pool.fetchrow(
        """SELECT o.id, m.role FROM organizations o
           LEFT JOIN memberships m ON m.org_id = o.id AND m.user_id = $2
           WHERE o.slug = $1""",
        slug, principal.user_id,
    )
    # A key's creator was found a member (or superuser) when the key was read.
    superuser = isinstance(principal, Session) and principal.is_superuser
    if row is None or (row["role"] is None and key is None and not superuser):
        raise NotFoundException(f"organization {slug!r} not found")
    role = row["role"] or "superuser"
    if key is not None:
        # An API key reaches only its own organization, with the key's role, capped by what
        # its creator may do there today.
        if row["id"] != key.org_id:
            raise NotFoundException(f"organization {slug!r} not found")
        if perm in KEY_FORBIDDEN:
            raise PermissionDeniedException(KEY_FORBIDDEN[perm])
        role = key_role(key.role, key.creator_role)
    if role != "superuser" and role not in MATRIX[perm]:
        if key is not None and role != key.role:
            raise PermissionDeniedException(f"this {key.role} API key acts as {role}, its creator's role "
                                            f"now, which may not do this ({perm})")
        raise PermissionDeniedException(f"the {role} role may not do this ({perm})")
    return OrgAccess(row["id"], slug, role, principal)


async def org_guard(connection: ASGIConnection[Principal, Any, Any, Any], handler: BaseRouteHandler) -> None:
    perm = handler.opt.get("perm")
    if perm not in MATRIX:
        raise PermissionDeniedException("route has no permission declared")  # check_routes prevents this
    # connection.user was authenticated by api/auth/backend.py, which runs first.
    access = await resolve_access(connection.app.state.pool, connection.user, connection.path_params.get("org", ""),
                                  perm)
    connection.scope.setdefault("state", {})["org_access"] = access


async def provide_org(request: Request[Any, Any, Any]) -> OrgAccess:
    return request.scope["state"]["org_access"]  # type: ignore[no-any-return]


ORG_PATH = "/api/v1/orgs/{org:str}"


def org_router(*controllers: Any) -> Router:
    """The router of every route under ``/api/v1/orgs/{org}``: the guard and the caller's
    :class:`OrgAccess` (the ``access`` dependency) belong to it, not to each controller."""
    return Router(path=ORG_PATH, route_handlers=list(controllers), guards=[org_guard],
                  dependencies={"access": Provide(provide_org)}, security=SECURITY)


def check_routes(app: Litestar) -> None:
    """Refuse to start with an organization route that declares no permission or is not
    guarded (registered outside :func:`org_router`)."""
    for route in app.routes:
        if not route.path.startswith("/api/v1/orgs/{org"):
            continue
        handlers = getattr(route, "route_handlers", None) or [getattr(route, "route_handler", None)]
        for handler in handlers:
            if handler is None:
                raise RuntimeError(f"{route.path}: a route of an unknown kind")
            http_methods = set(getattr(handler, "http_methods", ()) or ())
            if http_methods == {"OPTIONS"}:
                continue  # Litestar's automatic OPTIONS answer, which reveals nothing
            methods = ", ".join(sorted(http_methods)) or "WEBSOCKET"
            if handler.opt.get("perm") not in MATRIX:
                raise RuntimeError(f"{route.path} ({methods}) declares no "
                                   f"permission: add opt={{'perm': ...}} from api.access.MATRIX")
            if org_guard not in handler.resolve_guards():
                raise RuntimeError(f"{route.path} ({methods}) is not guarded: register its controller "
                                   f"in api.access.org_router")
