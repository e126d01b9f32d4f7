"""Broker access control: each device reaches only its own topics; disabled devices are out."""

from __future__ import annotations

import asyncio
import json
import time

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from lms_core.broker import BrokerAdmin
from lms_core.provisioning import DeviceCredentials
from lms_core.topics import TopicScheme
from tests.harness import Device, Stack, stop_client, wait_until

NOT_AUTHORIZED = 0x87


def test_device_cannot_publish_to_another_devices_topics(stack: Stack, unique: str) -> None:
    a = Device(stack.mq.port, stack.create_device(unique, "a"), protocol=paho.MQTTv5)
    b_creds = stack.create_device(unique, "b")
    other_org = stack.create_device(f"{unique}-other", "a")
    assert a.connect().value == 0
    # MQTT 5 tells the publisher: PUBACK reason "not authorized".
    for topic in (f"{b_creds.topic_prefix}/telemetry", f"{b_creds.topic_prefix}/status",
                  f"{other_org.topic_prefix}/telemetry", f"lms/{unique}/a/commands/1",
                  f"lms/{unique}/a/config", f"lms/{unique}/a/alerts", "lms/x", "$SYS/x",
                  "$CONTROL/dynamic-security/v1"):
        info = a.client.publish(topic, json.dumps({"v": 1}), qos=1)
        wait_until(lambda i=info: i.mid in a.acked, 5, f"PUBACK for {topic}")
        assert a.puback_reasons[info.mid] == NOT_AUTHORIZED, topic
    # ... and its own topics are allowed.
    for kind in ("telemetry", "events", "status", "config/reported", "commands/17/result"):
        payload = json.dumps({"type": "t"}) if kind == "events" else "online" if kind == "status" \
            else json.dumps({"v": 1})
        assert a.publish_wait(kind, payload) < 0x80, kind  # 0 or 0x10 "no matching subscribers"
    time.sleep(0.5)
    stored = stack.scalar("SELECT count(*) FROM readings r JOIN devices d ON d.id = r.device_id "
                          "JOIN organizations o ON o.id = d.org_id WHERE o.slug = $1 AND d.slug = 'b'", unique)
    assert stored == 0
    a.close()


def test_device_can_subscribe_only_to_its_commands_and_config(stack: Stack, unique: str) -> None:
    a = Device(stack.mq.port, stack.create_device(unique, "a"))
    stack.create_device(unique, "b")
    assert a.connect().value == 0
    allowed = [f"lms/{unique}/a/commands/#", f"lms/{unique}/a/config", f"lms/{unique}/a/commands/5"]
    denied = [f"lms/{unique}/b/commands/#", f"lms/{unique}/a/telemetry", f"lms/{unique}/+/commands/#",
              f"lms/{unique}/#", "lms/#", "#", "$share/g/lms/#", "$SYS/#", "$CONTROL/dynamic-security/#"]
    results = {}
    for f in allowed + denied:
        _, mid = a.client.subscribe(f, qos=1)
        results[f] = wait_until(lambda m=mid: a.suback.get(m), 5, f"SUBACK for {f}")
    for f in allowed:
        assert results[f] == [1], f
    for f in denied:
        assert results[f] == [0x80], f
    a.close()


def _client(port: int, creds: DeviceCredentials) -> tuple[paho.Client, list[object], list[object]]:
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=creds.client_id, reconnect_on_failure=False)
    c.username_pw_set(creds.username, creds.password)
    connacks: list[object] = []
    disconnects: list[object] = []
    c.on_connect = lambda cl, u, f, rc, p: connacks.append(rc)
    c.on_disconnect = lambda cl, u, f, rc, p: disconnects.append(rc)
    return c, connacks, disconnects


