"""The broker plugin lms_retain (mosquitto/plugin/lms_retain.c) refuses at publish time.

A device login may retain only its ``status``; a retained PUBLISH (or Will) anywhere else
under the topic root is refused by the broker before it is stored, so one device cannot
fill the broker's memory. The platform's service account still retains ``config`` and
clears retained messages. No bridge runs here: the janitor (bridge/retained.py) is not
what keeps these topics empty.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.harness import Device, Stack, stop_client, wait_until
from tests.test_retained import retained_now

#: Every device->cloud topic a device may publish to, except ``status``.
REFUSED_KINDS = ("telemetry", "events", "config/reported", "commands/x/result")
NOT_AUTHORIZED = 0x87


@pytest.fixture(scope="module")
def plugged(tmp_root: Path) -> Iterator[Stack]:
    """A broker with the plugin (as `lms up` starts it) and PostgreSQL; no bridge."""
    s = Stack(tmp_root / "retain-plugin").start()
    assert s.mq.retain_plugin
    yield s
    s.stop()


def service_client(s: Stack) -> paho.Client:
    url = s.mqtt_url
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"svc-{time.monotonic_ns()}")
    c.username_pw_set(url.username, url.password)
    c.connect("127.0.0.1", s.mq.port)
    c.loop_start()
    return c


def publish_acked(dev: Device, topic: str, payload: bytes | str, *, retain: bool, qos: int = 1) -> int:
    """Publish at QoS 1 and return the PUBACK's reason code (0 under MQTT 3.1.1)."""
    mid = dev.client.publish(topic, payload, qos=qos, retain=retain).mid
    with dev._lock:
        assert dev._lock.wait_for(lambda: mid in dev.acked, 10), f"no PUBACK for {topic}"
    return dev.puback_reasons.get(mid, 0)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("protocol", [paho.MQTTv311, paho.MQTTv5], ids=["mqtt311", "mqtt5"])
def test_device_cannot_retain_outside_status(plugged: Stack, unique: str, protocol: int) -> None:
    s = plugged
    creds = s.create_device(unique, "d1")
    prefix = creds.topic_prefix
    dev = Device(s.mq.port, creds, protocol=protocol)
    assert dev.connect().value == 0
    for kind in REFUSED_KINDS:
        reason = publish_acked(dev, f"{prefix}/{kind}", b"x" * 1000, retain=True)
        # MQTT 5 tells the device (0x87 not authorized); 3.1.1 has no reason codes.
        assert reason == (NOT_AUTHORIZED if protocol == paho.MQTTv5 else 0), kind
        dev.client.publish(f"{prefix}/{kind}", b"q0", qos=0, retain=True)
    # The device stays connected, and the same messages without the retain flag pass.
    # (MQTT 5 may answer 0x10, "no matching subscribers": a success, below 0x80.)
    for kind in REFUSED_KINDS:
        assert publish_acked(dev, f"{prefix}/{kind}", b"{}", retain=False) < 0x80, kind
    assert not dev.disconnects
    # A fresh subscriber (the service account, which may read everything) finds nothing.
    assert retained_now(s, f"lms/{unique}/#") == {}
    dev.close()


def test_a_refused_retained_message_is_not_delivered_either(plugged: Stack, unique: str) -> None:
    """Refused, not stripped: a live subscriber gets the plain message, not the retained one
    (a plugin cannot strip the flag in Mosquitto 2.0 without letting a Will through; see
    mosquitto/plugin/lms_retain.c)."""
    s = plugged
    creds = s.create_device(unique, "d1")
    got: list[bytes] = []
    subscribed = threading.Event()
    c = service_client(s)
    c.on_message = lambda cl, u, m: got.append(m.payload)
    c.on_subscribe = lambda cl, u, mid, rcs, p: subscribed.set()
    c.subscribe(f"{creds.topic_prefix}/telemetry", qos=1)
    try:
        assert subscribed.wait(10)
        dev = Device(s.mq.port, creds)
        assert dev.connect().value == 0
        publish_acked(dev, f"{creds.topic_prefix}/telemetry", b"retained", retain=True)
        publish_acked(dev, f"{creds.topic_prefix}/telemetry", b"plain", retain=False)
        wait_until(lambda: b"plain" in got, 10, "the plain message")
        assert got == [b"plain"]
        dev.close()
    finally:
        c.disconnect()
        stop_client(c)


