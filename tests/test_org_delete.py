"""Issue 6.2: deleting an organization removes and disconnects all of its broker logins
before it answers, and nothing of it is visible to a new organization of the same slug."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from lms_core.provisioning import DeviceCredentials
from tests.harness import ApiProcess, Device, Stack, stop_client, wait_until
from tests.test_api_access import User
from tests.test_security_takeover import connack


class Watcher:
    """A technician's subscriber: MQTT 5, its pinned client id, everything it receives."""

    def __init__(self, port: int, username: str, password: str, topic: str) -> None:
        self.messages: list[paho.MQTTMessage] = []
        self.disconnects: list[Any] = []
        self.subscribed = threading.Event()
        self.connected = threading.Event()
        c = self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=username, protocol=paho.MQTTv5,
                                      reconnect_on_failure=False)
        c.username_pw_set(username, password)
        c.on_connect = lambda cl, u, f, rc, p: (self.connected.set(), cl.subscribe(topic, qos=1))
        c.on_subscribe = lambda cl, u, mid, rcs, p: self.subscribed.set()
        c.on_message = lambda cl, u, m: self.messages.append(m)
        c.on_disconnect = lambda cl, u, f, rc, p: self.disconnects.append(rc)
        c.connect("127.0.0.1", port)
        c.loop_start()
        assert self.subscribed.wait(10), "no SUBACK"

    def stop(self) -> None:
        stop_client(self.client)


def device_id(stack: Stack, org: str, device: str) -> int:
    return stack.scalar("SELECT d.id FROM devices d JOIN organizations o ON o.id = d.org_id "
                        "WHERE o.slug = $1 AND d.slug = $2", org, device)


def test_deleted_org_logins_are_gone_and_a_new_org_of_the_same_slug_sees_nothing_of_it(
        api: ApiProcess, stack: Stack, unique: str) -> None:
    port = stack.mq.port
    first = User(api, f"{unique}-first@example.com")
    assert first.call("POST", "/api/v1/orgs", {"slug": unique}).status_code == 201
    old_creds = DeviceCredentials(**first.call("POST", f"/api/v1/orgs/{unique}/devices", {"slug": "d1"}
                                               ).json()["credentials"])
    old_tech = first.call("POST", f"/api/v1/orgs/{unique}/mqtt-credentials", {}).json()

    old_dev = Device(port, old_creds, will=True)
    assert old_dev.connect().value == 0
    old_dev.client.publish(f"{old_creds.topic_prefix}/status", "online", qos=1, retain=True).wait_for_publish(5)
    old_dev.publish_wait("telemetry", json.dumps({"temp": 1}))
    old_dev.publish_wait("telemetry", b"not json at all")  # quarantined, for the old organization
    old_id = device_id(stack, unique, "d1")
    wait_until(lambda: stack.scalar("SELECT count(*) FROM readings WHERE device_id = $1", old_id) == 1, 15,
               "the old device's reading (its id now in the bridge's cache)")
    wait_until(lambda: first.call("GET", f"/api/v1/orgs/{unique}/quarantine").json()["items"], 15,
               "the old organization's quarantine row")
    old_watch = Watcher(port, old_tech["username"], old_tech["password"], f"lms/{unique}/#")

    old_org = stack.scalar("SELECT id FROM organizations WHERE slug = $1", unique)
    assert first.call("DELETE", f"/api/v1/orgs/{unique}").status_code == 204
    # A bridge batch that resolved the organization just before the delete writes its
    # quarantine row just after: it must stay the old organization's.
    stack.query("INSERT INTO quarantine (topic, payload, reason, org_slug, device_slug, org_id) "
                "VALUES ($1, 'x', 'late', $2, 'd1', $3)", f"lms/{unique}/d1/telemetry", unique, old_org)
    # Done before the answer: both connected logins were kicked, neither can come back.
    wait_until(lambda: old_dev.disconnects and old_watch.disconnects, 5, "the old logins to be disconnected")
    old_dev.stop()
    old_watch.stop()
    assert connack(port, old_creds.username, old_creds.password, old_creds.client_id, clean=True) != 0
    assert connack(port, old_tech["username"], old_tech["password"], old_tech["username"], clean=True) != 0

    # Someone else takes the same slug, with a device and a technician of the same names.
    second = User(api, f"{unique}-second@example.com")
    assert second.call("POST", "/api/v1/orgs", {"slug": unique}).status_code == 201
    new_creds = DeviceCredentials(**second.call("POST", f"/api/v1/orgs/{unique}/devices", {"slug": "d1"}
                                                ).json()["credentials"])
    new_tech = second.call("POST", f"/api/v1/orgs/{unique}/mqtt-credentials", {}).json()
    assert connack(port, old_creds.username, old_creds.password, old_creds.client_id, clean=True) != 0
    assert connack(port, old_tech["username"], old_tech["password"], old_tech["username"], clean=True) != 0

    # The new owner's technician sees no retained message of the old organization.
    watch = Watcher(port, new_tech["username"], new_tech["password"], f"lms/{unique}/#")
    time.sleep(0.5)
    assert [(m.topic, m.payload) for m in watch.messages] == []

    # The new device's readings land under the new device (the bridge cached the old id).
    new_id = device_id(stack, unique, "d1")
    assert new_id != old_id
    new_dev = Device(port, new_creds)
    assert new_dev.connect().value == 0
    new_dev.publish_wait("telemetry", json.dumps({"temp": 2}))
    wait_until(lambda: stack.scalar("SELECT count(*) FROM readings WHERE device_id = $1", new_id) == 1, 15,
               "the new device's reading under the new device id")
    new_dev.close()
    watch.stop()

    # The new owner reads no quarantine row of the old organization.
    assert second.call("GET", f"/api/v1/orgs/{unique}/quarantine").json()["items"] == []
    for u in (first, second):
        u.client.close()


