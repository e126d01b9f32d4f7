"""Issue 6.1: no broker login the platform makes can present another login's client id.

Mosquitto hands an existing session to whoever connects with its client id: a login that
may choose its id could take the bridge's persistent session (and acknowledge, so lose,
its backlog), or a device's (and kick the device). Every login is pinned to its own id.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from lms_core.broker import BrokerAdmin
from lms_core.topics import TopicScheme
from tests.harness import Device, Stack, stamped, stop_client, wait_until

NOT_AUTHORIZED = 0x87


def connack(port: int, username: str, password: str, client_id: str, *, clean: bool) -> int:
    """Connect with MQTT 5 as ``username`` presenting ``client_id``; return the CONNACK
    reason code (0 = accepted). An accepted connection is closed at once."""
    got = threading.Event()
    result: dict[str, Any] = {}
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5,
                    reconnect_on_failure=False)
    c.username_pw_set(username, password)

    def on_connect(cl: Any, u: Any, flags: Any, reason: Any, props: Any) -> None:
        result["rc"] = reason.value
        got.set()

    c.on_connect = on_connect
    c.connect("127.0.0.1", port, clean_start=clean)
    c.loop_start()
    try:
        assert got.wait(10), "no CONNACK"
        if result["rc"] == 0:
            c.disconnect()
    finally:
        stop_client(c)
    return int(result["rc"])


def watch_login(stack: Stack, password: str) -> str:
    async def run() -> str:
        async with BrokerAdmin(stack.mqtt_url, TopicScheme()) as admin:
            return await admin.ensure_watch(password)

    return asyncio.run(run())


def test_no_login_can_take_over_the_bridge_or_another_login(own_stack: Stack) -> None:
    s = own_stack
    bridge = s.start_bridge("lms-bridge-1")
    d1 = s.create_device("takeover-a", "d1")
    d2 = s.create_device("takeover-b", "d2")
    org_a = s.scalar("SELECT id FROM organizations WHERE slug = 'takeover-a'")
    org_b = s.scalar("SELECT id FROM organizations WHERE slug = 'takeover-b'")
    _, tech_a, tech_a_pw = asyncio.run(s._provision("create_technician", org_a, "takeover-a", "t", None, None))
    _, tech_b, _ = asyncio.run(s._provision("create_technician", org_b, "takeover-b", "t", None, None))
    watch = watch_login(s, "watch-password-0123456789")
    assert watch_login(s, "watch-password-0123456789") == watch  # idempotent
    port = s.mq.port

    # A backlog queued in the bridge's persistent session while it is away.
    bridge.stop()
    dev = Device(port, d1)
    assert dev.connect().value == 0
    n = 50
    dev.publish_many([stamped(i) for i in range(n)])

    logins = {
        "device": (d1.username, d1.password, d1.client_id),
        "technician": (tech_a, tech_a_pw, tech_a),
        "watch": (watch, "watch-password-0123456789", watch),
    }
    for kind, (user, pw, own_id) in logins.items():
        # Each login works with its own id ...
        if kind != "device":  # (the device is online with its id; connecting again would kick it)
            assert connack(port, user, pw, own_id, clean=True) == 0, kind
        # ... and with no other: the bridge's, another device's, another technician's.
        for victim in ("lms-bridge-1", d2.client_id, tech_b):
            for clean in (True, False):
                rc = connack(port, user, pw, victim, clean=clean)
                assert rc == NOT_AUTHORIZED, f"{kind} login connected as {victim!r} (clean={clean}): {rc:#x}"
    assert not dev.disconnects, "the device was kicked"
    dev.close()

    # The bridge comes back to its whole backlog: nothing was taken, acknowledged or wiped.
    s.start_bridge("lms-bridge-1")
    dev_id = s.scalar("SELECT d.id FROM devices d JOIN organizations o ON o.id = d.org_id "
                      "WHERE o.slug = 'takeover-a' AND d.slug = 'd1'")
    wait_until(lambda: s.scalar("SELECT count(*) FROM readings WHERE device_id = $1", dev_id) == n, 30,
               f"all {n} backlog readings")


def test_reconcile_pins_a_technician_client_left_without_its_client_id(own_stack: Stack) -> None:
    s = own_stack
    s.create_device("pin", "d1")
    org = s.scalar("SELECT id FROM organizations WHERE slug = 'pin'")
    _, tech, pw = asyncio.run(s._provision("create_technician", org, "pin", "t", None, None))

    async def unpin() -> None:
        async with BrokerAdmin(s.mqtt_url, TopicScheme()) as admin:
            await admin.execute([{"command": "modifyClient", "username": tech, "clientid": ""}])

    asyncio.run(unpin())  # as a broker state from before the pinning would have it
    assert connack(s.mq.port, tech, pw, "lms-bridge-1", clean=True) == 0
    counts = asyncio.run(s._provision("reconcile"))
    assert counts["acl_fixed"] >= 1
    assert connack(s.mq.port, tech, pw, "lms-bridge-1", clean=True) == NOT_AUTHORIZED
    assert connack(s.mq.port, tech, pw, tech, clean=True) == 0
