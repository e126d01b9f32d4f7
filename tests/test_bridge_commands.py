"""Cloud to device, the bridge's half: command results move their commands, reported
configuration is stored, reconcile restores the retained desired configuration.

Real devices on real credentials publish; the command rows are written straight into the
database (what the API's POST does), and read back from it.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import timedelta
from typing import Any

import asyncpg
import paho.mqtt.client as paho

from lms_core.broker import BrokerAdmin
from lms_core.commands import NOTIFY_CHANNEL, config_payload
from lms_core.mqtt import AsyncMqttClient
from lms_core.topics import TopicScheme
from tests.harness import BridgeProcess, Device, Stack, wait_until
from tests.test_decode import BAD_COMMAND_RESULTS, BAD_REPORTED_CONFIGS

NOT_AUTHORIZED = 0x87


def _device(s: Stack, org: str, name: str, **kw: Any) -> Device:
    dev = Device(s.mq.port, s.create_device(org, name), **kw)
    assert dev.connect().value == 0
    return dev


def _command(s: Stack, org: str, device: str, *, state: str = "pending", expires_in: float = 300) -> int:
    """A command row as the API stores it; expires ``expires_in`` s from now (negative: past)."""
    return int(s.scalar(
        """INSERT INTO commands (org_id, device_id, name, params, state, expires_at, sent_at)
           SELECT d.org_id, d.id, 'reboot', '{}', $3, now() + make_interval(secs => $4), now()
           FROM devices d JOIN organizations o ON o.id = d.org_id WHERE o.slug = $1 AND d.slug = $2
           RETURNING id""", org, device, state, float(expires_in)))


def _row(s: Stack, command_id: int) -> dict[str, Any]:
    (r,) = s.query("SELECT * FROM commands WHERE id = $1", command_id)
    out = dict(r)
    out["result"] = None if r["result"] is None else json.loads(r["result"])
    return out


def _state(s: Stack, command_id: int, state: str) -> dict[str, Any]:
    return wait_until(lambda: (r := _row(s, command_id))["state"] == state and r, 10,
                      f"command {command_id} {state}")


def _reply(dev: Device, command_id: int | str, status: str, **fields: Any) -> None:
    dev.publish_wait(f"commands/{command_id}/result", json.dumps({"status": status, **fields}))


_marks = iter(range(1, 1_000_000))


def _barrier(s: Stack, dev: Device) -> None:
    """Return once everything ``dev`` published before is committed: its messages reach the
    bridge in order on one connection and are committed in that order."""
    mark = next(_marks)
    dev.publish_wait("telemetry", json.dumps({"barrier": mark}))
    wait_until(lambda: s.scalar(
        """SELECT count(*) FROM readings r JOIN devices d ON d.id = r.device_id
           WHERE d.slug = $1 AND r.metric = 'barrier' AND r.value = $2""",
        dev.creds.client_id.split(".", 1)[1], float(mark)), 10, "the barrier reading")


def _quarantine(s: Stack, org: str) -> list[asyncpg.Record]:
    return s.query("SELECT topic, payload, reason, device_slug, org_id FROM quarantine WHERE org_slug = $1 "
                   "ORDER BY id", org)


# -- the lifecycle ------------------------------------------------------------------------

def test_ok_succeeds_with_its_result_and_error_fails(stack: Stack, bridge: BridgeProcess, unique: str) -> None:
    dev = _device(stack, unique, "d")
    try:
        ok, bad = _command(stack, unique, "d"), _command(stack, unique, "d")
        before = bridge.metric("lms_bridge_command_replies_total")
        _reply(dev, ok, "ok", result={"uptime": 12, "fw": "1.2"})
        _reply(dev, bad, "error", error="relay stuck")
        r = _state(stack, ok, "succeeded")
        assert r["result"] == {"uptime": 12, "fw": "1.2"} and r["error"] is None
        assert r["reply_status"] == "ok" and r["finished_at"] == r["reply_at"] is not None
        assert r["delivered_at"] is None  # accepted is optional
        r = _state(stack, bad, "failed")
        assert (r["reply_status"], r["error"], r["result"]) == ("error", "relay stuck", None)
        assert r["finished_at"] is not None
        wait_until(lambda: bridge.metric("lms_bridge_command_replies_total") >= before + 2, 5, "the count")
        assert stack.query("SELECT * FROM quarantine WHERE org_slug = $1", unique) == []
    finally:
        dev.close()


def test_accepted_delivers_then_ok_succeeds(stack: Stack, unique: str) -> None:
    dev = _device(stack, unique, "d")
    try:
        cid = _command(stack, unique, "d")
        _reply(dev, cid, "accepted")
        r = _state(stack, cid, "delivered")
        delivered_at = r["delivered_at"]
        assert delivered_at is not None and r["finished_at"] is None and r["reply_status"] == "accepted"
        _reply(dev, cid, "in_progress", result={"percent": 50})
        _barrier(stack, dev)
        r = _row(stack, cid)
        assert (r["state"], r["reply_status"], r["result"]) == ("delivered", "in_progress", {"percent": 50})
        assert r["delivered_at"] == delivered_at  # the first delivery's time stays
        _reply(dev, cid, "ok", result=[1, 2])
        r = _state(stack, cid, "succeeded")
        assert r["delivered_at"] == delivered_at and r["finished_at"] >= delivered_at and r["result"] == [1, 2]
    finally:
        dev.close()


def test_a_reply_after_expires_at_expires_the_command(stack: Stack, unique: str) -> None:
    dev = _device(stack, unique, "d")
    try:
        late_ok = _command(stack, unique, "d", expires_in=-1)
        late_accept = _command(stack, unique, "d", expires_in=-1)
        _reply(dev, late_ok, "ok", result={"done": True})
        _reply(dev, late_accept, "accepted")
        for cid, status in ((late_ok, "ok"), (late_accept, "accepted")):
            r = _state(stack, cid, "expired")
            assert r["finished_at"] == r["expires_at"], "it expired when its time ran out, not at the reply"
            assert r["reply_status"] == status and r["reply_at"] > r["expires_at"]
        assert _row(stack, late_ok)["result"] == {"done": True}  # kept for whoever looks
    finally:
        dev.close()


def test_a_result_for_a_cancelled_command_is_recorded_and_the_state_kept(stack: Stack, unique: str) -> None:
    dev = _device(stack, unique, "d")
    try:
        cid = _command(stack, unique, "d", state="cancelled")
        stack.query("UPDATE commands SET finished_at = now() - interval '1 minute' WHERE id = $1", cid)
        finished = _row(stack, cid)["finished_at"]
        _reply(dev, cid, "ok", result={"too": "late"})
        wait_until(lambda: _row(stack, cid)["reply_status"] == "ok", 10, "the reply recorded")
        r = _row(stack, cid)
        assert (r["state"], r["result"], r["finished_at"]) == ("cancelled", {"too": "late"}, finished)
    finally:
        dev.close()


def test_a_repeated_final_reply_does_not_overwrite_the_first(stack: Stack, bridge: BridgeProcess,
                                                            unique: str) -> None:
    dev = _device(stack, unique, "d")
    try:
        cid = _command(stack, unique, "d")
        _reply(dev, cid, "ok", result={"n": 1})
        first = _state(stack, cid, "succeeded")
        ignored = bridge.metric('lms_bridge_command_replies_total{outcome="ignored"}')
        _reply(dev, cid, "ok", result={"n": 2})
        _reply(dev, cid, "error", error="second thoughts")
        _reply(dev, cid, "accepted")  # a progress reply overtaken by the result
        _barrier(stack, dev)
        assert _row(stack, cid) == first
        assert bridge.metric('lms_bridge_command_replies_total{outcome="ignored"}') == ignored + 3
    finally:
        dev.close()


def test_replies_in_one_batch_apply_in_the_order_received(own_stack: Stack, unique: str) -> None:
    """A long flush interval puts them in one batch: one lock, one UPDATE, the last state wins."""
    s = own_stack
    s.start_bridge("cmd-batch", LMS_BRIDGE_FLUSH_MS="1000")
    dev = _device(s, unique, "d")
    try:
        a, b = _command(s, unique, "d"), _command(s, unique, "d")
        for payload in ({"status": "accepted"}, {"status": "in_progress"}, {"status": "ok", "result": 1}):
            dev.publish(f"commands/{a}/result", json.dumps(payload))
        dev.publish(f"commands/{b}/result", json.dumps({"status": "error", "error": "x"}))
        dev.publish_wait(f"commands/{b}/result", json.dumps({"status": "ok"}))
        ra, rb = _state(s, a, "succeeded"), _state(s, b, "failed")
        assert ra["delivered_at"] is not None and ra["delivered_at"] <= ra["finished_at"] and ra["result"] == 1
        assert (rb["reply_status"], rb["error"]) == ("error", "x")
    finally:
        dev.close()


# -- what is refused ---------------------------------------------------------------------

def test_unknown_and_foreign_commands_are_quarantined(stack: Stack, bridge: BridgeProcess, unique: str) -> None:
    a = _device(stack, unique, "a")
    stack.create_device(unique, "b")
    try:
        theirs = _command(stack, unique, "b")
        gone = _command(stack, unique, "a")
        stack.query("DELETE FROM commands WHERE id = $1", gone)
        _reply(a, theirs, "ok", result="mine now")
        _reply(a, gone, "ok")
        _reply(a, 9_000_000_000_000_000_000, "ok")
        wait_until(lambda: len(_quarantine(stack, unique)) == 3, 10, "three quarantine rows")
        reasons = [(q["topic"], q["reason"], q["device_slug"]) for q in _quarantine(stack, unique)]
        assert reasons == [
            (f"lms/{unique}/a/commands/{theirs}/result", f"command {theirs} belongs to another device", "a"),
            (f"lms/{unique}/a/commands/{gone}/result", f"unknown command {gone}", "a"),
            (f"lms/{unique}/a/commands/9000000000000000000/result", "unknown command 9000000000000000000", "a"),
        ]
        assert all(q["org_id"] is not None for q in _quarantine(stack, unique))
        r = _row(stack, theirs)
        assert (r["state"], r["reply_status"], r["result"]) == ("pending", None, None)
        assert bridge.proc is not None and bridge.proc.poll() is None
    finally:
        a.close()


def test_malformed_results_and_reports_are_quarantined_with_their_reason(
        stack: Stack, bridge: BridgeProcess, unique: str) -> None:
    """The decoder's bad-input corpus (tests/test_decode.py), sent by a real device through
    the shared bridge. Each becomes one quarantine row; the good reply after them still works.

    The shared bridge refuses payloads over 4096 bytes; the corpus's 300 kB ones are over the
    broker's max_packet_size (which disconnects the device), so 5 kB ones stand in for them."""
    dev = _device(stack, unique, "d")
    cid = _command(stack, unique, "d")
    sent: list[tuple[str, bytes, str]] = []
    for command_id, payload, reason in BAD_COMMAND_RESULTS:
        if command_id.strip() != command_id or not command_id.isascii():
            continue  # not a topic level a device can publish to as such (tested in test_decode)
        if len(payload) > 4096:
            payload, reason = payload[:5000], "payload too large"
        sent.append((f"commands/{command_id}/result", payload, reason))
    for payload, reason in BAD_REPORTED_CONFIGS:
        if len(payload) > 4096:
            payload, reason = payload[:5000], "payload too large"
        sent.append(("config/reported", payload, reason))
    try:
        for kind, payload, _ in sent:
            dev.publish(kind, payload)
        _reply(dev, cid, "ok", result={"after": "garbage"})
        _state(stack, cid, "succeeded")
        wait_until(lambda: len(_quarantine(stack, unique)) >= len(sent), 10, "the quarantine rows")
        rows = _quarantine(stack, unique)
        assert len(rows) == len(sent)
        for (kind, payload, reason), q in zip(sent, rows, strict=True):
            assert q["topic"] == f"lms/{unique}/d/{kind}"
            assert bytes(q["payload"]) == payload
            assert reason in q["reason"], (kind, payload[:60], q["reason"])
        assert stack.scalar("SELECT count(*) FROM device_config c JOIN devices d ON d.id = c.device_id "
                            "JOIN organizations o ON o.id = d.org_id WHERE o.slug = $1", unique) == 0
        assert bridge.proc is not None and bridge.proc.poll() is None
    finally:
        dev.close()


