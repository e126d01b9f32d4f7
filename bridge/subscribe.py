"""The ingest loop: receive (exclusive or shared subscription), commit in batches, then ack.

Messages are appended to a list by the MQTT session's callback (in the event loop's thread,
see lms_core/mqtt.py and lms_core/mqtt_fast.py). One flusher task takes up to
``batch_size`` of them and starts their commit - one transaction - in a task that sends
their PUBACKs after it. Two commits are in flight at most, each on its own connection:
while PostgreSQL commits one batch, the bridge decodes the next and writes its readings
(Store.commit keeps the batches' effects in the order received). Meanwhile the next batch
fills; the broker's in-flight window (mosquitto.conf ``max_inflight_messages``) and the
buffer's own bound (reading paused at ``max_buffer``) bound the bridge's memory.

While PostgreSQL is down the flusher retries the same batch with backoff and sends no
acknowledgement, so the broker stops sending once the window is full and keeps the rest
queued in the bridge's persistent session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from time import time as _now
from time import time_ns as _now_ns  # globals, not attributes: read once per message

import paho.mqtt.client as paho

from bridge.metrics import BridgeMetrics
from bridge.store import Message, Store, Turn, TurnLost
from lms_core.errors import BrokerError, BrokerUnavailable, DatabaseUnavailable
from lms_core.mqtt import AsyncMqttClient
from lms_core.mqtt_fast import FastMqttClient, MqttSession, ReceivedMessage
from lms_core.settings import Settings
from lms_core.topics import TopicScheme

log = logging.getLogger("lms.bridge.ingest")


class Flight:
    """One batch's commit: its task (True once committed) and the Turn of its current
    attempt, which the next batch's commit follows (Store.commit)."""

    __slots__ = ("task", "turn")

    def __init__(self, turn: Turn) -> None:
        self.turn = turn
        self.task: asyncio.Task[bool]


