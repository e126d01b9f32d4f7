"""/api/v1/auth: register, login, logout, me, password."""

from __future__ import annotations

import time
from typing import Annotated, Any

import msgspec
from litestar import Controller, Response, get, post
from litestar.datastructures import Cookie
from litestar.di import Provide
from litestar.params import JSONBody
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT
from msgspec import Meta

from api.auth.backend import CSRF_COOKIE, DEVICE_COOKIE, DEVICE_HEADER, SECURITY, SESSION_COOKIE
from api.auth.service import Session
from api.deps import AuditLog, Auth, Me, Req, UserSession, provide_principal, provide_user_session

#: users.email allows 254 characters (RFC 5321's limit); longer is a 422 here, not a 500 there.
Email = Annotated[str, Meta(max_length=254)]


class Credentials(msgspec.Struct, forbid_unknown_fields=True):
    email: Email
    password: str


class LoginRequest(msgspec.Struct, forbid_unknown_fields=True):
    email: Email
    password: str
    remember: bool = False


class PasswordChange(msgspec.Struct, forbid_unknown_fields=True):
    current_password: str
    new_password: str


class User(msgspec.Struct):
    id: int
    email: str
    is_superuser: bool


class LoginResult(msgspec.Struct):
    access_token: str
    token_type: str
    expires_at: int
    user: User
    csrf_token: str
    #: Also set as the ``lms_device`` cookie; a program sends it back as ``X-LMS-Device`` on
    #: later logins, which then cannot be locked out by others' failures at its address.
    device_token: str


class AuthController(Controller):
    path = "/api/v1/auth"
    tags = ["auth"]

    @post("/register", status_code=HTTP_201_CREATED, opt={"exclude_from_auth": True})
    async def register(self, data: JSONBody[Credentials], auth: Auth, audit: AuditLog) -> User:
        """Create an account (if self-service registration is on: LMS_API_REGISTRATION),
        at most LMS_API_REGISTRATION_MAX_PER_ADDRESS per client address and window."""
        user_id = await auth.register(data.email, data.password, audit=audit)
        return User(id=user_id, email=data.email.strip(), is_superuser=False)

    @post("/login", status_code=200, opt={"exclude_from_auth": True})
    async def login(self, request: Req, data: JSONBody[LoginRequest], auth: Auth,
                    audit: AuditLog) -> Response[Any]:
        """Exchange email and password for an access token, also set as an HTTP-only cookie.

        ``remember``: the token and cookie last 30 days instead of 1 hour. A device token from an
        earlier login (the ``lms_device`` cookie, or the ``X-LMS-Device`` header) exempts this
        login from the limits others' failures at the same address set off, under a small
        limit of its own (see api/auth/service.py)."""
        device = request.headers.get(DEVICE_HEADER) or request.cookies.get(DEVICE_COOKIE)
        token, claims, user = await auth.login(data.email, data.password, remember=data.remember, audit=audit,
                                               device=device)
        csrf = auth.csrf_token(claims.jti)
        device_token = auth.device_token(user["id"])
        ttl = claims.expires_at - int(time.time())
        secure = auth.settings.cookie_secure or request.url.scheme == "https"
        cookies = [
            Cookie(key=SESSION_COOKIE, value=token, httponly=True, samesite="lax", secure=secure, path="/",
                   max_age=ttl),
            Cookie(key=CSRF_COOKIE, value=csrf, httponly=False, samesite="lax", secure=secure, path="/",
                   max_age=ttl),
            # Only ever read by login: sent to the auth routes alone, and kept after logout.
            Cookie(key=DEVICE_COOKIE, value=device_token, httponly=True, samesite="lax", secure=secure,
                   path="/api/v1/auth", max_age=auth.device_max_age_s),
        ]
        body = LoginResult(access_token=token, token_type="bearer", expires_at=claims.expires_at,
                           user=User(**user), csrf_token=csrf, device_token=device_token)
        return Response(body, cookies=cookies)

    @post("/logout", status_code=HTTP_204_NO_CONTENT, dependencies={"me": Provide(provide_user_session)},
          security=SECURITY)
    async def logout(self, me: UserSession, auth: Auth, audit: AuditLog) -> Response[None]:
        """Revoke the token used for this request and clear the cookies."""
        await auth.logout(me, audit=audit)
        return Response(None, status_code=HTTP_204_NO_CONTENT, cookies=[
            Cookie(key=SESSION_COOKIE, value="", max_age=0, path="/", httponly=True, samesite="lax"),
            Cookie(key=CSRF_COOKIE, value="", max_age=0, path="/", samesite="lax"),
        ])

    @get("/me", dependencies={"me": Provide(provide_principal)}, security=SECURITY)
    async def me(self, me: Me) -> User:
        """The authenticated user (an API key's creator)."""
        return User(id=me.user_id, email=me.email, is_superuser=isinstance(me, Session) and me.is_superuser)

    @post("/password", status_code=HTTP_204_NO_CONTENT, dependencies={"me": Provide(provide_user_session)},
          security=SECURITY)
    async def change_password(self, data: JSONBody[PasswordChange], me: UserSession, auth: Auth,
                              audit: AuditLog) -> None:
        """Change the password; every token issued before (all sessions) stops working."""
        await auth.change_password(me, data.current_password, data.new_password, audit=audit)
