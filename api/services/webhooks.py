"""Webhooks of an organization: where alert changes are POSTed, signed (bridge/notify.py
sends them), and the log of every delivery and attempt.

The secret (the HMAC key of ``X-LMS-Signature``) is generated here and shown once, in the
answer that creates or rotates it; lists and reads never show it. A rotated secret signs
every attempt from then on, those of deliveries already queued included.

A URL is checked when saved (lms_core/webhooks.py): http(s), no credentials in it, and its
host must not be or resolve to a loopback, private, link-local, multicast, unspecified or
reserved address unless ``LMS_WEBHOOK_ALLOW_PRIVATE=1``. The sender checks again at each
attempt.

Disabling a webhook gives up its queued deliveries (``failed``, "webhook disabled"): turning
it on again does not replay a backlog of stale alerts.
"""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

import asyncpg
import msgspec
from msgspec import UNSET, Meta, UnsetType

from api.services.audit import Audit
from api.services.rules import Severity
from lms_core.alerts import SEVERITIES
from lms_core.errors import InvalidInput, NotFound
from lms_core.settings import Settings
from lms_core.webhooks import MAX_URL_CHARS, parse_url, resolve

if TYPE_CHECKING:
    from api.access import OrgAccess

Url = Annotated[str, Meta(min_length=1, max_length=MAX_URL_CHARS, description="http(s) URL of a public host")]
Severities = Annotated[list[Severity], Meta(min_length=1, max_length=len(SEVERITIES))]
DeliveryState = Literal["pending", "delivered", "failed"]

_LOCK_WEBHOOK_COUNT = 0x4C4D5321


class WebhookCreate(msgspec.Struct, forbid_unknown_fields=True):
    url: Url
    #: the alert severities sent to it; every severity when not given
    severities: Severities = msgspec.field(default_factory=lambda: list(SEVERITIES))
    enabled: bool = True


class WebhookUpdate(msgspec.Struct, forbid_unknown_fields=True):
    url: Url | UnsetType = UNSET
    severities: Severities | UnsetType = UNSET
    enabled: bool | UnsetType = UNSET


class Webhook(msgspec.Struct):
    id: int
    url: str
    severities: list[str]
    enabled: bool
    created_at: datetime
    #: deliveries keep failing: since when, how many attempts in a row, the last error
    failing: bool
    failing_since: datetime | None
    consecutive_failures: int
    last_error: str | None
    last_success_at: datetime | None
    last_failure_at: datetime | None


class WebhookSecret(msgspec.Struct):
    """A webhook with its secret: only in the answer that created or rotated it."""

    webhook: Webhook
    secret: str


class Delivery(msgspec.Struct):
    id: int
    alert_id: int | None
    #: the event as stored; each attempt adds ``timestamp`` and signs the whole body
    event: dict[str, Any]
    state: DeliveryState
    attempts: int
    next_attempt_at: datetime | None
    created_at: datetime
    finished_at: datetime | None


class Attempt(msgspec.Struct):
    id: int
    at: datetime
    #: the receiver's HTTP status, null when there was none (refused, timed out, not allowed)
    status_code: int | None
    error: str | None
    duration_ms: int


_COLUMNS = """id, url, severities, enabled, created_at, failing_since, consecutive_failures, last_error,
              last_success_at, last_failure_at"""


def _webhook(r: Any) -> Webhook:
    return Webhook(id=r["id"], url=r["url"], severities=list(r["severities"]), enabled=r["enabled"],
                   created_at=r["created_at"], failing=r["failing_since"] is not None,
                   failing_since=r["failing_since"], consecutive_failures=r["consecutive_failures"],
                   last_error=r["last_error"], last_success_at=r["last_success_at"],
                   last_failure_at=r["last_failure_at"])


def _new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def _ordered(severities: list[str]) -> list[str]:
    return [s for s in SEVERITIES if s in severities]


_decode_event = msgspec.json.Decoder(dict[str, Any]).decode


