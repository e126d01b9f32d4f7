"""The topic scheme of DESIGN.md: ``{root}/{org}/{device}/{kind}[/...]``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from lms_core.errors import InvalidInput

#: An organization's or device's slug, written once: matched here, anchored for the API's
#: input types (``SLUG_PATTERN``), and joined into broker usernames (lms_core/broker.py).
SLUG = r"[a-z0-9][a-z0-9_-]{0,62}"
SLUG_PATTERN = rf"^{SLUG}$"
SLUG_RE = re.compile(SLUG)

#: Topic kinds a device publishes (device -> cloud), after ``{root}/{org}/{device}/``.
DEVICE_PUBLISHES = ("telemetry", "status", "events", "config/reported", "commands/+/result")
#: Topic filters a device subscribes to (cloud -> device).
DEVICE_SUBSCRIBES = ("commands/#", "config")


def check_slug(value: str, what: str = "slug") -> str:
    """Return ``value`` if it is a valid slug, else raise InvalidInput."""
    if not isinstance(value, str) or not SLUG_RE.fullmatch(value):
        raise InvalidInput(
            f"{what} {value!r} is not a valid slug: lowercase letters, digits, '-' and '_', "
            "starting with a letter or digit, at most 63 characters"
        )
    return value


@dataclass(frozen=True, slots=True)
class TopicScheme:
    root: str = "lms"

    def device_prefix(self, org: str, device: str) -> str:
        return f"{self.root}/{org}/{device}"

    def device_publish_topics(self, org: str, device: str) -> list[str]:
        prefix = self.device_prefix(org, device)
        return [f"{prefix}/{kind}" for kind in DEVICE_PUBLISHES]

    def device_subscribe_filters(self, org: str, device: str) -> list[str]:
        prefix = self.device_prefix(org, device)
        return [f"{prefix}/{kind}" for kind in DEVICE_SUBSCRIBES]

    def ingest_filters(self) -> list[str]:
        """What the bridge subscribes to: directly, or each behind ``$share/<group>/`` when
        several bridges share the load (``LMS_BRIDGE_SUBSCRIPTION=shared``)."""
        return [
            f"{self.root}/+/+/telemetry",
            f"{self.root}/+/+/status",
            f"{self.root}/+/+/events",
            f"{self.root}/+/+/config/reported",
            f"{self.root}/+/+/commands/+/result",
        ]

    def parse(self, topic: str) -> DeviceTopic | None:
        """The device topic ``topic`` names, or None when it is not ``{root}/{org}/{device}/...``.

        Slugs are not checked here: an org or device that does not exist is the caller's
        finding (the bridge quarantines it as an unknown device).
        """
        parts = topic.split("/", 3)
        if len(parts) != 4 or parts[0] != self.root:
            return None
        _, org, device, rest = parts
        kind = _KINDS.get(rest)
        if kind is not None:
            return DeviceTopic(org, device, kind, rest)
        pieces = rest.split("/")
        if len(pieces) == 3 and pieces[0] == "commands" and pieces[2] == "result" and pieces[1]:
            return DeviceTopic(org, device, TopicKind.COMMAND_RESULT, rest, pieces[1])
        return DeviceTopic(org, device, TopicKind.OTHER, rest)


class TopicKind(StrEnum):
    """What a device topic carries: the part after ``{root}/{org}/{device}/`` (DESIGN.md, Topics).

    A ``StrEnum``: members hash and compare as their strings, in C, so counting messages
    per kind on the ingest path costs what a string key does (``Enum.__hash__`` is Python).
    """

    TELEMETRY = "telemetry"
    STATUS = "status"
    EVENTS = "events"
    CONFIG_REPORTED = "config/reported"
    COMMAND_RESULT = "commands/+/result"
    #: Anything else after a device: no device->cloud topic of the contract.
    OTHER = "other"


#: The kinds a topic names literally (a command result has an id in it).
_KINDS: dict[str, TopicKind] = {k.value: k for k in TopicKind if k not in (TopicKind.COMMAND_RESULT, TopicKind.OTHER)}


@dataclass(frozen=True, slots=True)
class DeviceTopic:
    """One device topic, parsed once (:meth:`TopicScheme.parse`)."""

    org: str
    device: str
    kind: TopicKind
    #: What follows the device, as published: ``telemetry``, ``commands/42/result``, ...
    rest: str
    #: The command a ``commands/{id}/result`` topic answers; None for other kinds.
    command_id: str | None = None

    @property
    def section(self) -> str:
        """The first level after the device (``commands`` for a command result)."""
        return self.rest.split("/", 1)[0]
