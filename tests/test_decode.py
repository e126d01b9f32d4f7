"""The payload decoder on its own: contract cases and property-based fuzzing."""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.decode import CommandReply, Rejected, ReportedConfig, TelemetryDecoder
from lms_core.settings import Limits

NOW = time.time()
# The suite runs bridges and APIs beside these tests on two cores: slow generation is the
# machine's load, not a problem of the strategy.
SLOW_BOX = [HealthCheck.too_slow, HealthCheck.data_too_large]
dec = TelemetryDecoder(Limits())


def test_flat_uses_time_of_receipt_and_flattens() -> None:
    rows = dec.telemetry(b'{"a": 1, "b": {"c": false, "d": "x"}}', NOW)
    when = datetime.fromtimestamp(NOW, UTC)
    assert rows == [(when, "a", 1.0, None), (when, "b.c", 0.0, None), (when, "b.d", None, "x")]


def test_stamped_accepts_milliseconds_and_rfc3339_with_offsets() -> None:
    ms = int(NOW * 1000) - 1234
    a = dec.telemetry(json.dumps({"ts": ms, "values": {"t": 1}}).encode(), NOW)
    iso = datetime.fromtimestamp(ms / 1000, UTC).astimezone().isoformat()
    b = dec.telemetry(json.dumps({"ts": iso, "values": {"t": 1}}).encode(), NOW)
    assert a == b == [(datetime.fromtimestamp(ms / 1000, UTC), "t", 1.0, None)]


def test_object_with_ts_and_other_keys_is_flat() -> None:
    # Only exactly {"ts", "values"} is the stamped form; anything else is metrics.
    rows = dec.telemetry(b'{"ts": 5, "temp": 1}', NOW)
    assert [r[1] for r in rows] == ["ts", "temp"]


@pytest.mark.parametrize("limit, payload, reason", [
    (Limits(max_metrics=2), b'{"a": 1, "b": 2, "c": 3}', "too many metrics: 3 > limit 2"),
    (Limits(max_metrics=2), b'{"a": {"b": 1, "c": 2, "d": 3}}', "too many metrics"),
    (Limits(max_batch_entries=1), b'[{"ts": %d, "values": {"a": 1}}, {"ts": %d, "values": {"a": 1}}]',
     "batch of 2 entries > limit 1"),
    (Limits(max_payload_bytes=16), b'{"a": 1234567890123}', "payload too large: 20 bytes > limit 16"),
    (Limits(metric_pattern="[a-z]+"), b'{"A": 1}', "does not match [a-z]+"),
    (Limits(max_text_chars=3), b'{"a": "abcd"}', "text longer than 3"),
    (Limits(max_depth=2), b'{"a": {"b": {"c": 1}}}', "nested deeper than 2"),
    (Limits(max_future_s=0), b'{"ts": %d, "values": {"a": 1}}', "outside the accepted window"),
])
def test_each_limit_is_configurable_and_enforced(limit: Limits, payload: bytes, reason: str) -> None:
    ms = int(NOW * 1000)
    if b"%d" in payload:
        payload = payload % ((ms + 60_000,) * payload.count(b"%d"))
    with pytest.raises(Rejected, match=reason.replace("[", r"\[").replace("]", r"\]").replace("+", r"\+")):
        TelemetryDecoder(limit).telemetry(payload, NOW)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None, suppress_health_check=SLOW_BOX)
@given(json_values)
def test_any_json_is_rows_or_a_reason_never_a_crash(doc: object) -> None:
    payload = json.dumps(doc).encode()
    try:
        rows = dec.telemetry(payload, NOW)
    except Rejected as exc:
        assert str(exc)
        return
    for when, metric, value, text in rows:
        assert when.tzinfo is not None
        assert (value is None) != (text is None)
        assert "\x00" not in metric and (text is None or "\x00" not in text)


@settings(max_examples=300, deadline=None, suppress_health_check=SLOW_BOX)
@given(st.binary(max_size=300))
def test_any_bytes_are_rows_or_a_reason(payload: bytes) -> None:
    for fn in (dec.telemetry, dec.event):
        try:
            fn(payload, NOW)
        except Rejected:
            pass
    for other in (lambda p: dec.command_reply("7", p), dec.reported_config):
        try:
            other(payload)
        except Rejected:
            pass
    try:
        dec.status(payload)
    except Rejected:
        pass