def test_a_device_cannot_answer_into_another_devices_topics(stack: Stack, unique: str) -> None:
    a = _device(stack, unique, "a", protocol=paho.MQTTv5)
    stack.create_device(unique, "b")
    try:
        theirs = _command(stack, unique, "b")
        info = a.client.publish(f"lms/{unique}/b/commands/{theirs}/result", json.dumps({"status": "ok"}), qos=1)
        wait_until(lambda: info.mid in a.acked, 5, "the PUBACK")
        assert a.puback_reasons[info.mid] == NOT_AUTHORIZED
        info = a.client.publish(f"lms/{unique}/b/config/reported", json.dumps({"version": 9}), qos=1)
        wait_until(lambda: info.mid in a.acked, 5, "the PUBACK")
        assert a.puback_reasons[info.mid] == NOT_AUTHORIZED
        _barrier(stack, a)
        time.sleep(0.3)
        r = _row(stack, theirs)
        assert (r["state"], r["reply_status"]) == ("pending", None)
        assert _quarantine(stack, unique) == []
        assert stack.scalar("SELECT count(*) FROM device_config c JOIN devices d ON d.id = c.device_id "
                            "JOIN organizations o ON o.id = d.org_id WHERE o.slug = $1", unique) == 0
    finally:
        a.close()


