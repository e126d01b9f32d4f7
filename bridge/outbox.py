"""Alert messages: the ``mqtt_outbox`` rows, published after the commit that wrote them.

An alert change writes its message into ``mqtt_outbox`` in its own transaction
(bridge/rules.py), so no change is ever without its message. After that commit the
engine wakes this publisher, which, in a transaction of its own, takes the pending rows
``FOR UPDATE SKIP LOCKED`` (two bridges never publish the same row at the same time),
publishes each on the bridge's MQTT connection (QoS 1, not retained), waits for the
broker's PUBACKs and deletes the acknowledged rows. Rows left behind (a crash between the
commit and the delete, a broker away) are published by the same drain, which also runs
every :data:`DRAIN_S`.

At least once: a bridge killed after the broker acknowledged a message but before its
delete committed publishes it again; a subscriber tells a repeat by ``alert_id`` and
``state``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg

from bridge.metrics import BridgeMetrics
from lms_core.db import translate
from lms_core.errors import BrokerError, DatabaseUnavailable, StorageError
from lms_core.mqtt_fast import MqttSession

log = logging.getLogger("lms.bridge.outbox")

#: Leftovers are looked for this often even without a wake-up (one cheap query).
DRAIN_S = 2.0
#: Rows per transaction: bounded, so one drain never holds many locks or PUBACK waits.
DRAIN_ROWS = 500
#: How long the broker gets to acknowledge a drain's messages before they are left for later.
ACK_TIMEOUT_S = 10.0


class AlertOutbox:
    """Publishes ``mqtt_outbox`` rows on the bridge's connection (module docstring)."""

    def __init__(self, pool: asyncpg.Pool, mqtt: MqttSession, metrics: BridgeMetrics,
                 interval: float = DRAIN_S) -> None:
        self.pool = pool
        self.mqtt = mqtt
        self.metrics = metrics
        self.interval = interval
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Publish now: a commit has written outbox rows."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Drain on every wake-up and every interval until ``stop``; failures are logged
        and the rows stay for the next drain (never fatal to the ingest)."""
        while not stop.is_set():
            self._wake.clear()
            try:
                while await self.drain() == DRAIN_ROWS:
                    pass
            except (DatabaseUnavailable, BrokerError) as exc:
                log.warning("alert messages not published yet (%s); retrying", exc)
            except StorageError:
                log.exception("alert outbox drain failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    waits = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
                    try:
                        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        for w in waits:
                            w.cancel()

    async def drain(self) -> int:
        """Publish up to :data:`DRAIN_ROWS` pending rows; return how many were taken."""
        if not self.mqtt.connected:
            return 0
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                rows = await conn.fetch("SELECT id, topic, payload FROM mqtt_outbox ORDER BY id LIMIT $1 "
                                        "FOR UPDATE SKIP LOCKED", DRAIN_ROWS)
                if not rows:
                    return 0
                mids = [(r["id"], self.mqtt.publish_nowait(r["topic"], r["payload"], qos=1)) for r in rows]
                results = await asyncio.gather(*(self.mqtt.wait_published(mid, ACK_TIMEOUT_S) for _, mid in mids),
                                               return_exceptions=True)
                done = [i for (i, _), res in zip(mids, results, strict=True) if res is None]
                if done:
                    await conn.execute("DELETE FROM mqtt_outbox WHERE id = ANY($1::bigint[])", done)
        except BrokerError:
            raise
        except Exception as exc:
            raise translate(exc) from exc
        self.metrics.outbox_published.inc(len(done))
        failed = [r for r in results if r is not None]
        if failed:
            log.warning("%d alert message(s) not acknowledged (%s); left for the next drain", len(failed), failed[0])
        return len(rows)
