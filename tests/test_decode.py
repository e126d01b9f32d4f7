"""The payload decoder on its own: contract cases and property-based fuzzing."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.decode import Rejected, TelemetryDecoder
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
