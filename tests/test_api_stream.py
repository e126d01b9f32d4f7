"""WebSocket relays of topic streams (issue 10): a real `lms api`, a real broker, real devices
publishing through it, and WebSocket clients (the `websockets` library's own client)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from lms_core.provisioning import DeviceCredentials
from tests.harness import ApiProcess, Device, Stack, wait_until
from tests.test_api_access import User


def ws_url(api: ApiProcess, org: str, query: str = "") -> str:
    return api.url.replace("http://", "ws://") + f"/api/v1/orgs/{org}/stream" + (f"?{query}" if query else "")


@contextlib.contextmanager
def open_stream(api: ApiProcess, org: str, token: str, query: str = "", **kw: Any) -> Iterator[ClientConnection]:
    with connect(ws_url(api, org, query), additional_headers={"Authorization": f"Bearer {token}"},
                 open_timeout=10, **kw) as ws:
        welcome = json.loads(ws.recv(10))
        assert welcome["type"] == "welcome" and welcome["org"] == org, welcome
        yield ws


def refused(url: str, **kw: Any) -> None:
    """The upgrade is refused (an HTTP answer instead of a WebSocket)."""
    with pytest.raises(InvalidStatus), connect(url, open_timeout=10, **kw):
        pass


def request(ws: ClientConnection, **frame: Any) -> dict[str, Any]:
    """Send a request and return the answer to it (frames of messages in between are skipped)."""
    ws.send(json.dumps(frame))
    while True:
        answer = json.loads(ws.recv(10))
        if answer["type"] != "message":
            return answer  # type: ignore[no-any-return]


def messages(ws: ClientConnection, n: int, timeout: float = 20) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        frame = json.loads(ws.recv(max(0.1, deadline - time.monotonic())))
        if frame["type"] == "message":
            out.append(frame)
    return out


def quiet(ws: ClientConnection, seconds: float = 0.5) -> list[dict[str, Any]]:
    """Frames that arrive within ``seconds`` (none expected, usually)."""
    out = []
    with pytest.raises(TimeoutError):
        while True:
            out.append(json.loads(ws.recv(seconds)))
    return out


def small_window(api: ApiProcess) -> socket.socket:
    """A connected socket whose kernel buffers little: a client that stops reading it soon
    stalls the server's sends (unlike loopback's default, which holds megabytes)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", int(api.url.rsplit(":", 1)[1])))
    return sock


def token_of(user: User) -> str:
    return str(user.client.headers["Authorization"].split(" ", 1)[1])


def api_metric(api: ApiProcess, name: str) -> float:
    text = httpx.get(api.url + "/metrics", timeout=5).text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


class Org:
    def __init__(self, api: ApiProcess, stack: Stack, slug: str) -> None:
        self.api, self.stack, self.slug = api, stack, slug
        self.owner = User(api, f"{slug}@example.com")
        assert self.owner.call("POST", "/api/v1/orgs", {"slug": slug}).status_code == 201
        self.devices: list[Device] = []

    def device(self, slug: str) -> Device:
        r = self.owner.call("POST", f"/api/v1/orgs/{self.slug}/devices", {"slug": slug})
        assert r.status_code == 201, r.text
        dev = Device(self.stack.mq.port, DeviceCredentials(**r.json()["credentials"]))
        assert dev.connect().value == 0
        self.devices.append(dev)
        return dev

    @property
    def token(self) -> str:
        return token_of(self.owner)

    def close(self) -> None:
        for d in self.devices:
            d.stop()
        self.owner.client.close()


@pytest.fixture
def two_orgs(api: ApiProcess, stack: Stack, unique: str) -> Iterator[tuple[Org, Org]]:
    a, b = Org(api, stack, f"{unique}-a"), Org(api, stack, f"{unique}-b")
    yield a, b
    a.close()
    b.close()