def test_status_stays_retained_and_the_last_will_works(plugged: Stack, unique: str) -> None:
    s = plugged
    creds = s.create_device(unique, "d1")
    status = f"{creds.topic_prefix}/status"
    dev = Device(s.mq.port, creds, will=True)  # Will: retained "offline" on status, QoS 1
    assert dev.connect().value == 0
    assert publish_acked(dev, status, "online", retain=True) == 0
    assert retained_now(s, status) == {status: b"online"}
    # An unclean end of the connection: the broker sends the Will, retained.
    dev.client.loop_stop()
    sock = dev.client.socket()
    assert sock is not None
    sock.close()
    wait_until(lambda: retained_now(s, status) == {status: b"offline"}, 30, "the retained Last Will")
    dev.stop()


def test_a_retained_will_outside_status_is_dropped(plugged: Stack, unique: str) -> None:
    """The Will is checked (write, with its retain flag) when the broker sends it."""
    s = plugged
    creds = s.create_device(unique, "d1")
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=creds.client_id)
    c.username_pw_set(creds.username, creds.password)
    c.will_set(f"{creds.topic_prefix}/commands/w/result", b"x" * 10_000, qos=1, retain=True)
    connected = threading.Event()
    c.on_connect = lambda cl, u, f, rc, p: connected.set()
    c.connect("127.0.0.1", s.mq.port)
    c.loop_start()
    assert connected.wait(10)
    c.loop_stop()
    sock = c.socket()
    assert sock is not None
    sock.close()  # unclean: the Will is due
    time.sleep(1.0)
    assert retained_now(s, f"lms/{unique}/#") == {}
    stop_client(c)


def test_service_account_retains_config_and_clears_retained(plugged: Stack, unique: str) -> None:
    s = plugged
    creds = s.create_device(unique, "d1")
    config = f"{creds.topic_prefix}/config"
    status = f"{creds.topic_prefix}/status"
    dev = Device(s.mq.port, creds)
    assert dev.connect().value == 0
    assert publish_acked(dev, status, "online", retain=True) == 0
    dev.close()
    c = service_client(s)
    try:
        c.publish(config, '{"version": 1}', qos=1, retain=True).wait_for_publish(10)
        assert retained_now(s, f"lms/{unique}/#") == {config: b'{"version": 1}', status: b"online"}
        # An empty retained message deletes the retained one (how the platform clears).
        c.publish(config, b"", qos=1, retain=True).wait_for_publish(10)
        c.publish(status, b"", qos=1, retain=True).wait_for_publish(10)
        assert retained_now(s, f"lms/{unique}/#") == {}
    finally:
        c.disconnect()
        stop_client(c)


def test_a_retained_flood_does_not_grow_the_broker(plugged: Stack, unique: str) -> None:
    """300 retained 200 kB messages on as many topics would keep ~60 MB in the broker."""
    s = plugged
    assert s.mq.proc is not None
    creds = s.create_device(unique, "flood")
    dev = Device(s.mq.port, creds)
    assert dev.connect().value == 0
    big = b"x" * 200_000
    publish_acked(dev, f"{creds.topic_prefix}/commands/warm/result", big, retain=True)  # buffers warm
    before = rss_kib(s.mq.proc.pid)
    n = 300
    done = threading.Semaphore(0)
    dev.client.on_publish = lambda cl, u, mid, rc, p: done.release()
    for i in range(n):
        dev.client.publish(f"{creds.topic_prefix}/commands/{i}/result", big, qos=1, retain=True)
    for _ in range(n):
        assert done.acquire(timeout=60), "the flood was not acknowledged"
    growth_mib = (rss_kib(s.mq.proc.pid) - before) / 1024
    assert growth_mib < 30, f"broker RSS grew {growth_mib:.0f} MiB"
    assert retained_now(s, f"lms/{unique}/#") == {}
    dev.close()


def test_a_missing_or_stale_plugin_stops_the_broker_from_starting(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """No silent fallback to a broker without the plugin: one line saying how to build it."""
    from lms_cli import localstack
    from lms_cli.localstack import Mosquitto, StackError, free_port

    mq = Mosquitto(tmp_path / "mq", free_port(), "service-pw-0123456789")
    mq.init()
    monkeypatch.setattr(localstack, "RETAIN_PLUGIN", tmp_path / "build" / "lms_retain.so")
    with pytest.raises(StackError, match=r"not built: run \./lms .* bash mosquitto/plugin/build\.sh$"):
        mq.start()
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "lms_retain.so").write_bytes(b"")
    (tmp_path / "build" / "lms_retain.sha256").write_text("0" * 64 + "\n")
    with pytest.raises(StackError, match="older than its source"):
        mq.start()
    assert mq.proc is None
