"""Authentication through Litestar's security layer: one middleware finds the caller of
every request a route does not exclude (``opt={"exclude_from_auth": True}``: sign-up,
login, health; and the OpenAPI document), so ``request.user`` is a
:class:`~api.auth.service.Session` or an :class:`~api.auth.service.ApiKeyPrincipal` and
``request.auth`` names how it authenticated. The OpenAPI document declares the three ways.

Revocation is checked on every request: a logged-out token's id is in ``revoked_tokens``,
a password change bumps the user's token version, a key is revoked or loses its creator.
"""

from __future__ import annotations

import hmac
from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult, DefineMiddleware
from litestar.openapi.spec import Reference, SecurityRequirement, SecurityScheme

from api.auth.service import AuthService, Principal

SESSION_COOKIE = "lms_session"
CSRF_COOKIE = "lms_csrf"
#: The device token of OWASP's "device cookie" (api/auth/service.py): it authenticates
#: nothing, it only lets its holder's logins escape others' failures at a shared address.
DEVICE_COOKIE = "lms_device"
DEVICE_HEADER = "x-lms-device"
CSRF_HEADER = "x-csrf-token"
API_KEY_HEADER = "x-api-key"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

#: How a caller may authenticate, as the OpenAPI document declares it.
SECURITY_SCHEMES: dict[str, SecurityScheme | Reference] = {
    "bearer": SecurityScheme(
        type="http", scheme="bearer", bearer_format="JWT",
        description="An access token from POST /api/v1/auth/login (or an API key, lms_...)."),
    "session_cookie": SecurityScheme(
        type="apiKey", name=SESSION_COOKIE, security_scheme_in="cookie",
        description="The cookie set by POST /api/v1/auth/login. A request that changes state must also "
                    "send the session's CSRF token (the lms_csrf cookie) in the X-CSRF-Token header."),
    "api_key": SecurityScheme(
        type="apiKey", name="X-API-Key", security_scheme_in="header",
        description="An API key of one organization, lms_<prefix>_<secret>."),
}
#: Any one of them.
SECURITY: list[SecurityRequirement] = [{name: []} for name in SECURITY_SCHEMES]


def _unauthorized(message: str) -> NotAuthorizedException:
    return NotAuthorizedException(message, headers={"WWW-Authenticate": "Bearer"})


async def authenticate(connection: ASGIConnection[Any, Any, Any, Any]) -> tuple[Principal, str]:
    """The caller and how it authenticated (``bearer``, ``cookie`` or ``api_key``), or 401.

    An API key (X-API-Key, or a bearer token starting ``lms_``), a bearer token (programs) or
    the session cookie (browsers). A cookie-authenticated request that changes state must
    also carry the session's CSRF token in X-CSRF-Token: another site can make the browser
    send the cookie, but cannot read it to copy it, nor compute the token of someone else's
    session.

    The CSRF check is ours, not Litestar's CSRFConfig: that one is a double-submit cookie
    demanded of every unsafe request, bearer and API-key clients included (who carry no
    cookie and need no protection), and its token is not bound to the session (a sibling
    subdomain could plant a matching pair).
    """
    auth: AuthService = connection.app.state.auth
    header = connection.headers.get("authorization", "")
    api_key = connection.headers.get(API_KEY_HEADER, "")
    principal: Principal | None
    if api_key:
        principal, via = await auth.key_principal(api_key.strip()), "api_key"
    elif header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("Authorization must be 'Bearer <token>'")
        token = token.strip()
        if token.startswith("lms_"):
            principal, via = await auth.key_principal(token), "api_key"
        else:
            principal, via = await auth.principal(token), "bearer"
    elif connection.scope["type"] == "websocket" and (offered := ws_token(connection)):
        # A browser page on another site cannot send a header with a WebSocket, nor (SameSite)
        # our cookie: it offers the token as a subprotocol, "lms.token.<token>".
        if offered.startswith("lms_"):
            principal, via = await auth.key_principal(offered), "api_key"
        else:
            principal, via = await auth.principal(offered), "bearer"
    else:
        token = connection.cookies.get(SESSION_COOKIE, "")
        if not token:
            raise _unauthorized("authentication required")
        session = await auth.principal(token)
        # A WebSocket upgrade is a GET a browser sends with the cookie from any page, and it
        # cannot carry our header: the stream checks its Origin instead (api/stream/routes.py).
        if session is not None and connection.scope["type"] == "http" \
                and connection.scope.get("method") not in SAFE_METHODS:
            # The token is an HMAC of this session's token id (the CSRF cookie only hands it to
            # the page's script): a token of another session, or a CSRF cookie planted by a
            # sibling subdomain, does not match.
            sent = connection.headers.get(CSRF_HEADER, "")
            if not sent or not hmac.compare_digest(sent.encode(), auth.csrf_token(session.jti).encode()):
                raise PermissionDeniedException("missing or wrong X-CSRF-Token header for a cookie session")
        principal, via = session, "cookie"
    if principal is None:
        raise _unauthorized("invalid, expired or revoked token")
    return principal, via


#: The WebSocket subprotocol that carries a token, and the one the stream then speaks.
WS_TOKEN_PREFIX = "lms.token."
WS_PROTOCOL = "lms.v1"


def ws_token(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    """The token a WebSocket client offered as subprotocol ``lms.token.<token>``, or ""."""
    for offered in connection.scope.get("subprotocols") or ():
        if isinstance(offered, str) and offered.startswith(WS_TOKEN_PREFIX):
            return offered[len(WS_TOKEN_PREFIX):]
    return ""


class AuthenticationMiddleware(AbstractAuthenticationMiddleware):
    async def authenticate_request(self, connection: ASGIConnection[Any, Any, Any, Any]) -> AuthenticationResult:
        principal, via = await authenticate(connection)
        return AuthenticationResult(user=principal, auth=via)


#: The app's authentication; every HTTP method is authenticated but OPTIONS (CORS preflight,
#: and Litestar's automatic answer, which reveals nothing).
authentication = DefineMiddleware(AuthenticationMiddleware, exclude=["^/schema"],
                                  exclude_from_auth_key="exclude_from_auth", exclude_http_methods=["OPTIONS"])
