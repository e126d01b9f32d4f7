"""``lms simulate``: a fleet of simulated devices in one asyncio process, speaking exactly the
firmware's protocol.

Each device is an :class:`asyncio.Protocol` (no task of its own: ten thousand of them cost a
socket and a few timers each) that uses the firmware's own code for everything on the wire
and above it: ``firmware/lms_wire.py`` (MQTT packets), ``firmware/lms_proto.py`` (telemetry,
commands, desired config) and the firmware's simulated sensor. What differs from the board
is only the I/O: the event loop instead of the firmware's polling loop. Like the firmware,
a device keeps its readings in a bounded buffer until the broker acknowledged them, sends
them oldest first (a batch when several wait), reconnects with exponential backoff and
jitter, has a Last Will ``offline`` and a retained ``online``, a persistent session, and
answers commands and configs.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from firmware import lms_proto, lms_wire
from firmware.lms_sensors import Simulated
from lms_core.provisioning import DeviceCredentials
from lms_core.settings import MqttUrl

KEEPALIVE = 60
BUFFER_MAX = 200  # as the firmware's default
ACK_TIMEOUT = 15.0


@dataclass
class Stats:
    devices: int = 0
    connected: int = 0
    produced: int = 0  # readings made
    acked: int = 0  # readings the broker acknowledged
    dropped: int = 0  # readings lost to a full buffer
    commands: int = 0  # commands answered
    configs: int = 0  # configs reported
    connects: int = 0
    refused: int = 0
    last_all_connected: float = 0.0  # loop time at which the last device of the fleet connected

    def line(self) -> str:
        return (f"connected {self.connected}/{self.devices} · readings {self.produced} made, {self.acked} "
                f"acknowledged · commands answered {self.commands} · configs {self.configs}"
                + (f" · dropped {self.dropped}" if self.dropped else "")
                + (f" · refused logins {self.refused}" if self.refused else ""))


@dataclass
class Fleet:
    """The owner of the devices, their connection attempts and the statistics."""

    url: MqttUrl
    interval: float
    stats: Stats = field(default_factory=Stats)
    connect_rate: float = 500.0  # new connections per second at most (a start or a broker restart)
    spike_chance: float = 0.0
    devices: list[SimDevice] = field(default_factory=list)
    _pending: set[asyncio.Task[None]] = field(default_factory=set)
    _next_connect: float = 0.0
    closing: bool = False

    def add(self, creds: DeviceCredentials, index: int) -> SimDevice:
        d = SimDevice(self, creds, index)
        self.devices.append(d)
        self.stats.devices += 1
        return d

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        for d in self.devices:
            # Each device samples at its own phase, like boards switched on at different times.
            loop.call_later(random.uniform(0, self.interval), d.sample)
            self.connect_later(d, 0)

    def connect_later(self, d: SimDevice, delay: float) -> None:
        """Connect ``d`` after ``delay`` s, and no faster than ``connect_rate`` a second."""
        loop = asyncio.get_running_loop()
        at = max(loop.time() + delay, self._next_connect)
        self._next_connect = max(self._next_connect, loop.time()) + 1 / self.connect_rate
        loop.call_at(at, self._connect, d)

    def _connect(self, d: SimDevice) -> None:
        if self.closing:
            return
        task = asyncio.get_running_loop().create_task(d.open(), name=f"connect {d.creds.client_id}")
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def close(self) -> None:
        self.closing = True
        for t in list(self._pending):
            t.cancel()
        for d in self.devices:
            d.power_off()
        await asyncio.sleep(0)


class SimDevice(asyncio.Protocol):
    def __init__(self, fleet: Fleet, creds: DeviceCredentials, index: int) -> None:
        self.fleet = fleet
        self.stats = fleet.stats
        self.creds = creds
        self.prefix = creds.topic_prefix
        rnd = random.Random(index)
        self.sensor = Simulated({"base": round(rnd.uniform(18, 24), 1), "amp": 3.0, "noise": 0.2,
                                 "spike_chance": fleet.spike_chance, "spike": 8.0, "spike_len": 6})
        self.defaults: dict[str, Any] = {"interval_s": fleet.interval, "led": "off"}
        self.settings = dict(self.defaults)
        self.interval = fleet.interval
        self.version: int | None = None
        self.reported_version: int | None = None
        self.led = "off"
        self.transport: asyncio.Transport | None = None
        self.rx = bytearray()
        self.connected = False
        self.pid = 0
        self.buf: list[str] = []
        self.inflight = 0
        self.tx_pid = 0
        self.tx_at = 0.0
        self.outbox: list[list[Any]] = []  # [topic, payload, retain, pid, version]
        self.failures = 0
        self.last_ts = 0
        self.ping_handle: asyncio.TimerHandle | None = None

    # -- connection ------------------------------------------------------------------------

    async def open(self) -> None:
        u = self.fleet.url
        try:
            await asyncio.get_running_loop().create_connection(lambda: self, u.host, u.port)
        except OSError:
            self.retry()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        c = self.creds
        transport.write(lms_wire.connect(c.client_id, c.username, c.password, KEEPALIVE, False,
                                         (self.prefix + "/status", "offline", 1, True)))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.connected:
            self.stats.connected -= 1
        self.connected = False
        self.transport = None
        self.rx.clear()
        self.inflight = 0
        for e in self.outbox:
            e[3] = 0
        if self.ping_handle is not None:
            self.ping_handle.cancel()
        self.retry()

    def retry(self) -> None:
        if self.fleet.closing:
            return
        # The firmware's backoff: doubling from 1 s to 60 s, drawn from the upper half.
        d = min(60.0, 1.0 * 2 ** min(self.failures, 16))
        self.failures += 1
        self.fleet.connect_later(self, d / 2 + random.uniform(0, d / 2))

    def power_off(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def _publish(self, topic: str, payload: str, retain: bool = False) -> int:
        self.pid = self.pid % 65535 + 1
        self._write(lms_wire.publish(topic, payload, 1, retain, self.pid))
        return self.pid

    def _ping(self) -> None:
        if self.connected:
            self._write(lms_wire.PINGREQ)
            self.ping_handle = asyncio.get_running_loop().call_later(KEEPALIVE / 2, self._ping)

    # -- packets ---------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.rx += data
        while len(self.rx) >= 2:
            size, shift, pos = 0, 0, 1
            while True:
                if pos >= len(self.rx):
                    return
                b = self.rx[pos]
                size |= (b & 0x7F) << shift
                pos += 1
                if not b & 0x80:
                    break
                shift += 7
            if len(self.rx) < pos + size:
                return
            first, body = self.rx[0], bytes(self.rx[pos:pos + size])
            del self.rx[:pos + size]
            self._packet(first, body)

    def _packet(self, first: int, body: bytes) -> None:
        kind = first & 0xF0
        if kind == lms_wire.CONNACK:
            _, code = lms_wire.parse_connack(body)
            if code:
                self.stats.refused += 1
                if self.transport is not None:
                    self.transport.close()
                return
            self.connected = True
            self.failures = 0
            self.stats.connected += 1
            self.stats.connects += 1
            if self.stats.connected == self.stats.devices:
                self.stats.last_all_connected = asyncio.get_running_loop().time()
            self.pid = self.pid % 65535 + 1
            self._write(lms_wire.subscribe(self.pid, lms_proto.subscriptions(self.prefix)))
            self.outbox.insert(0, [self.prefix + "/status", "online", True, 0, None])
            self.ping_handle = asyncio.get_running_loop().call_later(KEEPALIVE / 2, self._ping)
            self.pump()
        elif kind == lms_wire.PUBLISH:
            topic, payload, qos, pid = lms_wire.parse_publish(first, body)
            self.on_message(topic, payload)
            if qos:
                self._write(lms_wire.puback(pid))
            self.pump()
        elif kind == lms_wire.PUBACK:
            self.on_ack(lms_wire.pid_of(body))
            self.pump()

    def on_ack(self, pid: int) -> None:
        if self.inflight and pid == self.tx_pid:
            del self.buf[:self.inflight]
            self.stats.acked += self.inflight
            self.inflight = 0
            return
        for i, e in enumerate(self.outbox):
            if e[3] == pid:
                if e[4] is not None:
                    self.reported_version = e[4]
                del self.outbox[i]
                return

    def pump(self) -> None:
        """As the firmware's: the outbox, then the oldest readings, one message in flight."""
        if not self.connected:
            return
        for e in self.outbox:
            if not e[3]:
                e[3] = self._publish(e[0], e[1], e[2])
        now = time.monotonic()
        if self.inflight:
            if now - self.tx_at > ACK_TIMEOUT and self.transport is not None:
                self.transport.abort()  # no PUBACK: reconnect and send again
            return
        if self.buf:
            n = min(len(self.buf), lms_proto.BATCH_MAX)
            self.tx_pid = self._publish(self.prefix + "/telemetry", lms_proto.batch(self.buf[:n]))
            self.inflight = n
            self.tx_at = now

    # -- what the device does ---------------------------------------------------------------

    def sample(self) -> tuple[int, dict[str, Any]]:
        if not self.fleet.closing:
            asyncio.get_running_loop().call_later(self.interval, self.sample)
        ts = max(int(time.time() * 1000), self.last_ts + 1)
        self.last_ts = ts
        values = self.sensor.read(ts)
        if len(self.buf) >= BUFFER_MAX:
            self.buf.pop(0)
            if self.inflight:
                self.inflight -= 1
            else:
                self.stats.dropped += 1
        self.buf.append(lms_proto.stamped(ts, values))
        self.stats.produced += 1
        self.pump()
        return ts, values

    def on_message(self, topic: str, payload: bytes) -> None:
        if topic == self.prefix + "/config":
            self.on_config(payload)
            return
        cid = lms_proto.command_id(self.prefix, topic)
        if cid is None:
            return
        reply = self.prefix + f"/commands/{cid}/result"
        try:
            name, params = lms_proto.parse_command(cid, payload, int(time.time() * 1000))
        except lms_proto.Refused as e:
            self.outbox.append([reply, lms_proto.result("error", error=str(e)), False, 0, None])
            self.stats.commands += 1
            return
        result: dict[str, Any]
        if name == "ping":
            result = {"pong": True, "firmware": "simulator", "interval_s": self.interval, "buffered": len(self.buf)}
        elif name == "reboot":
            result = {"rebooting": True}
            asyncio.get_running_loop().call_later(1, self.power_off)
        elif name == "set_interval":
            self.interval = params["seconds"]
            result = {"interval_s": self.interval}
        elif name == "read_now":
            ts, values = self.sample()
            result = {"ts": ts, "values": values}
        else:
            self.led = params["state"]
            result = {"led": self.led}
        self.outbox.append([reply, lms_proto.result("ok", result), False, 0, None])
        self.stats.commands += 1

    def on_config(self, payload: bytes) -> None:
        try:
            doc = lms_proto.parse_config(payload)
        except lms_proto.Refused:
            return
        if doc is None:
            self.version, self.settings = None, dict(self.defaults)
            return
        v = doc["version"]
        if v == self.reported_version:
            return
        topic = self.prefix + "/config/reported"
        try:
            new = lms_proto.effective(self.defaults, doc)
        except lms_proto.Refused as e:
            self.outbox.append([topic, lms_proto.reported(v, self.settings, str(e), self.version), False, 0, v])
            return
        self.settings, self.version, self.interval = new, v, new["interval_s"]
        self.outbox.append([topic, lms_proto.reported(v, new), False, 0, v])
        self.stats.configs += 1


async def run_fleet(url: MqttUrl, creds: list[DeviceCredentials], interval: float, *,
                    seconds: float | None = None, progress: float = 2.0, stop: asyncio.Event | None = None,
                    spike_chance: float = 0.0, connect_rate: float = 500.0) -> Stats:
    """Run the fleet until ``stop`` is set (or ``seconds`` passed), printing a progress line
    every ``progress`` seconds (0: none)."""
    fleet = Fleet(url, interval, spike_chance=spike_chance, connect_rate=connect_rate)
    for i, c in enumerate(creds):
        fleet.add(c, i)
    fleet.start()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds if seconds else None
    tty = sys.stdout.isatty()
    try:
        while not stop.is_set() and (deadline is None or loop.time() < deadline):
            try:
                await asyncio.wait_for(stop.wait(), progress or 1.0)
            except TimeoutError:
                pass
            if progress:
                print(("\r" if tty else "") + fleet.stats.line(), end="" if tty else "\n", flush=True)
    finally:
        await fleet.close()
        if progress and tty:
            print()
    return fleet.stats
