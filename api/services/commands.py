"""Commands to devices, one at a time or to a fleet (a tag or an asset), and their lifecycle.

A command is stored (state ``pending``) and committed first, then published at QoS 1 on
``{root}/{org}/{device}/commands/{id}`` with MQTT 5 message expiry = its TTL; the bridge
records the device's replies (bridge/store.py). Committed first because a device answers
within milliseconds, possibly before the API's transaction would have committed, and the
bridge must find the row. If the broker does not take the message, the row is marked
``failed`` with the reason and the caller gets 503: no command claims to be pending that
was never handed to the broker. A publish handed over but not acknowledged in time (a hung
broker, a connection lost meanwhile) may still be delivered - the broker reads it late, or
paho sends it again on reconnecting - so that command stays ``pending`` (the caller still
gets 503, saying so) rather than be called ``failed`` while the device runs it.

``expired`` is written when it is read: every read of commands first moves the open ones
past their ``expires_at`` to ``expired`` (an index keeps only open commands), so every
reader sees the same state without a sweeper's delay.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

import asyncpg
import msgspec
from msgspec import Meta

from api.services.audit import Audit
from api.services.devices import Slug, Tag, device_id
from api.services.errors import CommandNotSent, Conflict
from api.services.publisher import Publisher
from api.services.waiter import CommandWaiter
from lms_core.commands import COMMAND_NAME_PATTERN, FINAL_STATES, OPEN_STATES, STATES, command_payload
from lms_core.db import is_transient, translate
from lms_core.errors import BrokerError, BrokerUnavailable, DeliveryUnknown, InvalidInput, NotFound
from lms_core.settings import Settings
from lms_core.topics import TopicScheme

if TYPE_CHECKING:
    from api.access import OrgAccess

log = logging.getLogger("lms.api.commands")

CommandName = Annotated[str, Meta(pattern=COMMAND_NAME_PATTERN, description="what the firmware dispatches on")]
State = Literal["pending", "delivered", "succeeded", "failed", "expired", "cancelled"]
#: The most a request may wait for a result (``?wait=``).
MAX_WAIT_S = 30
#: A sent command whose state cannot be read (PostgreSQL restarting) is read again for this
#: long past the wait before the answer is 503: a restart takes a few seconds.
WAIT_GRACE_S = 5


class CommandCreate(msgspec.Struct, forbid_unknown_fields=True):
    name: CommandName
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    ttl_seconds: Annotated[int, Meta(ge=1, description="how long the command may wait for its device")] = 60


class FleetCommandCreate(msgspec.Struct, forbid_unknown_fields=True):
    """The same command to every device with ``tag`` or of ``asset`` (exactly one of them)."""

    name: CommandName
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    ttl_seconds: Annotated[int, Meta(ge=1)] = 60
    tag: Tag | None = None
    asset: Slug | None = None


class Reply(msgspec.Struct):
    """The device's last answer (``commands/{id}/result``)."""

    status: str
    at: datetime
    result: Any = None
    error: str | None = None


class Command(msgspec.Struct):
    id: int
    device: str
    name: str
    params: dict[str, Any]
    state: State
    created_at: datetime
    expires_at: datetime
    sent_at: datetime | None
    delivered_at: datetime | None
    finished_at: datetime | None
    reply: Reply | None
    #: why it failed: the device's error, or the platform's (not handed to the broker)
    error: str | None
    group_id: int | None
    topic: str


class CommandGroup(msgspec.Struct):
    id: int
    name: str
    params: dict[str, Any]
    target: dict[str, str]
    created_at: datetime
    expires_at: datetime
    devices: int
    #: commands per state, every state present
    summary: dict[str, int]


_COLUMNS = """c.id, d.slug AS device, c.name, c.params, c.state, c.created_at, c.expires_at, c.sent_at,
              c.delivered_at, c.finished_at, c.reply_status, c.reply_at, c.result, c.error, c.group_id"""