# -- NOTIFY -----------------------------------------------------------------------------------

def test_each_change_is_notified_at_commit(stack: Stack, unique: str) -> None:
    """What an API process waiting on a command (``?wait=``) listens to."""
    dev = _device(stack, unique, "d")
    a, b = _command(stack, unique, "d"), _command(stack, unique, "d")

    async def run() -> list[str]:
        got: asyncio.Queue[str] = asyncio.Queue()
        conn = await asyncpg.connect(stack.pg.url)
        try:
            await conn.add_listener(NOTIFY_CHANNEL, lambda _c, _pid, _ch, payload: got.put_nowait(payload))
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, lambda: _reply(dev, a, "accepted"))
            first = await asyncio.wait_for(got.get(), 10)
            await loop.run_in_executor(None, lambda: _reply(dev, b, "error", error="no"))
            second = await asyncio.wait_for(got.get(), 10)
            await loop.run_in_executor(None, lambda: _reply(dev, b, "ok"))  # ignored: no change
            await loop.run_in_executor(None, lambda: _reply(dev, a, "ok"))
            third = await asyncio.wait_for(got.get(), 10)
            await asyncio.sleep(0.3)
            assert got.empty(), "a reply that changed nothing was notified"
            return [first, second, third]
        finally:
            await conn.close()

    try:
        assert asyncio.run(run()) == [str(a), str(b), str(a)]
        assert _row(stack, a)["state"] == "succeeded" and _row(stack, b)["state"] == "failed"
    finally:
        dev.close()


