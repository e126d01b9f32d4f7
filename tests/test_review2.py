"""Review R2 (issues 9 and 10): attacks from outside on streams, rules, alerts and webhooks,
against a real API, bridge, broker and database. Each test names the finding it pins."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tests.harness import ApiProcess, Device, Stack, wait_until
from tests.test_api_commands import Org as RulesOrg
from tests.test_api_rules import THRESHOLD, insert_alert
from tests.test_api_stream import Org as StreamOrg
from tests.test_api_stream import api_metric, open_stream, refused, request, ws_url
from tests.test_webhooks import Receiver


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def stream_api(stack: Stack) -> Iterator[ApiProcess]:
    """An API of its own (its memory is measured), default stream settings."""
    api = stack.start_api()
    yield api
    api.stop()
    stack.apis.remove(api)


def test_an_unread_stream_does_not_hold_megabytes_of_frames(stream_api: ApiProcess, stack: Stack,
                                                            unique: str) -> None:
    """Finding: a client's queue was bounded in frames only (1000), not in bytes. A message may
    be as large as the broker takes (max_packet_size, 260 KiB), so one member whose stream
    reads slowly (or not at all, until the ping timeout) made the API hold 1000 x 260 KiB
    = 260 MB — 20 such streams per user, each watching its own device, several GB: one tenant
    could take the API process (and every other tenant's dashboards) down."""
    api = stream_api
    org = StreamOrg(api, stack, unique)
    try:
        dev = org.device("big")
        # A reader that takes nothing: its library stops reading the socket after 4 frames, and
        # its kernel buffers little, so the server's sends stall at once.
        tiny = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tiny.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        tiny.connect(("127.0.0.1", api.port))
        with open_stream(api, unique, org.token, query="overflow=drop", max_queue=4, sock=tiny) as ws:
            assert request(ws, type="subscribe", filter="+/#")["type"] == "subscribed"
            time.sleep(0.5)
            assert api.proc is not None
            before = rss_bytes(api.proc.pid)
            frames_before = api_metric(api, "lms_api_ws_frames_total")
            n = 300
            pad = "x" * 200_000
            dev.publish_many([json.dumps({"seq": i, "pad": pad}).encode() for i in range(n)], kind="events",
                             window=20)
            wait_until(lambda: api_metric(api, "lms_api_ws_frames_total") >= frames_before + n, 30,
                       "the relay to take every message")
            grown = rss_bytes(api.proc.pid) - before
            assert grown < 30 * 2**20, f"the API grew by {grown / 2**20:.0f} MiB for one unread stream"
    finally:
        org.close()


# -- rules and the devices they watch ----------------------------------------------------

@pytest.fixture
def org(api: ApiProcess, stack: Stack, unique: str) -> Iterator[RulesOrg]:
    o = RulesOrg(api, stack, unique)
    yield o
    o.close()


def test_deleting_an_asset_does_not_silently_delete_its_rules_and_strand_their_alerts(org: RulesOrg,
                                                                                      stack: Stack) -> None:
    """Finding: ``alert_rules.scope_asset_id`` is ``ON DELETE CASCADE``, so deleting an asset
    deleted every rule scoped to it without a word (no audit, no answer saying so), and their
    firing alerts stayed ``firing`` for ever with ``rule_id`` null: nothing would ever resolve
    them, no ``resolved`` message or webhook went out. Deleting the rule itself resolves them
    (``rule deleted``); deleting the asset must not be a way around that."""
    org.device("pump-1")
    assert org.call("POST", "/assets", {"slug": "site-a"}).status_code == 201
    assert org.call("PUT", "/assets/site-a/devices/pump-1").status_code == 204
    rid = org.call("POST", "/rules", {**THRESHOLD, "scope": {"asset": "site-a"}}).json()["id"]
    aid = insert_alert(stack, org.slug, "pump-1", rule_id=rid)

    r = org.call("DELETE", "/assets/site-a")
    assert r.status_code == 409, r.text
    assert f"rule(s) {rid} ('hot')" in r.text, r.text
    assert org.call("GET", f"/rules/{rid}").status_code == 200
    assert org.call("GET", "/assets/site-a").status_code == 200
    # Once the rule is gone (its alerts resolved with it), the asset may go.
    assert org.call("DELETE", f"/rules/{rid}").status_code == 204
    assert org.call("GET", f"/alerts/{aid}").json()["resolved_reason"] == "rule deleted"
    assert org.call("DELETE", "/assets/site-a").status_code == 204


def test_a_device_that_leaves_a_rules_scope_does_not_keep_its_alert_firing_for_ever(org: RulesOrg,
                                                                                   stack: Stack) -> None:
    """Finding (fixed: the bridge's sweep resolves it, "device left the rule's scope"): a
    threshold rule scoped to a tag (or an asset) fires for a device; the tag is then taken off
    the device (or the device detached from the asset). The bridge evaluates only the rules in
    a device's scope, so nothing resolved that alert: it stayed ``firing`` for ever."""
    creds = org.device("pump-1", tags=["hot"])
    dev = Device(stack.mq.port, creds)
    assert dev.connect().value == 0
    try:
        rid = org.call("POST", "/rules", {**THRESHOLD, "scope": {"tag": "hot"}}).json()["id"]
        # No wait needed: each batch reads rules_version and reloads the rules when it moved.
        dev.publish_wait("telemetry", json.dumps({"temp": 35}))
        firing = wait_until(lambda: [a for a in org.call("GET", "/alerts?state=firing").json()
                                     if a["rule_id"] == rid], 15, "the alert to fire")
        assert org.call("PATCH", "/devices/pump-1", {"tags": []}).status_code == 200
        dev.publish_wait("telemetry", json.dumps({"temp": 10}))
        alert = wait_until(lambda: (a := org.call("GET", f"/alerts/{firing[0]['id']}").json())["state"] == "resolved"
                           and a, 15, "the alert of a device no longer in the rule's scope to resolve")
        assert alert["resolved_reason"] == "device left the rule's scope", alert
    finally:
        dev.stop()


# -- what held (kept as regression tests) ------------------------------------------------

@pytest.fixture
def limited_api(stack: Stack) -> Iterator[ApiProcess]:
    api = stack.start_api(LMS_API_WS_RECHECK_SECONDS="1", LMS_API_WS_MAX_PER_USER="2")
    yield api
    api.stop()
    stack.apis.remove(api)


def test_refused_streams_leak_no_slot_and_a_revoked_subprotocol_key_ends_its_stream(limited_api: ApiProcess,
                                                                                      stack: Stack,
                                                                                      unique: str) -> None:
    api = limited_api
    org = StreamOrg(api, stack, unique)
    try:
        url = ws_url(api, unique)
        header = {"Authorization": f"Bearer {org.token}"}
        with open_stream(api, unique, org.token) as one, open_stream(api, unique, org.token):
            for _ in range(5):  # over the per-user limit: accepted, then closed with 4029
                with connect(url, additional_headers=header, open_timeout=10) as ws, \
                        pytest.raises(ConnectionClosed) as closed:
                    while True:
                        ws.recv(10)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 4029
            assert api_metric(api, "lms_api_ws_clients") == 2
            assert request(one, type="subscribe", filter="+/telemetry")["type"] == "subscribed"
        wait_until(lambda: api_metric(api, "lms_api_ws_clients") == 0, 5, "both streams gone")
        assert api_metric(api, "lms_api_ws_broker_filters") == 0
        # An API key offered as a subprotocol (a page on another site); revoked, the stream ends.
        r = org.owner.call("POST", f"/api/v1/orgs/{unique}/api-keys", {"name": "dash", "role": "viewer"})
        assert r.status_code == 201, r.text
        key, key_id = r.json()["key"], r.json()["id"]
        with connect(url, subprotocols=["lms.v1", f"lms.token.{key}"], open_timeout=10) as ws:  # type: ignore[list-item]
            assert json.loads(ws.recv(10))["type"] == "welcome"
            assert org.owner.call("DELETE", f"/api/v1/orgs/{unique}/api-keys/{key_id}").status_code == 204
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    ws.recv(10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001
        refused(url, subprotocols=["lms.v1", f"lms.token.{key}"])  # type: ignore[list-item]
        # Origin variants for a cookie: only the API's own host:port passes.
        cookie = {"Cookie": f"lms_session={org.token}"}
        host = api.url.split("//", 1)[1]
        for origin in ("null", f"http://{host}.evil.example", f"http://evil.example@{host}",
                       f"http://{host.split(':')[0]}", "http://localhost:" + host.split(":")[1], f"http://{host}:1"):
            with pytest.raises((InvalidStatus, ConnectionClosed)), \
                    connect(url, additional_headers={**cookie, "Origin": origin}, open_timeout=10) as ws:
                ws.recv(10)
    finally:
        org.close()


# -- the webhook sender ------------------------------------------------------------------

def test_one_organizations_dead_webhooks_do_not_hold_up_anothers(own_stack: Stack, unique: str) -> None:
    """Finding (fixed: an organization, and failing webhooks, take at most half the slots):
    the sender (bridge/notify.py) claimed the due deliveries in
    ``next_attempt_at`` order across every organization, at most one per webhook and
    ``LMS_WEBHOOK_CONCURRENCY`` at once. An organization with a few webhooks pointing at a
    receiver that accepts and never answers (each attempt takes the whole time-out) and a
    backlog of alert changes (up to 2,000 rules per organization) fills every slot, and
    another organization's fresh delivery waits behind the whole backlog: backlog x time-out /
    concurrency (here 30 x 1 s / 2 = 15 s; with the defaults, 20 webhooks and thousands of
    alert changes, hours)."""
    s = own_stack
    s.start_bridge(LMS_WEBHOOK_ALLOW_PRIVATE="1", LMS_WEBHOOK_CONCURRENCY="2", LMS_WEBHOOK_TIMEOUT_SECONDS="1")
    s.create_device(f"{unique}-a", "d")
    s.create_device(f"{unique}-b", "d")
    tarpit = socket.socket()  # accepts connections (the kernel's backlog) and never answers
    tarpit.bind(("127.0.0.1", 0))
    tarpit.listen(1000)
    good = Receiver()
    try:
        dead = [s.scalar("""INSERT INTO webhooks (org_id, url, secret, severities)
                            SELECT id, $2, 's', ARRAY['critical','major','minor','warning','info']
                            FROM organizations WHERE slug = $1 RETURNING id""",
                         f"{unique}-a", f"http://127.0.0.1:{tarpit.getsockname()[1]}/hook") for _ in range(4)]
        s.query("""INSERT INTO webhook_deliveries (webhook_id, body)
                   SELECT w, '{"event": "alert.firing"}' FROM unnest($1::bigint[]) w, generate_series(1, 8)""", dead)
        time.sleep(0.2)
        other = s.scalar("""INSERT INTO webhooks (org_id, url, secret, severities)
                            SELECT id, $2, 's', ARRAY['major'] FROM organizations WHERE slug = $1 RETURNING id""",
                         f"{unique}-b", good.url)
        s.query("""INSERT INTO webhook_deliveries (webhook_id, body) VALUES ($1, '{"event": "alert.firing"}')""",
                other)
        started = time.monotonic()
        wait_until(lambda: good.requests, 30, "the other organization's delivery")
        waited = time.monotonic() - started
        assert waited < 5, f"another organization's delivery waited {waited:.1f} s behind dead webhooks"
    finally:
        good.close()
        tarpit.close()
