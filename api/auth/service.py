"""Users, logins, tokens and the audit log, on PostgreSQL.

Login throttling keeps its state in ``login_failures`` so that it holds across API
processes behind a load balancer.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from api.auth import passwords, tokens
from lms_core.errors import AlreadyExists, InvalidInput, LmsError
from lms_core.settings import ApiSettings

EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]{1,189}\.[^@\s.]{2,63}")
MIN_PASSWORD = 10
MAX_PASSWORD = 256


class InvalidCredentials(LmsError):
    pass


class TooManyAttempts(LmsError):
    def __init__(self, retry_after: int) -> None:
        super().__init__("too many failed logins; try again later")
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a user, authenticated by a token in a header or a cookie."""

    user_id: int
    email: str
    is_superuser: bool
    via: str  # "bearer" | "cookie" | "api_key"
    jti: str
    expires_at: int
    key_id: int | None = None  # an API key: valid for one organization, with the key's role
    key_org_id: int | None = None
    key_role: str | None = None


def hash_key(secret: str) -> str:
    # API key secrets are 32 random characters: a fast hash is enough, and it is compared
    # in constant time.
    return hashlib.sha256(secret.encode()).hexdigest()


def new_api_key() -> tuple[str, str, str]:
    """(the full key shown once, its prefix, the hash stored)."""
    prefix, secret = secrets.token_hex(4), secrets.token_urlsafe(24).replace("_", "x")
    return f"lms_{prefix}_{secret}", prefix, hash_key(secret)


def check_email(email: str) -> str:
    email = email.strip()
    if not EMAIL.fullmatch(email):
        raise InvalidInput("email is not a valid address")
    return email


def check_password(password: str) -> str:
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise InvalidInput(f"password must be {MIN_PASSWORD} to {MAX_PASSWORD} characters long")
    return password


async def audit(conn: asyncpg.Connection | asyncpg.Pool, action: str, *, actor: int | None = None,
                org_id: int | None = None, target: str | None = None, detail: dict[str, Any] | None = None,
                address: str | None = None, request_id: str | None = None) -> None:
    await conn.execute(
        """INSERT INTO audit_log (action, actor_user_id, org_id, target, detail, address, request_id)
           VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7)""",
        action, actor, org_id, target, json.dumps(detail or {}), address, request_id,
    )