def test_a_device_recreated_under_the_same_slug_is_written_under_its_new_id(
        api: ApiProcess, stack: Stack, unique: str) -> None:
    port = stack.mq.port
    owner = User(api, f"{unique}@example.com")
    assert owner.call("POST", "/api/v1/orgs", {"slug": unique}).status_code == 201
    old_creds = DeviceCredentials(**owner.call("POST", f"/api/v1/orgs/{unique}/devices", {"slug": "d1"}
                                               ).json()["credentials"])
    old = Device(port, old_creds)
    assert old.connect().value == 0
    old.client.publish(f"{old_creds.topic_prefix}/status", "online", qos=1, retain=True).wait_for_publish(5)
    old.publish_wait("telemetry", json.dumps({"temp": 1}))
    old_id = device_id(stack, unique, "d1")
    wait_until(lambda: stack.scalar("SELECT count(*) FROM readings WHERE device_id = $1", old_id) == 1, 15,
               "the old device's reading (its id now in the bridge's cache)")

    assert owner.call("DELETE", f"/api/v1/orgs/{unique}/devices/d1").status_code == 204
    wait_until(lambda: old.disconnects, 5, "the deleted device to be disconnected")
    old.stop()
    new_creds = DeviceCredentials(**owner.call("POST", f"/api/v1/orgs/{unique}/devices", {"slug": "d1"}
                                               ).json()["credentials"])
    tech = owner.call("POST", f"/api/v1/orgs/{unique}/mqtt-credentials", {}).json()
    watch = Watcher(port, tech["username"], tech["password"], f"lms/{unique}/#")
    time.sleep(0.5)
    assert [(m.topic, m.payload) for m in watch.messages] == []  # no retained status of the old device
    watch.stop()
    new_id = device_id(stack, unique, "d1")
    new = Device(port, new_creds)
    assert new.connect().value == 0
    new.publish_wait("telemetry", json.dumps({"temp": 2}))
    wait_until(lambda: stack.scalar("SELECT count(*) FROM readings WHERE device_id = $1", new_id) == 1, 15,
               "the new device's reading under the new device id")
    new.close()
    owner.client.close()