# -- reported configuration -------------------------------------------------------------------

def _config(s: Stack, org: str, device: str) -> dict[str, Any] | None:
    rows = s.query("""SELECT c.* FROM device_config c JOIN devices d ON d.id = c.device_id
                      JOIN organizations o ON o.id = d.org_id WHERE o.slug = $1 AND d.slug = $2""", org, device)
    if not rows:
        return None
    out = dict(rows[0])
    for k in ("desired", "reported"):
        out[k] = None if out[k] is None else json.loads(out[k])
    return out


def test_reported_config_is_stored_and_never_moved_backwards(stack: Stack, bridge: BridgeProcess,
                                                            unique: str) -> None:
    dev = _device(stack, unique, "d")
    other = _device(stack, unique, "e")
    try:
        # A device without a config row gets one; the desired side stays empty.
        dev.publish_wait("config/reported", json.dumps({"version": 2, "interval": 5, "led": {"on": True}}))
        c = wait_until(lambda: _config(stack, unique, "d"), 10, "the reported config")
        assert (c["reported"], c["reported_version"], c["desired"], c["desired_version"]) == \
            ({"interval": 5, "led": {"on": True}}, 2, None, 0)
        first_at = c["reported_at"]
        dev.publish_wait("config/reported", json.dumps({"version": 3, "interval": 10}))
        c = wait_until(lambda: (c := _config(stack, unique, "d")) and c["reported_version"] == 3 and c, 10, "v3")
        assert c["reported"] == {"interval": 10} and c["reported_at"] > first_at

        # A row the API made: the desired side is left alone.
        stack.query("""INSERT INTO device_config (device_id, desired, desired_version, desired_at)
                       SELECT d.id, '{"interval": 7}', 4, now() FROM devices d JOIN organizations o
                       ON o.id = d.org_id WHERE o.slug = $1 AND d.slug = 'e'""", unique)
        other.publish_wait("config/reported", json.dumps({"version": 4, "interval": 7}))
        c = wait_until(lambda: (c := _config(stack, unique, "e")) and c["reported_version"] == 4 and c, 10, "e v4")
        assert (c["desired"], c["desired_version"], c["reported"]) == ({"interval": 7}, 4, {"interval": 7})

        # A newer report is stored (another bridge's, say): an older one arriving now - a
        # redelivery after a crash between commit and acknowledgement - does not replace it.
        newer = c["reported_at"] + timedelta(hours=1)
        stack.query("""UPDATE device_config SET reported = '{"interval": 8}', reported_version = 5,
                       reported_at = $2 WHERE device_id = (SELECT d.id FROM devices d JOIN organizations o
                       ON o.id = d.org_id WHERE o.slug = $1 AND d.slug = 'e')""", unique, newer)
        other.publish_wait("config/reported", json.dumps({"version": 4, "interval": 7}))
        _barrier(stack, other)
        c = _config(stack, unique, "e")
        assert c is not None and (c["reported"], c["reported_version"], c["reported_at"]) == \
            ({"interval": 8}, 5, newer)
        assert bridge.metric("lms_bridge_config_reports_total") >= 4
        assert _quarantine(stack, unique) == []
    finally:
        dev.close()
        other.close()