class WebhookService:
    def __init__(self, pool: asyncpg.Pool, settings: Settings) -> None:
        self.pool = pool
        self.settings = settings

    async def _checked_url(self, url: str) -> str:
        target = parse_url(url)
        if not self.settings.alerts.webhook_allow_private:
            await resolve(target, allow_private=False)
        return url

    async def _id(self, conn: asyncpg.Connection | asyncpg.Pool, access: OrgAccess, webhook_id: int,
                  lock: bool = False) -> int:
        found = await conn.fetchval(
            f"SELECT id FROM webhooks WHERE id = $1 AND org_id = $2{' FOR UPDATE' if lock else ''}",
            webhook_id, access.org_id)
        if found is None:
            raise NotFound(f"webhook {webhook_id} not found")
        return int(found)

    async def list_webhooks(self, access: OrgAccess) -> list[Webhook]:
        rows = await self.pool.fetch(f"SELECT {_COLUMNS} FROM webhooks WHERE org_id = $1 ORDER BY id", access.org_id)
        return [_webhook(r) for r in rows]

    async def get(self, access: OrgAccess, webhook_id: int,
                  conn: asyncpg.Connection | asyncpg.Pool | None = None) -> Webhook:
        r = await (conn or self.pool).fetchrow(f"SELECT {_COLUMNS} FROM webhooks WHERE id = $1 AND org_id = $2",
                                               webhook_id, access.org_id)
        if r is None:
            raise NotFound(f"webhook {webhook_id} not found")
        return _webhook(r)

    async def create(self, access: OrgAccess, data: WebhookCreate, audit: Audit) -> WebhookSecret:
        url = await self._checked_url(data.url)
        secret = _new_secret()
        limit = self.settings.alerts.max_webhooks_per_org
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2::bigint::text))", _LOCK_WEBHOOK_COUNT,
                               access.org_id)
            if await conn.fetchval("SELECT count(*) FROM webhooks WHERE org_id = $1", access.org_id) >= limit:
                raise InvalidInput(f"this organization has {limit} webhooks, the most it may have "
                                   f"(LMS_WEBHOOKS_MAX_PER_ORG); delete one first")
            webhook_id = await conn.fetchval(
                """INSERT INTO webhooks (org_id, url, secret, severities, enabled, created_by)
                   VALUES ($1, $2, $3, $4, $5, $6) RETURNING id""",
                access.org_id, url, secret, _ordered(data.severities), data.enabled, access.principal.user_id)
            await audit.write(conn, "webhook.created", actor=access.principal.user_id, org_id=access.org_id,
                              target=url, detail={"webhook_id": webhook_id, "severities": _ordered(data.severities)})
            return WebhookSecret(webhook=await self.get(access, webhook_id, conn), secret=secret)

    async def update(self, access: OrgAccess, webhook_id: int, data: WebhookUpdate, audit: Audit) -> Webhook:
        url = None if data.url is UNSET else await self._checked_url(data.url)
        severities = None if data.severities is UNSET else _ordered(data.severities)
        enabled = None if data.enabled is UNSET else data.enabled
        async with self.pool.acquire() as conn, conn.transaction():
            await self._id(conn, access, webhook_id, lock=True)
            await conn.execute(
                """UPDATE webhooks SET url = coalesce($2, url), severities = coalesce($3, severities),
                          enabled = coalesce($4, enabled)
                   WHERE id = $1""", webhook_id, url, severities, enabled)
            given_up = 0
            if enabled is False:
                status = await conn.execute(
                    """UPDATE webhook_deliveries SET state = 'failed', finished_at = now()
                       WHERE webhook_id = $1 AND state = 'pending'""", webhook_id)
                given_up = int(status.rsplit(" ", 1)[-1])
            detail = {k: v for k, v in (("url", url), ("severities", severities), ("enabled", enabled))
                      if v is not None}
            await audit.write(conn, "webhook.updated", actor=access.principal.user_id, org_id=access.org_id,
                              target=str(webhook_id), detail={"webhook_id": webhook_id, **detail,
                                                              "deliveries_given_up": given_up})
            return await self.get(access, webhook_id, conn)

    async def delete(self, access: OrgAccess, webhook_id: int, audit: Audit) -> None:
        """Delete the webhook, its queued deliveries and its log."""
        async with self.pool.acquire() as conn, conn.transaction():
            url = await conn.fetchval("DELETE FROM webhooks WHERE id = $1 AND org_id = $2 RETURNING url",
                                      webhook_id, access.org_id)
            if url is None:
                raise NotFound(f"webhook {webhook_id} not found")
            await audit.write(conn, "webhook.deleted", actor=access.principal.user_id, org_id=access.org_id,
                              target=url, detail={"webhook_id": webhook_id})

    async def rotate_secret(self, access: OrgAccess, webhook_id: int, audit: Audit) -> WebhookSecret:
        secret = _new_secret()
        async with self.pool.acquire() as conn, conn.transaction():
            await self._id(conn, access, webhook_id, lock=True)
            await conn.execute("UPDATE webhooks SET secret = $2 WHERE id = $1", webhook_id, secret)
            await audit.write(conn, "webhook.secret_rotated", actor=access.principal.user_id, org_id=access.org_id,
                              target=str(webhook_id), detail={"webhook_id": webhook_id})
            return WebhookSecret(webhook=await self.get(access, webhook_id, conn), secret=secret)

    async def deliveries(self, access: OrgAccess, webhook_id: int, *, state: str | None, limit: int,
                         before: int | None) -> list[Delivery]:
        """Newest first; continue with ``before`` = the last id of a page."""
        async with self.pool.acquire() as conn:
            await self._id(conn, access, webhook_id)
            rows = await conn.fetch(
                """SELECT id, alert_id, body, state, attempts, next_attempt_at, created_at, finished_at
                   FROM webhook_deliveries
                   WHERE webhook_id = $1 AND ($2::text IS NULL OR state = $2) AND ($3::bigint IS NULL OR id < $3)
                   ORDER BY id DESC LIMIT $4""", webhook_id, state, before, limit)
        return [Delivery(id=r["id"], alert_id=r["alert_id"], event=_decode_event(r["body"]), state=r["state"],
                         attempts=r["attempts"],
                         next_attempt_at=r["next_attempt_at"] if r["state"] == "pending" else None,
                         created_at=r["created_at"], finished_at=r["finished_at"]) for r in rows]

    async def attempts(self, access: OrgAccess, webhook_id: int, delivery_id: int, *, limit: int,
                       after: int | None) -> list[Attempt]:
        """Oldest first (the order they were made); continue with ``after`` = the last id."""
        async with self.pool.acquire() as conn:
            await self._id(conn, access, webhook_id)
            found = await conn.fetchval("SELECT id FROM webhook_deliveries WHERE id = $1 AND webhook_id = $2",
                                        delivery_id, webhook_id)
            if found is None:
                raise NotFound(f"delivery {delivery_id} of webhook {webhook_id} not found")
            rows = await conn.fetch(
                """SELECT id, at, status_code, error, duration_ms FROM webhook_attempts
                   WHERE delivery_id = $1 AND ($2::bigint IS NULL OR id > $2) ORDER BY id LIMIT $3""",
                delivery_id, after, limit)
        return [Attempt(id=r["id"], at=r["at"], status_code=r["status_code"], error=r["error"],
                        duration_ms=r["duration_ms"]) for r in rows]
