"""The webhook sender: POSTs the rows of ``webhook_deliveries`` (the outbox the rule engine
writes with each alert change), signed, retried with backoff, every attempt logged.

How it stays out of the way of ingestion: it runs as its own task on a pool of its own
(bridge/main.py), holds no database transaction while a request is in flight, and sends at
most ``LMS_WEBHOOK_CONCURRENCY`` requests at once and at most one per webhook, each bounded
by ``LMS_WEBHOOK_TIMEOUT_SECONDS`` as a whole (name lookup, connect, send, answer). A dead or
slow receiver so costs one slot and its own time-outs, never the ingest's.

A delivery is claimed, not taken: the claim (``FOR UPDATE SKIP LOCKED``, so several bridges
share the work) only moves its ``next_attempt_at`` past the longest an attempt can take (a
lease) and commits; the row stays ``pending``. The attempt is recorded afterwards, and the
row's state moves only if the lease is still the one this sender took. A bridge that dies
mid-request loses nothing: when the lease runs out, any bridge tries again. So a receiver
may get a delivery twice (its answer lost, or the lease ran out); the ``X-LMS-Delivery``
header, the same on every attempt, lets it de-duplicate.

Each attempt signs ``webhook_body(event, now)`` (lms_core/alerts.py) with the webhook's
current secret, checks the URL's addresses again (a name may resolve elsewhere since it was
saved: lms_core/webhooks.py) and connects to the address it checked. A 2xx answer delivers;
anything else (another status, a refused or timed-out connection, a forbidden address) is a
failure, retried after ``LMS_WEBHOOK_BACKOFF_MS`` doubled per failure up to
``LMS_WEBHOOK_BACKOFF_MAX_SECONDS``, until ``LMS_WEBHOOK_RETRY_SECONDS`` after the alert
change; then the delivery is ``failed``. Redirects are not followed (a redirect could point
anywhere, past the address check). The webhook row shows whether it is failing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime

import asyncpg
import httpx
from prometheus_client import CollectorRegistry, Counter

from lms_core import db
from lms_core.alerts import DELIVERY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, sign, webhook_body
from lms_core.errors import InvalidInput
from lms_core.settings import AlertSettings
from lms_core.webhooks import parse_url, resolve

log = logging.getLogger("lms.bridge.notify")

#: Between two looks for due deliveries when none was due: what a retry that came due, or
#: a delivery the API queued, may wait (the look is one index scan of the pending rows). The
#: bridge's own alert changes wake the sender at once (:meth:`Notifier.wake`).
POLL_S = 0.5
#: How long after a failed look (the database away) the sender looks again.
ERROR_PAUSE_S = 2.0
#: Added to the attempt time-out to make the lease: time for recording the attempt.
LEASE_MARGIN_S = 10
#: What the receiver's answer may say in the log: its status line is enough.
MAX_ERROR_CHARS = 300


@dataclass(frozen=True, slots=True)
class Claimed:
    id: int
    webhook_id: int
    org_id: int
    failing: bool  # the webhook's last attempt failed
    url: str
    secret: str
    body: str
    lease: datetime  # next_attempt_at as this sender set it: the claim is its while unchanged


@dataclass(frozen=True, slots=True)
class Outcome:
    status_code: int | None
    error: str | None
    duration_ms: int

    @property
    def delivered(self) -> bool:
        return self.error is None


class Notifier:
    def __init__(self, settings: AlertSettings, pool: asyncpg.Pool, registry: CollectorRegistry) -> None:
        self.settings = settings
        self.pool = pool
        self.lease_s = settings.webhook_timeout_s + LEASE_MARGIN_S
        self.in_flight: set[int] = set()  # webhook ids
        #: Slots in use per organization, and by webhooks whose last attempt failed. Neither may
        #: take more than half the slots: one organization's dead receivers (each attempt the
        #: whole time-out) must not make every other organization's deliveries wait behind them.
        self.org_slots: collections.Counter[int] = collections.Counter()
        self.failing_slots = 0
        self.share = max(1, settings.webhook_concurrency // 2)
        self._wake = asyncio.Event()
        self.attempts = Counter("lms_bridge_webhook_attempts", "Webhook attempts, by outcome (delivered, failed)",
                                ["outcome"], registry=registry)
        self.errors = Counter("lms_bridge_webhook_sender_errors",
                              "Looks for due deliveries or records of attempts that failed (retried)",
                              registry=registry)

    async def run(self, stop: asyncio.Event) -> None:
        """Send until ``stop`` is set; then let the requests in flight finish (each within its
        time-out) and return."""
        # No keep-alive: each attempt connects to the address it has just checked, and a pooled
        # connection (keyed by address) could carry another host's request under the first's
        # TLS name. Proxies from the environment are not used: they would connect by name.
        # The attempt's one time bound is its asyncio.timeout (name lookup included), not httpx's own.
        async with httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=None,
                                     limits=httpx.Limits(max_connections=self.settings.webhook_concurrency,
                                                         max_keepalive_connections=0)) as client, \
                asyncio.TaskGroup() as tasks:
            tasks.create_task(self._wake_on(stop), name="webhook sender stop watcher")
            while not stop.is_set():
                self._wake.clear()  # before the look, so that a wake-up during it is not lost
                free = self.settings.webhook_concurrency - len(self.in_flight)
                claimed: list[Claimed] = []
                if free > 0:
                    try:
                        claimed = await self._claim(free)
                    except Exception as exc:
                        self.errors.inc()
                        log.warning("webhook sender could not look for due deliveries: %s", db.translate(exc))
                        await self._sleep(ERROR_PAUSE_S)
                        continue
                for c in claimed:
                    self.in_flight.add(c.webhook_id)
                    self.org_slots[c.org_id] += 1
                    self.failing_slots += c.failing
                    tasks.create_task(self._deliver(client, c), name=f"webhook delivery {c.id}")
                if not claimed:
                    await self._sleep(POLL_S)

    def wake(self) -> None:
        """Look for due deliveries now: a commit has queued some (bridge/rules.py), which
        then go out without waiting for the next poll."""
        self._wake.set()

    async def _wake_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._wake.set()

    async def _sleep(self, seconds: float) -> None:
        """Until ``seconds`` pass, or a wake-up since the last look: a slot freed up, a commit
        queued deliveries, or the sender is stopped."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()

    async def _claim(self, free: int) -> list[Claimed]:
        """Up to ``free`` due deliveries, at most one per webhook and none of a webhook with
        one in flight here, leased to this sender. Healthy webhooks first; an organization,
        and failing webhooks together, get at most half the slots (``share``)."""
        async with self.pool.acquire() as conn, conn.transaction():
            # The oldest due delivery of each webhook (an index per webhook: the cost follows
            # the number of webhooks, not the backlog), then a choice here, then the lock.
            due = await conn.fetch(
                """SELECT d.id, w.id AS webhook_id, w.org_id, w.consecutive_failures > 0 AS failing
                   FROM webhooks w CROSS JOIN LATERAL (
                       SELECT id, next_attempt_at FROM webhook_deliveries
                       WHERE webhook_id = w.id AND state = 'pending' AND next_attempt_at <= now()
                       ORDER BY next_attempt_at LIMIT 1) d
                   WHERE w.enabled AND NOT (w.id = ANY ($1::bigint[]))
                   ORDER BY w.consecutive_failures > 0, d.next_attempt_at""",
                list(self.in_flight))
            chosen: dict[int, int] = {}  # webhook -> delivery
            orgs = collections.Counter(self.org_slots)
            failing = self.failing_slots
            for r in due:
                if len(chosen) >= free:
                    break
                if orgs[r["org_id"]] >= self.share or (r["failing"] and failing >= self.share):
                    continue
                chosen[r["webhook_id"]] = r["id"]
                orgs[r["org_id"]] += 1
                failing += r["failing"]
            # Another bridge may have taken some meanwhile: those are skipped, not waited for.
            locked = await conn.fetch(
                """SELECT id, webhook_id FROM webhook_deliveries
                   WHERE id = ANY ($1::bigint[]) AND state = 'pending' AND next_attempt_at <= now()
                   FOR UPDATE SKIP LOCKED""", list(chosen.values()))
            ids = {r["webhook_id"]: r["id"] for r in locked}
            if not ids:
                return []
            rows = await conn.fetch(
                """UPDATE webhook_deliveries d SET next_attempt_at = now() + $2 * interval '1 second'
                   FROM webhooks w WHERE d.id = ANY ($1::bigint[]) AND w.id = d.webhook_id
                   RETURNING d.id, d.webhook_id, w.org_id, w.consecutive_failures > 0 AS failing, d.body,
                             d.next_attempt_at, w.url, w.secret""",
                list(ids.values()), self.lease_s)
        return [Claimed(id=r["id"], webhook_id=r["webhook_id"], org_id=r["org_id"], failing=r["failing"], url=r["url"],
                        secret=r["secret"], body=r["body"], lease=r["next_attempt_at"]) for r in rows]

    async def _deliver(self, client: httpx.AsyncClient, c: Claimed) -> None:
        try:
            outcome = await self.attempt(client, c)
            self.attempts.labels("delivered" if outcome.delivered else "failed").inc()
            try:
                await self._record(c, outcome)
            except Exception as exc:
                # The delivery stays pending under its lease and is tried again when it runs out.
                self.errors.inc()
                log.warning("webhook sender could not record attempt of delivery %d: %s", c.id, db.translate(exc))
        finally:
            self.in_flight.discard(c.webhook_id)
            self.org_slots[c.org_id] -= 1
            if self.org_slots[c.org_id] <= 0:
                del self.org_slots[c.org_id]
            self.failing_slots -= c.failing
            self._wake.set()

    async def attempt(self, client: httpx.AsyncClient, c: Claimed) -> Outcome:
        """One signed POST of the delivery, within the time-out; never raises for the
        receiver's sake."""
        started = time.monotonic()
        status: int | None = None
        error: str | None = None
        try:
            async with asyncio.timeout(self.settings.webhook_timeout_s):
                target = parse_url(c.url)
                addresses = await resolve(target, allow_private=self.settings.webhook_allow_private)
                url, headers, extensions = target.pinned(addresses[0])
                now = int(time.time())
                body = webhook_body(json.loads(c.body), now)
                headers.update({"Content-Type": "application/json", "User-Agent": "lms-core-webhooks",
                                SIGNATURE_HEADER: sign(c.secret, body), TIMESTAMP_HEADER: str(now),
                                DELIVERY_HEADER: str(c.id)})
                # Streamed and not read: only the status matters, and a receiver cannot make
                # the sender take a large answer.
                async with client.stream("POST", url, content=body, headers=headers,
                                         extensions=extensions) as response:
                    status = response.status_code
                    if not 200 <= status < 300:
                        error = f"HTTP {status} {response.reason_phrase}".strip()
        except InvalidInput as exc:
            error = f"not sent: {exc}"
        except TimeoutError:
            error = f"no answer within {self.settings.webhook_timeout_s} s"
        except httpx.HTTPError as exc:
            error = f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__
        return Outcome(status, error[:MAX_ERROR_CHARS] if error else None,
                       int((time.monotonic() - started) * 1000))

    async def _record(self, c: Claimed, outcome: Outcome) -> None:
        """Log the attempt; move the delivery on (delivered, retried later, or failed) if it is
        still this sender's claim; update the webhook's failure fields."""
        s = self.settings
        ok = outcome.delivered
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                """INSERT INTO webhook_attempts (delivery_id, webhook_id, status_code, error, duration_ms)
                   SELECT id, webhook_id, $2, $3, $4 FROM webhook_deliveries WHERE id = $1""",
                c.id, outcome.status_code, outcome.error, outcome.duration_ms)
            # The wait before the next attempt: the base doubled per failure so far, capped.
            await conn.execute(
                """WITH wait AS (
                       SELECT least($5::bigint * 2 ^ least(attempts, 40), $6::bigint * 1000) * interval '1 ms' AS ms
                       FROM webhook_deliveries WHERE id = $1)
                   UPDATE webhook_deliveries d SET attempts = d.attempts + 1,
                          state = CASE WHEN $3 THEN 'delivered'
                                       WHEN now() + wait.ms > d.created_at + $4 * interval '1 second' THEN 'failed'
                                       ELSE 'pending' END,
                          next_attempt_at = CASE WHEN $3 THEN d.next_attempt_at ELSE now() + wait.ms END,
                          finished_at = CASE WHEN $3 OR now() + wait.ms > d.created_at + $4 * interval '1 second'
                                             THEN now() END
                   FROM wait
                   WHERE d.id = $1 AND d.state = 'pending' AND d.next_attempt_at = $2""",
                c.id, c.lease, ok, s.webhook_retry_s, s.webhook_backoff_ms, s.webhook_backoff_max_s)
            await conn.execute(
                """UPDATE webhooks SET consecutive_failures = CASE WHEN $2 THEN 0 ELSE consecutive_failures + 1 END,
                          failing_since = CASE WHEN $2 THEN NULL ELSE coalesce(failing_since, now()) END,
                          last_success_at = CASE WHEN $2 THEN now() ELSE last_success_at END,
                          last_failure_at = CASE WHEN $2 THEN last_failure_at ELSE now() END,
                          last_error = CASE WHEN $2 THEN last_error ELSE $3 END
                   WHERE id = $1""", c.webhook_id, ok, outcome.error)
