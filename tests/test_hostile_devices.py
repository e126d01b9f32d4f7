"""What one device (with its own valid credentials) can do to the bridge.

Each test runs on a stack of its own: the misbehaviour tried here used to disconnect or kill the
bridge, which would disturb the shared stack's other tests.
"""

from __future__ import annotations

import json
import threading
import time

from tests.harness import Device, Stack, wait_until


def _device_rows(s: Stack, org: str, dev: str) -> int:
    return int(s.scalar(
        "SELECT count(*) FROM readings r JOIN devices d ON d.id = r.device_id "
        "JOIN organizations o ON o.id = d.org_id WHERE o.slug = $1 AND d.slug = $2", org, dev))


def _quarantined(s: Stack, org: str, dev: str) -> int:
    return int(s.scalar("SELECT count(*) FROM quarantine WHERE org_slug = $1 AND device_slug = $2", org, dev))


def test_huge_integer_ts_is_quarantined_and_does_not_kill_the_bridge(own_stack: Stack, unique: str) -> None:
    """A ts of a few hundred digits decodes (msgspec gives a Python int) but ``ts / 1000.0``
    raises OverflowError, which is not ``Rejected``: Store.build raises, Ingest.run raises,
    the bridge exits; the unacknowledged message is redelivered at every restart (poison
    message: ingestion stops for every device)."""
    s = own_stack
    bridge = s.start_bridge("rv-bridge")
    dev = Device(s.mq.port, s.create_device(unique, "evil"))
    assert dev.connect().value == 0
    huge = "9" * 400
    dev.publish_wait("telemetry", f'{{"ts": {huge}, "values": {{"a": 1}}}}')
    dev.publish_wait("events", f'{{"type": "boot", "ts": -{huge}}}')
    dev.publish_wait("telemetry", json.dumps({"ts": int(time.time() * 1000), "values": {"good": 1}}))
    try:
        wait_until(lambda: _device_rows(s, unique, "evil") >= 1 or bridge.proc.poll() is not None, 15,
                   "the good reading (or the bridge's death)")
    finally:
        dev.close()
    assert bridge.proc.poll() is None, "bridge died: " + bridge.log_text()[-1500:]
    assert _device_rows(s, unique, "evil") == 1
    wait_until(lambda: _quarantined(s, unique, "evil") == 2, 5, "both bad messages in quarantine")


def test_qos0_publish_does_not_disconnect_the_bridge(own_stack: Stack, unique: str) -> None:
    """A QoS 0 message reaches the bridge with packet id 0; Ingest acknowledges every
    message of the batch with a raw PUBACK, including ``PUBACK 0``, which Mosquitto treats
    as a protocol error and drops the bridge's connection. Any device can do this at will."""
    s = own_stack
    bridge = s.start_bridge("rv-bridge")
    dev = Device(s.mq.port, s.create_device(unique, "q0"))
    assert dev.connect().value == 0
    dev.client.publish(f"{dev.creds.topic_prefix}/telemetry", json.dumps({"q0": 1}), qos=0)
    wait_until(lambda: _device_rows(s, unique, "q0") == 1, 10, "the QoS 0 reading")
    time.sleep(1.0)
    dev.close()
    assert "disconnected from" not in bridge.log_text(), bridge.log_text()[-1500:]


def test_qos0_from_one_device_does_not_double_another_devices_readings(
        own_stack: Stack, unique: str) -> None:
    """Consequence of the above: the PUBACKs written after ``PUBACK 0`` in the same write are
    lost with the connection, the broker redelivers those (already committed) messages, and
    flat payloads of an innocent device are stored twice with a second receipt time."""
    s = own_stack
    s.start_bridge("rv-bridge", LMS_BRIDGE_FLUSH_MS="20")
    victim = Device(s.mq.port, s.create_device(unique, "victim"))
    evil = Device(s.mq.port, s.create_device(unique, "evil"))
    assert victim.connect().value == 0 and evil.connect().value == 0
    n = 2000
    stop = threading.Event()

    def poke() -> None:
        while not stop.wait(0.05):
            evil.client.publish(f"{evil.creds.topic_prefix}/telemetry", '{"x": 1}', qos=0)

    t = threading.Thread(target=poke, daemon=True)
    t.start()
    try:
        victim.publish_many([json.dumps({"seq": i}).encode() for i in range(n)], window=300, timeout=40)
    finally:
        stop.set()
        t.join(5)
    time.sleep(3)  # redeliveries arrive now
    victim.close()
    evil.close()
    assert _device_rows(s, unique, "victim") == n


def test_retained_telemetry_and_status_are_not_replayed_at_each_bridge_restart(
        stack_without_retain_plugin: Stack, unique: str) -> None:
    """The bridge subscribes again (MQTT 3.1.1) at every connection, so the broker resends every
    retained message on its topics each time. The bridge ignores ``msg.retain``: a retained flat
    telemetry message becomes a new reading at every bridge restart/reconnect, and the retained
    status (retained by design) becomes a new status event and resets status_changed_at.
    On a broker without the lms_retain plugin, which refuses the retained telemetry itself."""
    s = stack_without_retain_plugin
    bridge = s.start_bridge("rv-bridge")
    dev = Device(s.mq.port, s.create_device(unique, "ret"))
    assert dev.connect().value == 0
    dev.client.publish(f"{dev.creds.topic_prefix}/telemetry", json.dumps({"temp": 20}), qos=1, retain=True)
    dev.client.publish(f"{dev.creds.topic_prefix}/status", "online", qos=1, retain=True)
    wait_until(lambda: _device_rows(s, unique, "ret") == 1, 10, "the reading")
    wait_until(lambda: s.scalar("SELECT count(*) FROM events WHERE type = 'status'") == 1, 10, "status event")
    changed = s.scalar("SELECT status_changed_at FROM devices WHERE slug = 'ret'")
    dev.close()  # clean disconnect: no will
    time.sleep(0.5)
    bridge.stop()
    bridge.start()
    time.sleep(2)
    assert _device_rows(s, unique, "ret") == 1, "retained telemetry stored again after a bridge restart"
    assert s.scalar("SELECT count(*) FROM events WHERE type = 'status'") == 1, "status event replayed"
    assert s.scalar("SELECT status_changed_at FROM devices WHERE slug = 'ret'") == changed