def test_disabled_device_is_disconnected_and_cannot_reconnect(stack: Stack, unique: str) -> None:
    creds = stack.create_device(unique, "dev-1")
    c, connacks, disconnects = _client(stack.mq.port, creds)
    c.connect("127.0.0.1", stack.mq.port)
    c.loop_start()
    wait_until(lambda: connacks, 5, "CONNACK")
    assert connacks[0].value == 0  # type: ignore[attr-defined]
    stack.set_enabled(unique, "dev-1", False)
    wait_until(lambda: disconnects, 5, "the broker to disconnect the disabled device")
    stop_client(c)
    assert stack.scalar("SELECT enabled FROM devices d JOIN organizations o ON o.id = d.org_id "
                        "WHERE o.slug = $1 AND d.slug = 'dev-1'", unique) is False

    c2, connacks2, _ = _client(stack.mq.port, creds)
    c2.connect("127.0.0.1", stack.mq.port)
    c2.loop_start()
    wait_until(lambda: connacks2, 5, "CONNACK")
    stop_client(c2)
    assert connacks2[0].is_failure  # type: ignore[attr-defined]

    stack.set_enabled(unique, "dev-1", True)
    c3, connacks3, _ = _client(stack.mq.port, creds)
    c3.connect("127.0.0.1", stack.mq.port)
    c3.loop_start()
    wait_until(lambda: connacks3, 5, "CONNACK")
    assert connacks3[0].value == 0  # type: ignore[attr-defined]
    c3.disconnect()
    stop_client(c3)


def test_wrong_password_or_client_id_is_refused_and_anonymous_too(stack: Stack, unique: str) -> None:
    creds = stack.create_device(unique, "dev-1")
    for user, password, cid in ((creds.username, "wrong", creds.client_id),
                                (creds.username, creds.password, "someone-else"),
                                (None, None, "anon")):
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=cid)
        if user:
            c.username_pw_set(user, password)
        got: list[object] = []
        c.on_connect = lambda cl, u, f, rc, p, got=got: got.append(rc)
        c.connect("127.0.0.1", stack.mq.port)
        c.loop_start()
        wait_until(lambda got=got: got, 5, "CONNACK")
        stop_client(c)
        assert got[0].is_failure, (user, cid)  # type: ignore[attr-defined]


def test_reconcile_rebuilds_lost_broker_credentials(own_stack: Stack, unique: str) -> None:
    """The database is the source of truth: a broker that lost its state gets the devices back
    (same passwords, same disabled state) when a bridge starts; unknown device clients go."""
    s = own_stack
    creds = s.create_device(unique, "keep")
    off_creds = s.create_device(unique, "off")
    s.set_enabled(unique, "off", False)
    # Lose the broker's state: a fresh dynamic-security file with only the service account.
    s.mq.stop()
    s.mq.dynsec_path.unlink()
    (s.mq.workdir / "mosquitto.db").unlink(missing_ok=True)
    s.mq.init()
    s.mq.start()
    dev = Device(s.mq.port, creds)
    assert dev.connect().is_failure
    dev.stop()
    # A device client the database does not know (left over, or made by hand).
    stray = DeviceCredentials("stray.dev", "pw-stray-000000000000000000000000", "stray.dev", "lms/stray/dev", "")

    async def add_stray() -> None:
        async with BrokerAdmin(s.mqtt_url, TopicScheme()) as admin:
            await admin.create_device("stray", "dev", stray.password)

            # A client made by hand that merely looks like one is not the platform's to delete.
            await admin.execute([{"command": "createClient", "username": "jane.doe", "password": "jane-pw"}])

    asyncio.run(add_stray())
    assert Device(s.mq.port, stray).connect().value == 0

    s.start_bridge()
    dev = Device(s.mq.port, creds)
    assert dev.connect().value == 0
    dev.publish_wait("telemetry", json.dumps({"t": 1}))
    wait_until(lambda: s.scalar("SELECT count(*) FROM readings") == 1, 10, "the reading")
    dev.close()
    for c in (off_creds, stray):
        d = Device(s.mq.port, c)
        assert d.connect().is_failure, c.username
        d.stop()
    jane = Device(s.mq.port, DeviceCredentials("jane.doe", "jane-pw", "jane", "", ""))
    assert jane.connect().value == 0
    jane.close()
