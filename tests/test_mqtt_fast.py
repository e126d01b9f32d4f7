"""The asyncio receiver (lms_core/mqtt_fast.py): its parser at every byte boundary, hostile
input, and its session against the real Mosquitto (reconnect, acknowledgement, flow control)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import struct
import termios
import time

import pytest

from lms_core.errors import BrokerError, BrokerUnavailable
from lms_core.mqtt_fast import (
    CONNACK,
    PINGRESP,
    PUBACK,
    PUBLISH,
    SUBACK,
    UNSUBACK,
    FastMessage,
    FastMqttClient,
    PacketReader,
    ProtocolViolation,
    publish_packet,
)
from lms_core.settings import MqttUrl
from tests.harness import Device, Stack, wait_until


def _stream() -> tuple[bytes, list[object]]:
    """Bytes a broker could send, and what the reader must make of them."""
    big = bytes(range(256)) * 80  # 20,480 bytes: a 3-byte remaining length
    packets = [
        b"\x20\x02\x01\x00",  # CONNACK, session present
        b"\x90\x04\x00\x01\x01\x80",  # SUBACK pid 1: granted 1, refused
        publish_packet("lms/a/d/telemetry", b'{"t":1}', 0, False, 0),
        publish_packet("lms/a/d/status", b"online", 1, True, 65535),
        publish_packet("lms/a/d/telemetry", big, 1, False, 2),
        publish_packet("lms/ä/d/events", b"", 1, False, 3),  # empty payload, non-ASCII topic
        b"\xb0\x02\x00\x05",  # UNSUBACK pid 5
        b"\xd0\x00",  # PINGRESP
        b"\x40\x02\x01\x02",  # PUBACK pid 258
    ]
    expected: list[object] = [
        (CONNACK, 0, b"\x01\x00"), (SUBACK, 0, b"\x00\x01\x01\x80"),
        ("lms/a/d/telemetry", b'{"t":1}', 0, 0, False), ("lms/a/d/status", b"online", 65535, 1, True),
        ("lms/a/d/telemetry", big, 2, 1, False), ("lms/ä/d/events", b"", 3, 1, False),
        (UNSUBACK, 0, b"\x00\x05"), (PINGRESP, 0, b""), (PUBACK, 0, b"\x01\x02"),
    ]
    return b"".join(packets), expected


def _plain(items: list[FastMessage | tuple[int, int, bytes]]) -> list[object]:
    return [(p.topic, p.payload, p.mid, p.qos, p.retain) if isinstance(p, FastMessage) else p for p in items]


def test_reader_gives_the_same_packets_whatever_the_split() -> None:
    data, expected = _stream()
    reader = PacketReader()
    assert _plain(reader.feed(data)) == expected
    # Byte by byte.
    got = []
    for i in range(len(data)):
        got += reader.feed(data[i:i + 1])
    assert _plain(got) == expected
    # Split in two at every byte boundary.
    for cut in range(len(data) + 1):
        reader = PacketReader()
        assert _plain(reader.feed(data[:cut]) + reader.feed(data[cut:])) == expected, cut


def test_reader_hands_a_publish_with_a_non_utf8_topic_back_as_undecodable_and_goes_on() -> None:
    bad = b"\x32" + bytes((2 + 4 + 2 + 2,)) + b"\x00\x04lms\xff" + b"\x00\x07" + b"{}"
    nul = publish_packet("lms/\x00/x", b"{}", 1, False, 8)
    good = publish_packet("lms/a/d/telemetry", b"{}", 1, False, 9)
    reader = PacketReader()
    out = []
    for b in bad + nul + good:  # and at every boundary
        out += reader.feed(bytes((b,)))
    assert _plain(out) == [(PUBLISH, 7, b""), (PUBLISH, 8, b""), ("lms/a/d/telemetry", b"{}", 9, 1, False)]


@pytest.mark.parametrize("data", [
    b"\x30\xff\xff\xff\xff\x01",  # remaining length of 5 bytes
    b"\x30\x02\x00\x05",  # topic longer than the packet
    b"\x32\x04\x00\x02ab",  # QoS 1 without a packet id
    b"\x36\x05\x00\x01a\x00\x01",  # QoS 3
])
def test_reader_refuses_broken_framing(data: bytes) -> None:
    with pytest.raises(ProtocolViolation):
        PacketReader().feed(data)


def test_reader_refuses_a_packet_over_its_limit_before_buffering_it() -> None:
    reader = PacketReader(max_packet=1000)
    with pytest.raises(ProtocolViolation):
        reader.feed(b"\x30\xe9\x07\x00")  # claims 1001 bytes


async def test_a_hostile_publish_is_dropped_and_acknowledged_and_the_session_lives_on() -> None:
    """A broker that sends a non-UTF-8 topic (Mosquitto refuses one from a publisher, so this
    broker is a fault injected at the edge: a TCP server speaking just enough MQTT)."""
    received_by_broker = bytearray()
    served = asyncio.Event()

    async def broker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)  # CONNECT
        bad = b"\x32" + bytes((2 + 4 + 2 + 2,)) + b"\x00\x04lms\xff" + b"\x00\x07" + b"{}"
        writer.write(b"\x20\x02\x00\x00" + bad + publish_packet("lms/a/d/telemetry", b"{}", 1, False, 8))
        await writer.drain()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                while len(received_by_broker) < 4:
                    received_by_broker.extend(await reader.read(1024))
        served.set()
        with contextlib.suppress(ConnectionError):
            await reader.read(1024)
        writer.close()

    server = await asyncio.start_server(broker, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    got: list[FastMessage] = []
    try:
        async with FastMqttClient(MqttUrl.parse(f"mqtt://u:p@127.0.0.1:{port}"), manual_ack=True,
                                  on_message=got.append, name="probe") as client:
            await asyncio.wait_for(served.wait(), 5)
            assert [(m.topic, m.mid) for m in got] == [("lms/a/d/telemetry", 8)]
            assert client.dropped == 1 and client.connected
            assert bytes(received_by_broker[:4]) == struct.pack(">BBH", 0x40, 2, 7)  # only the dropped one
    finally:
        server.close()
        await server.wait_closed()


async def _collect(got: list[FastMessage], n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(got) < n:
        assert time.monotonic() < deadline, f"{len(got)} of {n} messages"
        await asyncio.sleep(0.02)


async def test_session_against_mosquitto_never_acknowledges_on_a_new_connection(stack: Stack, unique: str) -> None:
    topic = f"lms/{unique}/dev/telemetry"
    cid = f"fast-{unique}"
    got: list[FastMessage] = []
    connects: list[bool] = []
    async with FastMqttClient(stack.mqtt_url, client_id=cid, persistent=True, manual_ack=True, reconnect=True,
                              on_message=got.append, on_connect=connects.append, name="probe") as sub, \
            FastMqttClient(stack.mqtt_url, name="publisher") as pub:
        assert await sub.subscribe([topic], qos=1) == [1]
        for i in range(50):
            pub.publish_nowait(topic, f"{i}".encode(), qos=1)
        await pub.publish(topic, b"last", qos=1)
        await _collect(got, 51, 10)
        assert [m.payload for m in got[:3]] == [b"0", b"1", b"2"] and all(m.qos == 1 for m in got)
        first = sub.generation
        old = [m.mid for m in got]
        # The connection drops with all 51 unacknowledged (a fault injected at the socket).
        assert sub._wire is not None and sub._wire.transport is not None
        sub._wire.transport.abort()
        deadline = time.monotonic() + 10
        while not (sub.connected and sub.generation == first + 1):
            assert time.monotonic() < deadline, "no reconnect"
            await asyncio.sleep(0.02)
        assert connects == [False, True]  # the persistent session was kept
        assert sub.ack_many(old, first) == 0  # never on the new connection
        await _collect(got, 102, 10)  # all redelivered
        assert sorted(m.payload for m in got[51:]) == sorted(m.payload for m in got[:51])
        assert sub.ack_many([m.mid for m in got[51:]], sub.generation) == 51
        await sub.barrier()
    # Everything acknowledged on the second connection: a third one gets nothing back.
    again: list[FastMessage] = []
    async with FastMqttClient(stack.mqtt_url, client_id=cid, persistent=True, manual_ack=True,
                              on_message=again.append, name="probe") as sub:
        await sub.barrier()
        await asyncio.sleep(0.3)
        assert again == []
        await sub.unsubscribe([topic])


def _unread(client: FastMqttClient) -> int:
    """Bytes waiting in the client's kernel receive buffer."""
    assert client._wire is not None and client._wire.transport is not None
    sock = client._wire.transport.get_extra_info("socket")
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