def test_a_member_gets_exactly_its_organizations_messages_in_order(two_orgs: tuple[Org, Org],
                                                                   api: ApiProcess) -> None:
    a, b = two_orgs
    da, db = a.device("sensor-1"), b.device("sensor-1")
    with open_stream(api, a.slug, a.token) as ws:
        assert request(ws, type="subscribe", filter="+/telemetry", id=1) == {
            "type": "subscribed", "filter": "+/telemetry", "id": 1}
        # Overlapping filters deliver a message once.
        assert request(ws, type="subscribe", filter="sensor-1/#", id=2)["type"] == "subscribed"
        for i in range(50):
            da.publish("telemetry", json.dumps({"seq": i}))
            db.publish("telemetry", json.dumps({"seq": 1000 + i}))
        got = messages(ws, 50)
        assert [m["payload"]["seq"] for m in got] == list(range(50))
        assert {(m["topic"], m["device"], m["kind"]) for m in got} == {("sensor-1/telemetry", "sensor-1", "telemetry")}
        assert all(abs(m["received_at"] / 1000 - time.time()) < 30 for m in got)
        assert quiet(ws) == []  # no duplicates, nothing of the other organization
        # Not JSON: the text as it is; not UTF-8: base64.
        da.publish("events", b"plain words")
        assert messages(ws, 1)[0]["payload_text"] == "plain words"
        da.publish("events", b"\xff\xfe")
        assert messages(ws, 1)[0]["payload_base64"] == "//4="
        assert request(ws, type="unsubscribe", filter="sensor-1/#", id=3)["type"] == "unsubscribed"
        assert request(ws, type="unsubscribe", filter="sensor-1/#", id=4)["type"] == "error"


@pytest.mark.parametrize("bad", [
    "#", "$SYS/#", "$share/g/+/telemetry", "+/#/telemetry", "sens+or/telemetry", "Sensor/telemetry", "",
    "+//telemetry", "/+/telemetry", "a/b/c/d/e/f/g", "x" * 300, 5, None, ["+/telemetry"], "+/tele metry",
    "../other/+/telemetry", "+/telemetry\u0000",
])
def test_a_filter_that_would_leave_the_organization_gets_an_error_frame(api: ApiProcess, stack: Stack, unique: str,
                                                                        bad: Any) -> None:
    org = Org(api, stack, unique)
    try:
        with open_stream(api, unique, org.token) as ws:
            answer = request(ws, type="subscribe", filter=bad, id="x")
            assert answer["type"] == "error" and answer["id"] == "x" and answer["message"], answer
            assert request(ws, type="ping")["type"] == "pong"  # still served
    finally:
        org.close()


def test_who_may_open_a_stream(api: ApiProcess, stack: Stack, unique: str) -> None:
    org = Org(api, stack, unique)
    other = Org(api, stack, f"{unique}-o")
    try:
        url = ws_url(api, unique)
        refused(url)  # anonymous
        refused(url, additional_headers={"Authorization": f"Bearer {other.token}"})
        refused(url, additional_headers={"Authorization": "Bearer not-a-token"})
        # The session cookie: only from the API's own origin (or LMS_API_CORS_ORIGINS).
        cookie = {"Cookie": f"lms_session={org.token}"}
        refused(url, additional_headers={**cookie, "Origin": "https://evil.example"})
        refused(url, additional_headers=cookie)  # no Origin at all
        host = api.url.split("//", 1)[1]
        with connect(url, additional_headers={**cookie, "Origin": f"http://{host}"}, open_timeout=10) as ws:
            assert json.loads(ws.recv(10))["type"] == "welcome"
        # A page on another site offers the token as a subprotocol instead.
        with connect(url, subprotocols=["lms.v1", f"lms.token.{org.token}"], open_timeout=10) as ws:  # type: ignore[list-item]
            assert ws.subprotocol == "lms.v1" and json.loads(ws.recv(10))["type"] == "welcome"
        # A revoked token cannot open one.
        revoked = User(api, f"{unique}@example.com")
        assert revoked.call("POST", "/api/v1/auth/logout").status_code in (200, 204)
        refused(url, additional_headers={"Authorization": f"Bearer {token_of(revoked)}"})
        revoked.client.close()
    finally:
        org.close()
        other.close()


@pytest.fixture
def quick_api(stack: Stack) -> Iterator[ApiProcess]:
    """An API that rechecks streams every second and has small client queues."""
    api = stack.start_api(LMS_API_WS_RECHECK_SECONDS="1", LMS_API_WS_QUEUE_FRAMES="200")
    yield api
    api.stop()
    stack.apis.remove(api)


def test_a_revoked_token_or_a_removed_member_closes_the_stream(quick_api: ApiProcess, stack: Stack,
                                                               unique: str) -> None:
    api = quick_api
    org = Org(api, stack, unique)
    member = User(api, f"{unique}-m@example.com")
    try:
        assert org.owner.call("PUT", f"/api/v1/orgs/{unique}/members/{member.email}",
                              {"role": "viewer"}).status_code == 200
        session = User(api, f"{unique}@example.com")
        with open_stream(api, unique, token_of(session)) as ws1, open_stream(api, unique, token_of(member)) as ws2:
            assert session.call("POST", "/api/v1/auth/logout").status_code in (200, 204)
            assert org.owner.call("DELETE", f"/api/v1/orgs/{unique}/members/{member.email}").status_code in (200, 204)
            started = time.monotonic()
            for ws, code in ((ws1, 4001), (ws2, 4003)):
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        ws.recv(10)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == code, closed.value
            assert time.monotonic() - started < 5
        session.client.close()
    finally:
        member.client.close()
        org.close()


