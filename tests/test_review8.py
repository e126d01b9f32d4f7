"""Adversarial review of issue 8 (commands and the device shadow): attacks from outside,
against a real broker, a real bridge and real API processes."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness import ApiProcess, Stack, wait_until
from tests.test_api_commands import Org, Responder


@pytest.fixture
def shop(api: ApiProcess, stack: Stack, unique: str) -> Iterator[Org]:
    o = Org(api, stack, unique)
    yield o
    o.close()


def deep(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


@pytest.mark.parametrize("depth", [100, 400, 800, 990, 3000])
@pytest.mark.parametrize(("method", "path", "wrap"), [
    ("POST", "/devices/d/commands", lambda doc: '{"name":"ping","params":' + doc + "}"),
    ("PUT", "/devices/d/config", lambda doc: doc),
    ("PATCH", "/devices/d/config", lambda doc: doc),
])
def test_deeply_nested_bodies_are_4xx_or_taken(shop: Org, method: str, path: str, wrap: Any, depth: int) -> None:
    org = shop
    org.device("d")
    r = org.owner.client.request(method, org.base + path, content=wrap(deep(depth)),
                                 headers={"Content-Type": "application/json"})
    assert r.status_code < 500, (r.status_code, r.text[:300])
    assert org.call("GET", "/devices/d/commands").status_code == 200
    assert org.call("GET", "/devices/d/config").status_code == 200


def test_cross_org_ids(shop: Org, api: ApiProcess, stack: Stack, unique: str) -> None:
    org = shop
    other = Org(api, stack, unique + "b")
    try:
        other.device("d")
        org.device("d")
        theirs = other.call("POST", "/devices/d/commands", {"name": "ping"}).json()["id"]
        tag = other.call("PATCH", "/devices/d", {"tags": ["t"]})
        assert tag.status_code == 200
        gid = other.call("POST", "/command-groups", {"name": "ping", "tag": "t"}).json()["id"]
        for m, p in [("GET", f"/devices/d/commands/{theirs}"), ("POST", f"/devices/d/commands/{theirs}/cancel"),
                     ("GET", f"/command-groups/{gid}"), ("GET", f"/command-groups/{gid}/commands"),
                     ("POST", f"/command-groups/{gid}/cancel")]:
            r = org.call(m, p)
            assert r.status_code == 404, (m, p, r.text)
        assert org.call("GET", "/devices/d/commands").json() == []
        assert org.call("GET", "/command-groups").json() == []
        r = org.call("POST", "/command-groups", {"name": "ping", "tag": "t"})
        assert r.status_code == 422, r.text
        assert other.call("GET", f"/devices/d/commands/{theirs}").json()["state"] == "pending"
    finally:
        other.close()


def _sig(stack: Stack, sig: signal.Signals) -> None:
    assert stack.mq.proc is not None
    os.kill(stack.mq.proc.pid, sig)


def test_a_command_answered_503_does_not_reach_the_device_later(own_stack: Stack, unique: str) -> None:
    """A broker that does not acknowledge in time (hung, overloaded) gets a 503 and the
    command was marked failed, "not delivered" - and then the broker delivered it: the device
    ran a command the platform said it never got, and its "ok" did not count."""
    own_stack.start_bridge("lms-bridge-r8")
    api = own_stack.start_api()
    org = Org(api, own_stack, unique)
    try:
        dev = org.responder("pump")
        assert org.call("POST", "/devices/pump/commands?wait=5", {"name": "warm"}).status_code == 200
        _sig(own_stack, signal.SIGSTOP)
        try:
            r = org.call("POST", "/devices/pump/commands", {"name": "unlock"})
        finally:
            _sig(own_stack, signal.SIGCONT)
        assert r.status_code == 503, r.text
        # The broker read it late and delivered it: the device ran it and answered. The
        # command was not "not delivered": it stayed pending, and the answer counts.
        wait_until(lambda: any(c["name"] == "unlock" for c in dev.commands), 10, "the late delivery")
        unlock = wait_until(lambda: (c := org.call("GET", "/devices/pump/commands").json()[0])["reply"] and c,
                            10, "the device's answer")
        assert unlock["name"] == "unlock" and unlock["state"] == "succeeded", unlock
    finally:
        org.close()


def test_a_config_change_rolled_back_with_503_is_not_retained_later(own_stack: Stack, unique: str) -> None:
    api = own_stack.start_api()
    org = Org(api, own_stack, unique)
    try:
        creds = org.device("thermo")
        assert org.call("PUT", "/devices/thermo/config", {"mode": "A"}).status_code == 200
        _sig(own_stack, signal.SIGSTOP)
        try:
            r = org.call("PUT", "/devices/thermo/config", {"mode": "B"})
        finally:
            _sig(own_stack, signal.SIGCONT)
        assert r.status_code == 503, r.text
        time.sleep(2)
        late = Responder(own_stack.mq.port, creds)
        org.devices.append(late)
        assert late.connect().value == 0
        wait_until(lambda: late.configs, 5, "the retained config")
        # The retained message is the database's desired config (the broker took it late),
        # never a version the database gave up and will number again for another document.
        stored = org.call("GET", "/devices/thermo/config").json()
        assert late.configs == [{**stored["desired"], "version": stored["desired_version"]}]
        assert org.call("PUT", "/devices/thermo/config", {"mode": "C"}).json()["desired_version"] \
            > late.configs[0]["version"]
    finally:
        org.close()


def test_the_publisher_recovers_after_a_broker_restart(own_stack: Stack, unique: str) -> None:
    own_stack.start_bridge("lms-bridge-r8b")
    api = own_stack.start_api()
    org = Org(api, own_stack, unique)
    try:
        org.responder("pump")
        assert org.call("POST", "/devices/pump/commands?wait=5", {"name": "warm"}).status_code == 200
        own_stack.mq.stop()
        own_stack.mq.start()
        started = time.monotonic()
        ok = wait_until(lambda: (r := org.call("POST", "/devices/pump/commands", {"name": "again"})).status_code
                        == 202 and r, 20, "the API to publish again")
        assert time.monotonic() - started < 15
        assert ok.json()["state"] == "pending"
    finally:
        org.close()


def test_reconcile_clears_a_deleted_config_that_a_broker_crash_brought_back(own_stack: Stack, unique: str) -> None:
    """The broker writes its snapshot every 60 s: a crash after a config DELETE brings the
    deleted retained config back from the older snapshot. Reconcile (the bridge's start) must
    clear it, as the issue asks ("a deleted or cleared config clears the retained message")."""
    api = own_stack.start_api()
    org = Org(api, own_stack, unique)
    try:
        creds = org.device("thermo")
        assert org.call("PUT", "/devices/thermo/config", {"mode": "A"}).status_code == 200
        own_stack.mq.stop()  # a clean stop: the snapshot holds the retained config
        own_stack.mq.start()
        assert wait_until(lambda: org.call("DELETE", "/devices/thermo/config").status_code == 200, 20,
                          "the API to publish again")
        _sig(own_stack, signal.SIGKILL)  # a crash before the next snapshot
        assert own_stack.mq.proc is not None
        own_stack.mq.proc.wait()
        own_stack.mq.start()
        own_stack.start_bridge("lms-bridge-r8c")  # reconciles at start
        dev = Responder(own_stack.mq.port, creds)
        org.devices.append(dev)
        assert dev.connect().value == 0
        wait_until(lambda: dev.suback, 5, "the subscription")
        time.sleep(1)
        assert dev.configs == [], "a deleted desired config is handed to the device again"
    finally:
        org.close()


def test_a_database_restart_while_waiting_does_not_turn_a_sent_command_into_a_503(
        own_stack: Stack, unique: str) -> None:
    """The command is stored and handed to the broker; PostgreSQL restarts while the request
    waits for the result. A 503 then would tell the caller the command was not sent (a retry
    runs it twice): the answer is the state as last known, 202."""
    own_stack.start_bridge("lms-bridge-r8d")
    api = own_stack.start_api()
    org = Org(api, own_stack, unique)
    try:
        dev = org.responder("quiet", script=None)
        result: dict[str, Any] = {}

        def send() -> None:
            result["r"] = org.call("POST", "/devices/quiet/commands?wait=8", {"name": "unlock"})

        t = threading.Thread(target=send)
        t.start()
        wait_until(lambda: dev.commands, 5, "the command to reach the device")
        own_stack.pg.stop()
        time.sleep(1.5)
        own_stack.pg.start()
        t.join(30)
        r = result["r"]
        assert r.status_code in (200, 202), (r.status_code, r.text)
    finally:
        org.close()


def test_concurrent_merge_patches_lose_nothing_and_the_retained_is_the_newest(shop: Org, stack: Stack) -> None:
    creds = shop.device("thermo")
    results: list[Any] = [None] * 20

    def patch(i: int) -> None:
        results[i] = shop.call("PATCH", "/devices/thermo/config", {f"k{i}": i})

    threads = [threading.Thread(target=patch, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(r.status_code == 200 for r in results), [r.text for r in results if r.status_code != 200]
    # Each answer is that change's own version and document (it used to be whatever was
    # newest when the answer was read: twelve callers told "13").
    assert sorted(r.json()["desired_version"] for r in results) == list(range(1, 21))
    assert all(r.json()["desired"][f"k{i}"] == i for i, r in enumerate(results))
    final = shop.call("GET", "/devices/thermo/config").json()
    assert final["desired"] == {f"k{i}": i for i in range(20)} and final["desired_version"] == 20
    dev = Responder(stack.mq.port, creds)
    shop.devices.append(dev)
    assert dev.connect().value == 0
    wait_until(lambda: dev.configs, 5, "the retained config")
    assert dev.configs == [{**final["desired"], "version": 20}]


def test_many_waiters_at_once_hold_no_connection_and_all_answer(shop: Org) -> None:
    shop.responder("quiet", script=None)
    results: list[Any] = [None] * 60

    def send(i: int) -> None:
        results[i] = shop.call("POST", "/devices/quiet/commands?wait=3", {"name": "ping"})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(60)]
    for t in threads:
        t.start()
    time.sleep(1)
    started = time.monotonic()
    # Meanwhile the API answers others at once: a waiter holds no database connection.
    assert shop.call("GET", "/devices/quiet/commands?limit=1").status_code == 200
    assert time.monotonic() - started < 1.5
    for t in threads:
        t.join(30)
    assert all(r.status_code == 202 and r.json()["state"] == "pending" for r in results)