@settings(max_examples=200, deadline=None, suppress_health_check=SLOW_BOX)
@given(st.dictionaries(st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True),
                       st.floats(allow_nan=False, allow_infinity=False) | st.integers(-2**53, 2**53),
                       min_size=1, max_size=20),
       st.integers(0, 10**9))
def test_stamped_round_trip(values: dict[str, float], offset_ms: int) -> None:
    ms = int(NOW * 1000) - offset_ms
    rows = dec.telemetry(json.dumps({"ts": ms, "values": values}).encode(), NOW)
    assert {m: v for _, m, v, _ in rows} == {k: float(v) for k, v in values.items()}
    assert {w for w, _, _, _ in rows} == {datetime.fromtimestamp(ms / 1000, UTC)}


@pytest.mark.parametrize("payload", [
    b'{"ts": 1' + b"0" * 400 + b', "values": {"a": 1}}',
    b'[{"ts": -1' + b"0" * 400 + b', "values": {"a": 1}}]',
])
def test_huge_integer_timestamps_are_rejected_not_raised(payload: bytes) -> None:
    with pytest.raises(Rejected, match="out of range"):
        dec.telemetry(payload, NOW)


def test_huge_integer_event_timestamp_is_rejected_not_raised() -> None:
    with pytest.raises(Rejected, match="out of range"):
        dec.event(b'{"type": "x", "ts": 1' + b"0" * 400 + b"}", NOW)


def test_a_name_given_twice_by_flattening_is_rejected() -> None:
    with pytest.raises(Rejected, match="given twice"):
        dec.telemetry(b'{"a.b": 1, "a": {"b": 2}}', NOW)


def test_devices_cannot_forge_presence_events() -> None:
    with pytest.raises(Rejected, match="reserved"):
        dec.event(b'{"type": "status", "data": {"status": "online"}}', NOW)


# -- cloud to device: command results and reported configuration ------------------------

@pytest.mark.parametrize("command_id, payload, expected", [
    ("1", b'{"status": "ok"}', CommandReply(1, "ok", None, None)),
    ("42", b'{"status": "ok", "result": {"a": [1, "x"]}}', CommandReply(42, "ok", '{"a":[1,"x"]}', None)),
    ("42", b'{"status": "error", "error": "no such relay"}', CommandReply(42, "error", None, "no such relay")),
    ("42", b'{"status": "accepted", "result": null, "error": null}', CommandReply(42, "accepted", None, None)),
    ("42", b'{"status": "in_progress", "result": 3}', CommandReply(42, "in_progress", "3", None)),
    ("9223372036854775807", b'{"status": "ok"}', CommandReply(2**63 - 1, "ok", None, None)),
])
def test_a_command_result_decodes(command_id: str, payload: bytes, expected: CommandReply) -> None:
    assert dec.command_reply(command_id, payload) == expected


#: The bad-input corpus of ``commands/{id}/result``: (id in the topic, payload, reason).
BAD_COMMAND_RESULTS = [
    ("7", b"not json", "not valid JSON"),
    ("7", b"", "empty payload"),
    ("7", b'"ok"', "must be a JSON object"),
    ("7", b"[]", "must be a JSON object"),
    ("7", b"{}", "status must be one of accepted, in_progress, ok, error"),
    ("7", b'{"status": "done"}', "status must be one of"),
    ("7", b'{"status": "OK"}', "status must be one of"),
    ("7", b'{"status": 1}', "status must be one of"),
    ("7", b'{"status": "ok", "extra": 1}', "unknown fields: extra"),
    ("7", b'{"status": "ok", "id": 7}', "unknown fields: id"),
    ("7", b'{"status": "error", "error": 42}', "error must be a string"),
    ("7", json.dumps({"status": "error", "error": "e" * 1001}).encode(), "error longer than 1000"),
    ("7", json.dumps({"status": "ok", "result": {"s": "a\u0000b"}}).encode(), "NUL"),
    ("7", json.dumps({"status": "ok", "error": "\u0000"}).encode(), "NUL"),
    ("7", json.dumps({"status": "ok", "result": "x" * 300_000}).encode(), "payload too large"),
    ("7", b'{"status": "ok", "result": ' + b"[" * 2000 + b"]" * 2000 + b"}", "nested too deeply"),
    ("7", b'{"status": "ok", "result": 1' + b"0" * 5000 + b"}", "not valid JSON"),
    ("abc", b'{"status": "ok"}', "command id 'abc' is not a command id"),
    ("0", b'{"status": "ok"}', "command id '0' is not a command id"),
    ("-1", b'{"status": "ok"}', "is not a command id"),
    ("007", b'{"status": "ok"}', "is not a command id"),
    ("1.5", b'{"status": "ok"}', "is not a command id"),
    ("1e3", b'{"status": "ok"}', "is not a command id"),
    (" 1", b'{"status": "ok"}', "is not a command id"),
    ("\u0661", b'{"status": "ok"}', "is not a command id"),  # an Arabic-Indic one: int() would take it
    ("9223372036854775808", b'{"status": "ok"}', "is not a command id"),  # bigint + 1
    ("9" * 30, b'{"status": "ok"}', "is not a command id"),
]


