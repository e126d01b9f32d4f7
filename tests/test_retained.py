"""Issue 6.7: a device cannot fill the broker with retained messages.

Only ``status`` (the device's, retained by design) and ``config`` (the platform's,
cloud->device, retained by design) keep a retained message. The broker plugin lms_retain
refuses the others at publish time (tests/test_retain_plugin.py); behind it, the bridge's
janitor clears any a device leaves where the plugin is not loaded (compose.yaml without
its plugin build), including those retained before the bridge started: tested here on a
broker without the plugin.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from tests.harness import Device, Stack, stop_client, wait_until

BIG = b"x" * 200_000


def retained_now(stack: Stack, topic: str) -> dict[str, bytes]:
    """What a fresh subscriber to ``topic`` receives as retained messages."""
    got: dict[str, bytes] = {}
    subscribed = threading.Event()
    url = stack.mqtt_url
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"fresh-{time.monotonic_ns()}")
    c.username_pw_set(url.username, url.password)

    def on_message(cl: Any, u: Any, m: paho.MQTTMessage) -> None:
        if m.retain:
            got[m.topic] = m.payload

    c.on_message = on_message
    c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(topic, qos=1)
    c.on_subscribe = lambda cl, u, mid, rcs, p: subscribed.set()
    c.connect("127.0.0.1", stack.mq.port)
    c.loop_start()
    try:
        assert subscribed.wait(10)
        time.sleep(1.0)  # the replay follows the SUBACK
    finally:
        c.disconnect()
        stop_client(c)
    return got


def test_retained_messages_outside_status_are_cleared(stack_without_retain_plugin: Stack) -> None:
    s = stack_without_retain_plugin
    creds = s.create_device("ret", "d1")
    prefix = creds.topic_prefix
    dev = Device(s.mq.port, creds)
    assert dev.connect().value == 0
    # Retained while no bridge runs: cleared when one starts.
    for kind in ("telemetry", "events", "commands/early/result"):
        dev.client.publish(f"{prefix}/{kind}", BIG, qos=1, retain=True).wait_for_publish(10)
    assert len(retained_now(s, "lms/ret/#")) == 3

    bridge = s.start_bridge("lms-bridge-1", LMS_BRIDGE_RETAINED_SWEEP_S="1")
    n = 20
    for i in range(n):
        dev.client.publish(f"{prefix}/commands/{i}/result", BIG, qos=1, retain=True).wait_for_publish(10)
    for kind in ("telemetry", "events", "config/reported"):
        dev.client.publish(f"{prefix}/{kind}", BIG, qos=1, retain=True).wait_for_publish(10)
    good = json.dumps({"ts": int(time.time() * 1000), "values": {"temp": 21.5}})
    dev.client.publish(f"{prefix}/telemetry", good, qos=1, retain=True).wait_for_publish(10)
    dev.client.publish(f"{prefix}/status", "online", qos=1, retain=True).wait_for_publish(10)
    # The platform's desired config, retained by design.

    def publish_config() -> None:
        url = s.mqtt_url
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"cfg-{time.monotonic_ns()}")
        c.username_pw_set(url.username, url.password)
        c.connect("127.0.0.1", s.mq.port)
        c.loop_start()
        c.publish(f"{prefix}/config", '{"version": 1}', qos=1, retain=True).wait_for_publish(10)
        c.disconnect()
        stop_client(c)

    publish_config()
    expected = {f"{prefix}/status": b"online", f"{prefix}/config": b'{"version": 1}'}
    wait_until(lambda: retained_now(s, "lms/ret/#") == expected, 30,
               "only status and config to stay retained", interval=0.5)
    # Every topic that held one was cleared at least once (telemetry, events, n + 1 results, reported).
    assert bridge.metric("lms_bridge_retained_cleared_total") >= 2 + n + 1 + 1

    # The good telemetry was stored once, and the janitor's clearing left no quarantine
    # row (an empty message on a topic it cleared is recognised). A message published
    # after the clearing is stored after it: the barrier for the check below.
    dev_id = s.scalar("SELECT id FROM devices WHERE slug = 'd1'")
    dev.publish_wait("telemetry", json.dumps({"ts": int(time.time() * 1000) + 1, "values": {"temp": 22}}))
    wait_until(lambda: s.scalar("SELECT count(*) FROM readings WHERE device_id = $1 AND metric = 'temp'",
                                dev_id) == 2, 15, "both good readings")
    assert s.scalar("SELECT count(*) FROM quarantine WHERE payload = ''") == 0
    dev.close()