# -- the one-by-one fallback -----------------------------------------------------------------

POISON = """
CREATE FUNCTION commands_test_poison() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.metric = 'poison' THEN
        RAISE EXCEPTION 'test: poison reading refused';
    END IF;
    RETURN NEW;
END $$;
"""


def test_replies_and_reports_survive_a_batch_the_database_refuses(own_stack: Stack, unique: str) -> None:
    """A batch PostgreSQL refuses is written again message by message (Store._write_one_by_one):
    replies, refusals of unknown commands and reports of that batch come out as they would have."""
    s = own_stack
    s.query(POISON)
    s.query("CREATE TRIGGER commands_test_poison BEFORE INSERT ON readings "
            "FOR EACH ROW EXECUTE FUNCTION commands_test_poison()")
    s.start_bridge("cmd-fallback", LMS_BRIDGE_FLUSH_MS="1500")
    dev = _device(s, unique, "d")
    try:
        a, b = _command(s, unique, "d"), _command(s, unique, "d")
        dev.publish(f"commands/{a}/result", json.dumps({"status": "accepted"}))
        dev.publish("telemetry", json.dumps({"poison": 1}))
        dev.publish(f"commands/{a}/result", json.dumps({"status": "ok", "result": "A"}))
        dev.publish(f"commands/{b + 1000}/result", json.dumps({"status": "ok"}))
        dev.publish("config/reported", json.dumps({"version": 1, "k": "v"}))
        dev.publish_wait(f"commands/{b}/result", json.dumps({"status": "error", "error": "E"}))
        ra, rb = _state(s, a, "succeeded"), _state(s, b, "failed")
        assert ra["delivered_at"] is not None and ra["result"] == "A" and rb["error"] == "E"
        wait_until(lambda: len(_quarantine(s, unique)) == 2, 10, "two quarantine rows")
        reasons = sorted(q["reason"] for q in _quarantine(s, unique))
        assert "test: poison reading refused" in reasons[0] and reasons[1] == f"unknown command {b + 1000}"
        c = _config(s, unique, "d")
        assert c is not None and (c["reported"], c["reported_version"]) == ({"k": "v"}, 1)
        assert "retrying message by message" in s.bridges[0].log_text()
    finally:
        dev.close()


# -- reconcile restores the retained desired configuration -------------------------------------

