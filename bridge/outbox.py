"""Alert messages: the ``mqtt_outbox`` rows, published after the commit that wrote them.

An alert change writes its message into ``mqtt_outbox`` in its own transaction
(bridge/rules.py), so no change is ever without its message. Two ways out:

- **From memory** (the bridge's own alert changes): the evaluation writes the rows with
  ``publish_after`` :data:`LEASE_S` ahead (a lease: no drain takes them before) and knows
  their ids. Right after the commit the engine hands the messages to :meth:`AlertOutbox.publish`,
  which publishes them at once on the bridge's MQTT connection (QoS 1, not retained) - no
  wake-up of another task, no connection to acquire, no read of what was just written. The
  outbox task then waits for the broker's PUBACKs and deletes the acknowledged rows; a
  message not acknowledged (connection lost, time-out) has its row released
  (``publish_after = now()``) for the drain.
- **The drain**, every :data:`DRAIN_S` and after a release: in a transaction of its own it
  takes the rows past ``publish_after`` ``FOR UPDATE SKIP LOCKED`` (two bridges never publish
  the same row at the same time), publishes them, waits for the PUBACKs and deletes the
  acknowledged rows. That is how the API's messages go out (its rows are due at once), and
  the leftovers of a bridge that died before its messages were acknowledged, once their
  lease has run out.

At least once: a bridge killed after the broker acknowledged a message but before its
delete committed publishes it again (or, from memory, another bridge does when the lease
runs out); a subscriber tells a repeat by ``alert_id`` and ``state``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import NamedTuple

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
#: How long the broker gets to acknowledge messages before they are left for later.
ACK_TIMEOUT_S = 10.0
#: How long the rows of messages published from memory are the publishing bridge's alone:
#: longer than it waits for their PUBACKs (then it deletes or releases them), so that no
#: drain publishes them a second time meanwhile. Also how late a dead bridge's unacknowledged
#: alert messages go out (from another bridge, or from itself once restarted).
LEASE_S = ACK_TIMEOUT_S + 5.0


class OutboxMessage(NamedTuple):
    """An ``mqtt_outbox`` row as written: its id, topic and payload."""

    id: int
    topic: str
    payload: bytes


class AlertOutbox:
    """Publishes ``mqtt_outbox`` rows on the bridge's connection (module docstring)."""

    def __init__(self, pool: asyncpg.Pool, mqtt: MqttSession, metrics: BridgeMetrics,
                 interval: float = DRAIN_S) -> None:
        self.pool = pool
        self.mqtt = mqtt
        self.metrics = metrics
        self.interval = interval
        self._wake = asyncio.Event()
        #: (row id, packet id) of messages published from memory, PUBACK not yet seen.
        self._sent: list[tuple[int, int]] = []
        #: Rows of messages published from memory and acknowledged, to delete.
        self._acked: list[int] = []
        #: Rows of messages from memory that went unacknowledged, to hand to the drain.
        self._unsent: list[int] = []

    def publish(self, messages: Sequence[OutboxMessage]) -> None:
        """Publish now the messages a commit has just written (their rows leased to this
        bridge); the outbox task settles them (module docstring). Never raises."""
        for m in messages:
            try:
                self._sent.append((m.id, self.mqtt.publish_nowait(m.topic, m.payload, qos=1)))
            except BrokerError:
                self._unsent.append(m.id)  # not connected: the drain publishes it once connected
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Settle what was published from memory on every wake-up; drain every interval and
        after a release; until ``stop``. Failures are logged and the rows stay for the next
        round (never fatal to the ingest)."""
        drain_at = 0.0
        while not stop.is_set():
            self._wake.clear()
            try:
                released = await self._settle()
                if released or time.monotonic() >= drain_at:
                    drain_at = time.monotonic() + self.interval
                    while await self.drain() == DRAIN_ROWS:
                        pass
            except (DatabaseUnavailable, BrokerError) as exc:
                drain_at = time.monotonic() + self.interval
                log.warning("alert messages not published yet (%s); retrying", exc)
            except StorageError:
                drain_at = time.monotonic() + self.interval
                log.exception("alert outbox drain failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, drain_at - time.monotonic())):
                    waits = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
                    try:
                        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        for w in waits:
                            w.cancel()

    async def _settle(self) -> int:
        """Wait for the PUBACKs of the messages published from memory; delete the rows of
        those acknowledged and release the others to the drain. Returns how many were released."""
        sent, self._sent = self._sent, []
        if sent:
            results = await asyncio.gather(*(self.mqtt.wait_published(mid, ACK_TIMEOUT_S) for _, mid in sent),
                                           return_exceptions=True)
            acked = [i for (i, _), res in zip(sent, results, strict=True) if res is None]
            self._acked += acked
            self.metrics.outbox_published.inc(len(acked))
            failed = [(i, res) for (i, _), res in zip(sent, results, strict=True) if res is not None]
            if failed:
                log.warning("%d alert message(s) not acknowledged (%s); left for the drain", len(failed),
                            failed[0][1])
                self._unsent += [i for i, _ in failed]
        if not self._acked and not self._unsent:
            return 0
        acked, unsent = self._acked, self._unsent
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                if acked:
                    await conn.execute("DELETE FROM mqtt_outbox WHERE id = ANY($1::bigint[])", acked)
                if unsent:
                    await conn.execute("UPDATE mqtt_outbox SET publish_after = now() WHERE id = ANY($1::bigint[])",
                                       unsent)
        except Exception as exc:
            raise translate(exc) from exc  # both lists kept: tried again next round
        self._acked, self._unsent = [], []
        return len(unsent)

    async def drain(self) -> int:
        """Publish up to :data:`DRAIN_ROWS` due rows; return how many were taken."""
        if not self.mqtt.connected:
            return 0
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                rows = await conn.fetch("SELECT id, topic, payload FROM mqtt_outbox WHERE publish_after <= now() "
                                        "ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED", DRAIN_ROWS)
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
