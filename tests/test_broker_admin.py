"""The review after issue 6 crashed the broker with concurrent provisioning: every broker
administrator numbered its commands c1, c2, ... on one shared response topic, so concurrent
API requests took each other's answers (failures reported for commands that had worked,
logins left in the broker without a row), and deleting the organization then deleted a role
those orphans still held - a use-after-free in Mosquitto 2.0 (eclipse/mosquitto#2660)."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from lms_core.broker import BrokerAdmin, tech_rolename
from lms_core.provisioning import DeviceCredentials
from lms_core.topics import TopicScheme
from tests.harness import ApiProcess, Device, Stack, stop_client
from tests.test_api_access import User


@pytest.fixture
def owner(api: ApiProcess, unique: str) -> Iterator[User]:
    user = User(api, f"{unique}@example.com")
    yield user
    user.client.close()


def _broker_clients(stack: Stack) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        async with BrokerAdmin(stack.mqtt_url, TopicScheme()) as admin:
            return await admin.list_clients()

    return asyncio.run(run())


def _mosquitto_pid(stack: Stack) -> int:
    assert stack.mq.proc is not None and stack.mq.proc.poll() is None, "the broker is not running"
    return stack.mq.proc.pid


def test_concurrent_provisioning_keeps_broker_and_database_in_step(api: ApiProcess, stack: Stack, unique: str,
                                                                   owner: User) -> None:
    assert owner.call("POST", "/api/v1/orgs", {"slug": unique}).status_code == 201
    base = f"/api/v1/orgs/{unique}"
    for i in range(6):
        assert owner.call("POST", f"{base}/devices", {"slug": f"r{i}"}).status_code == 201
    token = owner.client.headers["Authorization"]
    barrier = threading.Barrier(24)

    def call(method: str, path: str, body: Any) -> httpx.Response:
        with httpx.Client(base_url=api.url, timeout=30, headers={"Authorization": token}) as c:
            barrier.wait(30)
            return c.request(method, path, json=body)

    jobs = ([("POST", f"{base}/devices", {"slug": f"n{i}"}) for i in range(12)]
            + [("POST", f"{base}/devices/r{i}/credentials", None) for i in range(6)]
            + [("POST", f"{base}/mqtt-credentials", {"label": f"t{i}"}) for i in range(6)])
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda j: call(*j), jobs))
    assert [r.status_code for r in answers] == [201] * 12 + [200] * 6 + [201] * 6, [
        (r.status_code, r.text[:200]) for r in answers if r.status_code >= 300]

    # Every password shown works, and the broker holds exactly what the database holds.
    for r in answers[:18]:
        body = r.json()
        creds = DeviceCredentials(**body.get("credentials", body))
        d = Device(stack.mq.port, creds)
        try:
            assert d.connect().value == 0, creds.username
        finally:
            d.close()
    techs = {r["username"] for r in stack.query(
        "SELECT m.username FROM mqtt_credentials m JOIN organizations o ON o.id = m.org_id WHERE o.slug = $1",
        unique)}
    devices = {f"{unique}.{r['slug']}" for r in stack.query(
        "SELECT d.slug FROM devices d JOIN organizations o ON o.id = d.org_id WHERE o.slug = $1", unique)}
    in_broker = {u for u in _broker_clients(stack) if u.startswith((f"{unique}.", f"tech.{unique}."))}
    assert in_broker == devices | techs


def test_deleting_an_org_whose_role_an_unknown_login_holds_leaves_the_broker_standing(
        api: ApiProcess, stack: Stack, unique: str, owner: User) -> None:
    assert owner.call("POST", "/api/v1/orgs", {"slug": unique}).status_code == 201
    assert owner.call("POST", f"/api/v1/orgs/{unique}/mqtt-credentials", {}).status_code == 201
    orphan = f"tech.{unique}.999999"

    async def make_orphan() -> None:
        # A login holding the organization's role that the database does not know (what a
        # failure between the broker and the database leaves behind).
        async with BrokerAdmin(stack.mqtt_url, TopicScheme()) as admin:
            await admin.execute([{"command": "createClient", "username": orphan, "password": os.urandom(8).hex(),
                                  "clientid": orphan, "roles": [{"rolename": tech_rolename(unique)}]}])

    asyncio.run(make_orphan())
    pid = _mosquitto_pid(stack)
    assert owner.call("DELETE", f"/api/v1/orgs/{unique}").status_code == 204
    assert _mosquitto_pid(stack) == pid
    clients = _broker_clients(stack)  # answers, and holds nothing of the organization
    assert not [u for u in clients if u.startswith((f"{unique}.", f"tech.{unique}."))]


def test_deleting_an_org_clears_every_retained_message_under_it(api: ApiProcess, stack: Stack, unique: str,
                                                                 owner: User) -> None:
    """Not only status and config: a retained command result or reported config (holding a
    Wi-Fi password, in the review) was handed to the next organization of the same slug."""
    assert owner.call("POST", "/api/v1/orgs", {"slug": unique}).status_code == 201
    assert owner.call("POST", f"/api/v1/orgs/{unique}/devices", {"slug": "d1"}).status_code == 201
    url = stack.mqtt_url
    topics = [f"lms/{unique}/d1/{k}" for k in ("telemetry", "events", "config/reported", "commands/42/result",
                                               "status", "config")]
    pub = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{unique}-retainer", protocol=paho.MQTTv311)
    pub.username_pw_set(url.username, url.password)
    pub.connect("127.0.0.1", stack.mq.port)
    pub.loop_start()
    try:
        for t in topics:
            pub.publish(t, b'{"wifi_psk": "old-secret"}', qos=1, retain=True).wait_for_publish(5)
    finally:
        stop_client(pub)
    assert len(_retained(stack, f"lms/{unique}/#")) == len(topics)
    assert owner.call("DELETE", f"/api/v1/orgs/{unique}").status_code == 204
    assert _retained(stack, f"lms/{unique}/#") == []


def _retained(stack: Stack, topic_filter: str) -> list[str]:
    url = stack.mqtt_url
    got: list[str] = []
    done = threading.Event()
    c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    c.username_pw_set(url.username, url.password)
    c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(topic_filter, qos=1)
    c.on_subscribe = lambda cl, u, mid, rcs, p: threading.Timer(1.0, done.set).start()
    c.on_message = lambda cl, u, m: got.append(m.topic) if m.retain else None
    c.connect("127.0.0.1", stack.mq.port)
    c.loop_start()
    try:
        assert done.wait(10), "no SUBACK"
    finally:
        stop_client(c)
    return sorted(got)
