"""Dependencies shared by the routes: the caller, the services, the client's address.

Every service is built here from the app's state (its pools and settings), per request
(cheap: a few references); handlers receive them by name (``SERVICES``)."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any

from litestar import Request
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import PathParameter

from api.auth.service import AuthService, Principal, Session
from api.services.alerts import AlertService
from api.services.assets import AssetService
from api.services.audit import Audit
from api.services.commands import CommandService
from api.services.config import ConfigService
from api.services.data import DataService
from api.services.devices import DeviceService
from api.services.errors import Forbidden
from api.services.keys import KeyService
from api.services.orgs import OrgService
from api.services.rules import RuleService
from api.services.technicians import TechnicianService
from api.services.webhooks import WebhookService
from lms_core.settings import Settings

Req = Request[Any, Any, Any]
Me = NamedDependency[Principal]
UserSession = NamedDependency[Session]
Auth = NamedDependency[AuthService]
AuditLog = NamedDependency[Audit]
AppSettings = NamedDependency[Settings]

#: Ids are PostgreSQL bigints; a larger number is a 422, not an overflow deep down.
BIGINT_MAX = 2**63 - 1
Id = Annotated[int, PathParameter(ge=1, le=BIGINT_MAX)]


def client_address(request: Request[Any, Any, Any]) -> str:
    """The client's address: the peer, or, when the peer is a trusted proxy, the nearest
    address in X-Forwarded-For that is not one of the trusted proxies."""
    peer = request.client.host if request.client else "unknown"
    trusted = request.app.state.trusted_proxies
    if not trusted or not _is_trusted(peer, trusted):
        return peer
    hops = [h.strip() for h in request.headers.get("x-forwarded-for", "").split(",") if h.strip()]
    for hop in reversed(hops):
        if not _is_trusted(hop, trusted):
            return hop[:64]
    return peer


def _is_trusted(address: str, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in n for n in networks)


def request_id(request: Request[Any, Any, Any]) -> str:
    return str(request.scope.get("state", {}).get("request_id", ""))


async def provide_audit(request: Request[Any, Any, Any]) -> Audit:
    """The client's address and the request id, for the audit rows this request writes."""
    return Audit(address=client_address(request), request_id=request_id(request))


async def provide_settings(state: State) -> Settings:
    return state.settings  # type: ignore[no-any-return]


async def provide_auth(state: State) -> AuthService:
    return state.auth  # type: ignore[no-any-return]


async def provide_orgs(state: State) -> OrgService:
    return OrgService(state.pool, state.settings)


async def provide_devices(state: State) -> DeviceService:
    return DeviceService(state.pool, state.settings)


async def provide_assets(state: State) -> AssetService:
    return AssetService(state.pool, state.settings)


async def provide_keys(state: State) -> KeyService:
    return KeyService(state.pool)


async def provide_technicians(state: State) -> TechnicianService:
    return TechnicianService(state.pool, state.settings)


async def provide_data(state: State) -> DataService:
    return DataService(state.pool, state.export_pool, state.export_slots)


async def provide_commands(state: State) -> CommandService:
    return CommandService(state.pool, state.settings, state.publisher, state.command_waiter)


async def provide_configs(state: State) -> ConfigService:
    return ConfigService(state.pool, state.settings, state.publisher)


async def provide_rules(state: State) -> RuleService:
    return RuleService(state.pool, state.settings)


async def provide_alerts(state: State) -> AlertService:
    return AlertService(state.pool)


async def provide_webhooks(state: State) -> WebhookService:
    return WebhookService(state.pool, state.settings)


#: Named as the handlers' parameters. ``data`` is Litestar's name for the request body,
#: hence ``data_service``.
SERVICES = {
    "settings": Provide(provide_settings),
    "audit": Provide(provide_audit),
    "auth": Provide(provide_auth),
    "orgs": Provide(provide_orgs),
    "devices": Provide(provide_devices),
    "assets": Provide(provide_assets),
    "keys": Provide(provide_keys),
    "technicians": Provide(provide_technicians),
    "data_service": Provide(provide_data),
    "commands": Provide(provide_commands),
    "configs": Provide(provide_configs),
    "rules": Provide(provide_rules),
    "alerts": Provide(provide_alerts),
    "webhooks": Provide(provide_webhooks),
}


async def provide_principal(request: Request[Principal, str, State]) -> Principal:
    """The authenticated caller (api/auth/backend.py)."""
    return request.user


async def provide_user_session(request: Request[Principal, str, State]) -> Session:
    """The caller, who must be a user session: an API key may not manage accounts or
    create organizations (it is scoped to one organization)."""
    if not isinstance(request.user, Session):
        raise Forbidden("an API key cannot do this; log in as a user")
    return request.user
