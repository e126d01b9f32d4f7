"""Telemetry, events and presence through the real broker and bridge into PostgreSQL."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

from tests.harness import BridgeProcess, Device, Stack, wait_until


def _device(stack: Stack, org: str, name: str, **kw: object) -> Device:
    d = Device(stack.mq.port, stack.create_device(org, name), **kw)  # type: ignore[arg-type]
    assert d.connect().value == 0
    return d


def _readings(stack: Stack, org: str, dev: str) -> list[tuple[datetime, str, float | None, str | None]]:
    rows = stack.query(
        """SELECT r.time, r.metric, r.value, r.text_value FROM readings r
           JOIN devices d ON d.id = r.device_id JOIN organizations o ON o.id = d.org_id
           WHERE o.slug = $1 AND d.slug = $2 ORDER BY r.time, r.metric""",
        org, dev,
    )
    return [(r["time"], r["metric"], r["value"], r["text_value"]) for r in rows]


def _quarantine(stack: Stack, org: str) -> list[tuple[str, bytes, str]]:
    rows = stack.query("SELECT topic, payload, reason FROM quarantine WHERE org_slug = $1 ORDER BY id", org)
    return [(r["topic"], bytes(r["payload"]), r["reason"]) for r in rows]


def test_each_telemetry_form_stores_exactly_its_rows(stack: Stack, unique: str) -> None:
    dev = _device(stack, unique, "dev-1")
    base = int(time.time() * 1000) - 60_000
    before = time.time()
    dev.publish_wait("telemetry", json.dumps({"temp": 21.5, "hum": 40, "ok": True, "mode": "eco",
                                              "gps": {"lat": 52.5, "fix": {"sats": 7}}}))
    after = time.time()
    dev.publish_wait("telemetry", json.dumps({"ts": base, "values": {"temp": 20.25}}))
    rfc3339 = datetime.fromtimestamp((base + 1) / 1000, UTC).isoformat().replace("+00:00", "Z")
    dev.publish_wait("telemetry", json.dumps({"ts": rfc3339, "values": {"temp": -3}}))
    dev.publish_wait("telemetry", json.dumps([{"ts": base + 10 + i, "values": {"seq": i, "s": f"v{i}"}}
                                              for i in range(5)]))
    rows = wait_until(lambda: (r := _readings(stack, unique, "dev-1")) and len(r) >= 18 and r, 10, "18 rows")
    time.sleep(0.3)
    rows = _readings(stack, unique, "dev-1")
    assert len(rows) == 18, rows

    flat = {m: (v, t) for ts, m, v, t in rows if ts.timestamp() > base / 1000 + 30}
    assert flat == {"temp": (21.5, None), "hum": (40.0, None), "ok": (1.0, None), "mode": (None, "eco"),
                    "gps.lat": (52.5, None), "gps.fix.sats": (7.0, None)}
    flat_times = {ts for ts, _, _, _ in rows if ts.timestamp() > base / 1000 + 30}
    assert len(flat_times) == 1
    assert before - 0.01 <= flat_times.pop().timestamp() <= after + 0.5

    def at(ms: int) -> datetime:
        return datetime.fromtimestamp(ms / 1000, UTC)

    stamped = [(ts, m, v, t) for ts, m, v, t in rows if ts.timestamp() <= base / 1000 + 30]
    assert stamped[:2] == [(at(base), "temp", 20.25, None), (at(base + 1), "temp", -3.0, None)]
    batch = stamped[2:]
    assert batch == [x for i in range(5)
                     for x in ((at(base + 10 + i), "s", None, f"v{i}"), (at(base + 10 + i), "seq", float(i), None))]
    assert _quarantine(stack, unique) == []
    dev.close()


def test_redelivered_stamped_message_is_stored_once(stack: Stack, unique: str) -> None:
    dev = _device(stack, unique, "dev-1")
    payload = json.dumps({"ts": int(time.time() * 1000) - 5000, "values": {"a": 1, "b": 2}})
    for _ in range(3):
        dev.publish_wait("telemetry", payload)
    wait_until(lambda: len(_readings(stack, unique, "dev-1")) >= 2, 10, "rows")
    time.sleep(0.5)
    assert len(_readings(stack, unique, "dev-1")) == 2
    dev.close()


def test_bad_payloads_are_quarantined_and_good_ones_around_them_stored(
        stack: Stack, bridge: BridgeProcess, unique: str) -> None:
    dev = _device(stack, unique, "dev-1")
    now_ms = int(time.time() * 1000)
    # The shared bridge runs with LMS_MAX_PAYLOAD_BYTES=4096, LMS_MAX_METRICS=20,
    # LMS_MAX_BATCH_ENTRIES=50 (tests/conftest.py).
    bad: list[tuple[bytes, str]] = [
        (b"not json", "not valid JSON"),
        (b"\xff\xfe\x00\x01binary", "not valid JSON"),
        (b"", "empty payload"),
        (b"{}", "no metrics"),
        (b"[]", "empty batch"),
        (b"42", "must be a JSON object or array"),
        (b'"text"', "must be a JSON object or array"),
        (b'{"temp": null}', "null is not a number"),
        (b'{"temp": [1, 2]}', "array is not a number"),
        (b'{"temp": 1e999}', "not valid JSON"),
        (b'{"bad name!": 1}', "does not match"),
        (b'{"": 1}', "does not match"),
        (json.dumps({f"m{i}": i for i in range(21)}).encode(), "too many metrics"),
        (json.dumps({"x": "y" * 5000}).encode(), "payload too large"),
        (json.dumps({"ts": now_ms - 400 * 86400_000, "values": {"t": 1}}).encode(), "outside the accepted window"),
        (json.dumps({"ts": now_ms + 3_600_000, "values": {"t": 1}}).encode(), "outside the accepted window"),
        (json.dumps({"ts": now_ms // 1000, "values": {"t": 1}}).encode(), "looks like seconds"),
        (json.dumps({"ts": "yesterday", "values": {"t": 1}}).encode(), "not an RFC 3339"),
        (json.dumps({"ts": "2026-11-25T10:00:00", "values": {"t": 1}}).encode(), "no time zone"),
        (json.dumps({"ts": True, "values": {"t": 1}}).encode(), "ts must be epoch milliseconds"),
        (json.dumps({"ts": now_ms, "values": [1]}).encode(), "values must be a JSON object"),
        (json.dumps([{"ts": now_ms, "values": {"t": 1}}, {"t": 2}]).encode(), "batch entry 1"),
        (json.dumps([{"ts": now_ms - i, "values": {"t": i}} for i in range(51)]).encode(), "batch of 51"),
        (b'{"a":' * 300 + b"1" + b"}" * 300, "nested"),
        (json.dumps({"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": 1}}}}}}}}}).encode(), "nested deeper"),
        (json.dumps({"s": "nul\u0000byte"}).encode(), "NUL"),
        (json.dumps({"n": 10**400}).encode(), "out of range"),
    ]
    good_count = 0
    for i, (payload, _reason) in enumerate(bad):
        dev.publish("telemetry", payload)
        dev.publish("telemetry", json.dumps({"ts": now_ms - 10_000 + i, "values": {"good": i}}))
        good_count += 1
    dev.publish_wait("telemetry", json.dumps({"ts": now_ms - 20_000, "values": {"good": -1}}))
    good_count += 1

    wait_until(lambda: len(_quarantine(stack, unique)) >= len(bad), 15, "quarantine rows")
    wait_until(lambda: len(_readings(stack, unique, "dev-1")) >= good_count, 15, "good rows")
    time.sleep(0.3)
    q = _quarantine(stack, unique)
    assert len(q) == len(bad)
    for (payload, reason), (topic, stored, stored_reason) in zip(bad, q, strict=True):
        assert topic == f"lms/{unique}/dev-1/telemetry"
        assert stored == payload
        assert reason in stored_reason, (payload[:60], stored_reason)
    assert sorted(v for _, _, v, _ in _readings(stack, unique, "dev-1")) == [-1.0, *map(float, range(len(bad)))]
    assert bridge.proc is not None and bridge.proc.poll() is None
    assert bridge.metric("lms_bridge_messages_quarantined_total") >= len(bad)
    dev.close()


def test_status_and_last_will_update_presence_and_are_events(stack: Stack, unique: str) -> None:
    dev = _device(stack, unique, "dev-1", will=True)
    creds = dev.creds

    def state() -> tuple[str, datetime | None]:
        r = stack.query("SELECT status, last_seen_at FROM devices d JOIN organizations o ON o.id = d.org_id "
                        "WHERE o.slug = $1 AND d.slug = 'dev-1'", unique)[0]
        return r["status"], r["last_seen_at"]

    assert state() == ("unknown", None)
    dev.publish_wait("status", "online")
    wait_until(lambda: state()[0] == "online", 10, "online")
    seen_online = state()[1]
    assert seen_online is not None

    time.sleep(1.1)  # last_seen_at is refreshed at most once a second per device
    dev.publish_wait("telemetry", json.dumps({"t": 1}))
    wait_until(lambda: (s := state()[1]) is not None and s > seen_online, 10, "telemetry to refresh last_seen_at")

    # An unclean disconnect fires the Last Will: retained "offline" on the status topic.
    dev.client.socket().close()
    wait_until(lambda: state()[0] == "offline", 60, "the Last Will to mark the device offline")
    events = stack.query("SELECT type, data FROM events e JOIN devices d ON d.id = e.device_id "
                         "JOIN organizations o ON o.id = d.org_id WHERE o.slug = $1 ORDER BY time", unique)
    assert [(e["type"], json.loads(e["data"])) for e in events] == [
        ("status", {"status": "online"}), ("status", {"status": "offline"})]
    dev.stop()

    # A bad status goes to quarantine, an empty one (clearing the retained message) is ignored.
    dev2 = Device(stack.mq.port, creds)
    assert dev2.connect().value == 0
    dev2.publish_wait("status", "sleeping")
    dev2.publish_wait("status", b"")
    wait_until(lambda: _quarantine(stack, unique), 10, "quarantined status")
    assert [r for _, _, r in _quarantine(stack, unique)] == ["status must be 'online' or 'offline', got b'sleeping'"]
    dev2.close()


def test_events_are_stored_and_bad_events_quarantined(stack: Stack, unique: str) -> None:
    dev = _device(stack, unique, "dev-1")
    ts = int(time.time() * 1000) - 1000
    dev.publish_wait("events", json.dumps({"type": "boot", "ts": ts, "data": {"fw": "1.2.0", "reset": "power"}}))
    dev.publish_wait("events", json.dumps({"type": "door.open"}))
    dev.publish_wait("events", json.dumps({"type": "bad type!"}))
    dev.publish_wait("events", json.dumps({"type": "x", "data": [1]}))
    dev.publish_wait("events", json.dumps({"type": "x", "extra": 1}))
    wait_until(lambda: len(_quarantine(stack, unique)) >= 3, 10, "quarantined events")
    rows = stack.query("SELECT e.time, type, data FROM events e JOIN devices d ON d.id = e.device_id "
                       "JOIN organizations o ON o.id = d.org_id WHERE o.slug = $1 ORDER BY type", unique)
    assert [(r["type"], json.loads(r["data"])) for r in rows] == [
        ("boot", {"fw": "1.2.0", "reset": "power"}), ("door.open", {})]
    assert rows[0]["time"] == datetime.fromtimestamp(ts / 1000, UTC)
    reasons = [r for _, _, r in _quarantine(stack, unique)]
    assert "event type must match" in reasons[0]
    assert "event data must be a JSON object" in reasons[1]
    assert "unknown fields: extra" in reasons[2]
    dev.close()
