"""Commands and desired / reported configuration through REST, a real broker, a real bridge
and devices that are real MQTT clients on credentials from the API (issue 8)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as paho
import pytest

from lms_core.provisioning import DeviceCredentials
from tests.harness import ApiProcess, Device, Stack, wait_until
from tests.test_api_access import User

#: What a responder answers to a command: a list of (delay s, result payload) per command.
Script = Callable[[dict[str, Any]], list[tuple[float, dict[str, Any]]]]


def answer_ok(cmd: dict[str, Any]) -> list[tuple[float, dict[str, Any]]]:
    if cmd["name"] == "fail":
        return [(0, {"status": "error", "error": "cannot do that"})]
    if cmd["name"] == "slow":
        return [(0, {"status": "accepted"}), (0.3, {"status": "in_progress"}),
                (0.3, {"status": "ok", "result": {"done": True}})]
    return [(0, {"status": "ok", "result": {"echo": cmd["params"], "id": cmd["id"]}})]


class Responder(Device):
    """A device that subscribes to its commands and config and answers per ``script``."""

    def __init__(self, port: int, creds: DeviceCredentials, script: Script | None = answer_ok,
                 persistent: bool = False) -> None:
        super().__init__(port, creds, persistent=persistent)
        self.script = script
        self.commands: list[dict[str, Any]] = []
        self.configs: list[dict[str, Any]] = []
        self.client.on_message = self._message
        self.client.on_connect = self._connected_then_subscribe

    def _connected_then_subscribe(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not reason.is_failure and not flags.session_present:
            client.subscribe([(f"{self.creds.topic_prefix}/commands/+", 1), (f"{self.creds.topic_prefix}/config", 1)])
        self._on_connect(client, userdata, flags, reason, props)

    def _message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        self.messages.append(msg)
        if msg.topic.endswith("/config"):
            if msg.payload:
                self.configs.append(json.loads(msg.payload))
            return
        cmd = json.loads(msg.payload)
        self.commands.append(cmd)
        if self.script is None:
            return

        def run() -> None:
            for delay, reply in self.script(cmd):  # type: ignore[misc]
                time.sleep(delay)
                self.publish(f"commands/{cmd['id']}/result", json.dumps(reply))

        threading.Thread(target=run, daemon=True).start()


class Org:
    def __init__(self, api: ApiProcess, stack: Stack, unique: str) -> None:
        self.api, self.stack, self.slug = api, stack, unique
        self.owner = User(api, f"{unique}@example.com")
        assert self.owner.call("POST", "/api/v1/orgs", {"slug": unique}).status_code == 201
        self.base = f"/api/v1/orgs/{unique}"
        self.devices: list[Device] = []

    def device(self, slug: str, tags: list[str] | None = None) -> DeviceCredentials:
        r = self.owner.call("POST", f"{self.base}/devices", {"slug": slug, "tags": tags or []})
        assert r.status_code == 201, r.text
        return DeviceCredentials(**r.json()["credentials"])

    def responder(self, slug: str, tags: list[str] | None = None, **kw: Any) -> Responder:
        dev = Responder(self.stack.mq.port, self.device(slug, tags), **kw)
        self.devices.append(dev)
        assert dev.connect().value == 0
        wait_until(lambda: dev.suback, 5, "the device's subscription")
        return dev

    def call(self, method: str, path: str, body: Any = None) -> Any:
        return self.owner.call(method, self.base + path, body)

    def close(self) -> None:
        for d in self.devices:
            d.stop()
        self.owner.client.close()


@pytest.fixture
def org(api: ApiProcess, stack: Stack, unique: str) -> Iterator[Org]:
    o = Org(api, stack, unique)
    yield o
    o.close()


def test_a_command_goes_to_the_device_and_its_result_comes_back(org: Org, stack: Stack) -> None:
    dev = org.responder("pump-1")
    r = org.call("POST", "/devices/pump-1/commands?wait=10", {"name": "ping", "params": {"n": 1}})
    assert r.status_code == 200, r.text
    cmd = r.json()
    assert cmd["state"] == "succeeded" and cmd["reply"]["status"] == "ok"
    assert cmd["reply"]["result"] == {"echo": {"n": 1}, "id": cmd["id"]}
    assert cmd["sent_at"] and cmd["finished_at"] and cmd["topic"] == f"lms/{org.slug}/pump-1/commands/{cmd['id']}"
    assert r.headers["location"].endswith(f"/devices/pump-1/commands/{cmd['id']}")
    # What the device received: the contract's payload, expires_at in epoch ms.
    got = dev.commands[0]
    assert set(got) == {"id", "name", "params", "expires_at"} and got["id"] == cmd["id"]
    assert abs(got["expires_at"] / 1000 - (time.time() + 60)) < 10

    # An error answer is a failed command; without wait= the answer is 202 and pending.
    r = org.call("POST", "/devices/pump-1/commands", {"name": "fail"})
    assert r.status_code == 202 and r.json()["state"] == "pending", r.text
    cid = r.json()["id"]
    got = wait_until(lambda: (c := org.call("GET", f"/devices/pump-1/commands/{cid}").json())["state"] == "failed"
                     and c, 10, "the command to fail")
    assert got["reply"] == {"status": "error", "at": got["reply"]["at"], "result": None, "error": "cannot do that"}

    # accepted -> in_progress -> ok: delivered on the way, succeeded at the end.
    r = org.call("POST", "/devices/pump-1/commands?wait=10", {"name": "slow"})
    assert r.status_code == 200 and r.json()["state"] == "succeeded", r.text
    assert r.json()["delivered_at"] < r.json()["finished_at"]

    listed = org.call("GET", "/devices/pump-1/commands").json()
    assert [c["name"] for c in listed] == ["slow", "fail", "ping"]
    assert [c["name"] for c in org.call("GET", "/devices/pump-1/commands?state=failed").json()] == ["fail"]
    page = org.call("GET", f"/devices/pump-1/commands?limit=1&before={listed[0]['id']}").json()
    assert [c["name"] for c in page] == ["fail"]


def test_wait_returns_the_result_through_another_api_process(org: Org, stack: Stack) -> None:
    """The API learns of the result through PostgreSQL, so any API process can answer."""
    org.responder("pump-1")
    other = stack.start_api()
    try:
        r = org.owner.client.post(f"{other.url}{org.base}/devices/pump-1/commands?wait=10", json={"name": "ping"})
        assert r.status_code == 200 and r.json()["state"] == "succeeded", r.text
    finally:
        other.stop()
        stack.apis.remove(other)


def test_a_wait_that_runs_out_answers_202_with_the_state_now(org: Org) -> None:
    org.responder("quiet", script=None)
    started = time.monotonic()
    r = org.call("POST", "/devices/quiet/commands?wait=1", {"name": "ping"})
    assert r.status_code == 202 and r.json()["state"] == "pending", r.text
    assert 1 <= time.monotonic() - started < 5


def test_cancel_before_the_result_keeps_the_outcome_cancelled(org: Org) -> None:
    dev = org.responder("quiet", script=None)
    cid = org.call("POST", "/devices/quiet/commands", {"name": "reboot"}).json()["id"]
    r = org.call("POST", f"/devices/quiet/commands/{cid}/cancel")
    assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
    assert org.call("POST", f"/devices/quiet/commands/{cid}/cancel").status_code == 409
    wait_until(lambda: dev.commands, 5, "the command to reach the device")
    dev.publish_wait(f"commands/{cid}/result", json.dumps({"status": "ok", "result": {"late": 1}}))
    got = wait_until(lambda: (c := org.call("GET", f"/devices/quiet/commands/{cid}").json())["reply"] and c,
                     10, "the late result to be recorded")
    assert got["state"] == "cancelled" and got["reply"]["result"] == {"late": 1}


def test_an_offline_device_gets_its_command_within_the_ttl_and_never_after(org: Org, stack: Stack) -> None:
    dev = Responder(stack.mq.port, org.device("sleepy"), persistent=True)
    assert dev.connect().value == 0
    wait_until(lambda: dev.suback, 5, "the subscription")
    dev.close()
    fresh = org.call("POST", "/devices/sleepy/commands", {"name": "ping", "ttl_seconds": 60}).json()
    stale = org.call("POST", "/devices/sleepy/commands", {"name": "old", "ttl_seconds": 1}).json()
    time.sleep(2.5)
    assert org.call("GET", f"/devices/sleepy/commands/{stale['id']}").json()["state"] == "expired"
    again = Responder(stack.mq.port, dev.creds, persistent=True)
    org.devices.append(again)
    assert again.connect().value == 0
    wait_until(lambda: org.call("GET", f"/devices/sleepy/commands/{fresh['id']}").json()["state"] == "succeeded",
               10, "the queued command to be answered after reconnecting")
    time.sleep(0.5)
    assert [c["name"] for c in again.commands] == ["ping"]  # the expired one never arrived


def test_a_fleet_command_reaches_each_tagged_device_once(org: Org) -> None:
    tagged = [org.responder(f"lamp-{i}", ["lamps"]) for i in range(3)]
    other = org.responder("pump", ["pumps"])
    r = org.call("POST", "/command-groups", {"name": "ping", "params": {"x": 1}, "tag": "lamps"})
    assert r.status_code == 202, r.text
    gid = r.json()["id"]
    assert r.json()["devices"] == 3 and r.json()["target"] == {"tag": "lamps"}
    group = wait_until(lambda: (g := org.call("GET", f"/command-groups/{gid}").json())["summary"]["succeeded"] == 3
                       and g, 10, "every lamp to answer")
    assert sum(group["summary"].values()) == group["devices"] == 3
    assert all(len(d.commands) == 1 for d in tagged) and other.commands == []
    rows = org.call("GET", f"/command-groups/{gid}/commands").json()
    assert sorted(c["device"] for c in rows) == ["lamp-0", "lamp-1", "lamp-2"]
    assert [g["id"] for g in org.call("GET", "/command-groups").json()] == [gid]
    assert org.call("POST", "/command-groups", {"name": "ping", "tag": "nobody"}).status_code == 422
    assert org.call("POST", "/command-groups", {"name": "ping", "tag": "lamps", "asset": "x"}).status_code == 422


def test_desired_config_is_retained_versioned_and_compared_with_the_reported(org: Org, stack: Stack) -> None:
    creds = org.device("thermo")
    r = org.call("PUT", "/devices/thermo/config", {"interval_s": 10, "led": {"on": True}})
    assert r.status_code == 200, r.text
    assert r.json()["desired_version"] == 1 and r.json()["in_sync"] is False
    r = org.call("PATCH", "/devices/thermo/config", {"interval_s": 30, "led": {"on": None, "color": "red"}})
    assert r.json()["desired"] == {"interval_s": 30, "led": {"color": "red"}} and r.json()["desired_version"] == 2

    # A device connecting later gets the newest desired config, retained.
    dev = Responder(stack.mq.port, creds)
    org.devices.append(dev)
    assert dev.connect().value == 0
    wait_until(lambda: dev.configs, 5, "the retained config")
    assert dev.configs == [{"interval_s": 30, "led": {"color": "red"}, "version": 2}]

    dev.publish_wait("config/reported", json.dumps({"version": 1, "interval_s": 10, "led": {"on": True}}))
    got = wait_until(lambda: (c := org.call("GET", "/devices/thermo/config").json())["reported_version"] == 1 and c,
                     10, "the reported config")
    assert got["in_sync"] is False
    assert {d["key"]: (d["desired"], d["reported"]) for d in got["differences"]} == {
        "interval_s": (30, 10), "led.color": ("red", None)}
    dev.publish_wait("config/reported", json.dumps({"version": 2, "interval_s": 30, "led": {"color": "red"},
                                                    "firmware": "1.0"}))
    got = wait_until(lambda: (c := org.call("GET", "/devices/thermo/config").json())["reported_version"] == 2 and c,
                     10, "the second report")
    assert got["in_sync"] is True and got["differences"] == []

    # Delete: the retained message is cleared; the version never goes back.
    assert org.call("DELETE", "/devices/thermo/config").status_code == 200
    assert org.call("DELETE", "/devices/thermo/config").status_code == 404
    assert org.call("PUT", "/devices/thermo/config", {"a": 1}).json()["desired_version"] == 3


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    ("POST", "/devices/d/commands", "{", 400),
    ("POST", "/devices/d/commands", [], 422),
    ("POST", "/devices/d/commands", {}, 422),
    ("POST", "/devices/d/commands", {"name": 5}, 422),
    ("POST", "/devices/d/commands", {"name": "has space"}, 422),
    ("POST", "/devices/d/commands", {"name": "x" * 65}, 422),
    ("POST", "/devices/d/commands", {"name": "ping", "params": [1]}, 422),
    ("POST", "/devices/d/commands", {"name": "ping", "params": {"a": "\u0000"}}, 422),
    ("POST", "/devices/d/commands", {"name": "ping", "params": {"a": "x" * 9000}}, 422),
    ("POST", "/devices/d/commands", {"name": "ping", "ttl_seconds": 0}, 422),
    ("POST", "/devices/d/commands", {"name": "ping", "ttl_seconds": -5}, 422),
    ("POST", "/devices/d/commands", {"name": "ping", "ttl_seconds": 10**9}, 422),
    ("POST", "/devices/d/commands", {"name": "ping", "ttl_seconds": "sixty"}, 422),
    ("POST", "/devices/d/commands", {"name": "ping", "extra": 1}, 422),
    ("POST", "/devices/d/commands?wait=31", {"name": "ping"}, 422),
    ("POST", "/devices/d/commands?wait=-1", {"name": "ping"}, 422),
    ("POST", "/devices/d/commands?wait=x", {"name": "ping"}, 422),
    ("POST", "/devices/nobody/commands", {"name": "ping"}, 404),
    ("GET", "/devices/d/commands/abc", None, 404),
    ("GET", "/devices/d/commands/0", None, 422),
    ("GET", "/devices/d/commands/-1", None, 422),
    ("GET", "/devices/d/commands/" + "9" * 30, None, 422),
    ("GET", "/devices/d/commands/99999999", None, 404),
    ("GET", "/devices/d/commands?state=bogus", None, 422),
    ("GET", "/devices/d/commands?before=0", None, 422),
    ("POST", "/devices/d/commands/99999999/cancel", None, 404),
    ("GET", "/command-groups/99999999", None, 404),
    ("POST", "/command-groups", {"name": "ping"}, 422),
    ("POST", "/command-groups", {"name": "ping", "asset": "nowhere"}, 404),
    ("PUT", "/devices/d/config", [1, 2], 422),
    ("PUT", "/devices/d/config", '"text"', 422),
    ("PUT", "/devices/d/config", {"version": 3}, 422),
    ("PUT", "/devices/d/config", {"a": "\u0000"}, 422),
    ("PUT", "/devices/d/config", {"a": "x" * 20000}, 422),
    ("PATCH", "/devices/d/config", [1], 422),
    ("PUT", "/devices/nobody/config", {"a": 1}, 404),
    ("DELETE", "/devices/d/config", None, 404),
])
def test_bad_input_gets_a_clear_4xx(org: Org, method: str, path: str, body: Any, status: int) -> None:
    org.device("d")
    if isinstance(body, str):
        r = org.owner.client.request(method, org.base + path, content=body,
                                     headers={"Content-Type": "application/json"})
    else:
        r = org.call(method, path, body)
    assert r.status_code == status, (r.status_code, r.text)
    assert r.json()["error"]["status"] == status
    # Nothing that was refused is left claiming to be pending.
    assert org.call("GET", "/devices/d/commands").json() == []


def test_a_broker_that_is_down_gives_503_and_no_pending_command(own_stack: Stack, unique: str) -> None:
    api = own_stack.start_api()
    org = Org(api, own_stack, unique)
    try:
        org.responder("pump")
        assert org.call("POST", "/devices/pump/commands", {"name": "ping"}).status_code == 202  # connected
        own_stack.mq.stop()
        r = org.call("POST", "/devices/pump/commands", {"name": "ping"})
        assert r.status_code == 503, r.text
        # The answer names the command and where to look it up before sending it again.
        cid = r.json()["error"]["details"]["command_id"]
        assert r.headers["location"] == f"{org.base}/devices/pump/commands/{cid}"
        assert org.call("GET", f"/devices/pump/commands/{cid}").json()["state"] == "failed"
        listed = org.call("GET", "/devices/pump/commands").json()
        # The first was handed to the broker (pending, rightly); the refused one says why it failed.
        assert [c["state"] for c in listed] == ["failed", "pending"]
        assert "broker" in listed[0]["error"]
        assert org.call("PUT", "/devices/pump/config", {"a": 1}).status_code == 503
        assert org.call("GET", "/devices/pump/config").json()["desired_version"] == 0  # rolled back
    finally:
        org.close()