def test_a_client_that_stops_reading_is_cut_off_and_no_one_else_waits(quick_api: ApiProcess, stack: Stack,
                                                                        unique: str) -> None:
    api = quick_api
    org = Org(api, stack, unique)
    try:
        dev = org.device("busy")
        bridge = stack.bridges[0]
        received_before = bridge.metric("lms_bridge_messages_received_total")
        # The slow one: its library stops reading the socket once 4 frames wait unread, and its
        # kernel buffers little, so the server's sends soon stall.
        tiny = small_window(api)
        with open_stream(api, unique, org.token, max_queue=4, sock=tiny) as slow, \
                open_stream(api, unique, org.token, max_queue=None) as fast:  # takes all it can
            assert request(slow, type="subscribe", filter="+/telemetry")["type"] == "subscribed"
            assert request(fast, type="subscribe", filter="+/telemetry")["type"] == "subscribed"
            padding = os.urandom(4000).hex()  # incompressible
            n = 2000
            dev.publish_many([json.dumps({"seq": i, "pad": padding}).encode() for i in range(n)])
            got = messages(fast, n, timeout=60)
            assert [m["payload"]["seq"] for m in got] == list(range(n))
            wait_until(lambda: api_metric(api, "lms_api_ws_slow_disconnects_total") >= 1, 10,
                       "the slow client cut off")
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    slow.recv(10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4008, closed.value
        wait_until(lambda: bridge.metric("lms_bridge_messages_received_total") >= received_before + n, 30,
                   "the bridge to take everything meanwhile")
    finally:
        org.close()


def test_the_relay_holds_only_the_subscriptions_its_clients_watch(quick_api: ApiProcess, stack: Stack,
                                                                  unique: str) -> None:
    api = quick_api
    org = Org(api, stack, unique)
    try:
        assert api_metric(api, "lms_api_ws_broker_filters") == 0
        with open_stream(api, unique, org.token) as ws, open_stream(api, unique, org.token) as ws2:
            request(ws, type="subscribe", filter="dev-1/telemetry")
            request(ws2, type="subscribe", filter="dev-1/telemetry")
            assert api_metric(api, "lms_api_ws_broker_filters") == 1  # counted once for both
            assert api_metric(api, "lms_api_ws_clients") == 2
        wait_until(lambda: api_metric(api, "lms_api_ws_broker_filters") == 0, 5, "the last watcher's unsubscribe")
        assert api_metric(api, "lms_api_ws_clients") == 0
    finally:
        org.close()


def test_a_broker_restart_gives_a_gap_frame_then_messages_again(own_stack: Stack, unique: str) -> None:
    s = own_stack
    s.start_bridge()
    api = s.start_api()
    org = Org(api, s, unique)
    try:
        with open_stream(api, unique, org.token) as ws:
            assert request(ws, type="subscribe", filter="+/telemetry")["type"] == "subscribed"
            dev = org.device("d")
            dev.publish_wait("telemetry", json.dumps({"n": 1}))
            assert messages(ws, 1)[0]["payload"] == {"n": 1}
            dev.stop()
            s.mq.stop()
            s.mq.start()
            deadline = time.monotonic() + 30
            while True:
                frame = json.loads(ws.recv(max(0.1, deadline - time.monotonic())))
                if frame["type"] == "gap":
                    break
            assert frame["from"] <= frame["to"]
            again = Device(s.mq.port, dev.creds)
            org.devices.append(again)
            assert again.connect().value == 0
            again.publish_wait("telemetry", json.dumps({"n": 2}))
            assert messages(ws, 1)[0]["payload"] == {"n": 2}
    finally:
        org.close()


def test_fuzzed_frames_get_errors_or_a_close_and_the_api_lives_on(api: ApiProcess, stack: Stack,
                                                                  unique: str) -> None:
    org = Org(api, stack, unique)
    try:
        with open_stream(api, unique, org.token) as ws:
            for frame in ["{", "[]", "null", '"text"', '{"type": 5}', '{"type": "subscribe"}',
                          '{"type": "nope"}', '{"type": "subscribe", "filter": "+/telemetry", "id": {"a": 1}}',
                          "x" * 5000, "[" * 3000 + "]" * 3000]:
                ws.send(frame)
                answer = json.loads(ws.recv(10))
                assert answer["type"] in ("error", "subscribed"), (frame[:40], answer)
            ws.send(b"\x00\x01binary")
            assert json.loads(ws.recv(10))["type"] == "error"
            # Thousands of subscriptions: the limit answers, the stream stays.
            for i in range(300):
                ws.send(json.dumps({"type": "subscribe", "filter": f"dev-{i}/telemetry"}))
            answers = [json.loads(ws.recv(10)) for _ in range(300)]
            assert sum(a["type"] == "subscribed" for a in answers) == 99  # '+/telemetry' above was the 100th
            assert {a["type"] for a in answers} == {"subscribed", "error"}
        # A frame over the size limit closes the connection (1009), nothing else.
        with open_stream(api, unique, org.token) as ws:
            ws.send("y" * 100_000)
            with pytest.raises(ConnectionClosed):
                while True:
                    ws.recv(10)
        with open_stream(api, unique, org.token) as ws:
            assert request(ws, type="ping")["type"] == "pong"
    finally:
        org.close()


def test_api_keys_stream_and_a_revoked_key_is_closed(quick_api: ApiProcess, stack: Stack, unique: str) -> None:
    api = quick_api
    org = Org(api, stack, unique)
    try:
        r = org.owner.call("POST", f"/api/v1/orgs/{unique}/api-keys", {"name": "screen", "role": "viewer"})
        key = r.json()["key"]
        url = ws_url(api, unique)
        with connect(url, additional_headers={"X-API-Key": key}, open_timeout=10) as ws:
            assert json.loads(ws.recv(10))["type"] == "welcome"
            assert request(ws, type="subscribe", filter="+/status")["type"] == "subscribed"
            key_id = org.owner.call("GET", f"/api/v1/orgs/{unique}/api-keys").json()[0]["id"]
            assert org.owner.call("DELETE", f"/api/v1/orgs/{unique}/api-keys/{key_id}").status_code == 204
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    ws.recv(10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001, closed.value
        refused(url, additional_headers={"X-API-Key": key})
        # Another organization's key never opens this one's stream.
        other = Org(api, stack, f"{unique}-k")
        try:
            k2 = other.owner.call("POST", f"/api/v1/orgs/{other.slug}/api-keys", {"name": "x"}).json()["key"]
            refused(url, additional_headers={"X-API-Key": k2})
        finally:
            other.close()
    finally:
        org.close()


def test_drop_oldest_tells_the_client_how_many_it_lost(quick_api: ApiProcess, stack: Stack, unique: str) -> None:
    """With ?overflow=drop a client that falls behind keeps its connection and is told."""
    api = quick_api
    org = Org(api, stack, unique)
    try:
        dev = org.device("busy")
        tiny = small_window(api)
        with open_stream(api, unique, org.token, query="overflow=drop", max_queue=4, sock=tiny) as ws:
            assert request(ws, type="subscribe", filter="+/telemetry")["type"] == "subscribed"
            padding = os.urandom(4000).hex()
            n = 2000
            dev.publish_many([json.dumps({"seq": i, "pad": padding}).encode() for i in range(n)])
            wait_until(lambda: api_metric(api, "lms_api_ws_frames_dropped_total") > 0, 20, "frames to be dropped")
            seen, dropped = [], 0
            deadline = time.monotonic() + 60
            while len(seen) + dropped < n and time.monotonic() < deadline:
                frame = json.loads(ws.recv(10))
                if frame["type"] == "dropped":
                    dropped += frame["count"]
                elif frame["type"] == "message":
                    seen.append(frame["payload"]["seq"])
            assert dropped > 0 and len(seen) + dropped == n, (len(seen), dropped)
            assert seen == sorted(seen)  # what arrives keeps its order; the oldest went
        assert api_metric(api, "lms_api_ws_slow_disconnects_total") == 0
    finally:
        org.close()


def test_a_user_cannot_hold_more_than_its_share_of_streams(stack: Stack, unique: str) -> None:
    api = stack.start_api(LMS_API_WS_MAX_PER_USER="2")
    org = Org(api, stack, unique)
    try:
        with open_stream(api, unique, org.token), open_stream(api, unique, org.token):
            with connect(ws_url(api, unique), additional_headers={"Authorization": f"Bearer {org.token}"},
                         open_timeout=10) as third, pytest.raises(ConnectionClosed) as closed:
                while True:
                    third.recv(10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4029, closed.value
        # The slots come back when streams close.
        wait_until(lambda: api_metric(api, "lms_api_ws_clients") == 0, 10, "the streams to be closed")
        with open_stream(api, unique, org.token), open_stream(api, unique, org.token):
            pass
    finally:
        org.close()
        api.stop()
        stack.apis.remove(api)
