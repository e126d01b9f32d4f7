"""Alert rules end to end: real devices publish, real bridges evaluate, alerts are read back
from the database and from ``lms/{org}/{device}/alerts`` on the broker.

Rules and webhooks are written straight into the database (what the API's POST does).
Device times are an hour back, so that the tests choose every timestamp a rule sees.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bridge.rules import PairState, Rule, step
from tests.harness import ApiProcess, BridgeProcess, Device, Stack, stop_client, wait_until
from tests.test_api_commands import Org


class AlertWatch:
    """A subscriber on ``lms/{org}/+/alerts`` with the platform's account (a technician's
    login reads the same topics; see tests/test_api_technicians.py)."""

    def __init__(self, s: Stack, org: str) -> None:
        url = s.mqtt_url
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        c = self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"alert-watch-{org}",
                                      protocol=paho.MQTTv311)
        c.username_pw_set(url.username, url.password)
        c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(f"lms/{org}/+/alerts", qos=1)
        c.on_subscribe = lambda cl, u, mid, rcs, p: subscribed.set()
        c.on_message = self._on_message
        c.connect("127.0.0.1", s.mq.port)
        c.loop_start()
        assert subscribed.wait(10), "no SUBACK"

    def _on_message(self, client: Any, userdata: Any, m: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((m.topic, json.loads(m.payload)))

    def states(self) -> list[tuple[int, str]]:
        with self._lock:
            return [(p["alert_id"], p["state"]) for _, p in self.messages]

    def stop(self) -> None:
        stop_client(self.client)


def _device(s: Stack, org: str, name: str, **kw: Any) -> Device:
    dev = Device(s.mq.port, s.create_device(org, name), **kw)
    assert dev.connect().value == 0
    return dev


def _rule(s: Stack, org: str, name: str, **kw: Any) -> int:
    """A rule as the API stores it; ``device=`` scopes it to one device of ``org``."""
    fields: dict[str, Any] = {"kind": "threshold", "severity": "major", "scope_kind": "org", **kw}
    device = fields.pop("device", None)
    if device is not None:
        fields["scope_kind"] = "device"
        fields["scope_device_id"] = _device_id(s, org, device)
    cols = list(fields)
    sql = (f"INSERT INTO alert_rules (org_id, name, {', '.join(cols)}) "
           f"VALUES ((SELECT id FROM organizations WHERE slug = $1), $2, "
           f"{', '.join(f'${i + 3}' for i in range(len(cols)))}) RETURNING id")
    return int(s.scalar(sql, org, name, *fields.values()))


def _device_id(s: Stack, org: str, device: str) -> int:
    return int(s.scalar("SELECT d.id FROM devices d JOIN organizations o ON o.id = d.org_id "
                        "WHERE o.slug = $1 AND d.slug = $2", org, device))


def _alerts(s: Stack, rule_id: int) -> list[dict[str, Any]]:
    return [dict(r) for r in s.query("SELECT * FROM alerts WHERE rule_id = $1 ORDER BY id", rule_id)]


T0 = int(time.time() * 1000) - 3_600_000  # device time of the tests' readings, ms


def _send(s: Stack, dev: Device, at_s: float, **values: float) -> None:
    """Publish one stamped reading at ``T0 + at_s`` and wait until it is committed."""
    ts = T0 + round(at_s * 1000)
    dev.publish_wait("telemetry", json.dumps({"ts": ts, "values": values}))
    device = dev.creds.client_id.split(".", 1)[1]
    org = dev.creds.client_id.split(".", 1)[0]
    when = datetime.fromtimestamp(ts / 1000, UTC)
    wait_until(lambda: s.scalar(
        """SELECT count(*) FROM readings r JOIN devices d ON d.id = r.device_id JOIN organizations o ON o.id = d.org_id
           WHERE o.slug = $1 AND d.slug = $2 AND r.time = $3""", org, device, when) == len(values), 10,
        f"the reading at {at_s}")


def _at(at_s: float) -> datetime:
    return datetime.fromtimestamp((T0 + round(at_s * 1000)) / 1000, UTC)


# -- thresholds ---------------------------------------------------------------------------

def test_threshold_held_for_its_duration_fires_once_and_clears_past_the_clear_threshold(
        stack: Stack, unique: str) -> None:
    s = stack
    dev = _device(s, unique, "d")
    watch = AlertWatch(s, unique)
    try:
        s.create_device(f"{unique}-other", "x")
        hooks = {name: int(s.scalar(
            """INSERT INTO webhooks (org_id, url, secret, severities, enabled)
               VALUES ((SELECT id FROM organizations WHERE slug = $1), 'https://example.com/' || $2, 's3cret', $3, $4)
               RETURNING id""", org, name, sev, enabled))
            for name, org, sev, enabled in [
                ("match", unique, ["critical", "major"], True), ("other-severity", unique, ["info"], True),
                ("disabled", unique, ["major"], False), ("other-org", f"{unique}-other", ["major"], True)]}
        rule = _rule(s, unique, "hot", metric="temp", comparison=">", threshold=30.0, clear_threshold=28.0,
                     duration_s=5)
        _send(s, dev, 0, temp=31)
        _send(s, dev, 3, temp=35)
        assert _alerts(s, rule) == []  # held 3 s of 5
        _send(s, dev, 5, temp=32)
        (a,) = wait_until(lambda: _alerts(s, rule), 10, "the alert")
        assert (a["state"], a["value"], a["fired_at"], a["severity"], a["metric"], a["kind"], a["rule_name"]) == (
            "firing", 32.0, _at(5), "major", "temp", "threshold", "hot")
        assert a["device_id"] == _device_id(s, unique, "d") and a["fired_evaluated_at"] is not None
        wait_until(lambda: watch.states() == [(a["id"], "firing")], 10, "the firing message")
        topic, msg = watch.messages[0]
        assert topic == f"lms/{unique}/d/alerts"
        assert msg == {"alert_id": a["id"], "rule": "hot", "state": "firing", "severity": "major", "metric": "temp",
                       "value": 32.0, "ts": T0 + 5000}
        _send(s, dev, 6, temp=29)  # inside the hysteresis band: still firing
        _send(s, dev, 7, temp=31)
        assert [r["state"] for r in _alerts(s, rule)] == ["firing"]
        _send(s, dev, 8, temp=27.5)
        (a,) = wait_until(lambda: [r for r in _alerts(s, rule) if r["state"] == "resolved"], 10, "the resolution")
        assert (a["resolved_value"], a["resolved_at"], a["resolved_reason"]) == (27.5, _at(8), "condition cleared")
        wait_until(lambda: watch.states() == [(a["id"], "firing"), (a["id"], "resolved")], 10, "the resolved message")
        assert watch.messages[1][1]["value"] == 27.5 and watch.messages[1][1]["ts"] == T0 + 8000
        # Webhook deliveries: only the enabled webhook of this organization with the severity.
        rows = s.query("SELECT webhook_id, alert_id, body, state FROM webhook_deliveries WHERE alert_id = $1 "
                       "ORDER BY id", a["id"])
        assert [(r["webhook_id"], r["state"]) for r in rows] == [(hooks["match"], "pending")] * 2
        bodies = [json.loads(r["body"]) for r in rows]
        assert [b["event"] for b in bodies] == ["alert.firing", "alert.resolved"]
        first = bodies[0]["alert"]
        assert {k: first[k] for k in ("id", "org", "device", "rule", "rule_id", "severity", "metric", "value",
                                      "state", "resolved_at")} == {
            "id": a["id"], "org": unique, "device": "d", "rule": "hot", "rule_id": rule, "severity": "major",
            "metric": "temp", "value": 32.0, "state": "firing", "resolved_at": None}
        assert bodies[1]["alert"]["state"] == "resolved" and bodies[1]["alert"]["resolved_value"] == 27.5
        assert datetime.fromisoformat(bodies[1]["alert"]["fired_at"]) == _at(5)
        wait_until(lambda: s.scalar("SELECT count(*) FROM mqtt_outbox WHERE topic LIKE $1", f"lms/{unique}/%") == 0,
                   10, "the outbox to empty")
    finally:
        watch.stop()
        dev.close()


def test_cooldown_and_late_data(stack: Stack, unique: str) -> None:
    s = stack
    dev = _device(s, unique, "d")
    try:
        rule = _rule(s, unique, "high", metric="p", comparison=">=", threshold=10.0, cooldown_s=60, device="d")
        _send(s, dev, 100, p=11)
        wait_until(lambda: len(_alerts(s, rule)) == 1, 10, "the first alert")
        _send(s, dev, 101, p=5)
        wait_until(lambda: _alerts(s, rule)[0]["state"] == "resolved", 10, "the resolution")
        _send(s, dev, 102, p=12)  # in cooldown until 161
        _send(s, dev, 20, p=50)  # late: older than what was evaluated - stored, never evaluated
        _send(s, dev, 150, p=12)
        assert len(_alerts(s, rule)) == 1
        _send(s, dev, 161, p=13)
        wait_until(lambda: len(_alerts(s, rule)) == 2, 10, "the alert after the cooldown")
        second = _alerts(s, rule)[1]
        assert (second["state"], second["fired_at"], second["value"]) == ("firing", _at(161), 13.0)
        _send(s, dev, 120, p=0)  # a late low value does not clear today's alert
        # A redelivered message (the same stamped payload) evaluates nothing again.
        _send(s, dev, 100, p=11)
        _send(s, dev, 101, p=5)
        assert [r["state"] for r in _alerts(s, rule)] == ["resolved", "firing"]
        state = s.query("SELECT * FROM rule_state WHERE rule_id = $1", rule)[0]
        assert state["last_ts"] == _at(161) and state["alert_id"] == second["id"]
    finally:
        dev.close()


# -- no data, offline -----------------------------------------------------------------------

def test_no_data_fires_on_time_without_traffic_and_resolves_on_the_next_message(stack: Stack, unique: str) -> None:
    s = stack
    quiet, never = _device(s, unique, "quiet"), _device(s, unique, "never")
    watch = AlertWatch(s, unique)
    try:
        s.query("UPDATE devices SET tags = '{watched}' WHERE slug IN ('quiet', 'never') AND org_id = "
                "(SELECT id FROM organizations WHERE slug = $1)", unique)
        quiet.publish_wait("telemetry", json.dumps({"v": 1}))  # flat: receipt time
        wait_until(lambda: s.scalar("SELECT count(*) FROM readings WHERE device_id = $1",
                                    _device_id(s, unique, "quiet")) == 1, 10, "the reading")
        rule = _rule(s, unique, "silent", kind="no_data", duration_s=3, severity="critical", scope_kind="tag",
                     scope_tag="watched")
        created = s.scalar("SELECT created_at FROM alert_rules WHERE id = $1", rule)

        def firing() -> list[dict[str, Any]]:
            return [a for a in _alerts(s, rule) if a["state"] == "firing"]

        alerts = wait_until(lambda: len(firing()) == 2 and firing(), 15, "two no-data alerts")
        for a in alerts:
            # No telemetry since the rule exists (the one reading came before it): the
            # deadline is the rule's creation plus 3 s, and it fired within a few seconds of it.
            assert a["fired_at"] == created + timedelta(seconds=3)
            assert timedelta(0) <= a["fired_evaluated_at"] - a["fired_at"] < timedelta(seconds=3), a
        wait_until(lambda: len(watch.states()) == 2, 10, "two firing messages")
        sent = time.time()
        quiet.publish_wait("telemetry", json.dumps({"v": 2}))
        quiet_id = _device_id(s, unique, "quiet")
        (a,) = wait_until(lambda: [r for r in _alerts(s, rule) if r["device_id"] == quiet_id
                                   and r["state"] == "resolved"], 10, "the resolution")
        assert a["resolved_reason"] == "data again"
        assert abs(a["resolved_at"].timestamp() - sent) < 2
        assert [r["state"] for r in _alerts(s, rule) if r["device_id"] != quiet_id] == ["firing"]
        wait_until(lambda: [st for _, st in watch.states()].count("resolved") == 1, 10, "the resolved message")
        # Data keeps the deadline away; silence again fires again, 3 s after the last message.
        quiet.publish_wait("telemetry", json.dumps({"v": 3}))
        wait_until(lambda: len([r for r in _alerts(s, rule) if r["device_id"] == quiet_id]) == 2, 15,
                   "the second no-data alert")
        last = s.scalar("SELECT last_seen_at FROM rule_state WHERE rule_id = $1 AND device_id = $2", rule, quiet_id)
        second = [r for r in _alerts(s, rule) if r["device_id"] == quiet_id][1]
        assert second["fired_at"] == last + timedelta(seconds=3)
        assert second["fired_evaluated_at"] - second["fired_at"] < timedelta(seconds=3)
    finally:
        watch.stop()
        quiet.close()
        never.close()


def test_offline_held_for_its_duration_fires_and_online_resolves(stack: Stack, unique: str) -> None:
    s = stack
    dev = _device(s, unique, "d")
    watch = AlertWatch(s, unique)
    try:
        rule = _rule(s, unique, "gone", kind="offline", duration_s=2, device="d")
        dev.publish_wait("status", "online")
        dev.publish_wait("status", "offline")
        dev_id = _device_id(s, unique, "d")
        changed = wait_until(lambda: s.scalar("SELECT status_changed_at FROM devices WHERE id = $1 AND "
                                              "status = 'offline'", dev_id), 10, "offline")
        (a,) = wait_until(lambda: _alerts(s, rule), 10, "the offline alert")
        assert a["state"] == "firing" and a["fired_at"] == changed + timedelta(seconds=2)
        assert a["fired_evaluated_at"] - a["fired_at"] < timedelta(seconds=3)
        dev.publish_wait("status", "online")
        (a,) = wait_until(lambda: [r for r in _alerts(s, rule) if r["state"] == "resolved"], 10, "the resolution")
        assert a["resolved_reason"] == "online again"
        wait_until(lambda: watch.states() == [(a["id"], "firing"), (a["id"], "resolved")], 10, "both messages")
        time.sleep(3)  # the sweep ran a few more times: one episode, one alert
        assert len(_alerts(s, rule)) == 1
    finally:
        watch.stop()
        dev.close()


# -- crashes and several bridges --------------------------------------------------------------

def test_bridge_killed_while_firing_and_while_pending_forgets_nothing_and_fires_nothing_twice(
        own_stack: Stack, unique: str) -> None:
    s = own_stack
    bridge = s.start_bridge()
    dev = _device(s, unique, "d")
    try:
        now_rule = _rule(s, unique, "at once", metric="a", comparison=">", threshold=50.0)
        held_rule = _rule(s, unique, "held 20 s", metric="b", comparison=">", threshold=50.0, duration_s=20)
        _send(s, dev, 0, a=60, b=60)
        wait_until(lambda: len(_alerts(s, now_rule)) == 1, 10, "the first alert")
        assert _alerts(s, held_rule) == []
        bridge.kill()
        # While it is down: more of the same, queued by the broker for its session.
        for t in (5, 10):
            dev.publish_wait("telemetry", json.dumps({"ts": T0 + t * 1000, "values": {"a": 70, "b": 70}}))
        bridge.start()
        _send(s, dev, 15, a=80, b=80)
        assert len(_alerts(s, now_rule)) == 1 and _alerts(s, held_rule) == []
        # The held rule remembers since when its condition holds (0): 20 s later it fires.
        _send(s, dev, 20, a=80, b=90)
        (held,) = wait_until(lambda: _alerts(s, held_rule), 10, "the held alert")
        assert held["fired_at"] == _at(20) and held["value"] == 90.0
        # Killed again with both firing; everything published again, as a redelivery would.
        bridge.kill()
        for t in (0, 5, 10, 15, 20):
            dev.publish_wait("telemetry", json.dumps({"ts": T0 + t * 1000, "values": {"a": 60, "b": 60}}))
        bridge.start()
        _send(s, dev, 21, a=10, b=10)
        wait_until(lambda: [a["state"] for a in _alerts(s, now_rule) + _alerts(s, held_rule)] == ["resolved"] * 2,
                   10, "both resolved")
        assert s.scalar("SELECT count(*) FROM alerts") == 2
    finally:
        dev.close()


def _stream_alerts(s: Stack, org: str, n_bridges: int) -> tuple[list[tuple[str, datetime, datetime | None]],
                                                                  list[float]]:
    """One device's stream through ``n_bridges`` bridges on the shared subscription: three
    high plateaus of 2 s of device time between low ones, 10 ms apart, as fast as the
    broker takes them. Returns the alerts (state, fired, resolved) and each bridge's count."""
    bridges = [s.start_bridge(f"lms-bridge-{i}", LMS_BRIDGE_SUBSCRIPTION="shared", LMS_BRIDGE_FLUSH_MS="20")
               for i in range(n_bridges)]
    dev = _device(s, org, "d")
    try:
        rule = _rule(s, org, "plateaus", metric="v", comparison=">", threshold=50.0, clear_threshold=40.0,
                     duration_s=1)
        payloads = []
        for i in range(1400):  # 14 s: low 2, high 2, low 2, high 2, low 2, high 2, low 2
            high = (i // 200) % 2 == 1
            payloads.append(json.dumps({"ts": T0 + i * 10, "values": {"v": 60 + i % 7 if high else 30}}).encode())
        dev.publish_many(payloads, window=100)
        dev_id = _device_id(s, org, "d")
        wait_until(lambda: s.scalar("SELECT count(*) FROM readings WHERE device_id = $1", dev_id) == 1400, 60,
                   "the stream")
        counts = [b.metric("lms_bridge_messages_stored_total") for b in bridges]
        alerts = wait_until(lambda: (a := _alerts(s, rule)) and len(a) == 3 and a[-1]["state"] == "resolved" and a,
                            10, f"three alerts ({_alerts(s, rule)})")
        return [(a["state"], a["fired_at"], a["resolved_at"]) for a in alerts], counts
    finally:
        dev.close()
        for b in bridges:
            b.stop()
        s.bridges.clear()


def test_two_bridges_splitting_one_device_give_the_same_alerts_as_one(own_stack: Stack, unique: str) -> None:
    s = own_stack
    one, _ = _stream_alerts(s, unique, 1)
    two, counts = _stream_alerts(s, f"{unique}-two", 2)
    assert all(c > 0 for c in counts), counts  # each bridge evaluated part of the stream
    for alerts in (one, two):
        assert [a[0] for a in alerts] == ["resolved"] * 3
        for k, (_, fired, resolved) in enumerate(alerts):
            start = _at(2 + 4 * k)  # each high plateau begins at 2, 6, 10 s and lasts 2 s
            assert start + timedelta(seconds=1) <= fired < start + timedelta(seconds=2), (k, fired)
            assert resolved is not None and start + timedelta(seconds=2) <= resolved < start + timedelta(seconds=4)
    # One bridge evaluates every reading in order: exactly what the state machine says.
    rule = Rule(id=1, org_id=1, name="r", metric="v", comparison=">", threshold=50.0, clear_threshold=40.0,
                duration_s=1)
    st, expected = PairState(), []
    for i in range(1400):
        high = (i // 200) % 2 == 1
        r = step(rule, st, (T0 + i * 10) / 1000, 60 + i % 7 if high else 30)
        if r == 1:
            expected.append(_at(i / 100))
    assert [a[1] for a in one] == expected


def test_two_bridges_alternating_on_one_device_share_its_rule_state(own_stack: Stack, unique: str) -> None:
    """Each message committed before the next is sent, so that the broker's round robin hands
    them to the two bridges in turn: the state one bridge wrote is the other's input."""
    s = own_stack
    bridges = [s.start_bridge(f"lms-bridge-{i}", LMS_BRIDGE_SUBSCRIPTION="shared") for i in range(2)]
    dev = _device(s, unique, "d")
    try:
        rule = _rule(s, unique, "held", metric="v", comparison=">", threshold=50.0, clear_threshold=40.0,
                     duration_s=3, cooldown_s=2)
        values = [60, 60, 60, 60, 45, 60, 30, 60, 60, 60, 60, 60, 60, 10, 55, 55, 55, 55, 55]
        for i, v in enumerate(values):
            _send(s, dev, i, v=v)
        assert all(b.metric("lms_bridge_messages_stored_total") > 0 for b in bridges)
        r = Rule(id=1, org_id=1, name="r", metric="v", comparison=">", threshold=50.0, clear_threshold=40.0,
                 duration_s=3, cooldown_s=2)
        st, expected = PairState(), []
        for i, v in enumerate(values):
            outcome = step(r, st, float(i), float(v))
            if outcome:
                expected.append(("fire" if outcome == 1 else "resolve", _at(i)))
        got = []
        for a in _alerts(s, rule):
            got.append(("fire", a["fired_at"]))
            if a["resolved_at"] is not None:
                got.append(("resolve", a["resolved_at"]))
        assert got == expected and len(expected) >= 4
    finally:
        dev.close()


# -- rule changes committed while an evaluation is under way ----------------------------------

class HeldLock:
    """A transaction of the test's own holding a row lock until :meth:`release`: a bridge's
    transaction that needs the row waits, and the test decides what commits meanwhile."""

    def __init__(self, s: Stack, sql: str, *args: Any) -> None:
        self.stack = s
        self.runner = asyncio.Runner()
        try:
            self.conn = self.runner.run(asyncpg.connect(s.pg.url))
            self.runner.run(self.conn.execute("BEGIN"))
            self.runner.run(self.conn.execute(sql, *args))
        except BaseException:
            self.runner.close()
            raise
        self.pid = self.conn.get_server_pid()

    def waiters(self, *also: int) -> list[tuple[int, datetime]]:
        """(pid, transaction start) of the sessions waiting for this one's locks, or for a
        lock the sessions ``also`` hold or queued for first."""
        return [(r["pid"], r["xact_start"]) for r in self.stack.query(
            "SELECT pid, xact_start FROM pg_stat_activity WHERE pg_blocking_pids(pid) && $1::int[] ORDER BY pid",
            [self.pid, *also])]

    def release(self) -> None:
        """Roll back (closing the connection ends its transaction)."""
        try:
            self.runner.run(self.conn.close())
        finally:
            self.runner.close()


def _change(org: Org, rule_id: int, change: str) -> None:
    """Change the rule through the API (its transaction locks the rule, resolves its firing
    alerts and forgets its state)."""
    if change == "delete":
        r = org.call("DELETE", f"/rules/{rule_id}")
    elif change == "disable":
        r = org.call("PATCH", f"/rules/{rule_id}", {"enabled": False})
    else:
        r = org.call("PATCH", f"/rules/{rule_id}", {"threshold": 100})
    assert r.status_code in (200, 204), r.text


@pytest.mark.parametrize("change", ["delete", "disable", "raise the threshold"])
def test_a_rule_change_committed_while_a_batch_waits_is_what_the_batch_evaluates(
        api: ApiProcess, stack: Stack, bridge: BridgeProcess, unique: str, change: str) -> None:
    """The batch read the rules version and cached the rule (temp > 30); before it evaluates,
    the API deletes, disables or changes the rule and commits. The batch must evaluate what is
    committed: no alert under the old rule, and no error (the state row of a deleted rule)."""
    s = stack
    org = Org(api, s, unique)
    dev = Device(s.mq.port, org.device("d"))
    try:
        assert dev.connect().value == 0
        rule = org.call("POST", "/rules", {"name": "hot", "metric": "temp", "comparison": ">", "threshold": 30,
                                           "scope": {"device": "d"}}).json()["id"]
        errors = bridge.metric("lms_bridge_rule_errors_total")
        # The batch's first write to the device's row (its last-seen time) waits for this
        # lock: after the batch read the rules version, before it evaluates.
        held = HeldLock(s, "SELECT 1 FROM devices WHERE id = $1 FOR NO KEY UPDATE", _device_id(s, unique, "d"))
        try:
            dev.publish_wait("telemetry", json.dumps({"ts": T0, "values": {"temp": 50}}))
            wait_until(held.waiters, 10, "the batch to wait for the device's row")
            _change(org, rule, change)
        finally:
            held.release()
        wait_until(lambda: s.scalar("SELECT count(*) FROM readings r JOIN devices d ON d.id = r.device_id "
                                    "JOIN organizations o ON o.id = d.org_id WHERE o.slug = $1", unique) == 1,
                   10, "the batch to commit")
        assert s.query("SELECT a.state FROM alerts a JOIN organizations o ON o.id = a.org_id "
                       "WHERE o.slug = $1", unique) == []
        assert bridge.metric("lms_bridge_rule_errors_total") == errors
    finally:
        dev.close()
        org.close()


@pytest.mark.parametrize("change", ["delete", "disable"])
def test_a_rule_change_committed_before_the_no_data_sweep_writes_leaves_no_alert(
        api: ApiProcess, stack: Stack, bridge: BridgeProcess, unique: str, change: str) -> None:
    """The sweep's query found a no-data alert due; before the sweep writes it, the API
    deletes or disables the rule and commits (it queued for the rule's row first). The sweep
    must neither fire under the rule as it was nor fail on the state row of a deleted rule."""
    s = stack
    org = Org(api, s, unique)
    try:
        org.device("quiet")
        dev_id = _device_id(s, unique, "quiet")
        # A no-data deadline counts from the later of the rule's and the device's creation:
        # a device "created" in the future keeps the rule from being due until the test says.
        s.query("UPDATE devices SET created_at = now() + interval '1 hour' WHERE id = $1", dev_id)
        rule = org.call("POST", "/rules", {"name": "silent", "kind": "no_data", "duration_s": 1,
                                           "scope": {"org": True}}).json()["id"]
        errors = bridge.metric("lms_bridge_rule_errors_total")
        held = HeldLock(s, "SELECT 1 FROM alert_rules WHERE id = $1 FOR UPDATE", rule)
        changed = threading.Event()
        change_thread = threading.Thread(target=lambda: (_change(org, rule, change), changed.set()))
        try:
            change_thread.start()
            ((api_pid, _),) = wait_until(held.waiters, 10, "the API's change to wait for the rule")
            s.query("UPDATE devices SET created_at = now() - interval '1 hour' WHERE id = $1", dev_id)
            # The sweep queues behind the API for the rule's row.
            sweep = wait_until(lambda: [w for w in held.waiters(api_pid) if w[0] != api_pid], 15,
                               "the sweep to wait for the rule")[0]
        finally:
            held.release()
            change_thread.join(30)
        assert changed.is_set()
        wait_until(lambda: not s.scalar("SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND xact_start = $2",
                                        *sweep), 10, "the sweep's transaction to end")
        assert bridge.metric("lms_bridge_rule_errors_total") == errors
        assert s.query("SELECT a.state FROM alerts a JOIN organizations o ON o.id = a.org_id "
                       "WHERE o.slug = $1", unique) == []
    finally:
        org.close()


# -- alert messages: from memory after the commit, the drain for the rest ---------------------

def test_the_drain_publishes_due_outbox_rows_and_leaves_leased_ones(stack: Stack, unique: str) -> None:
    """Rows due at once (the API's) and rows whose lease ran out (a bridge died before the
    broker acknowledged them) go out through the drain and are deleted; a row still leased
    (another bridge is publishing it from memory) is left to that bridge."""
    s = stack
    s.create_device(unique, "d")
    watch = AlertWatch(s, unique)
    try:
        ids = [r["id"] for r in s.query(
            """INSERT INTO mqtt_outbox (topic, payload, publish_after)
               SELECT 'lms/' || $1 || '/d/alerts', convert_to(u.body, 'UTF8'), now() + u.lease * interval '1 second'
               FROM unnest($2::text[], $3::int[]) AS u(body, lease) ORDER BY u.lease RETURNING id""",
            unique, ['{"n": "expired"}', '{"n": "api"}', '{"n": "leased"}'], [-60, 0, 3600])]
        got = wait_until(lambda: len(watch.messages) == 2 and watch.messages, 10, "the two due messages")
        assert sorted(p["n"] for _, p in got) == ["api", "expired"]
        remaining = wait_until(
            lambda: (r := s.query("SELECT id FROM mqtt_outbox WHERE id = ANY($1)", ids)) and len(r) == 1 and r,
            10, "the published rows to be deleted")
        assert remaining[0]["id"] == ids[2]
        assert len(watch.messages) == 2
    finally:
        s.query("DELETE FROM mqtt_outbox WHERE topic LIKE $1", f"lms/{unique}/%")
        watch.stop()