def _retained_config(s: Stack, dev: Device, timeout: float = 5) -> list[dict[str, Any]]:
    """What ``dev`` receives on subscribing to its ``config`` (the retained message)."""
    dev.messages.clear()
    _, mid = dev.client.subscribe(f"{dev.creds.topic_prefix}/config", qos=1)
    wait_until(lambda: dev.suback.get(mid), 5, "the SUBACK")
    deadline = time.monotonic() + timeout
    while not dev.messages and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    return [json.loads(m.payload) for m in dev.messages if m.retain]


def _set_desired(s: Stack, org: str, device: str, desired: dict[str, Any] | None, version: int) -> None:
    s.query("""INSERT INTO device_config (device_id, desired, desired_version, desired_at)
               SELECT d.id, $3::jsonb, $4, now() FROM devices d JOIN organizations o ON o.id = d.org_id
               WHERE o.slug = $1 AND d.slug = $2
               ON CONFLICT (device_id) DO UPDATE SET desired = EXCLUDED.desired,
                   desired_version = EXCLUDED.desired_version""",
            org, device, None if desired is None else json.dumps(desired), version)


def test_reconcile_republishes_desired_config_after_the_broker_lost_its_state(own_stack: Stack,
                                                                               unique: str) -> None:
    s = own_stack
    creds = s.create_device(unique, "cfg")
    s.create_device(unique, "cleared")
    s.create_device(unique, "never")
    _set_desired(s, unique, "cfg", {"interval": 5, "mode": "eco"}, 3)
    _set_desired(s, unique, "cleared", None, 2)  # deleted: nothing to restore

    async def publish_as_the_api() -> None:
        async with BrokerAdmin(s.mqtt_url, TopicScheme()) as admin:
            await admin.publish(f"lms/{unique}/cfg/config", config_payload(3, {"interval": 5, "mode": "eco"}),
                                retain=True)

    asyncio.run(publish_as_the_api())
    dev = Device(s.mq.port, creds)
    assert dev.connect().value == 0
    assert _retained_config(s, dev) == [{"interval": 5, "mode": "eco", "version": 3}]
    dev.close()

    # Lose the broker's state: its persistence file (retained messages) and its logins.
    s.mq.stop()
    s.mq.dynsec_path.unlink()
    (s.mq.workdir / "mosquitto.db").unlink(missing_ok=True)
    s.mq.init()
    s.mq.start()
    bridge = s.start_bridge()
    assert "'config_restored': 1" in bridge.log_text()
    dev = Device(s.mq.port, creds)
    try:
        assert dev.connect().value == 0
        assert _retained_config(s, dev) == [{"interval": 5, "mode": "eco", "version": 3}]
    finally:
        dev.close()

    async def retained_under_org() -> list[str]:
        """The retained ``config`` messages of the organization: only the device that has one."""
        topics: list[str] = []

        def on_message(msg: Any) -> None:
            if msg.retain and msg.payload:
                topics.append(msg.topic)

        async with AsyncMqttClient(s.mqtt_url, on_message=on_message, name="probe") as mqtt:
            await mqtt.subscribe([f"lms/{unique}/+/config"], qos=1)
            await asyncio.sleep(0.5)
        return topics

    assert asyncio.run(retained_under_org()) == [f"lms/{unique}/cfg/config"]