class Ingest:
    def __init__(self, settings: Settings, store: Store, metrics: BridgeMetrics) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.batch_size = settings.bridge.batch_size
        self.flush_s = settings.bridge.flush_ms / 1000
        group = settings.bridge.group
        plain = TopicScheme(settings.topic_root).ingest_filters()
        shared = [f"$share/{group}/{f}" for f in plain]
        if settings.bridge.subscription == "shared":
            self.filters, self.other_filters = shared, plain
        else:
            self.filters, self.other_filters = plain, shared
        self.buffer: list[Message] = []
        #: The one thing the flusher waits on: set when the buffer gets its first message or
        #: a full batch, and when ``stop`` is set.
        self._wake = asyncio.Event()
        #: Set on every new connection: the subscriber task (re)subscribes.
        self._connected = asyncio.Event()
        self._draining = False
        #: Last time of receipt given, in microseconds: each message gets a later one.
        self._last_us = 0
        self._backpressure = False
        #: A command result is buffered: commit without waiting for the batch to fill.
        self._urgent = False
        #: Called on a reconnection to a broker that kept no session for the bridge
        #: (bridge/restore.py).
        self.on_state_lost: Callable[[], None] | None = None
        # Twice the broker's in-flight window (mosquitto.conf max_inflight_messages 5000).
        self.max_buffer = max(4 * self.batch_size, 10_000)
        self.mqtt: MqttSession = self._client(settings)
        #: The newest batch's commit while it runs (its task, and the Turn the next follows).
        self._inflight: Flight | None = None
        self._commits: set[asyncio.Task[bool]] = set()

    def _client(self, settings: Settings) -> MqttSession:
        """The MQTT session, by ``LMS_BRIDGE_RECEIVER``: paho, or the bridge's own 3.1.1
        session (lms_core/mqtt_fast.py); the same surface and guarantees either way."""
        if settings.bridge.receiver == "asyncio":
            return FastMqttClient(settings.mqtt, client_id=settings.bridge.client_id, persistent=True,
                                  manual_ack=True, reconnect=True, on_message=self._on_message,
                                  on_connect=self._on_connect, on_disconnect=self._on_disconnect, name="bridge")
        # MQTT 3.1.1: paho's 3.1.1 path measured ~2x faster than its MQTT 5 path here,
        # and a persistent 3.1.1 session never expires on Mosquitto unless configured to.
        return AsyncMqttClient(
            settings.mqtt,
            client_id=settings.bridge.client_id,
            protocol=paho.MQTTv311,
            persistent=True,
            manual_ack=True,
            reconnect=True,
            on_message=self._on_message,
            on_connect=self._on_connect,
            on_disconnect=self._on_disconnect,
            name="bridge",
        )

    # -- MQTT callbacks (event loop thread) ------------------------------------------

    def _on_message(self, msg: ReceivedMessage) -> None:
        if self._draining:
            return  # stopping: left unacknowledged for the broker to redeliver
        buf = self.buffer
        topic = msg.topic
        # QoS 0 messages carry no packet id (mid 0): they are never acknowledged.
        us = _now_ns() // 1000
        if us <= self._last_us:
            # Flat telemetry is stamped with its time of receipt and readings are unique per
            # (device, metric, time): two messages of a device received in one microsecond
            # (the asyncio receiver hands over a read of a backlog at >100k msg/s) would
            # become one reading. Distinct microseconds keep both.
            us = self._last_us + 1
        self._last_us = us
        buf.append(Message(topic, msg.payload, msg.mid if msg.qos else 0, self.mqtt.generation, us / 1e6,
                           msg.retain))
        n = len(buf)
        if topic[-7:] == "/result":
            # A command's result: someone may be waiting on it (?wait=), so the batch it is
            # in is committed now rather than after up to flush_ms (~40 ns per message).
            self._urgent = True
            self._wake.set()
        if n == 1 or n >= self.batch_size:
            self._wake.set()
            if n >= self.max_buffer and not self._backpressure:
                # QoS 0 traffic is outside the broker's in-flight window; stop reading
                # until the backlog is committed so memory stays bounded regardless.
                self._backpressure = True
                self.mqtt.pause_reading()

    def _on_connect(self, session_present: bool) -> None:
        self.metrics.connected.set(1)
        if not session_present and self.mqtt.generation > 1 and self.on_state_lost is not None:
            # A reconnection, and the broker kept no session for us: it lost its state, and
            # the retained messages the platform put there with it (the first connection
            # follows the reconcile at start, which published them).
            log.warning("the broker kept no session for the bridge: it lost its state")
            self.on_state_lost()
        # Subscribing again on every connection is harmless when the session kept the
        # subscription and repairs it when the broker lost its state.
        self._connected.set()

    def _on_disconnect(self) -> None:
        self.metrics.connected.set(0)
        # Unacknowledged messages of the lost connection will be redelivered; drop the
        # ones not yet being committed instead of storing them twice.
        dropped = len(self.buffer)
        self.buffer.clear()
        self._backpressure = False  # the next connection reads from a fresh socket
        if dropped:
            log.info("connection lost: %d uncommitted message(s) left to the broker to redeliver", dropped)

    async def _subscriber(self) -> None:
        """Subscribe after every (re)connection. A refused subscription raises out of this
        task: running on would silently lose every message, so the task group around the
        flusher stops the ingest loudly."""
        while True:
            await self._connected.wait()
            self._connected.clear()
            await self._subscribe()

    async def _subscribe(self) -> None:
        try:
            await self.mqtt.subscribe(self.filters, qos=1)
            log.info("subscribed", extra={"filters": self.filters})
            # A session switched between exclusive and shared mode keeps the other mode's
            # subscription; without this each message would arrive twice. No deadline for
            # the answer: Mosquitto sends this UNSUBACK behind the session's backlog (after
            # a restart, only once most of it is drained), and MQTT 3.1.1 cannot refuse an
            # UNSUBSCRIBE. A lost connection still ends the wait (BrokerUnavailable).
            await self.mqtt.unsubscribe(self.other_filters, timeout=None)
        except BrokerUnavailable:
            pass  # the connection dropped; the next connection subscribes again
        except BrokerError as exc:
            log.error("subscription failed: %s", exc)
            raise

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Ingest:
        await self.mqtt.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Disconnect without unsubscribing: the persistent session keeps our share of
        # the messages queued while we are away.
        await self.mqtt.close()

    async def run(self, stop: asyncio.Event) -> None:
        """Flush batches until ``stop`` is set, then flush what was received and return.

        The subscriber and the stop watcher are tasks of one group owned here: a failure
        in either cancels the flusher and reaches the caller as an ``ExceptionGroup``."""
        async with asyncio.TaskGroup() as tasks:
            helpers = [tasks.create_task(self._subscriber(), name="bridge subscriber"),
                       tasks.create_task(self._wake_on(stop), name="bridge stop watcher")]
            try:
                await self._flush(stop)
            finally:
                for task in helpers:
                    task.cancel()
                for commit in list(self._commits):
                    commit.cancel()  # only on failure: a stop waits for them

    async def _flush(self, stop: asyncio.Event) -> None:
        paused = False
        while True:
            if self._inflight is not None and self._inflight.task.done():
                task, self._inflight = self._inflight.task, None
                task.result()  # a commit's failure stops the ingest (the task group)
            if stop.is_set() and not paused:
                # Stop taking new messages so that a busy stream cannot hold the stop
                # open; what is buffered is committed and acknowledged below.
                self.mqtt.pause_reading()
                paused = True
                log.info("stopping: committing %d buffered message(s)", len(self.buffer))
            if not self.buffer:
                if stop.is_set():
                    if self._inflight is not None:
                        await self._inflight.task
                        self._inflight = None
                    await self._final_barrier()
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            # A partial batch waits for more (or for stop) until its oldest message has waited
            # flush_ms. Counted from that message's receipt, not from now: messages received
            # while the previous batch committed have waited that long already, and under a
            # steady load a fresh window after each commit would add it to every latency.
            wait = self.buffer[0].received_at + self.flush_s - _now()
            if wait > 0 and len(self.buffer) < self.batch_size and not stop.is_set() and not self._urgent:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(wait, self.flush_s)):
                        await self._wake.wait()
                if not self.buffer:
                    continue  # (the buffer empties when the connection drops)
            self._urgent = False
            batch = self.buffer[: self.batch_size]
            del self.buffer[: self.batch_size]
            before = self._inflight
            flight = Flight(Turn())
            flight.task = asyncio.create_task(self._commit(batch, stop, before, flight), name="bridge commit")
            flight.task.add_done_callback(self._commit_done)
            self._commits.add(flight.task)
            self._inflight = flight
            if before is not None:
                await before.task  # two in flight at most; a failure stops the ingest

    def _commit_done(self, task: asyncio.Task[bool]) -> None:
        self._commits.discard(task)
        self._wake.set()  # the flusher sees how it ended

    async def _wake_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._wake.set()

    async def _final_barrier(self) -> None:
        """Make sure the broker has the last acknowledgements before we disconnect."""
        self._draining = True
        if not self.mqtt.connected:
            return
        try:
            await self.mqtt.barrier()
        except BrokerError as exc:
            log.warning("could not confirm the last acknowledgements (%s); the broker may redeliver some", exc)

    async def _commit(self, batch: list[Message], stop: asyncio.Event, before: Flight | None, flight: Flight) -> bool:
        """Commit ``batch`` - beside the batch before while that one commits, or after it
        once an attempt failed (Store.commit) - then acknowledge it. Each attempt gets a
        fresh Turn in ``flight``, which the batch after follows. Returns whether it was
        committed (not when stopping while the database is down)."""
        self.metrics.backlog.set(len(self.buffer) + len(batch))
        delay = 0.2
        first = True
        while True:
            if before is not None and (not first or before.task.done()):
                if not await before.task:
                    # The batch before was left to the broker (stopping, database down): so is this one.
                    flight.turn.fail()
                    self.buffer.clear()
                    self._draining = True
                    return False
                before = None
            if not first:
                flight.turn = Turn()
            first = False
            try:
                await self.store.commit(batch, flight.turn, before.turn if before is not None else None)
                break
            except TurnLost:
                pass  # again, once the batch before is done
            except DatabaseUnavailable as exc:
                self.metrics.db_errors.inc()
                log.warning("database unavailable (%s); holding %d message(s) unacknowledged, retry in %.1f s",
                            exc, len(batch), delay)
                if stop.is_set() and delay >= 5:
                    # Stopping while the database is down: leave the batch to the broker.
                    log.warning("stopping with %d uncommitted message(s) left to the broker",
                                len(batch) + len(self.buffer))
                    self.buffer.clear()
                    self._draining = True
                    return False
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        gen = self.mqtt.generation
        self.mqtt.ack_many([m.mid for m in batch if m.generation == gen and m.mid], gen)
        if self._backpressure and len(self.buffer) < self.max_buffer // 2 and not self._draining:
            self._backpressure = False
            self.mqtt.resume_reading()
        self.metrics.backlog.set(len(self.buffer))
        return True
