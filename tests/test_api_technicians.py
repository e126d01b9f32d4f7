"""Technician MQTT credentials: read the organization with mosquitto_sub, nothing else."""

from __future__ import annotations

import json
import shlex
import subprocess
import time

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from lms_core.provisioning import DeviceCredentials
from tests.harness import ApiProcess, Device, Stack, stop_client, wait_until
from tests.test_api_access import User


def _client(port: int, username: str, password: str) -> tuple[paho.Client, dict[str, list[object]]]:
    # A technician login's client id is pinned to its username.
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=username, protocol=paho.MQTTv5,
                    reconnect_on_failure=False)
    c.username_pw_set(username, password)
    seen: dict[str, list[object]] = {"connack": [], "suback": [], "puback": [], "messages": [], "disconnect": []}
    c.on_connect = lambda cl, u, f, rc, p: seen["connack"].append(rc)
    c.on_subscribe = lambda cl, u, mid, rcs, p: seen["suback"].append([r.value for r in rcs])
    c.on_publish = lambda cl, u, mid, rc, p: seen["puback"].append(rc.value)
    c.on_message = lambda cl, u, m: seen["messages"].append(m.topic)
    c.on_disconnect = lambda cl, u, f, rc, p: seen["disconnect"].append(rc)
    c.connect("127.0.0.1", port)
    c.loop_start()
    wait_until(lambda: seen["connack"], 5, "CONNACK")
    return c, seen


def test_technician_reads_own_org_only_never_publishes_and_is_revocable(api: ApiProcess, stack: Stack,
                                                                        unique: str) -> None:
    admin = User(api, f"{unique}@example.com")
    assert admin.call("POST", "/api/v1/orgs", {"slug": unique}).status_code == 201
    assert admin.call("POST", "/api/v1/orgs", {"slug": f"{unique}-other"}).status_code == 201
    dev_creds = DeviceCredentials(**admin.call("POST", f"/api/v1/orgs/{unique}/devices", {"slug": "d1"}
                                               ).json()["credentials"])
    other = DeviceCredentials(**admin.call("POST", f"/api/v1/orgs/{unique}-other/devices", {"slug": "d1"}
                                           ).json()["credentials"])
    r = admin.call("POST", f"/api/v1/orgs/{unique}/mqtt-credentials", {"label": "site visit", "expires_in_hours": 2})
    assert r.status_code == 201, r.text
    tech = r.json()
    assert tech["topic_filter"] == f"lms/{unique}/#"
    assert f"-i {tech['username']}" in tech["mosquitto_sub"]

    # The README's ready mosquitto_sub line, as printed, receives the organization's traffic.
    sub = subprocess.Popen([*shlex.split(tech["mosquitto_sub"]), "-C", "1", "-W", "10"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    d = Device(stack.mq.port, dev_creds)
    assert d.connect().value == 0
    o = Device(stack.mq.port, other)
    assert o.connect().value == 0
    o.publish_wait("telemetry", json.dumps({"secret": 1}))  # another organization: never seen
    d.publish_wait("telemetry", json.dumps({"temp": 21.5}))
    out, err = sub.communicate(timeout=15)
    assert out.strip() == f'lms/{unique}/d1/telemetry {{"temp": 21.5}}', (out, err)

    c, seen = _client(stack.mq.port, tech["username"], tech["password"])
    assert seen["connack"][0].value == 0  # type: ignore[attr-defined]
    for f in (f"lms/{unique}-other/#", "lms/#", "#", "$SYS/#", f"$share/g/lms/{unique}/#"):
        c.subscribe(f, qos=1)
    wait_until(lambda: len(seen["suback"]) == 5, 5, "SUBACKs")
    assert all(codes[0] >= 0x80 for codes in seen["suback"]), seen["suback"]  # type: ignore[index]
    for topic in (f"lms/{unique}/d1/telemetry", f"lms/{unique}/d1/commands/1", f"lms/{unique}/d1/config"):
        c.publish(topic, "{}", qos=1)
    wait_until(lambda: len(seen["puback"]) == 3, 5, "PUBACKs")
    assert seen["puback"] == [0x87, 0x87, 0x87]  # not authorized

    listed = admin.call("GET", f"/api/v1/orgs/{unique}/mqtt-credentials").json()
    assert [x["username"] for x in listed] == [tech["username"]] and "password" not in listed[0]
    assert admin.call("DELETE", f"/api/v1/orgs/{unique}/mqtt-credentials/{tech['id']}").status_code == 204
    wait_until(lambda: seen["disconnect"], 5, "the revoked login to be disconnected")
    stop_client(c)
    c2, seen2 = _client(stack.mq.port, tech["username"], tech["password"])
    assert seen2["connack"][0].is_failure  # type: ignore[attr-defined]
    stop_client(c2)
    assert admin.call("DELETE", f"/api/v1/orgs/{unique}/mqtt-credentials/{tech['id']}").status_code == 404
    d.close()
    o.close()
    admin.client.close()


def test_expired_technician_login_is_removed(api: ApiProcess, stack: Stack, unique: str) -> None:
    admin = User(api, f"{unique}@example.com")
    assert admin.call("POST", "/api/v1/orgs", {"slug": unique}).status_code == 201
    tech = admin.call("POST", f"/api/v1/orgs/{unique}/mqtt-credentials", {}).json()
    c, seen = _client(stack.mq.port, tech["username"], tech["password"])
    assert seen["connack"][0].value == 0  # type: ignore[attr-defined]
    c.disconnect()
    stop_client(c)
    stack.query("UPDATE mqtt_credentials SET expires_at = now() - interval '1 second' WHERE username = $1",
                tech["username"])
    # The API sweeps every 30 s; the same sweep, run now:
    import asyncio

    assert asyncio.run(stack._provision("expire_technicians")) == 1
    c2, seen2 = _client(stack.mq.port, tech["username"], tech["password"])
    assert seen2["connack"][0].is_failure  # type: ignore[attr-defined]
    stop_client(c2)
    listed = admin.call("GET", f"/api/v1/orgs/{unique}/mqtt-credentials").json()
    assert listed[0]["revoked_at"] is not None
    admin.client.close()


def test_technician_role_may_create_its_own_login_but_viewer_may_not(api: ApiProcess, unique: str) -> None:
    owner = User(api, f"{unique}-o@example.com")
    tech_user = User(api, f"{unique}-t@example.com")
    viewer = User(api, f"{unique}-v@example.com")
    assert owner.call("POST", "/api/v1/orgs", {"slug": unique}).status_code == 201
    owner.call("PUT", f"/api/v1/orgs/{unique}/members/{tech_user.email}", {"role": "technician"})
    owner.call("PUT", f"/api/v1/orgs/{unique}/members/{viewer.email}", {"role": "viewer"})
    assert tech_user.call("POST", f"/api/v1/orgs/{unique}/mqtt-credentials", {}).status_code == 201
    assert viewer.call("POST", f"/api/v1/orgs/{unique}/mqtt-credentials", {}).status_code == 403
    r = owner.call("POST", f"/api/v1/orgs/{unique}/mqtt-credentials", {"expires_in_hours": 100000})
    assert r.status_code == 422
    for u in (owner, tech_user, viewer):
        u.client.close()