def test_a_broker_that_lost_its_state_while_the_bridge_runs_gets_the_desired_config_back(
        own_stack: Stack, unique: str) -> None:
    """The broker restarts without its persistence file (retained messages, sessions) while
    the bridge runs; the bridge reconnects without its session and publishes the desired
    configurations again: a device connecting afterwards gets its configuration."""
    s = own_stack
    creds = s.create_device(unique, "cfg")
    _set_desired(s, unique, "cfg", {"interval": 5}, 4)
    bridge = s.start_bridge()  # its reconcile publishes the configuration, retained
    dev = Device(s.mq.port, creds)
    assert dev.connect().value == 0
    assert _retained_config(s, dev) == [{"interval": 5, "version": 4}]
    dev.close()
    restored = '"desired configuration restored after the broker lost its state"'
    assert restored not in bridge.log_text()  # not on the first connection

    # Lose the broker's persistence file: retained messages and sessions (the logins, in the
    # dynamic-security file, stay).
    s.mq.stop()
    (s.mq.workdir / "mosquitto.db").unlink(missing_ok=True)
    s.mq.start()

    async def retained() -> list[dict[str, Any]]:
        """The retained message on the device's config topic, as a new subscriber gets it."""
        got: list[dict[str, Any]] = []

        def on_message(msg: Any) -> None:
            if msg.retain:
                got.append(json.loads(msg.payload))

        async with AsyncMqttClient(s.mqtt_url, on_message=on_message, name="probe") as mqtt:
            await mqtt.subscribe([f"lms/{unique}/cfg/config"], qos=1)
            await mqtt.barrier()  # the broker sends a retained message before this answer
        return got

    wait_until(lambda: asyncio.run(retained()) == [{"interval": 5, "version": 4}], 30,
               "the desired configuration retained again")
    assert restored in bridge.log_text()
    dev = Device(s.mq.port, creds)
    try:
        assert dev.connect().value == 0
        assert _retained_config(s, dev) == [{"interval": 5, "version": 4}]
    finally:
        dev.close()
    # And the ingest went on: a reading is stored.
    dev = Device(s.mq.port, creds)
    try:
        assert dev.connect().value == 0
        dev.publish_wait("telemetry", json.dumps({"t": 1}))
        wait_until(lambda: s.scalar("SELECT count(*) FROM readings") == 1, 10, "the reading")
    finally:
        dev.close()


def test_reconcile_on_a_broker_that_kept_its_state_publishes_the_same_config(stack: Stack, unique: str) -> None:
    creds = stack.create_device(unique, "cfg")
    _set_desired(stack, unique, "cfg", {"a": [1, 2]}, 7)
    counts = asyncio.run(stack._provision("reconcile"))
    assert counts["config_restored"] >= 1
    _set_desired(stack, unique, "cfg", {"a": [3]}, 8)
    counts = asyncio.run(stack._provision("reconcile"))
    dev = Device(stack.mq.port, creds)
    assert dev.connect().value == 0
    try:
        assert _retained_config(stack, dev) == [{"a": [3], "version": 8}]
    finally:
        dev.close()


def test_reconcile_waits_for_a_config_change_in_progress_and_publishes_its_version(
        stack: Stack, unique: str) -> None:
    """The API changes desired config and publishes it holding the row FOR UPDATE. A reconcile
    reading the old version meanwhile and publishing it afterwards would put the broker's
    retained message back to it; reconcile reads each row FOR SHARE, so it waits."""
    creds = stack.create_device(unique, "cfg")
    _set_desired(stack, unique, "cfg", {"v": 1}, 1)
    topic = f"lms/{unique}/cfg/config"

    async def run() -> dict[str, int]:
        api = await asyncpg.connect(stack.pg.url)
        try:
            tr = api.transaction()
            await tr.start()
            await api.execute("""SELECT 1 FROM device_config WHERE device_id = (SELECT d.id FROM devices d
                                 JOIN organizations o ON o.id = d.org_id WHERE o.slug = $1 AND d.slug = 'cfg')
                                 FOR UPDATE""", unique)
            reconcile = asyncio.create_task(stack._provision("reconcile"))
            await asyncio.sleep(1.0)
            assert not reconcile.done(), "reconcile did not wait for the change in progress"
            await api.execute("""UPDATE device_config SET desired = '{"v": 2}', desired_version = 2
                                 WHERE device_id = (SELECT d.id FROM devices d JOIN organizations o
                                 ON o.id = d.org_id WHERE o.slug = $1 AND d.slug = 'cfg')""", unique)
            async with BrokerAdmin(stack.mqtt_url, TopicScheme()) as admin:
                await admin.publish(topic, config_payload(2, {"v": 2}), retain=True)
            await tr.commit()
            return await asyncio.wait_for(reconcile, 30)
        finally:
            await api.close()

    counts = asyncio.run(run())
    assert counts["config_restored"] >= 1
    dev = Device(stack.mq.port, creds)
    assert dev.connect().value == 0
    try:
        assert _retained_config(stack, dev) == [{"v": 2, "version": 2}]
    finally:
        dev.close()
