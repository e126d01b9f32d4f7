"""Decode and validate device payloads (DESIGN.md, "Telemetry payload").

A payload either becomes rows or raises :class:`Rejected` with a reason a person can
act on; the caller quarantines it. Nothing here touches the network or the database.
:meth:`TelemetryDecoder.decode` is the one place that routes a message by its topic's
kind: what telemetry, status and events become, and which kinds the bridge refuses.

Telemetry forms:
1. flat ``{"temp": 21.5}`` - time of receipt;
2. stamped ``{"ts": 1732550000123, "values": {...}}`` - ``ts`` in epoch ms or RFC 3339;
3. batch ``[stamped, ...]`` - a device flushing its offline buffer.
Numbers and booleans become ``value`` (float), strings ``text_value``; nested objects
are flattened with ".".

Cloud to device, the device's side (lms_core/commands.py): ``commands/{id}/result`` becomes
a :class:`CommandReply` and ``config/reported`` a :class:`ReportedConfig`. Whether the
command exists and is the device's own is the store's finding (it needs the database).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import msgspec

from lms_core.commands import COMMAND_ID_RE, REPLIES
from lms_core.settings import Limits
from lms_core.topics import DeviceTopic, TopicKind

_json = msgspec.json.Decoder()
_json_encode = msgspec.json.Encoder().encode

#: A row before its device is known: (time, metric, numeric value, text value).
Row = tuple[datetime, str, float | None, str | None]


#: A payload as paho hands it over.
Payload = bytes | bytearray


class Rejected(Exception):
    """The payload breaks the contract or a limit; ``str(exc)`` is the reason."""


# What one message becomes (:meth:`TelemetryDecoder.decode`). gc=False: they hold no
# reference that could close a cycle, and the collector need not walk them.

class Readings(msgspec.Struct, gc=False, frozen=True):
    """The rows of a ``telemetry`` message."""

    rows: list[Row]


class Presence(msgspec.Struct, gc=False, frozen=True):
    """A ``status`` message: ``online``/``offline``, or None for an empty payload (the
    clearing of a retained status: nothing to apply)."""

    status: str | None


class DeviceEvent(msgspec.Struct, gc=False, frozen=True):
    """An ``events`` message: its time, type and data as JSON text."""

    when: datetime
    type: str
    data: str


class CommandReply(msgspec.Struct, gc=False, frozen=True):
    """A ``commands/{id}/result`` message: the device's answer to command ``command_id``.
    ``result`` is JSON text (None when absent or null), ``error`` the device's message."""

    command_id: int
    status: str
    result: str | None
    error: str | None


class ReportedConfig(msgspec.Struct, gc=False, frozen=True):
    """A ``config/reported`` message: the configuration the device applied, as JSON text
    of the object without its ``version``."""

    version: int
    document: str


class Replayed(msgspec.Struct, gc=False, frozen=True):
    """A retained message the broker replayed to a new subscription: it was stored when
    it was first published, so it is not stored again."""


REPLAYED = Replayed()
Decoded = Readings | Presence | DeviceEvent | CommandReply | ReportedConfig | Replayed

#: The largest ``bigint``: a command id (19 digits may exceed it) or a version beyond it
#: cannot be a row's, and asyncpg would refuse to send it, failing the whole batch.
MAX_BIGINT = 2**63 - 1
#: ``error`` of a command result: a message for a person, not a log.
MAX_REPLY_ERROR_CHARS = 1000
_REPLY_FIELDS = frozenset({"status", "result", "error"})


