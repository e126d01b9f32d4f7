"""Write decoded batches to PostgreSQL: readings, events, presence, command replies,
reported configuration, quarantine.

One batch is one transaction. Readings go in by COPY straight into ``readings``; the
unique index (device, metric, time) refuses a redelivered reading, and then - only
then - the batch is written again through a temporary staging table with
``INSERT ... ON CONFLICT DO NOTHING``. Redeliveries come in bursts after a reconnect,
so the de-duplicating path stays on for a while before COPY is tried again: the common
case pays for COPY alone, the rare case for correctness.

If PostgreSQL rejects a batch for its content (it should not: the decoder checks what
PostgreSQL would refuse), the batch is written again message by message, each in a
savepoint, and the offending messages are quarantined with the database's reason. A
bad message never blocks the others.

Command replies move their commands in the same transaction (bridge/commands.py); a reply
to a command that does not exist or is another device's is only found out there, so the
quarantine rows are inserted after the replies were applied.

Alert rules are evaluated last in the same transaction, on the readings just written
(bridge/rules.py): alert state, alerts and their notifications commit with the readings
that caused them, or not at all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec

from bridge.commands import record_replies
from bridge.decode import (
    CommandReply,
    DeviceEvent,
    Payload,
    Presence,
    Readings,
    Rejected,
    ReportedConfig,
    TelemetryDecoder,
)
from bridge.metrics import BridgeMetrics
from bridge.rules import VERSIONS_SQL, Evaluated, RuleEngine
from lms_core import rollups
from lms_core.db import is_transient, translate
from lms_core.errors import DatabaseUnavailable
from lms_core.topics import DeviceTopic, TopicKind, TopicScheme

log = logging.getLogger("lms.bridge.store")


class Message(msgspec.Struct, gc=False, frozen=True):
    """One received MQTT message, as the ingest callback records it.

    Why this type (bench/record_cost.py: construction in the callback, append, the field
    reads of store and flusher; 100k messages, best of 25, 2 shared cores, ns/message):

    ===============================  ===============  ================
    type                             batches of 500   batches of 5000
    ===============================  ===============  ================
    tuple read by position (before)  331              417
    msgspec.Struct gc=False frozen   327              351
    msgspec.Struct (gc on)           341              376
    NamedTuple                       579              985
    class with __slots__             484              812
    ===============================  ===============  ================

    A Struct is built in C and, with ``gc=False``, is not tracked by the garbage
    collector, which otherwise walks the buffer again and again while a drain fills it.
    Safe: its fields (str, bytes, numbers) cannot form a reference cycle. In the callback
    itself, with real paho messages (bench/hot_path.py, interleaved runs): 257-280 ns per
    message against 243-268 ns with the tuple, inside the runs' noise; the whole bridge
    spends ~35 us of CPU per message (bench/ingest.py), mostly in paho's parser and COPY.
    """

    topic: str
    payload: Payload
    #: Packet id; 0 for QoS 0 (nothing to acknowledge).
    mid: int
    #: The connection it arrived on (``AsyncMqttClient.generation``): acknowledged only on it.
    generation: int
    #: Time of receipt, epoch seconds.
    received_at: float
    #: Set only when the broker replays a retained message to a new subscription (MQTT
    #: 3.1.1 clears it on live delivery).
    retained: bool


READING_COLUMNS = ("time", "device_id", "metric", "value", "text_value")
#: How long to stay on the de-duplicating path after a redelivered reading was seen.
DEDUP_HOLD_S = 30.0
#: last_seen_at is refreshed at most this often per device: it is for people, and each
#: update rewrites the device's row.
SEEN_EVERY_S = 1.0
#: Device ids are cached. The cache is dropped whenever a device or an organization was
#: deleted or renamed (``device_directory_version``, migration 0003, read before every
#: batch), so a device re-created under the same slugs is never written under its old id;
#: and, as a backstop, this often.
CACHE_TTL_S = 60.0
#: Parsed topics are kept across batches (a topic is parsed once, not once per message);
#: a fleet has devices x kinds of them. Past this many (a flood of made-up topics) the
#: cache starts again rather than grow.
TOPIC_CACHE_MAX = 100_000
#: The batch's readings on their way into ``readings`` (``Store._write_rolled_up``); emptied at
#: every commit. Created on each connection's first batch; the lock (lms_core/rollups.py: a
#: backfill replaces rollups only while no writer is between insert and commit) rides along.
_BATCH_TABLE_SQL = f"""CREATE TEMP TABLE IF NOT EXISTS readings_batch
    (time timestamptz, device_id bigint, metric text, value double precision, text_value text)
    ON COMMIT DELETE ROWS; {rollups.LOCK_SHARED_SQL}"""


@dataclass
class Batch:
    readings: list[tuple[datetime, int, str, float | None, str | None]] = field(default_factory=list)
    events: list[tuple[datetime, int, str, str]] = field(default_factory=list)
    statuses: dict[int, tuple[str, datetime]] = field(default_factory=dict)
    seen: dict[int, float] = field(default_factory=dict)
    seen_due: dict[int, float] = field(default_factory=dict)  # last-seen times this batch writes
    quarantine: list[tuple[datetime, str, Payload, str, str | None, str | None, int | None]] = field(
        default_factory=list)
    quarantined_kinds: list[str] = field(default_factory=list)
    replayed: int = 0  # retained messages replayed by the broker, not stored again
    received: dict[TopicKind, int] = field(default_factory=dict)  # messages per topic kind
    dedup_writes: int = 0  # writes of readings through the de-duplicating path
    #: Command replies in the order received: (message, its topic, device id, reply).
    replies: list[tuple[Message, DeviceTopic, int, CommandReply]] = field(default_factory=list)
    reply_outcomes: dict[str, int] = field(default_factory=dict)  # bridge/commands.py outcomes
    #: Reported configuration per device, the last received: (version, document, received at).
    reported: dict[int, tuple[int, str, datetime]] = field(default_factory=dict)
    #: What the rule evaluation did in this batch's transaction (None: no rule concerned).
    rules: Evaluated | None = None


_OTHER = TopicKind.OTHER


#: How long a batch waits, its readings written, for the batch before to commit (see
#: Store.commit); then it rolls back and is retried after that one.
TURN_WAIT_S = 2.0


class Turn:
    """Where one commit attempt stands, for the batch after it (Store.commit): its readings
    and rollups written, and its COMMIT done; either is False once the attempt failed."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.written: asyncio.Future[bool] = loop.create_future()
        self.committed: asyncio.Future[bool] = loop.create_future()

    @staticmethod
    def mark(fut: asyncio.Future[bool], value: bool) -> None:
        if not fut.done():
            fut.set_result(value)

    def fail(self) -> None:
        self.mark(self.written, False)
        self.mark(self.committed, False)

    async def wait(self, fut: asyncio.Future[bool]) -> None:
        """Until ``fut``: raise DatabaseUnavailable if it says the attempt failed, or after
        TURN_WAIT_S."""
        try:
            ok = await asyncio.wait_for(asyncio.shield(fut), TURN_WAIT_S)
        except TimeoutError:
            ok = False
        if not ok:
            raise TurnLost("the batch before this one is not committed yet; retrying after it")


