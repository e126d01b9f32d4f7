"""Users, logins, tokens and the audit log, on PostgreSQL.

Login throttling keeps its state in ``login_failures`` so that it holds across API
processes behind a load balancer. Its design:

- Count-and-decide is atomic. A login takes transaction-scoped advisory locks on its
  account and on its client address, counts the failures in the window, and -- when under
  every limit -- records the attempt as a failure *before* the password is checked, all in
  one transaction. A concurrent burst is thus serialised per account and address across
  every API process: exactly ``LMS_LOGIN_MAX_FAILURES`` guesses reach the password hash,
  the rest answer 429. A success then deletes its own record (and its address's failures).
- An attacker cannot lock the owner out. Failures count per (account, address), with a
  small limit; per account over all addresses and per address over all accounts, with much
  higher limits. Those two hold only logins from addresses the account has never logged in
  from (``login_known_addresses``, kept ``LMS_LOGIN_KNOWN_ADDRESS_DAYS``): the owner at home,
  or a superuser behind an office NAT full of guessing, still gets in; a newcomer waits.
- Nor can an attacker who shares the owner's address (a NAT, a proxy not listed in
  LMS_API_TRUSTED_PROXIES, localhost) lock the owner out with the per-(account, address)
  limit -- OWASP's "device cookie". A successful login hands out a device token
  (``tokens.device_token``: the user id, its issue time and a random nonce, signed with a key
  derived from the secret), as the HttpOnly, SameSite=Lax cookie ``lms_device`` scoped to
  /api/v1/auth, and in the login answer for programs, which send it back as ``X-LMS-Device``.
  A login presenting a genuine device token *of the account it logs in to*, issued within
  LMS_LOGIN_KNOWN_ADDRESS_DAYS, is counted apart: not under the (account, address), account
  or address limits, but under one of its own -- LMS_LOGIN_MAX_FAILURES failures within the
  window per token, recorded in ``login_failures`` with the address ``device:<nonce>`` --
  after which that one token is locked for the window while every other device of the
  owner still gets in. A forged token, an expired one, or another account's (an attacker's
  own) is as good as none: today's limits. A success through a token clears that token's
  failures only, never the address's, so the attacker beside the owner stays throttled.
- Throttled attempts are not recorded as failures and add one audit row per (account,
  address) and window -- per address alone (target ``*``) when only the address limit
  holds -- whose ``detail.count`` grows, so a flood cannot fill the log.
- ``sweep`` prunes what outlives its use (run periodically by the API: ``retention_sweeper``).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from api.auth import passwords, tokens
from api.services.audit import Audit, audit
from api.services.errors import InvalidCredentials, RegistrationClosed, TooManyAttempts, WrongPassword
from lms_core.errors import AlreadyExists, InvalidInput, LmsError
from lms_core.settings import ApiSettings

log = logging.getLogger("lms.api.auth")

EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]{1,189}\.[^@\s.]{2,63}")
MIN_PASSWORD = 10
MAX_PASSWORD = 256


#: Advisory-lock namespaces (the first key of pg_advisory_xact_lock(int, int)). Every login
#: locks its account before its address, so two logins never wait on each other in a cycle.
_LOCK_ACCOUNT = 0x4C4D5310
_LOCK_ADDRESS = 0x4C4D5311
_LOCK_REGISTRATION = 0x4C4D5312
_LOCK_WAIT_MS = 5000
#: The retention sweep deletes in chunks, so it never holds a long lock on a busy table.
_SWEEP_CHUNK = 10_000


class Principal:
    """Whoever calls: ``request.user`` of every authenticated request (api/auth/backend.py),
    a :class:`Session` or an :class:`ApiKeyPrincipal`.

    A base class, not a ``Session | ApiKeyPrincipal`` union: Litestar validates dependencies
    with msgspec, which takes no union of two dataclasses."""

    __slots__ = ()
    user_id: int  # the user acting (an API key's creator)
    email: str


@dataclass(frozen=True, slots=True)
class Session(Principal):
    """A user, by an access token: in the Authorization header or the session cookie."""

    user_id: int
    email: str
    is_superuser: bool
    jti: str  # the token's id: logout revokes it; the session's CSRF token is derived from it
    expires_at: int


@dataclass(frozen=True, slots=True)
class ApiKeyPrincipal(Principal):
    """A script or integration, by an API key: valid for one organization, with the key's
    role, never more than its creator may do there today (api.access)."""

    key_id: int
    user_id: int  # the key's creator: audit rows and export slots count for them
    email: str
    org_id: int
    role: str
    creator_role: str  # the creator's current role there ("superuser" for a platform superuser)


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


class AuthService:
    def __init__(self, pool: asyncpg.Pool, settings: ApiSettings, secret: str) -> None:
        self.pool = pool
        self.settings = settings
        self.key = tokens.signing_key(secret)
        self.csrf_key = tokens.csrf_key(secret)
        self.device_key = tokens.device_key(secret)

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

    async def register(self, email: str, password: str, *, audit: Audit) -> int:
        """Self-service sign-up: refused when turned off, limited per client address."""
        if not self.settings.registration:
            raise RegistrationClosed("registration is turned off; ask an administrator for an account")
        email = check_email(email)
        check_password(password)
        s = self.settings
        address = audit.address
        async with self.pool.acquire() as conn, conn.transaction():
            # Count-and-record under a lock per address, so a burst through several API
            # processes cannot all pass the count. Every attempt counts, duplicates included.
            await _lock(conn, (_LOCK_REGISTRATION, address))
            recent, oldest = await conn.fetchrow(
                """SELECT count(*), min(at) FROM registration_attempts
                   WHERE address = $1 AND at > now() - make_interval(secs => $2)""",
                address, float(s.registration_window_s))
            if recent >= s.registration_max_per_address:
                raise TooManyAttempts(_retry_after(oldest, s.registration_window_s),
                                      "too many sign-ups from this address; try again later")
            await conn.execute("INSERT INTO registration_attempts (address) VALUES ($1)", address)
        return await self.create_user(email, password, address=address, request_id=audit.request_id)

    def device_token(self, user_id: int) -> str:
        """A new device token for a successful login of ``user_id`` (see the module's docstring)."""
        return tokens.device_token(self.device_key, user_id)

    @property
    def device_max_age_s(self) -> int:
        return self.settings.login_known_address_days * 86400

    async def login(self, email: str, password: str, *, remember: bool, audit: Audit,
                    device: str | None = None) -> tuple[str, tokens.Claims, dict[str, Any]]:
        """``device``: a device token from an earlier login, if the caller sent one."""
        s = self.settings
        address = audit.address
        target = email[:254]
        genuine = tokens.read_device_token(self.device_key, device, self.device_max_age_s) if device else None
        async with self.pool.acquire() as conn, conn.transaction():
            # Failures are counted at the client's address, or at the device token when it is
            # a genuine one of this very account (another account's token, e.g. the
            # attacker's own, buys nothing).
            counted_at = address
            if genuine is not None and genuine[0] == await conn.fetchval(
                    "SELECT id FROM users WHERE lower(email) = lower($1)", target):
                counted_at = f"device:{genuine[1]}"
            # Account first, then address: the same order everywhere, so no deadlock.
            await _lock(conn, (_LOCK_ACCOUNT, target.lower()), (_LOCK_ADDRESS, counted_at))
            c = await conn.fetchrow(
                """SELECT count(*) FILTER (WHERE lower(email) = lower($1) AND address = $2) AS pair,
                          count(*) FILTER (WHERE lower(email) = lower($1)) AS account,
                          count(*) FILTER (WHERE address = $2) AS by_address,
                          min(at) FILTER (WHERE lower(email) = lower($1) AND address = $2) AS pair_oldest,
                          min(at) FILTER (WHERE lower(email) = lower($1)) AS account_oldest,
                          min(at) FILTER (WHERE address = $2) AS address_oldest,
                          EXISTS (SELECT 1 FROM login_known_addresses k JOIN users u ON u.id = k.user_id
                                  WHERE lower(u.email) = lower($1) AND k.address = $2
                                    AND k.last_success_at > now() - make_interval(days => $4)) AS known
                   FROM login_failures
                   WHERE at > now() - make_interval(secs => $3) AND (lower(email) = lower($1) OR address = $2)""",
                target, counted_at, float(s.login_window_s), s.login_known_address_days,
            )
            since, limit = None, ""
            by_device = counted_at != address
            if by_device:
                # The device token's own small limit, and no other.
                if c["pair"] >= s.login_max_failures:
                    since, limit = c["pair_oldest"], "device token"
            elif c["pair"] >= s.login_max_failures:
                since, limit = c["pair_oldest"], "account and address"
            elif not c["known"] and c["account"] >= s.login_account_max_failures:
                since, limit = c["account_oldest"], "account"
            elif not c["known"] and c["by_address"] >= s.login_address_max_failures:
                since, limit = c["address_oldest"], "address"
            if since is not None:
                # Held by the address alone: one row for the address, whatever emails it tries
                # (a row per email would let it write as many rows as it invents addresses).
                await self._audit_throttled(conn, "*" if limit == "address" else target.lower(), limit, audit)
            else:
                # Recorded as a failure now, under the lock; a success deletes it again.
                await conn.execute("INSERT INTO login_failures (email, address) VALUES ($1, $2)", target,
                                   counted_at)
                user = await conn.fetchrow(
                    "SELECT id, email, password_hash, is_superuser, token_version FROM users "
                    "WHERE lower(email) = lower($1)",
                    email,
                )
        if since is not None:
            # Raised outside the transaction: its audit row is committed.
            raise TooManyAttempts(_retry_after(since, s.login_window_s))
        ok = await passwords.verify_password(user["password_hash"] if user else None, password)
        async with self.pool.acquire() as conn, conn.transaction():
            if not ok or user is None:
                await audit.write(conn, "auth.login.failed", actor=user["id"] if user else None, target=target)
            else:
                # Only this address's (or device token's) failures: a success elsewhere must
                # not give an attacker at another address, or beside the owner, a fresh allowance.
                await conn.execute("DELETE FROM login_failures WHERE lower(email) = lower($1) AND address = $2",
                                   email, counted_at)
                await conn.execute(
                    """INSERT INTO login_known_addresses (user_id, address) VALUES ($1, $2)
                       ON CONFLICT (user_id, address) DO UPDATE SET last_success_at = now()""",
                    user["id"], address)
                await audit.write(conn, "auth.login", actor=user["id"], target=user["email"],
                                  detail={"remember": remember, "device_token": by_device})
        if not ok or user is None:
            # Each further failure answers a little later: guessing gets slower still.
            await asyncio.sleep(min(0.1 * (c["pair"] + 1), 1.0))
            raise InvalidCredentials("wrong email or password")
        ttl = s.remember_ttl_s if remember else s.access_ttl_s
        token, claims = tokens.issue(self.key, user["id"], user["token_version"], ttl)
        return token, claims, {"id": user["id"], "email": user["email"], "is_superuser": user["is_superuser"]}

    async def _audit_throttled(self, conn: asyncpg.Connection, target: str, limit: str, audit: Audit) -> None:
        """One audit row per (account, address) and window, counting the throttled attempts."""
        bumped = await conn.fetchval(
            """UPDATE audit_log SET detail = jsonb_set(detail, '{count}', to_jsonb((detail->>'count')::int + 1))
               WHERE id = (SELECT id FROM audit_log WHERE action = 'auth.login.throttled' AND target = $1
                           AND address = $2 AND at > now() - make_interval(secs => $3)
                           ORDER BY at DESC LIMIT 1)
               RETURNING id""",
            target, audit.address, float(self.settings.login_window_s))
        if bumped is None:
            await audit.write(conn, "auth.login.throttled", target=target, detail={"count": 1, "limit": limit})

    def csrf_token(self, jti: str) -> str:
        """The CSRF token of the session whose access token has ``jti``: another session's
        token (or one planted by a sibling subdomain) does not match."""
        return tokens.csrf_token(self.csrf_key, jti)

    async def principal(self, token: str) -> Session | None:
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
        return Session(user_id=claims.user_id, email=row["email"], is_superuser=row["is_superuser"],
                       jti=claims.jti, expires_at=claims.expires_at)

    async def key_principal(self, key: str) -> ApiKeyPrincipal | None:
        """The caller behind an API key ``lms_<prefix>_<secret>``, or None."""
        parts = key.split("_")
        if len(parts) != 3 or parts[0] != "lms" or not parts[1] or not parts[2]:
            return None
        # The creator's role now, read on every request: a demoted creator's key is demoted
        # with them, and a key whose creator left the organization (or was deleted) stops.
        row = await self.pool.fetchrow(
            """SELECT k.id, k.key_hash, k.org_id, k.role, u.id AS user_id, u.email,
                      CASE WHEN u.is_superuser THEN 'superuser' ELSE m.role END AS creator_role
               FROM api_keys k JOIN users u ON u.id = k.user_id
               LEFT JOIN memberships m ON m.org_id = k.org_id AND m.user_id = k.user_id
               WHERE k.prefix = $1 AND k.revoked_at IS NULL""", parts[1])
        if row is None or not hmac.compare_digest(row["key_hash"], hash_key(parts[2])):
            return None
        if row["creator_role"] is None:
            return None
        # Recorded at most once a minute: a busy script must not rewrite the row per request.
        await self.pool.execute(
            """UPDATE api_keys SET last_used_at = now() WHERE id = $1
               AND (last_used_at IS NULL OR last_used_at < now() - interval '1 minute')""", row["id"])
        return ApiKeyPrincipal(key_id=row["id"], user_id=row["user_id"], email=row["email"], org_id=row["org_id"],
                               role=row["role"], creator_role=row["creator_role"])

    async def logout(self, p: Session, *, audit: Audit) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO revoked_tokens (jti, expires_at) VALUES ($1, to_timestamp($2)) ON CONFLICT DO NOTHING",
                p.jti, p.expires_at,
            )
            await conn.execute("DELETE FROM revoked_tokens WHERE expires_at < now()")
            await audit.write(conn, "auth.logout", actor=p.user_id, target=p.email)

    async def change_password(self, p: Session, current: str, new: str, *, audit: Audit) -> None:
        check_password(new)
        stored = await self.pool.fetchval("SELECT password_hash FROM users WHERE id = $1", p.user_id)
        if not await passwords.verify_password(stored, current):
            raise WrongPassword("the current password is wrong")
        hashed = await passwords.hash_password(new)
        async with self.pool.acquire() as conn, conn.transaction():
            # A new token version revokes every token issued before, on every device.
            await conn.execute(
                "UPDATE users SET password_hash = $2, token_version = token_version + 1, updated_at = now() "
                "WHERE id = $1", p.user_id, hashed)
            await audit.write(conn, "auth.password.changed", actor=p.user_id, target=p.email)


