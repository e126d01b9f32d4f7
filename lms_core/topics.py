"""The topic scheme of DESIGN.md: ``{root}/{org}/{device}/{kind}[/...]``."""

from __future__ import annotations

import re
from dataclasses import dataclass

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
        ]

    def split(self, topic: str) -> tuple[str, str, str] | None:
        """``(org, device, kind)`` of a device topic, or None when it is not one."""
        parts = topic.split("/", 3)
        if len(parts) != 4 or parts[0] != self.root:
            return None
        return parts[1], parts[2], parts[3]