class TurnLost(DatabaseUnavailable):
    """This batch rolled back because the batch before failed or took too long: retry it
    once that one is done (no database outage implied)."""


class Store:
    """Turns messages into a :class:`Batch` and commits it."""

    def __init__(self, pool: asyncpg.Pool, decoder: TelemetryDecoder, topics: TopicScheme,
                 metrics: BridgeMetrics, rules: RuleEngine | None = None, *, rollups: bool = True) -> None:
        self.pool = pool
        self.rollups = rollups
        self.rules = rules
        self.decoder = decoder
        self.topics = topics
        self.metrics = metrics
        self._parsed: dict[str, DeviceTopic | None] = {}
        self._devices: dict[tuple[str, str], int] = {}
        self._orgs: dict[str, int] = {}  # slug -> id, for quarantine rows; filled with _devices
        self._directory_version: int | None = None
        self._cache_at = time.monotonic()
        self._seen_written: dict[int, float] = {}
        self._dedup_until = 0.0
        #: topic -> until when (epoch s) an empty message on it is the echo of the retained
        #: message the janitor cleared there (bridge/retained.py), not a device's mistake.
        self.cleared: dict[str, float] = {}

    # -- device ids ----------------------------------------------------------------

    def parse_topics(self, messages: Iterable[Message]) -> dict[str, DeviceTopic | None]:
        """Each distinct topic of ``messages``, parsed (None: not a device topic)."""
        cache = self._parsed
        out: dict[str, DeviceTopic | None] = {}
        for topic in {m.topic for m in messages}:  # a batch holds few distinct topics
            if topic in cache:
                out[topic] = cache[topic]
                continue
            if len(cache) >= TOPIC_CACHE_MAX:
                cache.clear()
            out[topic] = cache[topic] = self.topics.parse(topic)
        return out

    async def _resolve(self, conn: asyncpg.Connection, topics: Iterable[DeviceTopic | None]) -> None:
        rules_version, version = await conn.fetchrow(VERSIONS_SQL)
        if self.rules is not None:
            await self.rules.refresh(conn, rules_version, version)
        if version != self._directory_version or time.monotonic() - self._cache_at > CACHE_TTL_S:
            self._devices.clear()
            self._orgs.clear()
            self._directory_version = version
            self._cache_at = time.monotonic()
        devices = self._devices
        missing = {(t.org, t.device) for t in topics if t is not None and (t.org, t.device) not in devices}
        if not missing:
            return
        orgs, devs = zip(*missing, strict=True)
        rows = await conn.fetch(
            """SELECT k.org, k.device, o.id AS org_id, d.id FROM unnest($1::text[], $2::text[]) AS k(org, device)
               JOIN organizations o ON o.slug = k.org
               LEFT JOIN devices d ON d.org_id = o.id AND d.slug = k.device""",
            list(orgs), list(devs),
        )
        for r in rows:
            self._orgs[r["org"]] = r["org_id"]
            if r["id"] is not None:
                devices[(r["org"], r["device"])] = r["id"]

    # -- decoding --------------------------------------------------------------------

    def build(self, messages: list[Message], topics: dict[str, DeviceTopic | None] | None = None) -> Batch:
        """Decode messages into rows. Every message lands somewhere: rows or quarantine.

        ``topics``: :meth:`parse_topics` of ``messages``, when the caller has it already.
        """
        if topics is None:
            topics = self.parse_topics(messages)
        b = Batch()
        readings = b.readings
        received = b.received
        devices = self._devices
        decode = self.decoder.decode
        for m in messages:
            topic, payload, now = m.topic, m.payload, m.received_at
            t = topics[topic]
            if t is None:
                received[_OTHER] = received.get(_OTHER, 0) + 1
                self._quarantine(b, topic, payload, now, "not a device topic", "topic", None, None)
                continue
            received[t.kind] = received.get(t.kind, 0) + 1
            dev_id = devices.get((t.org, t.device))
            if dev_id is None:
                if not payload:
                    # An empty message is how a retained one is cleared (the platform does it
                    # when it deletes a device); only the platform may publish for a device
                    # that does not exist, and there is nothing to store or to explain.
                    continue
                self._quarantine(b, topic, payload, now, f"unknown device {t.org}/{t.device}", "unknown_device",
                                 t.org, t.device)
                continue
            try:
                d = decode(t, payload, now, m.retained)
            except Rejected as exc:
                if not payload and self.cleared.get(topic, 0.0) >= now:
                    continue  # the janitor's clearing of a retained message: nothing to store
                self._quarantine(b, topic, payload, now, str(exc), t.section, t.org, t.device)
                continue
            except Exception as exc:
                # A decoder bug must not become a poison message that stops every device.
                log.exception("decoder failed on %s", topic)
                self._quarantine(b, topic, payload, now, f"decoder error: {exc.__class__.__name__}: {exc}"[:500],
                                 "decoder_error", t.org, t.device)
                continue
            # Where each result goes; which kind of topic gives which result is the
            # decoder's decision (TelemetryDecoder.decode).
            if isinstance(d, Readings):
                for when, metric, value, text in d.rows:
                    readings.append((when, dev_id, metric, value, text))
                if now > b.seen.get(dev_id, 0.0):
                    b.seen[dev_id] = now
            elif isinstance(d, Presence):
                if d.status is not None:
                    when = datetime.fromtimestamp(now, UTC)
                    b.statuses[dev_id] = (d.status, when)
                    if not m.retained:  # a replay is the device's state, not a new event
                        b.events.append((when, dev_id, "status", f'{{"status": "{d.status}"}}'))
            elif isinstance(d, DeviceEvent):
                b.events.append((d.when, dev_id, d.type, d.data))
                if now > b.seen.get(dev_id, 0.0):
                    b.seen[dev_id] = now
            elif isinstance(d, CommandReply):
                b.replies.append((m, t, dev_id, d))
                if now > b.seen.get(dev_id, 0.0):
                    b.seen[dev_id] = now
            elif isinstance(d, ReportedConfig):
                b.reported[dev_id] = (d.version, d.document, datetime.fromtimestamp(now, UTC))
                if now > b.seen.get(dev_id, 0.0):
                    b.seen[dev_id] = now
            else:
                b.replayed += 1
        return b

    def _quarantine(self, b: Batch, topic: str, payload: Payload, now: float, reason: str, kind: str,
                    org: str | None, dev: str | None) -> None:
        # Keyed by the organization's id: a later organization of the same slug must not
        # read it. An unknown organization gets NULL (superusers only).
        org_id = self._orgs.get(org) if org is not None else None
        b.quarantine.append((datetime.fromtimestamp(now, UTC), topic, payload, reason, org, dev, org_id))
        b.quarantined_kinds.append(kind)

    # -- writing ---------------------------------------------------------------------

    async def commit(self, messages: list[Message], turn: Turn | None = None, before: Turn | None = None) -> Batch:
        """Store ``messages`` in one transaction and return what was written.

        Two batches may be in flight (bridge/subscribe.py): ``before`` is the attempt of the
        batch received before this one, still running, and ``turn`` is how this attempt tells
        the next batch where it stands. While the batch before commits, this one is decoded
        and its readings and rollups are written - only once the batch before has written
        its own, so rollup rows are locked in the order batches were received. Everything
        else - events, command results, reported config, quarantine, presence, the alert
        rules - and the COMMIT wait until the batch before is committed: batches take effect
        in order, and the rules see each device's readings in order. If the batch before
        fails, this transaction rolls back with :class:`TurnLost`: its caller retries it
        after the batch before is done. Most of the time the wait for the batch before's
        COMMIT happens inside the rollup upsert (the two add to the same hour row): a
        PostgreSQL lock wait, and the batch before never waits for this one, so any cycle
        through it is one PostgreSQL detects. Where it waits in the bridge instead
        (:meth:`Turn.wait`), it gives up after ``TURN_WAIT_S`` and rolls back the same way.

        Raises :class:`DatabaseUnavailable` when the work may succeed if tried again (the
        caller keeps the batch unacknowledged and retries) and :class:`StorageError` for
        anything else; no driver type escapes (:func:`lms_core.db.translate`). What a
        committed batch wrote is counted here, in one place (:meth:`BridgeMetrics.committed`).
        """
        started = time.perf_counter()
        topics = self.parse_topics(messages)
        try:
            try:
                async with self.pool.acquire() as conn:
                    await self._resolve(conn, topics.values())
                    batch = self.build(messages, topics)
                    try:
                        async with conn.transaction():
                            if before is not None:
                                await before.wait(before.written)
                            await self._write_readings(conn, batch)
                            if turn is not None:
                                turn.mark(turn.written, True)
                            if before is not None:
                                await before.wait(before.committed)
                            await self._write_rest(conn, batch)
                            await self._evaluate(conn, batch)
                    except asyncpg.PostgresError as exc:
                        if is_transient(exc):
                            raise
                        log.error("batch refused by the database, retrying message by message: %s", exc)
                        if turn is not None:
                            turn.fail()  # the batch after holds rollup rows this may need: let it go
                        if before is not None:
                            await before.wait(before.committed)
                        batch = await self._write_one_by_one(conn, messages)
            except BaseException:
                if turn is not None:
                    turn.fail()
                raise
        except Exception as exc:
            raise translate(exc) from exc
        if turn is not None:
            turn.mark(turn.written, True)
            turn.mark(turn.committed, True)
        self._after_commit(batch)
        self.metrics.committed(batch, len(messages), time.perf_counter() - started)
        if self.rules is not None:
            self.rules.committed(batch.rules)
        return batch

    async def _evaluate(self, conn: asyncpg.Connection, b: Batch) -> None:
        """Evaluate the alert rules on the batch's readings, in its transaction, in a
        savepoint: a rule engine error that is not the database's "not now" is logged and
        counted (``lms_bridge_rule_errors_total``) and the readings are stored all the same
        - losing data to a rule bug would be worse than an alert missed."""
        if self.rules is None or not b.readings or not self.rules.snap.rules:
            return
        try:
            async with conn.transaction():
                b.rules = await self.rules.evaluate(conn, b.readings, b.seen)
        except Exception as exc:
            if is_transient(exc):
                raise
            self.metrics.rule_errors.inc()
            log.exception("alert rule evaluation failed; the batch is stored without it")

    async def _write(self, conn: asyncpg.Connection, b: Batch, *, dedup: bool = False) -> None:
        await self._write_readings(conn, b, dedup=dedup)
        await self._write_rest(conn, b)

    async def _write_readings(self, conn: asyncpg.Connection, b: Batch, *, dedup: bool = False) -> None:
        """Readings and their rollups: what may be written while the batch before commits."""
        if b.readings and self.rollups:
            await self._write_rolled_up(conn, b, dedup)
        elif b.readings:
            if dedup or time.monotonic() < self._dedup_until:
                b.dedup_writes += 1
                await self._insert_dedup(conn, b.readings)
            else:
                try:
                    async with conn.transaction():  # a savepoint: a conflict undoes only the COPY
                        await conn.copy_records_to_table("readings", records=b.readings, columns=READING_COLUMNS)
                except asyncpg.UniqueViolationError:
                    log.info("redelivered readings seen; de-duplicating for %.0f s", DEDUP_HOLD_S)
                    self._dedup_until = time.monotonic() + DEDUP_HOLD_S
                    b.dedup_writes += 1
                    await self._insert_dedup(conn, b.readings)

    async def _write_rest(self, conn: asyncpg.Connection, b: Batch) -> None:
        """Everything else a batch writes, in the order batches were received."""
        if b.events:
            t, d, ty, da = zip(*b.events, strict=True)
            await conn.execute(
                """INSERT INTO events (time, device_id, type, data)
                   SELECT t, d, ty, da::jsonb FROM unnest($1::timestamptz[], $2::bigint[], $3::text[], $4::text[])
                   AS u(t, d, ty, da) ON CONFLICT DO NOTHING""",
                t, d, ty, da,
            )
        if b.replies:
            await self._write_replies(conn, b)
        if b.reported:
            ids = sorted(b.reported)  # one lock order, as for presence
            await conn.execute(
                # Only forward: a report redelivered after a newer one was stored (another
                # bridge's, or after a crash between commit and acknowledgement) is older.
                """INSERT INTO device_config AS c (device_id, reported, reported_version, reported_at)
                   SELECT d, doc::jsonb, v, at FROM unnest($1::bigint[], $2::text[], $3::bigint[],
                                                          $4::timestamptz[]) AS u(d, doc, v, at)
                   ON CONFLICT (device_id) DO UPDATE SET reported = EXCLUDED.reported,
                       reported_version = EXCLUDED.reported_version, reported_at = EXCLUDED.reported_at
                   WHERE c.reported_at IS NULL OR c.reported_at < EXCLUDED.reported_at""",
                ids,
                [b.reported[i][1] for i in ids],
                [b.reported[i][0] for i in ids],
                [b.reported[i][2] for i in ids],
            )
        if b.quarantine:
            await self._insert_quarantine(conn, b.quarantine)
        presence = self._presence_due(b)
        if presence:
            ids = sorted(presence)  # one statement, one lock order for every bridge
            await conn.execute(
                """UPDATE devices d SET
                       status = CASE WHEN u.s IS NOT NULL AND d.status IS DISTINCT FROM u.s
                                     AND (d.status_changed_at IS NULL OR d.status_changed_at <= u.st)
                                     THEN u.s ELSE d.status END,
                       status_changed_at = CASE WHEN u.s IS NOT NULL AND d.status IS DISTINCT FROM u.s
                                     AND (d.status_changed_at IS NULL OR d.status_changed_at <= u.st)
                                     THEN u.st ELSE d.status_changed_at END,
                       last_seen_at = GREATEST(d.last_seen_at, u.seen, u.st)
                   FROM unnest($1::bigint[], $2::text[], $3::timestamptz[], $4::timestamptz[]) AS u(id, s, st, seen)
                   WHERE d.id = u.id""",
                ids,
                [presence[i][0] for i in ids],
                [presence[i][1] for i in ids],
                [presence[i][2] for i in ids],
            )

    async def _write_rolled_up(self, conn: asyncpg.Connection, b: Batch, dedup: bool) -> None:
        """Readings and their rollups (lms_core/rollups.py), from the rows actually inserted.

        The batch is COPYed once, into a temporary table; one statement inserts it into
        ``readings`` and adds what it inserted to the rollups (bench/rollup_paths.py: the
        bridge's CPU per row is that of a COPY into ``readings``; sending the rows again as
        arrays, or grouping them in Python, cost it ~1.5 us more per row). A redelivered
        reading fails that insert in its savepoint; the same rows then go through
        ``ON CONFLICT DO NOTHING ... RETURNING``, as above, for ``DEDUP_HOLD_S``."""
        await conn.execute(_BATCH_TABLE_SQL)
        await conn.copy_records_to_table("readings_batch", records=b.readings, columns=READING_COLUMNS)
        if not dedup and time.monotonic() >= self._dedup_until:
            try:
                async with conn.transaction():
                    await conn.execute(rollups.INSERT_BATCH_SQL)
                return
            except asyncpg.UniqueViolationError:
                log.info("redelivered readings seen; de-duplicating for %.0f s", DEDUP_HOLD_S)
                self._dedup_until = time.monotonic() + DEDUP_HOLD_S
        b.dedup_writes += 1
        await conn.execute(rollups.INSERT_BATCH_DEDUP_SQL)
        if dedup:
            # Message by message (_write_one_by_one), in one transaction: the next message
            # must not find this one's rows in the table.
            await conn.execute("DELETE FROM readings_batch")

    async def _write_replies(self, conn: asyncpg.Connection, b: Batch) -> None:
        """Apply the batch's command replies; quarantine those for no command of theirs."""
        written = await record_replies(conn, [(dev_id, r, m.received_at) for m, _, dev_id, r in b.replies])
        for i, reason in written.refused:
            m, t, _, _ = b.replies[i]
            self._quarantine(b, m.topic, m.payload, m.received_at, reason, t.section, t.org, t.device)
        for outcome, n in written.outcomes.items():
            b.reply_outcomes[outcome] = b.reply_outcomes.get(outcome, 0) + n

    def _presence_due(self, b: Batch) -> dict[int, tuple[str | None, datetime | None, datetime | None]]:
        """Per device: (status, its time, last seen) to write; last seen at most once a second."""
        out: dict[int, tuple[str | None, datetime | None, datetime | None]] = {}
        written = self._seen_written
        for dev_id, t in b.seen.items():
            if t - written.get(dev_id, 0.0) >= SEEN_EVERY_S:
                out[dev_id] = (None, None, datetime.fromtimestamp(t, UTC))
                b.seen_due[dev_id] = t
        for dev_id, (status, when) in b.statuses.items():
            seen = out.get(dev_id, (None, None, None))[2]
            out[dev_id] = (status, when, seen)
        return out

    @staticmethod
    async def _insert_dedup(conn: asyncpg.Connection, readings: list[Any]) -> None:
        await conn.execute(
            """CREATE TEMP TABLE IF NOT EXISTS readings_stage
               (time timestamptz, device_id bigint, metric text, value double precision, text_value text)
               ON COMMIT DELETE ROWS"""
        )
        await conn.copy_records_to_table("readings_stage", records=readings, columns=READING_COLUMNS)
        status = await conn.execute(
            "INSERT INTO readings SELECT time, device_id, metric, value, text_value FROM readings_stage "
            "ON CONFLICT DO NOTHING"
        )
        await conn.execute("TRUNCATE readings_stage")
        inserted = int(status.rsplit(" ", 1)[-1])
        if inserted < len(readings):
            log.info("de-duplicated: %d of %d reading(s) were already stored", len(readings) - inserted, len(readings))

    @staticmethod
    async def _insert_quarantine(conn: asyncpg.Connection, rows: list[Any]) -> None:
        cols = list(zip(*rows, strict=True))
        await conn.execute(
            """INSERT INTO quarantine (received_at, topic, payload, reason, org_slug, device_slug, org_id)
               SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::bytea[], $4::text[], $5::text[], $6::text[],
                                    $7::bigint[])""",
            *cols,
        )

    async def _write_one_by_one(self, conn: asyncpg.Connection, messages: list[Message]) -> Batch:
        total = Batch()
        async with conn.transaction():
            for m in messages:
                b = self.build([m])
                try:
                    async with conn.transaction():
                        await self._write(conn, b, dedup=True)
                except asyncpg.PostgresError as exc:
                    if is_transient(exc):
                        raise
                    b = Batch()
                    t = self.topics.parse(m.topic)
                    org, dev = (t.org, t.device) if t is not None else (None, None)
                    self._quarantine(b, m.topic, m.payload, m.received_at, f"refused by the database: {exc}"[:500],
                                     "database", org, dev)
                    await self._insert_quarantine(conn, b.quarantine)
                total.readings += b.readings
                total.events += b.events
                total.quarantine += b.quarantine
                total.quarantined_kinds += b.quarantined_kinds
                total.seen_due.update(b.seen_due)
                total.replayed += b.replayed
                total.dedup_writes += b.dedup_writes
                total.reported.update(b.reported)
                total.seen.update(b.seen)
                for outcome, n in b.reply_outcomes.items():
                    total.reply_outcomes[outcome] = total.reply_outcomes.get(outcome, 0) + n
                for kind, n in b.received.items():
                    total.received[kind] = total.received.get(kind, 0) + n
            await self._evaluate(conn, total)
        return total

    def _after_commit(self, b: Batch) -> None:
        self._seen_written.update(b.seen_due)  # only now: a rolled-back write wrote nothing
        if b.quarantine:
            log.warning("quarantined %d message(s); first: %s: %s", len(b.quarantine),
                        b.quarantine[0][1], b.quarantine[0][3])
