"""The ingest path without I/O: a topic parsed once, routed by its kind, counted once."""

from __future__ import annotations

import time

import pytest

from bridge.decode import (
    REPLAYED,
    CommandReply,
    DeviceEvent,
    Presence,
    Readings,
    Rejected,
    ReportedConfig,
    TelemetryDecoder,
)
from bridge.metrics import BridgeMetrics
from bridge.store import Message, Store
from lms_core.settings import Limits
from lms_core.topics import DEVICE_PUBLISHES, DeviceTopic, TopicKind, TopicScheme

NOW = time.time()
scheme = TopicScheme("lms")
dec = TelemetryDecoder(Limits())


@pytest.mark.parametrize("topic, expected", [
    ("lms/acme/d1/telemetry", DeviceTopic("acme", "d1", TopicKind.TELEMETRY, "telemetry")),
    ("lms/acme/d1/status", DeviceTopic("acme", "d1", TopicKind.STATUS, "status")),
    ("lms/acme/d1/events", DeviceTopic("acme", "d1", TopicKind.EVENTS, "events")),
    ("lms/acme/d1/config/reported", DeviceTopic("acme", "d1", TopicKind.CONFIG_REPORTED, "config/reported")),
    ("lms/acme/d1/commands/42/result", DeviceTopic("acme", "d1", TopicKind.COMMAND_RESULT, "commands/42/result", "42")),
    ("lms/acme/d1/commands//result", DeviceTopic("acme", "d1", TopicKind.OTHER, "commands//result")),
    ("lms/acme/d1/commands/42", DeviceTopic("acme", "d1", TopicKind.OTHER, "commands/42")),
    ("lms/acme/d1/other", DeviceTopic("acme", "d1", TopicKind.OTHER, "other")),
    ("lms/acme/d1/telemetry/x", DeviceTopic("acme", "d1", TopicKind.OTHER, "telemetry/x")),
    ("lms/acme/d1", None),
    ("other/acme/d1/telemetry", None),
    ("lmsx/acme/d1/telemetry", None),
])
def test_a_topic_is_parsed_into_org_device_kind_and_command(topic: str, expected: DeviceTopic | None) -> None:
    assert scheme.parse(topic) == expected


def _topic(kind: str) -> DeviceTopic:
    t = scheme.parse(f"lms/o/d/{kind}")
    assert t is not None
    return t


def test_every_topic_a_device_publishes_has_its_own_kind() -> None:
    kinds = {_topic(k.replace("+", "7")).kind for k in DEVICE_PUBLISHES}
    assert len(kinds) == len(DEVICE_PUBLISHES) and TopicKind.OTHER not in kinds
    assert _topic("commands/ab-1/result").section == "commands"


def test_the_decoder_routes_each_kind() -> None:
    rows = dec.decode(_topic("telemetry"), b'{"a": 1}', NOW, False)
    assert isinstance(rows, Readings) and [r[1:] for r in rows.rows] == [("a", 1.0, None)]
    assert dec.decode(_topic("status"), b"online", NOW, False) == Presence("online")
    assert dec.decode(_topic("status"), b"", NOW, False) == Presence(None)
    event = dec.decode(_topic("events"), b'{"type": "boot"}', NOW, False)
    assert isinstance(event, DeviceEvent) and (event.type, event.data) == ("boot", "{}")
    assert dec.decode(_topic("config/reported"), b'{"version": 1, "a": 2}', NOW, False) == ReportedConfig(1, '{"a":2}')
    assert dec.decode(_topic("commands/42/result"), b'{"status": "ok", "result": [1]}', NOW, False) == \
        CommandReply(42, "ok", "[1]", None)
    with pytest.raises(Rejected, match="the bridge does not take messages on 'commands/42'"):
        dec.decode(_topic("commands/42"), b'{"status": "ok"}', NOW, False)


def test_the_bridge_subscribes_to_every_topic_a_device_publishes() -> None:
    assert scheme.ingest_filters() == [f"lms/+/+/{kind}" for kind in DEVICE_PUBLISHES]


def test_a_replayed_retained_message_is_not_decoded_again_except_status() -> None:
    for kind in ("telemetry", "events", "config/reported", "commands/1/result"):
        assert dec.decode(_topic(kind), b"not even json", NOW, True) is REPLAYED
    assert dec.decode(_topic("status"), b"offline", NOW, True) == Presence("offline")


def _received(m: BridgeMetrics) -> dict[str, float]:
    return {s.labels["kind"]: s.value for s in next(iter(m.received.collect())).samples
            if s.name.endswith("_total")}


def test_received_messages_are_counted_per_kind_once() -> None:
    metrics = BridgeMetrics()
    store = Store(None, dec, scheme, metrics)
    msgs = [Message(t, p, i + 1, 1, NOW, False) for i, (t, p) in enumerate([
        ("lms/o/d/telemetry", b'{"a": 1}'), ("lms/o/d/telemetry", b'{"a": 2}'), ("lms/o/e/telemetry", b"{}"),
        ("lms/o/d/status", b"online"), ("lms/o/d/events", b'{"type": "x"}'),
        ("lms/o/d/commands/1/result", b"{}"), ("lms/o", b"x"),
    ])]
    batch = store.build(msgs)  # no device is known: every message is quarantined, and counted
    assert batch.received == {TopicKind.TELEMETRY: 3, TopicKind.STATUS: 1, TopicKind.EVENTS: 1,
                              TopicKind.COMMAND_RESULT: 1, TopicKind.OTHER: 1}
    metrics.committed(batch, len(msgs), 0.01)
    assert _received(metrics) == {"telemetry": 3, "status": 1, "events": 1, "commands/+/result": 1, "other": 1}
    assert metrics.stored._value.get() == len(msgs)
