"""A device's desired and reported configuration (what AWS IoT calls the device shadow).

The desired document gets a version that only goes up, and is published retained at QoS 1
on ``{root}/{org}/{device}/config`` as ``{"version": n, ...}`` while its row is locked: two
changes at once are numbered and published in the same order, so the broker's retained
message is always the newest version. If the broker does not take it the change is rolled
back (503). If it was handed over but not acknowledged in time, the broker may still retain
it (or paho send it again on reconnecting): then the change is kept, and the caller gets 503
saying so - rolled back, its version would be given again to a different document, and a
device that applied the first would take the second for one it has. The bridge stores
what the device reports on ``config/reported``; the broker's retained config is restored
from here by reconcile (lms_core/provisioning.py).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg
import msgspec

from api.services.audit import Audit
from api.services.devices import device_id
from api.services.publisher import Publisher
from lms_core.commands import config_payload
from lms_core.errors import BrokerUnavailable, DeliveryUnknown, InvalidInput, NotFound
from lms_core.settings import Settings
from lms_core.topics import TopicScheme

if TYPE_CHECKING:
    from api.access import OrgAccess


class Difference(msgspec.Struct):
    """One desired key (dotted for nested objects) whose reported value differs; null when
    the device does not report it."""

    key: str
    desired: Any
    reported: Any


class DeviceConfig(msgspec.Struct):
    desired: dict[str, Any] | None
    desired_version: int
    desired_at: datetime | None
    reported: dict[str, Any] | None
    reported_version: int | None
    reported_at: datetime | None
    #: the device reports the desired version, with no difference
    in_sync: bool
    differences: list[Difference]
    topic: str


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396: objects merge key by key, null removes a key, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def differences(desired: dict[str, Any] | None, reported: dict[str, Any] | None) -> list[Difference]:
    """The keys of ``desired`` (dotted into nested objects) whose reported value differs.
    Keys only the device reports (its own facts, a firmware version) are not differences."""
    out: list[Difference] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(a):
                walk(a[key], b.get(key), f"{prefix}{key}.")
        elif a != b or isinstance(a, bool) != isinstance(b, bool):  # 1 == 1.0, but true is not 1
            out.append(Difference(key=prefix[:-1], desired=a, reported=b))

    if desired is not None:
        walk(desired, reported if reported is not None else {}, "")
    return out


def _doc(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


class ConfigService:
    def __init__(self, pool: asyncpg.Pool, settings: Settings, publisher: Publisher) -> None:
        self.pool = pool
        self.settings = settings
        self.publisher = publisher
        self.topics = TopicScheme(settings.topic_root)

    def _checked(self, doc: Any) -> str:
        if not isinstance(doc, dict):
            raise InvalidInput("the desired configuration must be a JSON object")
        if "version" in doc:
            raise InvalidInput("'version' is the platform's: it numbers the desired configuration; leave it out")
        text = json.dumps(doc, separators=(",", ":"))
        limit = self.settings.api.config_max_bytes
        if len(text.encode()) > limit:
            raise InvalidInput(f"the desired configuration is larger than {limit} bytes of JSON")
        if "\\u0000" in text:
            raise InvalidInput("the desired configuration may not contain NUL characters")
        return text

    async def get(self, access: OrgAccess, device: str) -> DeviceConfig:
        return await self._read(self.pool, access, device, await device_id(self.pool, access.org_id, device))

    async def _read(self, conn: asyncpg.Connection | asyncpg.Pool, access: OrgAccess, device: str,
                    dev_id: int) -> DeviceConfig:
        r = await conn.fetchrow("SELECT * FROM device_config WHERE device_id = $1", dev_id)
        topic = f"{self.topics.device_prefix(access.slug, device)}/config"
        if r is None:
            return DeviceConfig(desired=None, desired_version=0, desired_at=None, reported=None,
                                reported_version=None, reported_at=None, in_sync=False, differences=[], topic=topic)
        desired, reported = _doc(r["desired"]), _doc(r["reported"])
        diff = differences(desired, reported)
        in_sync = desired is not None and r["reported_version"] == r["desired_version"] and not diff
        return DeviceConfig(desired=desired, desired_version=r["desired_version"], desired_at=r["desired_at"],
                            reported=reported, reported_version=r["reported_version"], reported_at=r["reported_at"],
                            in_sync=in_sync, differences=diff, topic=topic)

    async def put(self, access: OrgAccess, device: str, doc: Any, audit: Audit) -> DeviceConfig:
        """Replace the desired configuration."""
        return await self._change(access, device, audit, lambda _current: doc)

    async def patch(self, access: OrgAccess, device: str, patch: Any, audit: Audit) -> DeviceConfig:
        """Merge ``patch`` (RFC 7396) into the desired configuration (``{}`` if there is none)."""
        if not isinstance(patch, dict):
            raise InvalidInput("a merge patch of the configuration must be a JSON object")
        return await self._change(access, device, audit, lambda current: merge_patch(current or {}, patch))

    async def delete(self, access: OrgAccess, device: str, audit: Audit) -> DeviceConfig:
        """Drop the desired configuration and clear the retained message (the version stays)."""
        return await self._change(access, device, audit, lambda _current: None)

    async def _change(self, access: OrgAccess, device: str, audit: Audit, new: Any) -> DeviceConfig:
        topic = f"{self.topics.device_prefix(access.slug, device)}/config"
        unknown: DeliveryUnknown | None = None
        async with self.pool.acquire() as conn, conn.transaction():
            dev_id = await device_id(conn, access.org_id, device)
            await conn.execute("INSERT INTO device_config (device_id) VALUES ($1) ON CONFLICT DO NOTHING", dev_id)
            r = await conn.fetchrow(
                "SELECT desired, desired_version FROM device_config WHERE device_id = $1 FOR UPDATE", dev_id)
            doc = new(_doc(r["desired"]))
            if doc is None:
                if r["desired"] is None:
                    raise NotFound(f"device {device!r} has no desired configuration")
                version = r["desired_version"]
                await conn.execute("UPDATE device_config SET desired = NULL, desired_at = now(), desired_by = $2 "
                                   "WHERE device_id = $1", dev_id, access.principal.user_id)
                payload = b""  # an empty retained message clears the retained one
            else:
                text = self._checked(doc)
                version = r["desired_version"] + 1
                await conn.execute(
                    """UPDATE device_config SET desired = $2::jsonb, desired_version = $3, desired_at = now(),
                              desired_by = $4 WHERE device_id = $1""",
                    dev_id, text, version, access.principal.user_id)
                payload = config_payload(version, doc)
            await audit.write(conn, "config.deleted" if doc is None else "config.changed",
                              actor=access.principal.user_id, org_id=access.org_id, target=device,
                              detail={"version": version})
            # Inside the transaction, holding the row: see the module's docstring.
            try:
                await self.publisher.publish(topic, payload, retain=True)
            except DeliveryUnknown as exc:
                unknown = exc  # committed: see the module's docstring
            # Read under the lock: the answer is this change's version, not a later one's.
            out = await self._read(conn, access, device, dev_id)
        if unknown is not None:
            raise BrokerUnavailable(f"the broker did not acknowledge version {version} of the configuration "
                                    f"({unknown}); it is stored and may still reach the device: reconcile "
                                    "or the next change publishes it again")
        return out