async def test_pause_reading_stops_the_broker_and_resume_takes_the_rest(stack: Stack, unique: str) -> None:
    topic = f"lms/{unique}/dev/telemetry"
    got: list[FastMessage] = []
    total = 1500
    payload = b"x" * 20_000  # 30 MB in all: far more than the socket buffers hold
    async with FastMqttClient(stack.mqtt_url, client_id=f"fast-{unique}", on_message=got.append,
                              name="probe") as sub, FastMqttClient(stack.mqtt_url, name="publisher") as pub:
        await sub.subscribe([topic], qos=1)
        sub.pause_reading()
        for _ in range(0, total, 100):
            await asyncio.gather(*(pub.publish(topic, payload, qos=1) for _ in range(100)))
        await asyncio.sleep(0.5)
        assert got == []  # nothing is read while paused
        # TCP flow control: the broker stopped sending once the buffers were full.
        held = _unread(sub)
        await asyncio.sleep(0.5)
        assert _unread(sub) == held < total * len(payload) // 4
        sub.resume_reading()
        await _collect(got, total, 30)  # auto-acknowledged (manual_ack off): the broker sends the rest
        assert len(got) == total and all(m.payload == payload for m in got)


async def test_refused_subscription_and_bad_credentials(stack: Stack, unique: str) -> None:
    url = stack.mqtt_url
    bad = MqttUrl(url.host, url.port, url.username, "wrong", False)
    with pytest.raises(BrokerUnavailable, match="refused the connection"):
        async with FastMqttClient(bad, name="probe"):
            pass
    creds = await asyncio.to_thread(stack.create_device, unique, "dev")
    device = MqttUrl(url.host, url.port, creds.username, creds.password, False)
    async with FastMqttClient(device, client_id=creds.client_id, name="probe") as client:
        assert client.connected and client.generation == 1
        with pytest.raises(BrokerError, match="refused subscription to lms/other/x/commands/#"):
            await client.subscribe([f"{creds.topic_prefix}/commands/#", "lms/other/x/commands/#"], qos=1)


def test_a_backlog_of_flat_telemetry_drained_by_the_asyncio_bridge_keeps_every_reading(
        own_stack: Stack, unique: str) -> None:
    """Flat telemetry is stamped with its time of receipt and readings are unique per
    (device, metric, time). The asyncio receiver hands a backlog over at several messages of
    one device per microsecond: before receipt times were made strictly increasing, 2,000
    flat messages became ~800 readings."""
    s = own_stack
    bridge = s.start_bridge("fast-bridge", LMS_BRIDGE_RECEIVER="asyncio")
    assert bridge.stop() == 0  # the session and its subscription stay: a backlog queues up
    dev = Device(s.mq.port, s.create_device(unique, "flat"))
    assert dev.connect().value == 0
    n = 3000
    dev.publish_many([json.dumps({"seq": i}).encode() for i in range(n)], window=500, timeout=60)
    dev.close()
    bridge.start()
    wait_until(lambda: s.scalar("SELECT count(*) FROM readings") >= n, 30, f"{n} readings")
    time.sleep(0.5)
    assert s.scalar("SELECT count(*) FROM readings") == n
    assert s.scalar("SELECT count(DISTINCT value) FROM readings") == n
    assert bridge.metric("lms_bridge_dedup_batches_total") == 0
