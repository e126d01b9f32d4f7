"""The bridge's lifecycle: starting before its services, failing to connect first, and
database errors it has never seen before. Each was a way for the bridge to die or to stop
ingesting for good while every service it needs was (or came) back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import asyncpg
import pytest

from bridge.decode import TelemetryDecoder
from bridge.metrics import BridgeMetrics
from bridge.store import TURN_WAIT_S, Store, TurnLost
from bridge.subscribe import Ingest
from lms_core import db
from lms_core.errors import BrokerUnavailable, DatabaseUnavailable
from lms_core.mqtt import AsyncMqttClient
from lms_core.settings import Settings
from lms_core.topics import TopicScheme
from tests.harness import Device, Stack, wait_until


def _stamped(i: int, base: int) -> str:
    return json.dumps({"ts": base + i, "values": {"seq": i}})


def test_bridge_started_while_postgres_is_down_waits_for_it(own_stack: Stack, unique: str) -> None:
    """It used to print a traceback 0.2 s after start: the retry re-entered a used
    ``@asynccontextmanager``, which cannot be entered twice."""
    s = own_stack
    creds = s.create_device(unique, "d")
    s.pg.stop()
    bridge = s.start_bridge(wait=False)
    time.sleep(3)
    assert bridge.proc is not None and bridge.proc.poll() is None, bridge.log_text()[-3000:]
    assert "Traceback" not in bridge.log_text()
    assert "PostgreSQL not ready" in bridge.log_text()
    s.pg.start()
    wait_until(lambda: b'"subscribed"' in bridge.log.read_bytes(), 40, "the bridge to subscribe")
    dev = Device(s.mq.port, creds)
    try:
        assert dev.connect().value == 0
        dev.publish_wait("telemetry", _stamped(1, int(time.time() * 1000)))
        wait_until(lambda: s.scalar("SELECT count(*) FROM readings") == 1, 15, "the reading")
    finally:
        dev.close()


def test_a_client_whose_connect_failed_cannot_be_entered_again(own_stack: Stack) -> None:
    """A failed ``__aenter__`` closes the client, and a closed client used to connect when
    entered again but never reconnect after it lost the broker (``_closing`` stayed set):
    the bridge retried its first connection that way and stopped ingesting for good after
    the next broker restart. Clients are single-use now; a retry makes a new one."""
    s = own_stack
    s.mq.stop()
    try:
        async def run() -> None:
            client = AsyncMqttClient(s.mqtt_url, reconnect=True, name="probe")
            with pytest.raises(BrokerUnavailable):
                await client.__aenter__()
            with pytest.raises(RuntimeError, match="single-use"):
                await client.__aenter__()

        asyncio.run(run())
    finally:
        s.mq.start()


def test_bridge_started_while_the_broker_is_down_connects_and_survives_a_restart(
        own_stack: Stack, unique: str) -> None:
    s = own_stack
    creds = s.create_device(unique, "d")
    s.mq.stop()
    bridge = s.start_bridge(wait=False)
    wait_until(lambda: "broker not ready" in bridge.log_text(), 20, "a failed first connection")
    s.mq.start()
    wait_until(lambda: b'"subscribed"' in bridge.log.read_bytes(), 40, "the bridge to subscribe")
    s.mq.stop()
    s.mq.start()
    base = int(time.time() * 1000)
    dev = Device(s.mq.port, creds)
    try:
        assert dev.connect().value == 0
        for i in range(20):
            dev.publish_wait("telemetry", _stamped(i, base))
        wait_until(lambda: s.scalar("SELECT count(*) FROM readings") == 20, 30,
                   "the readings published after the broker restart")
    finally:
        dev.close()
    assert bridge.proc is not None and bridge.proc.poll() is None


class _FailingCommits:
    """Fault injection at the database edge: the first ``n`` commits fail with ``exc``,
    raised from inside the real store (after its real connection was used)."""

    def __init__(self, store: Store, exc: BaseException, n: int) -> None:
        self.store, self.exc, self.left = store, exc, n
        self.real = store._write_rest

    async def write(self, conn: Any, b: Any, **kw: Any) -> None:
        await self.real(conn, b, **kw)
        if self.left:
            self.left -= 1
            raise self.exc


def test_an_unknown_database_error_during_commit_is_retried_not_fatal(own_stack: Stack, unique: str) -> None:
    """asyncpg raised ``InternalClientError`` at COMMIT during a PostgreSQL outage, a type
    the bridge's hand-kept list did not know, and the bridge died. Database errors are now
    translated once, in the store, and the ingest loop retries ``DatabaseUnavailable``."""
    s = own_stack
    creds = s.create_device(unique, "d")
    # paho's receiver: the late answer is injected through paho's callback.
    env = s.env(LMS_BRIDGE_CLIENT_ID="lms-bridge-inproc", LMS_BRIDGE_FLUSH_MS="20", LMS_BRIDGE_RECEIVER="paho")

    async def run() -> tuple[int, int]:
        settings = Settings.from_env(env)
        metrics = BridgeMetrics()
        async with db.create_pool(settings.database_url, min_size=1, max_size=2) as pool:
            store = Store(pool, TelemetryDecoder(settings.limits), TopicScheme(settings.topic_root), metrics)
            faults = _FailingCommits(store, asyncpg.exceptions.InternalClientError("injected at COMMIT"), 2)
            store._write_rest = faults.write  # type: ignore[method-assign]
            stop = asyncio.Event()
            async with Ingest(settings, store, metrics) as ingest:
                runner = asyncio.create_task(ingest.run(stop))
                await asyncio.to_thread(_publish_and_wait, s, creds, 10)
                stop.set()
                await asyncio.wait_for(runner, 30)
            return faults.left, int(metrics.db_errors._value.get())

    left, db_errors = asyncio.run(run())
    assert left == 0 and db_errors == 2
    assert s.scalar("SELECT count(*) FROM readings") == 10


def test_store_translates_what_the_driver_raises(own_stack: Stack) -> None:
    """The one place that knows asyncpg's types: connection-level failures of any kind
    become ``DatabaseUnavailable``; nothing raw escapes ``Store.commit``."""
    for exc in (asyncpg.exceptions.InternalClientError("x"), asyncpg.InterfaceError("x"),
                asyncpg.exceptions.ConnectionDoesNotExistError("x"), OSError("x"), TimeoutError(),
                asyncpg.exceptions.AdminShutdownError("x"), asyncpg.exceptions.DeadlockDetectedError("x"),
                asyncpg.exceptions.TooManyConnectionsError("x")):
        assert isinstance(db.translate(exc), DatabaseUnavailable), exc


def _publish_and_wait(s: Stack, creds: Any, n: int) -> None:
    base = int(time.time() * 1000)
    dev = Device(s.mq.port, creds)
    try:
        assert dev.connect().value == 0
        for i in range(n):
            dev.publish_wait("telemetry", _stamped(i, base))
        wait_until(lambda: s.scalar("SELECT count(*) FROM readings") == n, 30, f"{n} readings")
    finally:
        dev.close()


def test_connecting_does_not_stall_the_event_loop() -> None:
    """paho connects synchronously (DNS, TCP, TLS). Done on the loop, a broker that does not
    answer the SYN froze every other task - commits, acknowledgements, pings - for the whole
    connect time-out. A listener whose accept queue is full drops SYNs: that is the broker."""
    import socket

    from lms_core.settings import MqttUrl

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):  # fill the accept queue (backlog 0 admits one or two)
        f = socket.socket()
        f.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            f.connect(("127.0.0.1", port))
        fillers.append(f)

    async def run() -> tuple[int, float]:
        ticks = 0

        async def heartbeat() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        beat = asyncio.create_task(heartbeat())
        client = AsyncMqttClient(MqttUrl.parse(f"mqtt://u:p@127.0.0.1:{port}"), name="probe")
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable):
            await client.__aenter__()
        took = time.monotonic() - started
        beat.cancel()
        return ticks, took

    try:
        ticks, took = asyncio.run(run())
    finally:
        for f in fillers:
            f.close()
        listener.close()
    assert took >= 1, f"the connect attempt failed in {took:.2f} s: the listener did not stall it"
    # The loop kept running while the attempt waited (about 20 ticks a second).
    assert ticks >= took * 5, (ticks, took)


def test_a_late_unsuback_does_not_stop_the_bridge(own_stack: Stack, unique: str) -> None:
    """After subscribing, the bridge unsubscribes the other subscription mode's filters.
    Restarted with a backlog, Mosquitto answered that UNSUBSCRIBE only after seconds of the
    backlog (bench/ingest.py: after all 200,000 queued messages) and the bridge, which gave
    the answer 10 s, stopped with "subscription failed" while it was draining - a bridge
    could not come back after an outage. The broker's late answer is injected here: the
    first UNSUBACK reaches the client 12 s late."""
    s = own_stack
    creds = s.create_device(unique, "d")
    # paho's receiver: the late answer is injected through paho's callback.
    env = s.env(LMS_BRIDGE_CLIENT_ID="lms-bridge-inproc", LMS_BRIDGE_FLUSH_MS="20", LMS_BRIDGE_RECEIVER="paho")

    async def run() -> tuple[bool, int]:
        settings = Settings.from_env(env)
        metrics = BridgeMetrics()
        async with db.create_pool(settings.database_url, min_size=1, max_size=2) as pool:
            store = Store(pool, TelemetryDecoder(settings.limits), TopicScheme(settings.topic_root), metrics)
            ingest = Ingest(settings, store, metrics)
            paho_client = ingest.mqtt.client
            on_unsubscribe, late = paho_client.on_unsubscribe, [True]
            loop = asyncio.get_running_loop()

            def answer_late(*args: Any) -> None:
                if late:
                    late.clear()
                    loop.call_later(12, on_unsubscribe, *args)
                else:
                    on_unsubscribe(*args)

            paho_client.on_unsubscribe = answer_late
            stop = asyncio.Event()
            async with ingest:
                runner = asyncio.create_task(ingest.run(stop))
                await asyncio.to_thread(_publish_and_wait, s, creds, 5)
                await asyncio.wait({runner}, timeout=13)  # past the old 10 s wait
                alive = not runner.done()
                stop.set()
                await asyncio.wait_for(runner, 30)
            return alive, int(await asyncio.to_thread(s.scalar, "SELECT count(*) FROM readings"))

    alive, readings = asyncio.run(run())
    assert alive, "the bridge stopped while the broker's answer was on its way"
    assert readings == 5


def test_a_refused_subscription_stops_the_bridge_with_one_line(own_stack: Stack) -> None:
    """Running on without its subscription would silently lose every message: the
    subscriber task's error stops the ingest (its task group) and reaches the command line
    as one line, not as a traceback or an exception group."""
    from lms_core.broker import PLATFORM_ROLE, BrokerAdmin

    s = own_stack
    bridge = s.start_bridge()

    async def take_away_subscribing() -> None:
        async with BrokerAdmin(s.mqtt_url, TopicScheme()) as admin:
            acls = [{"acltype": "publishClientSend", "topic": "lms/#", "priority": 0, "allow": True}]
            await admin.execute([{"command": "modifyRole", "rolename": PLATFORM_ROLE, "acls": acls}])

    asyncio.run(take_away_subscribing())
    s.mq.stop()  # the bridge subscribes again on its next connection: refused now
    s.mq.start()
    assert bridge.proc is not None
    bridge.proc.wait(30)
    assert bridge.proc.returncode != 0
    text = bridge.log_text()
    assert "refused subscription" in text and "Traceback" not in text and "ExceptionGroup" not in text, text[-3000:]


class CommitFaults:
    """Fault injection in the real store: the ``slow``-th batch waits ``delay`` s before its
    last writes, the ``fail``-th fails there once (a transient error); every TurnLost (a
    batch rolled back to be retried after the one before) and every decode is counted."""

    def __init__(self, store: Store, slow: int = 0, delay: float = 0.0, fail: int = 0) -> None:
        self.slow, self.delay, self.fail = slow, delay, fail
        self.calls = self.lost = self.builds = 0
        self.real_rest, self.real_commit, self.real_build = store._write_rest, store.commit, store.build
        store._write_rest = self.write_rest  # type: ignore[method-assign]
        store.commit = self.commit  # type: ignore[method-assign]
        store.build = self.build  # type: ignore[method-assign]

    async def write_rest(self, conn: Any, b: Any) -> None:
        self.calls += 1
        if self.calls == self.slow:
            await asyncio.sleep(self.delay)
        await self.real_rest(conn, b)
        if self.calls == self.fail:
            raise asyncpg.exceptions.InternalClientError("injected at COMMIT")

    def build(self, *a: Any, **kw: Any) -> Any:
        self.builds += 1
        return self.real_build(*a, **kw)

    async def commit(self, messages: Any, turn: Any = None, before: Any = None) -> Any:
        try:
            return await self.real_commit(messages, turn, before)
        except TurnLost:
            self.lost += 1
            raise


def drain_backlog_in_process(s: Stack, unique: str, client_id: str, n: int,
                             **faults: Any) -> tuple[CommitFaults, BridgeMetrics]:
    """An in-process ingest (batches of 40) drains a backlog of ``n`` stamped readings of
    one device through a store with ``CommitFaults(**faults)``; returns them and the metrics."""
    creds = s.create_device(unique, "d")
    env = s.env(LMS_BRIDGE_CLIENT_ID=client_id, LMS_BRIDGE_BATCH_SIZE="40", LMS_BRIDGE_FLUSH_MS="20")

    async def run(faulty: bool) -> tuple[CommitFaults | None, BridgeMetrics]:
        settings = Settings.from_env(env)
        metrics = BridgeMetrics()
        async with db.create_pool(settings.database_url, min_size=1, max_size=4) as pool:
            store = Store(pool, TelemetryDecoder(settings.limits), TopicScheme(settings.topic_root), metrics)
            injected = CommitFaults(store, **faults) if faulty else None
            stop = asyncio.Event()
            async with Ingest(settings, store, metrics) as ingest:
                runner = asyncio.create_task(ingest.run(stop))
                if faulty:
                    await asyncio.to_thread(wait_until, lambda: s.scalar("SELECT count(*) FROM readings") == n, 90,
                                            f"{n} readings")
                else:
                    await asyncio.sleep(1)  # subscribed: the session holds the subscription
                stop.set()
                await asyncio.wait_for(runner, 30)
            return injected, metrics

    asyncio.run(run(False))  # the persistent session and its subscription
    base = int(time.time() * 1000) - 60_000
    dev = Device(s.mq.port, creds)
    try:
        assert dev.connect().value == 0
        for i in range(n):  # a backlog: every batch of the drain has one after it
            dev.publish_wait("telemetry", _stamped(i, base))
    finally:
        dev.close()
    injected, metrics = asyncio.run(run(True))
    assert injected is not None
    rows = s.query("SELECT value FROM readings WHERE metric = 'seq' ORDER BY time")
    assert [r["value"] for r in rows] == list(range(n)), "every reading once, in order"
    return injected, metrics


def test_two_batches_in_flight_wait_for_a_stalled_one_and_retry_after_a_failed_one(
        own_stack: Stack, unique: str) -> None:
    """Two commits are in flight: the next batch writes its readings while the one before
    commits, and waits for that commit before the rest (a stalled batch only makes the next
    one wait: the wait is inside its rollup upsert). When the one before fails, the next
    rolls back and is retried after it: every reading is stored once, in order."""
    faults, metrics = drain_backlog_in_process(own_stack, unique, "lms-bridge-inproc2", 600,
                                               slow=3, delay=TURN_WAIT_S + 1, fail=6)
    assert faults.lost >= 1, "the batch after the failed one rolled back"
    assert int(metrics.db_errors._value.get()) >= 1
    assert faults.calls >= 600 // 40