class AuthService:
    def __init__(self, pool: asyncpg.Pool, settings: ApiSettings, secret: str) -> None:
        self.pool = pool
        self.settings = settings
        self.key = tokens.signing_key(secret)

    async def create_user(self, email: str, password: str, *, superuser: bool = False,
                          request_id: str | None = None, address: str | None = None) -> int:
        email = check_email(email)
        check_password(password)
        hashed = await passwords.hash_password(password)
        async with self.pool.acquire() as conn, conn.transaction():
            try:
                user_id = await conn.fetchval(
                    "INSERT INTO users (email, password_hash, is_superuser) VALUES ($1, $2, $3) RETURNING id",
                    email, hashed, superuser,
                )
            except asyncpg.UniqueViolationError:
                raise AlreadyExists("an account with this email exists") from None
            await audit(conn, "user.created", actor=user_id, target=email, detail={"superuser": superuser},
                        address=address, request_id=request_id)
        return int(user_id)

    async def login(self, email: str, password: str, *, remember: bool, address: str,
                    request_id: str | None = None) -> tuple[str, tokens.Claims, dict[str, Any]]:
        s = self.settings
        async with self.pool.acquire() as conn:
            by_email, by_address, oldest = await conn.fetchrow(
                """SELECT count(*) FILTER (WHERE lower(email) = lower($1)),
                          count(*) FILTER (WHERE address = $2),
                          min(at) FILTER (WHERE lower(email) = lower($1) OR address = $2)
                   FROM login_failures
                   WHERE at > now() - make_interval(secs => $3) AND (lower(email) = lower($1) OR address = $2)""",
                email, address, float(s.login_window_s),
            )
            if by_email >= s.login_max_failures or by_address >= s.login_address_max_failures:
                await audit(conn, "auth.login.throttled", target=email[:254], address=address,
                            request_id=request_id)
                waited = (datetime.now(UTC) - oldest).total_seconds() if oldest else 0
                raise TooManyAttempts(max(1, int(s.login_window_s - waited) + 1))
            user = await conn.fetchrow(
                "SELECT id, email, password_hash, is_superuser, token_version FROM users "
                "WHERE lower(email) = lower($1)",
                email,
            )
        ok = await passwords.verify_password(user["password_hash"] if user else None, password)
        async with self.pool.acquire() as conn, conn.transaction():
            if not ok or user is None:
                await conn.execute("INSERT INTO login_failures (email, address) VALUES ($1, $2)", email[:254],
                                   address)
                await audit(conn, "auth.login.failed", actor=user["id"] if user else None, target=email[:254],
                            address=address, request_id=request_id)
            else:
                await conn.execute("DELETE FROM login_failures WHERE lower(email) = lower($1)", email)
                await audit(conn, "auth.login", actor=user["id"], target=user["email"],
                            detail={"remember": remember}, address=address, request_id=request_id)
        if not ok or user is None:
            # Each further failure answers a little later: guessing gets slower still.
            await asyncio.sleep(min(0.1 * (by_email + 1), 1.0))
            raise InvalidCredentials("wrong email or password")
        ttl = s.remember_ttl_s if remember else s.access_ttl_s
        token, claims = tokens.issue(self.key, user["id"], user["token_version"], ttl)
        return token, claims, {"id": user["id"], "email": user["email"], "is_superuser": user["is_superuser"]}

    async def principal(self, token: str, via: str) -> Principal | None:
        """The caller behind a token, or None when the token is invalid, expired or revoked."""
        try:
            claims = tokens.decode(self.key, token)
        except tokens.InvalidToken:
            return None
        row = await self.pool.fetchrow(
            """SELECT u.email, u.is_superuser, u.token_version,
                      EXISTS (SELECT 1 FROM revoked_tokens r WHERE r.jti = $2) AS revoked
               FROM users u WHERE u.id = $1""",
            claims.user_id, claims.jti,
        )
        if row is None or row["revoked"] or row["token_version"] != claims.version:
            return None
        return Principal(user_id=claims.user_id, email=row["email"], is_superuser=row["is_superuser"], via=via,
                         jti=claims.jti, expires_at=claims.expires_at)

    async def key_principal(self, key: str) -> Principal | None:
        """The caller behind an API key ``lms_<prefix>_<secret>``, or None."""
        parts = key.split("_")
        if len(parts) != 3 or parts[0] != "lms" or not parts[1] or not parts[2]:
            return None
        row = await self.pool.fetchrow(
            """SELECT k.id, k.key_hash, k.org_id, k.role, u.id AS user_id, u.email, u.is_superuser
               FROM api_keys k JOIN users u ON u.id = k.user_id
               WHERE k.prefix = $1 AND k.revoked_at IS NULL""", parts[1])
        if row is None or not hmac.compare_digest(row["key_hash"], hash_key(parts[2])):
            return None
        # Recorded at most once a minute: a busy script must not rewrite the row per request.
        await self.pool.execute(
            """UPDATE api_keys SET last_used_at = now() WHERE id = $1
               AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')""", row["id"])
        return Principal(user_id=row["user_id"], email=row["email"], is_superuser=False, via="api_key", jti="",
                         expires_at=0, key_id=row["id"], key_org_id=row["org_id"], key_role=row["role"])

    async def logout(self, p: Principal, *, address: str, request_id: str | None = None) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO revoked_tokens (jti, expires_at) VALUES ($1, to_timestamp($2)) ON CONFLICT DO NOTHING",
                p.jti, p.expires_at,
            )
            await conn.execute("DELETE FROM revoked_tokens WHERE expires_at < now()")
            await audit(conn, "auth.logout", actor=p.user_id, target=p.email, address=address,
                        request_id=request_id)

    async def change_password(self, p: Principal, current: str, new: str, *, address: str,
                              request_id: str | None = None) -> None:
        check_password(new)
        stored = await self.pool.fetchval("SELECT password_hash FROM users WHERE id = $1", p.user_id)
        if not await passwords.verify_password(stored, current):
            raise InvalidCredentials("the current password is wrong")
        hashed = await passwords.hash_password(new)
        async with self.pool.acquire() as conn, conn.transaction():
            # A new token version revokes every token issued before, on every device.
            await conn.execute(
                "UPDATE users SET password_hash = $2, token_version = token_version + 1, updated_at = now() "
                "WHERE id = $1", p.user_id, hashed)
            await audit(conn, "auth.password.changed", actor=p.user_id, target=p.email, address=address,
                        request_id=request_id)