#: Open commands past their deadline become ``expired`` (see the module's docstring).
_EXPIRE = """UPDATE commands SET state = 'expired', finished_at = expires_at
             WHERE state IN ('pending', 'delivered') AND expires_at <= now() AND {where}"""


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


class CommandService:
    def __init__(self, pool: asyncpg.Pool, settings: Settings, publisher: Publisher, waiter: CommandWaiter) -> None:
        self.pool = pool
        self.settings = settings
        self.publisher = publisher
        self.waiter = waiter
        self.topics = TopicScheme(settings.topic_root)

    # -- input ---------------------------------------------------------------------

    def _checked(self, params: dict[str, Any], ttl: int) -> str:
        text = json.dumps(params, separators=(",", ":"))
        limit = self.settings.api.command_params_max_bytes
        if len(text.encode()) > limit:
            raise InvalidInput(f"params are larger than {limit} bytes of JSON")
        if "\\u0000" in text:
            raise InvalidInput("params may not contain NUL characters")
        if ttl > self.settings.api.command_max_ttl_s:
            raise InvalidInput(f"ttl_seconds may be at most {self.settings.api.command_max_ttl_s}")
        return text

    def _command(self, r: Any, org: str) -> Command:
        reply = None
        if r["reply_status"] is not None:
            reply = Reply(status=r["reply_status"], at=r["reply_at"], result=_json(r["result"]), error=r["error"])
        return Command(id=r["id"], device=r["device"], name=r["name"], params=_json(r["params"]), state=r["state"],
                       created_at=r["created_at"], expires_at=r["expires_at"], sent_at=r["sent_at"],
                       delivered_at=r["delivered_at"], finished_at=r["finished_at"], reply=reply,
                       error=r["error"], group_id=r["group_id"],
                       topic=f"{self.topics.device_prefix(org, r['device'])}/commands/{r['id']}")

    # -- one device ----------------------------------------------------------------

    async def send(self, access: OrgAccess, device: str, data: CommandCreate, audit: Audit,
                   wait: int = 0) -> tuple[Command, bool]:
        """Store and publish a command; with ``wait``, wait up to that many seconds for a
        final state. Returns the command and whether its state is final."""
        params = self._checked(data.params, data.ttl_seconds)
        async with self.pool.acquire() as conn, conn.transaction():
            # One statement finds the device and stores the command (each round trip here is
            # paid by every command of a busy dashboard).
            r = await conn.fetchrow(
                """INSERT INTO commands (org_id, device_id, name, params, expires_at, created_by)
                   SELECT $1, d.id, $3, $4::jsonb, now() + $5 * interval '1 second', $6
                   FROM devices d WHERE d.org_id = $1 AND d.slug = $2
                   RETURNING id, created_at, expires_at""",
                access.org_id, device, data.name, params, data.ttl_seconds, access.principal.user_id)
            if r is None:
                raise NotFound(f"device {device!r} not found")
            await audit.write(conn, "command.sent", actor=access.principal.user_id, org_id=access.org_id,
                              target=device, detail={"command_id": r["id"], "name": data.name})
        command_id: int = r["id"]
        topic = f"{self.topics.device_prefix(access.slug, device)}/commands/{command_id}"
        location = f"/api/v1/orgs/{access.slug}/devices/{device}/commands/{command_id}"
        async with self.waiter.watching(command_id) as changed:
            try:
                await self.publisher.publish(topic, command_payload(command_id, data.name, data.params,
                                                                    r["expires_at"]),
                                             expiry=data.ttl_seconds)
            except DeliveryUnknown as exc:
                # Handed over, not acknowledged: it may still reach the device, so it stays
                # pending (and expires with its TTL) and a result still counts.
                raise CommandNotSent(f"the broker did not acknowledge command {command_id} ({exc}): it may still "
                                     "reach the device and stays pending until it expires; look it up before "
                                     "sending it again", command_id, location) from None
            except BrokerError as exc:
                await self._undeliverable([command_id], exc)
                raise CommandNotSent(f"the broker did not take command {command_id} ({exc}); it is failed and "
                                     "will not run", command_id, location) from None
            # From here the command is on its way: PostgreSQL failing now must not make the
            # answer an error (a caller told "failed" sends it again, and it runs twice).
            # Reads keep trying until the deadline; the last state read is the answer.
            deadline = time.monotonic() + min(wait, MAX_WAIT_S)
            sent = None
            try:
                sent = await self.pool.fetchrow(
                    "UPDATE commands SET sent_at = now() WHERE id = $1 RETURNING sent_at, state", command_id)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.warning("command %d sent, but its sent_at not written: %s", command_id, exc)
            cmd: Command | None = None
            if not wait and sent is not None and sent["state"] == "pending":
                # Nobody waits: the state is the one just written, no need to read it back.
                return Command(id=command_id, device=device, name=data.name, params=data.params, state="pending",
                               created_at=r["created_at"], expires_at=r["expires_at"], sent_at=sent["sent_at"],
                               delivered_at=None, finished_at=None, reply=None, error=None, group_id=None,
                               topic=topic), False
            while True:
                if wait:
                    # The device may have answered already: then the event is set and this
                    # returns at once; else it returns at the notification (or each POLL_S).
                    await self.waiter.sleep(changed, max(deadline - time.monotonic(), 0.0))
                try:
                    cmd = await self.get(access, device, command_id)
                except Exception as exc:
                    if not is_transient(exc):
                        raise
                    log.warning("command %d sent; reading its state failed: %s", command_id, exc)
                    if cmd is None and time.monotonic() >= deadline + WAIT_GRACE_S:
                        raise translate(exc) from exc
                    await asyncio.sleep(0.2)
                    continue
                if cmd.state in FINAL_STATES or deadline - time.monotonic() <= 0:
                    return cmd, cmd.state in FINAL_STATES

    async def _undeliverable(self, ids: list[int], exc: Exception) -> None:
        await self.pool.execute(
            """UPDATE commands SET state = 'failed', finished_at = now(), error = $2
               WHERE id = ANY($1::bigint[]) AND state = 'pending'""",
            ids, f"not delivered: the broker did not take the command ({exc})"[:500])

    async def get(self, access: OrgAccess, device: str, command_id: int) -> Command:
        query = f"""SELECT {_COLUMNS}, c.expires_at <= now() AS past FROM commands c
                    JOIN devices d ON d.id = c.device_id WHERE c.id = $1 AND c.org_id = $2 AND d.slug = $3"""
        async with self.pool.acquire() as conn:
            r = await conn.fetchrow(query, command_id, access.org_id, device)
            if r is not None and r["past"] and r["state"] in OPEN_STATES:
                # Past its deadline and still open: expired, written now (see the module's docstring).
                await conn.execute(_EXPIRE.format(where="id = $1"), command_id)
                r = await conn.fetchrow(query, command_id, access.org_id, device)
        if r is None:
            raise NotFound(f"command {command_id} of device {device!r} not found")
        return self._command(r, access.slug)

    async def list_commands(self, access: OrgAccess, device: str, *, state: str | None, limit: int,
                            before: int | None) -> list[Command]:
        """Newest first; continue with ``before`` = the last id of a page."""
        async with self.pool.acquire() as conn:
            dev_id = await device_id(conn, access.org_id, device)
            await conn.execute(_EXPIRE.format(where="device_id = $1"), dev_id)
            rows = await conn.fetch(
                f"""SELECT {_COLUMNS} FROM commands c JOIN devices d ON d.id = c.device_id
                    WHERE c.device_id = $1 AND ($2::text IS NULL OR c.state = $2)
                      AND ($3::bigint IS NULL OR c.id < $3)
                    ORDER BY c.id DESC LIMIT $4""", dev_id, state, before, limit)
        return [self._command(r, access.slug) for r in rows]

    async def cancel(self, access: OrgAccess, device: str, command_id: int, audit: Audit) -> Command:
        """Cancel an open command. The device may still have it (a published message cannot
        be taken back); a later result is recorded, the outcome stays ``cancelled``."""
        async with self.pool.acquire() as conn, conn.transaction():
            dev_id = await device_id(conn, access.org_id, device)
            await conn.execute(_EXPIRE.format(where="id = $1"), command_id)
            state = await conn.fetchval(
                "SELECT state FROM commands WHERE id = $1 AND device_id = $2 FOR UPDATE", command_id, dev_id)
            if state is None:
                raise NotFound(f"command {command_id} of device {device!r} not found")
            if state not in OPEN_STATES:
                raise Conflict(f"command {command_id} is already {state}")
            await conn.execute("UPDATE commands SET state = 'cancelled', finished_at = now() WHERE id = $1",
                               command_id)
            await audit.write(conn, "command.cancelled", actor=access.principal.user_id, org_id=access.org_id,
                              target=device, detail={"command_id": command_id})
        return await self.get(access, device, command_id)

    # -- fleets --------------------------------------------------------------------

    async def send_group(self, access: OrgAccess, data: FleetCommandCreate, audit: Audit) -> CommandGroup:
        if (data.tag is None) == (data.asset is None):
            raise InvalidInput("give exactly one of tag and asset: the devices the command goes to")
        params = self._checked(data.params, data.ttl_seconds)
        target = {"tag": data.tag} if data.tag is not None else {"asset": data.asset}
        limit = self.settings.api.fleet_max_devices
        async with self.pool.acquire() as conn, conn.transaction():
            if data.asset is not None:
                asset_id = await conn.fetchval("SELECT id FROM assets WHERE org_id = $1 AND slug = $2",
                                               access.org_id, data.asset)
                if asset_id is None:
                    raise NotFound(f"asset {data.asset!r} not found")
                devices = await conn.fetch(
                    """SELECT d.id, d.slug FROM devices d JOIN device_assets da ON da.device_id = d.id
                       WHERE da.asset_id = $1 AND d.org_id = $2 ORDER BY d.slug LIMIT $3""",
                    asset_id, access.org_id, limit + 1)
            else:
                devices = await conn.fetch(
                    "SELECT id, slug FROM devices WHERE org_id = $1 AND $2 = ANY (tags) ORDER BY slug LIMIT $3",
                    access.org_id, data.tag, limit + 1)
            if not devices:
                raise InvalidInput(f"no device {'has tag' if data.tag else 'belongs to asset'} "
                                   f"{data.tag or data.asset!r}")
            if len(devices) > limit:
                raise InvalidInput(f"a fleet command may address at most {limit} devices")
            group = await conn.fetchrow(
                """INSERT INTO command_groups (org_id, name, params, target, created_by, expires_at)
                   VALUES ($1, $2, $3::jsonb, $4::jsonb, $5, now() + $6 * interval '1 second')
                   RETURNING id, expires_at""",
                access.org_id, data.name, params, json.dumps(target), access.principal.user_id, data.ttl_seconds)
            rows = await conn.fetch(
                """INSERT INTO commands (org_id, device_id, group_id, name, params, expires_at, created_by)
                   SELECT $1, u.id, $2, $3, $4::jsonb, $5, $6 FROM unnest($7::bigint[]) AS u(id)
                   RETURNING id, device_id""",
                access.org_id, group["id"], data.name, params, group["expires_at"], access.principal.user_id,
                [d["id"] for d in devices])
            await audit.write(conn, "command_group.sent", actor=access.principal.user_id, org_id=access.org_id,
                              target=data.name, detail={"group_id": group["id"], **target, "devices": len(rows)})
        slugs = {d["id"]: d["slug"] for d in devices}
        ids = [r["id"] for r in rows]
        messages = [(f"{self.topics.device_prefix(access.slug, slugs[r['device_id']])}/commands/{r['id']}",
                     command_payload(r["id"], data.name, data.params, group["expires_at"]), data.ttl_seconds)
                    for r in rows]
        try:
            outcomes: list[BrokerError | None] = await self.publisher.publish_many(messages)
        except BrokerError as exc:
            outcomes = [exc] * len(messages)
        sent = [i for i, o in zip(ids, outcomes, strict=True) if o is None]
        # Not acknowledged in time is not a refusal: those stay pending (see send()).
        failed = [i for i, o in zip(ids, outcomes, strict=True) if o is not None and not isinstance(o, DeliveryUnknown)]
        if sent:
            await self.pool.execute("UPDATE commands SET sent_at = now() WHERE id = ANY($1::bigint[])", sent)
        if failed:
            await self._undeliverable(failed, next(o for o in outcomes if o is not None
                                                  and not isinstance(o, DeliveryUnknown)))
        if not sent:
            first = next(o for o in outcomes if o is not None)
            raise BrokerUnavailable(f"the broker did not take the command: {first}")
        return await self.get_group(access, group["id"])

    async def get_group(self, access: OrgAccess, group_id: int) -> CommandGroup:
        async with self.pool.acquire() as conn:
            g = await conn.fetchrow(
                """SELECT id, name, params, target, created_at, expires_at FROM command_groups
                   WHERE id = $1 AND org_id = $2""", group_id, access.org_id)
            if g is None:
                raise NotFound(f"command group {group_id} not found")
            await conn.execute(_EXPIRE.format(where="group_id = $1"), group_id)
            counts = await conn.fetch("SELECT state, count(*) AS n FROM commands WHERE group_id = $1 GROUP BY state",
                                      group_id)
        summary = dict.fromkeys(STATES, 0) | {r["state"]: r["n"] for r in counts}
        return CommandGroup(id=g["id"], name=g["name"], params=_json(g["params"]), target=_json(g["target"]),
                            created_at=g["created_at"], expires_at=g["expires_at"], devices=sum(summary.values()),
                            summary=summary)

    async def list_groups(self, access: OrgAccess, *, limit: int, before: int | None) -> list[CommandGroup]:
        ids = await self.pool.fetch(
            """SELECT id FROM command_groups WHERE org_id = $1 AND ($2::bigint IS NULL OR id < $2)
               ORDER BY id DESC LIMIT $3""", access.org_id, before, limit)
        return [await self.get_group(access, r["id"]) for r in ids]

    async def group_commands(self, access: OrgAccess, group_id: int, *, state: str | None, limit: int,
                             after: int | None) -> list[Command]:
        """The group's commands, one per device, by id; continue with ``after`` = the last id."""
        await self.get_group(access, group_id)  # 404 for another organization's, and expiry
        rows = await self.pool.fetch(
            f"""SELECT {_COLUMNS} FROM commands c JOIN devices d ON d.id = c.device_id
                WHERE c.group_id = $1 AND c.org_id = $2 AND ($3::text IS NULL OR c.state = $3)
                  AND ($4::bigint IS NULL OR c.id > $4)
                ORDER BY c.id LIMIT $5""", group_id, access.org_id, state, after, limit)
        return [self._command(r, access.slug) for r in rows]

    async def cancel_group(self, access: OrgAccess, group_id: int, audit: Audit) -> CommandGroup:
        """Cancel every command of the group that is still open."""
        await self.get_group(access, group_id)
        async with self.pool.acquire() as conn, conn.transaction():
            status = await conn.execute(
                """UPDATE commands SET state = 'cancelled', finished_at = now()
                   WHERE group_id = $1 AND org_id = $2 AND state IN ('pending', 'delivered')""",
                group_id, access.org_id)
            await audit.write(conn, "command_group.cancelled", actor=access.principal.user_id,
                              org_id=access.org_id, target=str(group_id),
                              detail={"cancelled": int(status.rsplit(" ", 1)[-1])})
        return await self.get_group(access, group_id)