class TelemetryDecoder:
    """Turns payload bytes into rows. One instance per bridge; it caches valid names."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._name_ok = re.compile(limits.metric_pattern).fullmatch
        self._good_names: set[str] = set()

    # -- helpers ---------------------------------------------------------------

    def _parse(self, payload: Payload) -> Any:
        if len(payload) > self.limits.max_payload_bytes:
            raise Rejected(f"payload too large: {len(payload)} bytes > limit {self.limits.max_payload_bytes}")
        if not payload:
            raise Rejected("empty payload")
        try:
            return _json.decode(payload)
        except msgspec.DecodeError as exc:
            raise Rejected(f"not valid JSON: {exc}") from None
        except RecursionError:
            raise Rejected("JSON nested too deeply") from None

    def _check_name(self, name: str) -> None:
        if name in self._good_names:
            return
        if not self._name_ok(name):
            raise Rejected(f"metric name {name[:80]!r} does not match {self.limits.metric_pattern}")
        if len(self._good_names) < 100_000:  # bounded: names are few, garbage is not
            self._good_names.add(name)

    def timestamp(self, ts: Any, now: float) -> datetime:
        """Epoch milliseconds or an RFC 3339 string, inside the configured window."""
        if isinstance(ts, bool) or not isinstance(ts, int | float | str):
            raise Rejected(f"ts must be epoch milliseconds or an RFC 3339 string, got {_short(ts)}")
        if isinstance(ts, str):
            try:
                when = datetime.fromisoformat(ts)
            except ValueError:
                raise Rejected(f"ts {ts[:40]!r} is not an RFC 3339 timestamp") from None
            if when.tzinfo is None:
                raise Rejected(f"ts {ts[:40]!r} has no time zone (add Z or an offset)")
            seconds = when.timestamp()
        else:
            try:
                seconds = ts / 1000.0
            except OverflowError:  # an integer of hundreds of digits
                raise Rejected(f"ts {_short(ts)} is out of range") from None
        lim = self.limits
        if not now - lim.max_past_s <= seconds <= now + lim.max_future_s:
            hint = ""
            if not isinstance(ts, str) and 1e9 < ts < 1e10:
                hint = " (looks like seconds; ts is in milliseconds)"
            raise Rejected(
                f"ts {_short(ts)} outside the accepted window of {lim.max_past_s} s in the past "
                f"to {lim.max_future_s} s in the future{hint}"
            )
        if isinstance(ts, str):
            return when.astimezone(UTC)
        return datetime.fromtimestamp(seconds, UTC)

    def _values(self, values: Any, when: datetime, out: list[Row]) -> None:
        if not isinstance(values, dict):
            raise Rejected(f"values must be a JSON object, got {_short(values)}")
        if not values:
            raise Rejected("no metrics in message")
        start = len(out)
        nested = self._flatten(values, "", 1, when, out)
        if len(out) - start > self.limits.max_metrics:
            raise Rejected(f"too many metrics: {len(out) - start} > limit {self.limits.max_metrics}")
        if nested:
            # {"a.b": 1, "a": {"b": 2}} flattens to the same name twice: refuse it rather
            # than let the unique index keep one value and silently drop the other.
            seen: set[str] = set()
            for row in out[start:]:
                if row[1] in seen:
                    raise Rejected(f"metric {row[1][:80]!r} given twice (a dotted name and a nested object)")
                seen.add(row[1])

    def _flatten(self, obj: dict[str, Any], prefix: str, depth: int, when: datetime, out: list[Row]) -> bool:
        """Append rows; return whether a nested object was flattened."""
        if depth > self.limits.max_depth:
            raise Rejected(f"object nested deeper than {self.limits.max_depth} levels")
        nested = False
        for key, v in obj.items():
            name = prefix + key
            tv = type(v)
            if tv is float or tv is int:
                self._check_name(name)
                try:
                    out.append((when, name, float(v), None))
                except OverflowError:
                    raise Rejected(f"metric {name[:80]!r}: number out of range") from None
            elif tv is bool:
                self._check_name(name)
                out.append((when, name, 1.0 if v else 0.0, None))
            elif tv is str:
                self._check_name(name)
                if len(v) > self.limits.max_text_chars:
                    raise Rejected(f"metric {name[:80]!r}: text longer than {self.limits.max_text_chars} characters")
                if "\x00" in v:
                    raise Rejected(f"metric {name[:80]!r}: text contains a NUL character")
                out.append((when, name, None, v))
            elif tv is dict:
                if not v:
                    raise Rejected(f"metric {name[:80]!r}: empty object")
                self._flatten(v, name + ".", depth + 1, when, out)
                nested = True
            else:
                kind = "null" if v is None else "array" if tv is list else tv.__name__
                raise Rejected(f"metric {name[:80]!r}: {kind} is not a number, boolean, string or object")
        return nested

    # -- public ------------------------------------------------------------------

    def decode(self, topic: DeviceTopic, payload: Payload, now: float, retained: bool) -> Decoded:
        """What a message on ``topic``, received at ``now`` (epoch seconds), becomes.

        Raises :class:`Rejected` for a payload that breaks the contract and for a topic
        kind the bridge does not take.
        """
        kind = topic.kind
        if retained and kind is not _STATUS:
            # Only a status replay is applied: it is the device's current state.
            return REPLAYED
        if kind is _TELEMETRY:
            return Readings(self.telemetry(payload, now))
        if kind is _STATUS:
            return Presence(self.status(payload))
        if kind is _EVENTS:
            when, etype, data = self.event(payload, now)
            return DeviceEvent(when, etype, data)
        if kind is _COMMAND_RESULT:
            return self.command_reply(topic.command_id, payload)
        if kind is _CONFIG_REPORTED:
            return self.reported_config(payload)
        raise Rejected(f"the bridge does not take messages on '{topic.rest}'")

    def telemetry(self, payload: Payload, now: float) -> list[Row]:
        """Rows of one telemetry message received at ``now`` (epoch seconds)."""
        doc = self._parse(payload)
        out: list[Row] = []
        if type(doc) is dict:
            if "values" in doc and "ts" in doc and len(doc) == 2:
                self._values(doc["values"], self.timestamp(doc["ts"], now), out)
            else:
                self._values(doc, datetime.fromtimestamp(now, UTC), out)
        elif type(doc) is list:
            if not doc:
                raise Rejected("empty batch")
            if len(doc) > self.limits.max_batch_entries:
                raise Rejected(f"batch of {len(doc)} entries > limit {self.limits.max_batch_entries}")
            for i, entry in enumerate(doc):
                if type(entry) is not dict or "ts" not in entry or "values" not in entry or len(entry) != 2:
                    raise Rejected(f"batch entry {i} is not {{\"ts\": ..., \"values\": {{...}}}}")
                self._values(entry["values"], self.timestamp(entry["ts"], now), out)
        else:
            raise Rejected(f"telemetry must be a JSON object or array, got {_short(doc)}")
        return out

    def event(self, payload: Payload, now: float) -> tuple[datetime, str, str]:
        """``(time, type, data as JSON text)`` of an ``events`` message."""
        doc = self._parse(payload)
        if type(doc) is not dict:
            raise Rejected(f"event must be a JSON object, got {_short(doc)}")
        extra = set(doc) - {"type", "ts", "data"}
        if extra:
            raise Rejected(f"event has unknown fields: {', '.join(sorted(extra))[:80]}")
        etype = doc.get("type")
        if not isinstance(etype, str) or not _EVENT_TYPE.fullmatch(etype):
            raise Rejected(f"event type must match {_EVENT_TYPE.pattern}, got {_short(etype)}")
        if etype in RESERVED_EVENT_TYPES:
            raise Rejected(f"event type {etype!r} is reserved for the platform (presence)")
        data = doc.get("data", {})
        if type(data) is not dict:
            raise Rejected(f"event data must be a JSON object, got {_short(data)}")
        if b"\\u0000" in payload:
            raise Rejected("event contains a NUL character")
        when = self.timestamp(doc["ts"], now) if "ts" in doc else datetime.fromtimestamp(now, UTC)
        return when, etype, _json_encode(data).decode()

    def command_reply(self, command_id: str | None, payload: Payload) -> CommandReply:
        """A ``commands/{id}/result`` message: ``{"status": ..., "result"?: any, "error"?: str}``."""
        if command_id is None or not COMMAND_ID_RE.fullmatch(command_id) or int(command_id) > MAX_BIGINT:
            raise Rejected(f"command id {_short(command_id)} is not a command id: the topic is "
                           "commands/{id}/result with the id of the command received, a decimal number from 1")
        doc = self._parse(payload)
        if type(doc) is not dict:
            raise Rejected(f"command result must be a JSON object, got {_short(doc)}")
        extra = doc.keys() - _REPLY_FIELDS
        if extra:
            raise Rejected(f"command result has unknown fields: {', '.join(sorted(extra))[:80]} "
                           "(allowed: status, result, error)")
        status = doc.get("status")
        if type(status) is not str or status not in REPLIES:
            raise Rejected(f"command result status must be one of {', '.join(REPLIES)}, got {_short(status)}")
        error = doc.get("error")
        if error is not None:
            if type(error) is not str:
                raise Rejected(f"command result error must be a string, got {_short(error)}")
            if len(error) > MAX_REPLY_ERROR_CHARS:
                raise Rejected(f"command result error longer than {MAX_REPLY_ERROR_CHARS} characters")
        if b"\\u0000" in payload:  # PostgreSQL's text and jsonb cannot hold it
            raise Rejected("command result contains a NUL character")
        result = doc.get("result")
        return CommandReply(int(command_id), status, None if result is None else _json_encode(result).decode(),
                            error)

    def reported_config(self, payload: Payload) -> ReportedConfig:
        """A ``config/reported`` message: ``{"version": n, ...}``, n an integer from 0."""
        doc = self._parse(payload)
        if type(doc) is not dict:
            raise Rejected(f"reported config must be a JSON object, got {_short(doc)}")
        version = doc.pop("version", None)
        if type(version) is not int or not 0 <= version <= MAX_BIGINT:
            raise Rejected(f"reported config needs an integer \"version\" from 0 (the version of the "
                           f"desired config applied), got {_short(version)}")
        if b"\\u0000" in payload:
            raise Rejected("reported config contains a NUL character")
        return ReportedConfig(version, _json_encode(doc).decode())

    @staticmethod
    def status(payload: Payload) -> str | None:
        """``online``/``offline``; None for an empty payload (a cleared retained message)."""
        text = payload.strip().strip(b'"').decode("ascii", "replace").lower() if payload else ""
        if not payload:
            return None
        if text not in ("online", "offline"):
            raise Rejected(f"status must be 'online' or 'offline', got {payload[:40]!r}")
        return text


# Module constants: the routing compares by identity without a class attribute lookup.
_TELEMETRY, _STATUS, _EVENTS = TopicKind.TELEMETRY, TopicKind.STATUS, TopicKind.EVENTS
_COMMAND_RESULT, _CONFIG_REPORTED = TopicKind.COMMAND_RESULT, TopicKind.CONFIG_REPORTED
_EVENT_TYPE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,63}")
#: Event types the bridge writes itself; a device may not forge them.
RESERVED_EVENT_TYPES = frozenset({"status"})


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."