async def _lock(conn: asyncpg.Connection, *keys: tuple[int, str]) -> None:
    """Take transaction-scoped advisory locks, in the order given. Each is held for a few
    milliseconds; a wait longer than _LOCK_WAIT_MS means a flood on this account or address,
    answered 429 rather than holding a pooled connection that other requests need."""
    await conn.execute(f"SET LOCAL lock_timeout = '{_LOCK_WAIT_MS}ms'")
    try:
        for namespace, name in keys:
            await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", namespace, name)
    except asyncpg.LockNotAvailableError:
        raise TooManyAttempts(1, "too many attempts at once; try again in a moment") from None


def _retry_after(oldest: datetime | None, window_s: int) -> int:
    """Seconds until the oldest counted attempt leaves the window (and the count drops)."""
    waited = (datetime.now(UTC) - oldest).total_seconds() if oldest else 0
    return max(1, int(window_s - waited) + 1)


async def sweep(pool: asyncpg.Pool, settings: ApiSettings) -> dict[str, int]:
    """Delete what has outlived its use; returns the rows deleted per table.

    Login failures and registration attempts older than their windows no longer count;
    revoked tokens past their expiry are refused by their signature anyway; known login
    addresses and audit rows are kept as long as the settings say."""
    jobs: dict[str, tuple[str, str, float | int]] = {
        "login_failures": ("login_failures", "at < now() - make_interval(secs => $1)",
                           float(settings.login_window_s)),
        "registration_attempts": ("registration_attempts", "at < now() - make_interval(secs => $1)",
                                  float(settings.registration_window_s)),
        "revoked_tokens": ("revoked_tokens", "expires_at < now() - make_interval(secs => $1)", 0.0),
        "login_known_addresses": ("login_known_addresses",
                                  "last_success_at < now() - make_interval(days => $1)",
                                  settings.login_known_address_days),
        "audit_log": ("audit_log", "at < now() - make_interval(days => $1)",
                      settings.audit_retention_days),
    }
    deleted: dict[str, int] = {}
    for name, (table, where, arg) in jobs.items():
        total = 0
        while True:
            status = await pool.execute(
                f"DELETE FROM {table} WHERE ctid = ANY (ARRAY(SELECT ctid FROM {table} WHERE {where} "
                f"LIMIT {_SWEEP_CHUNK}))", arg)
            n = int(status.split()[-1])
            total += n
            if n < _SWEEP_CHUNK:
                break
        deleted[name] = total
    return deleted


async def retention_sweeper(app: Any) -> None:
    """Run ``sweep`` every LMS_RETENTION_SWEEP_SECONDS, forever (cancelled at shutdown).
    Every API process sweeps; the deletes are idempotent, so several never conflict."""
    settings: ApiSettings = app.state.settings.api
    while True:
        await asyncio.sleep(settings.retention_sweep_s)
        try:
            deleted = await sweep(app.state.pool, settings)
            if any(deleted.values()):
                log.info("retention sweep deleted %s", ", ".join(f"{n} from {t}" for t, n in deleted.items() if n))
        except (asyncpg.PostgresError, asyncpg.InterfaceError, LmsError, OSError) as exc:
            log.warning("retention sweep failed (%s); retrying in %d s", exc, settings.retention_sweep_s)
