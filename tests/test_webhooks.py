"""The webhook sender (bridge/notify.py) against real receivers: a local HTTP server in the
test (an edge fake: the one thing outside the platform), real bridge and API processes, a
real database and broker.

The module's own stack lets webhooks call 127.0.0.1 (``LMS_WEBHOOK_ALLOW_PRIVATE=1``) and
keeps the backoff short; the shared stack's bridge keeps the default and shows the check at
delivery time."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from lms_core.alerts import DELIVERY_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER
from tests.harness import ApiProcess, BridgeProcess, Device, Stack, wait_until
from tests.test_api_commands import Org
from tests.test_api_rules import THRESHOLD, insert_alert

SENDER = {"LMS_WEBHOOK_ALLOW_PRIVATE": "1", "LMS_WEBHOOK_BACKOFF_MS": "100", "LMS_WEBHOOK_BACKOFF_MAX_SECONDS": "1",
          "LMS_WEBHOOK_TIMEOUT_SECONDS": "2", "LMS_WEBHOOK_RETRY_SECONDS": "30"}


class Receiver:
    """An HTTP server on 127.0.0.1 that records each request and answers what ``answer``
    says (a status), after ``hold`` is set if it is given."""

    def __init__(self, answer: Callable[[int], int] = lambda n: 200) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.answer = answer
        self.hold: threading.Event | None = None
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((dict(self.headers.items()), body))
                if receiver.hold is not None:
                    receiver.hold.wait(60)
                self.send_response(receiver.answer(len(receiver.requests)))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/lms?token=abc"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        if self.hold is not None:
            self.hold.set()
        self.server.shutdown()
        self.server.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def hooks_stack(tmp_root: Path) -> Iterator[Stack]:
    s = Stack(tmp_root / "webhooks").start()
    s.start_bridge("lms-bridge-webhooks", **SENDER)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def hooks_api(hooks_stack: Stack) -> ApiProcess:
    return hooks_stack.start_api(LMS_WEBHOOK_ALLOW_PRIVATE="1")


@pytest.fixture
def org(hooks_api: ApiProcess, hooks_stack: Stack, unique: str) -> Iterator[Org]:
    o = Org(hooks_api, hooks_stack, unique)
    yield o
    o.close()


def alert_change(org: Org, stack: Stack, device: str, severity: str = "major") -> int:
    """An alert change with its webhook deliveries, written by the API: a firing alert (as
    the bridge writes one) whose rule is then deleted, which resolves it. Returns the alert."""
    rid = org.call("POST", "/rules", {**THRESHOLD, "severity": severity}).json()["id"]
    aid = insert_alert(stack, org.slug, device, rule_id=rid, severity=severity, value=42.5)
    assert org.call("DELETE", f"/rules/{rid}").status_code == 204
    return aid


def test_a_signed_post_failing_twice_is_delivered_on_the_third_attempt(org: Org, hooks_stack: Stack) -> None:
    receiver = Receiver(answer=lambda n: 500 if n <= 2 else 200)
    try:
        org.device("pump-1")
        created = org.call("POST", "/webhooks", {"url": receiver.url, "severities": ["major"]})
        assert created.status_code == 201, created.text
        secret, wid = created.json()["secret"], created.json()["webhook"]["id"]
        # Takes only critical alerts: gets nothing of this major one.
        other = org.call("POST", "/webhooks", {"url": receiver.url, "severities": ["critical"]}).json()
        sent_at = int(time.time())
        aid = alert_change(org, hooks_stack, "pump-1")

        deliveries = wait_until(
            lambda: (d := org.call("GET", f"/webhooks/{wid}/deliveries").json()) and d[0]["state"] == "delivered"
            and d, 20, "the delivery to succeed")
        assert len(receiver.requests) == 3
        (delivery,) = deliveries
        assert delivery["attempts"] == 3 and delivery["alert_id"] == aid and delivery["finished_at"]
        assert delivery["event"]["event"] == "alert.resolved"
        attempts = org.call("GET", f"/webhooks/{wid}/deliveries/{delivery['id']}/attempts").json()
        assert [(a["status_code"], a["error"]) for a in attempts] == [
            (500, "HTTP 500 Internal Server Error"), (500, "HTTP 500 Internal Server Error"), (200, None)]
        page = org.call("GET", f"/webhooks/{wid}/deliveries/{delivery['id']}/attempts?limit=2"
                               f"&after={attempts[0]['id']}").json()
        assert page == attempts[1:]

        # Every request: signed over its exact body with the secret, the timestamp in both.
        for headers, body in receiver.requests:
            expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
            assert hmac.compare_digest(headers[SIGNATURE_HEADER], expected)
            event = json.loads(body)
            assert headers[TIMESTAMP_HEADER] == str(event["timestamp"])
            assert sent_at - 5 <= event["timestamp"] <= time.time() + 5
            assert headers[DELIVERY_HEADER] == str(delivery["id"])
            assert headers["Content-Type"] == "application/json"
            assert headers["Host"] == receiver.url.split("/")[2]
            alert = event["alert"]
            assert event["event"] == "alert.resolved" and alert["id"] == aid
            assert (alert["org"], alert["device"], alert["rule"], alert["severity"], alert["value"]) == (
                org.slug, "pump-1", "hot", "major", 42.5)
            assert alert["resolved_reason"] == "rule deleted"
        # A tampered body does not verify.
        headers, body = receiver.requests[0]
        forged = body.replace(b"major", b"minor")
        assert headers[SIGNATURE_HEADER] != "sha256=" + hmac.new(secret.encode(), forged, hashlib.sha256).hexdigest()

        hook = org.call("GET", f"/webhooks/{wid}").json()
        assert hook["failing"] is False and hook["consecutive_failures"] == 0 and hook["last_success_at"]
        assert hook["last_error"] == "HTTP 500 Internal Server Error"
        assert org.call("GET", f"/webhooks/{other['webhook']['id']}/deliveries").json() == []
    finally:
        receiver.close()


def test_an_unreachable_webhook_is_marked_failing_and_never_slows_ingestion(
        org: Org, hooks_stack: Stack) -> None:
    bridge = hooks_stack.bridges[0]
    # One receiver refuses connections, one accepts and never answers (each attempt waits
    # out the 2 s time-out).
    silent = Receiver()
    silent.hold = threading.Event()
    try:
        creds = org.device("pump-1")
        dead = org.call("POST", "/webhooks", {"url": f"http://127.0.0.1:{closed_port()}/hook"}).json()["webhook"]
        slow = org.call("POST", "/webhooks", {"url": silent.url}).json()["webhook"]
        for _ in range(3):
            alert_change(org, hooks_stack, "pump-1")

        def failures(hook: dict[str, Any]) -> int:
            return int(org.call("GET", f"/webhooks/{hook['id']}").json()["consecutive_failures"])

        wait_until(lambda: failures(dead) >= 1 and silent.requests, 15, "both webhooks to be tried")
        before = bridge.metric("lms_bridge_messages_stored_total")
        failed_before = failures(dead)
        device = Device(hooks_stack.mq.port, creds)
        assert device.connect().value == 0
        try:
            base = int(time.time() * 1000) - 600_000
            n = 3000
            started = time.monotonic()
            device.publish_many([json.dumps({"ts": base + i, "values": {"seq": i}}).encode() for i in range(n)])
        finally:
            device.close()
        # Every message was stored while the webhooks kept failing.
        stored = wait_until(lambda: (m := bridge.metric("lms_bridge_messages_stored_total") - before) >= n and m,
                            30, "the bridge to store what was published")
        took = time.monotonic() - started
        assert stored == n
        assert hooks_stack.scalar(
            """SELECT count(*) FROM readings r JOIN devices d ON d.id = r.device_id JOIN organizations o
               ON o.id = d.org_id WHERE o.slug = $1 AND r.metric = 'seq'""", org.slug) == n
        wait_until(lambda: failures(dead) > failed_before, 15, "the dead webhook to be tried again")
        hook = org.call("GET", f"/webhooks/{dead['id']}").json()
        assert hook["failing"] is True and hook["failing_since"] and hook["last_failure_at"]
        assert "ConnectError" in hook["last_error"]
        slow_hook = wait_until(lambda: (h := org.call("GET", f"/webhooks/{slow['id']}").json())["failing"] and h,
                               15, "the silent webhook to time out")
        assert slow_hook["last_error"] == "no answer within 2 s"
        attempts = hooks_stack.scalar("SELECT count(*) FROM webhook_attempts WHERE webhook_id = $1", dead["id"])
        assert attempts >= 2
        # One at a time per webhook, so its deliveries wait their turn; none is lost.
        assert hooks_stack.scalar("SELECT count(*) FROM webhook_deliveries WHERE webhook_id = $1", dead["id"]) == 3
        print(f"{n} messages stored in {took:.2f} s while two webhooks failed")
    finally:
        silent.close()


def test_a_delivery_that_keeps_failing_is_given_up_after_the_retry_time(tmp_root: Path, unique: str) -> None:
    stack = Stack(tmp_root / f"webhooks-{unique}").start()
    try:
        stack.start_bridge("lms-bridge-giving-up", **{**SENDER, "LMS_WEBHOOK_RETRY_SECONDS": "2"})
        api = stack.start_api(LMS_WEBHOOK_ALLOW_PRIVATE="1")
        org = Org(api, stack, unique)
        try:
            org.device("pump-1")
            wid = org.call("POST", "/webhooks",
                           {"url": f"http://127.0.0.1:{closed_port()}/"}).json()["webhook"]["id"]
            alert_change(org, stack, "pump-1")
            (d,) = wait_until(lambda: (x := org.call("GET", f"/webhooks/{wid}/deliveries").json())
                              and x[0]["state"] == "failed" and x, 20, "the delivery to be given up")
            assert d["attempts"] >= 2 and d["finished_at"] and d["next_attempt_at"] is None
            n = len(org.call("GET", f"/webhooks/{wid}/deliveries/{d['id']}/attempts").json())
            assert n == d["attempts"]
        finally:
            org.close()
    finally:
        stack.stop()


def test_two_bridges_send_each_delivery_once(own_stack: Stack, unique: str) -> None:
    """Both bridges' senders claim from the same outbox (FOR UPDATE SKIP LOCKED, then a
    lease): every delivery reaches its receiver exactly once, in one attempt."""
    bridges = [own_stack.start_bridge(f"lms-bridge-{x}", LMS_BRIDGE_SUBSCRIPTION="shared", **SENDER) for x in "ab"]
    api = own_stack.start_api(LMS_WEBHOOK_ALLOW_PRIVATE="1")
    receiver = Receiver()
    org = Org(api, own_stack, unique)
    try:
        org.device("pump-1")
        hooks = [org.call("POST", "/webhooks", {"url": receiver.url + f"&hook={i}"}).json()["webhook"]["id"]
                 for i in range(10)]
        for _ in range(3):
            alert_change(org, own_stack, "pump-1")
        total = len(hooks) * 3
        wait_until(lambda: own_stack.scalar("SELECT count(*) FROM webhook_deliveries WHERE state = 'delivered'")
                   == total, 30, "every delivery")
        ids = [h[DELIVERY_HEADER] for h, _ in receiver.requests]
        assert len(ids) == len(set(ids)) == total
        assert own_stack.scalar("SELECT count(*) FROM webhook_attempts") == total
        split = [b.metric('lms_bridge_webhook_attempts_total{outcome="delivered"}') for b in bridges]
        assert sum(split) == total
        print(f"deliveries sent per bridge: {split}")
    finally:
        org.close()
        receiver.close()


def test_a_bridge_killed_mid_request_loses_no_delivery(org: Org, hooks_stack: Stack) -> None:
    receiver = Receiver()
    receiver.hold = threading.Event()
    bridge: BridgeProcess = hooks_stack.bridges[0]
    try:
        org.device("pump-1")
        wid = org.call("POST", "/webhooks", {"url": receiver.url}).json()["webhook"]["id"]
        alert_change(org, hooks_stack, "pump-1")
        wait_until(lambda: receiver.requests, 15, "the request to arrive")
        bridge.kill()  # while the receiver holds the request
        (d,) = org.call("GET", f"/webhooks/{wid}/deliveries").json()
        assert d["state"] == "pending" and d["attempts"] == 0  # claimed, not taken
        receiver.hold.set()
        bridge.start()
        (d,) = wait_until(lambda: (x := org.call("GET", f"/webhooks/{wid}/deliveries").json())
                          and x[0]["state"] == "delivered" and x, 30, "the delivery after the lease ran out")
        assert d["attempts"] == 1 and len(receiver.requests) == 2
        assert len({h[DELIVERY_HEADER] for h, _ in receiver.requests}) == 1  # the receiver can de-duplicate
    finally:
        receiver.close()
        if bridge.proc is not None and bridge.proc.poll() is not None:
            bridge.start()


def test_the_address_is_checked_again_at_delivery(stack: Stack, unique: str) -> None:
    """A webhook row on a loopback address (as if its name had resolved elsewhere when it was
    saved): the shared stack's bridge, with private targets refused, does not call it."""
    receiver = Receiver()
    try:
        stack.create_device(unique, "pump-1")
        wid = stack.scalar(
            """INSERT INTO webhooks (org_id, url, secret, severities) SELECT id, $2, 's', '{major}'
               FROM organizations WHERE slug = $1 RETURNING id""", unique, receiver.url)
        did = stack.scalar("INSERT INTO webhook_deliveries (webhook_id, body) VALUES ($1, $2) RETURNING id", wid,
                           json.dumps({"event": "alert.firing", "alert": {"id": 0}}))
        (attempt,) = wait_until(lambda: stack.query("SELECT status_code, error FROM webhook_attempts "
                                                    "WHERE delivery_id = $1", did), 15, "the attempt")
        assert attempt["status_code"] is None
        assert attempt["error"].startswith("not sent:") and "loopback" in attempt["error"]
        assert stack.scalar("SELECT state FROM webhook_deliveries WHERE id = $1", did) == "pending"
        assert stack.scalar("SELECT failing_since FROM webhooks WHERE id = $1", wid) <= datetime.now(UTC)
        assert receiver.requests == []
    finally:
        receiver.close()