@pytest.mark.parametrize("command_id, payload, reason", BAD_COMMAND_RESULTS)
def test_a_bad_command_result_is_rejected_with_its_reason(command_id: str, payload: bytes, reason: str) -> None:
    with pytest.raises(Rejected, match=re.escape(reason)):
        dec.command_reply(command_id, payload)


#: The bad-input corpus of ``config/reported``: (payload, reason).
BAD_REPORTED_CONFIGS = [
    (b"nope", "not valid JSON"),
    (b"", "empty payload"),
    (b"[1]", "must be a JSON object"),
    (b"{}", 'needs an integer "version"'),
    (b'{"version": "3"}', 'needs an integer "version"'),
    (b'{"version": 1.0}', 'needs an integer "version"'),
    (b'{"version": true}', 'needs an integer "version"'),
    (b'{"version": -1}', 'needs an integer "version"'),
    (b'{"version": 9223372036854775808}', 'needs an integer "version"'),
    (json.dumps({"version": 1, "name": "a\u0000"}).encode(), "NUL"),
    (json.dumps({"version": 1, "k": "x" * 300_000}).encode(), "payload too large"),
]


@pytest.mark.parametrize("payload, reason", BAD_REPORTED_CONFIGS)
def test_a_bad_reported_config_is_rejected_with_its_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(Rejected, match=re.escape(reason)):
        dec.reported_config(payload)


def test_a_reported_config_is_its_version_and_the_rest() -> None:
    assert dec.reported_config(b'{"version": 0}') == ReportedConfig(0, "{}")
    assert dec.reported_config(b'{"interval": 5, "version": 3, "led": {"on": true}}') == \
        ReportedConfig(3, '{"interval":5,"led":{"on":true}}')


@settings(max_examples=300, deadline=None, suppress_health_check=SLOW_BOX)
@given(st.dictionaries(st.sampled_from(["status", "result", "error", "version", "x"]), json_values, max_size=4),
       st.sampled_from(["accepted", "in_progress", "ok", "error"]))
def test_any_command_result_or_report_is_a_value_or_a_reason(doc: dict[str, object], status: str) -> None:
    """What passes is what PostgreSQL can hold: JSON text without NUL, an id and version
    that fit a bigint, an error of bounded length."""
    for d in (doc, {**doc, "status": status}):
        payload = json.dumps(d).encode()
        try:
            reply = dec.command_reply("12", payload)
        except Rejected as exc:
            assert str(exc)
        else:
            assert reply.status in ("accepted", "in_progress", "ok", "error") and reply.command_id == 12
            assert reply.result is None or ("\x00" not in reply.result and "\\u0000" not in reply.result)
            assert reply.result is None or json.loads(reply.result) == d["result"]
            assert reply.error is None or (len(reply.error) <= 1000 and "\x00" not in reply.error)
        try:
            report = dec.reported_config(payload)
        except Rejected as exc:
            assert str(exc)
        else:
            assert 0 <= report.version < 2**63
            assert "\\u0000" not in report.document
            assert json.loads(report.document) == {k: v for k, v in d.items() if k != "version"}
