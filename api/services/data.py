"""Readings, aggregates, latest values, events, exports and the quarantine of an
organization's devices.

Every query is per device and rides the unique index (device_id, metric, time DESC);
aggregates use ``date_bin`` (plain PostgreSQL and TimescaleDB alike). Raw lists page by
keyset (an opaque cursor), never by offset. Exports stream window by window
(``Export``; the HTTP side, which cuts off a stalled reader, is in api/data.py).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import msgspec

from api.inputs import unstorable
from api.services.errors import RateLimited
from lms_core import rollups
from lms_core.errors import InvalidInput, NotFound

if TYPE_CHECKING:
    from api.access import OrgAccess

MAX_SPAN = timedelta(days=400)
MAX_BUCKETS = 20_000
_BUCKET = re.compile(r"(\d{1,5})(s|m|h|d)")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
AGGREGATES = ("avg", "min", "max", "count", "last")


class Reading(msgspec.Struct, gc=False):  # no cycles: not the collector's
    time: datetime
    metric: str
    value: float | None
    text: str | None


class ReadingPage(msgspec.Struct):
    items: list[Reading]
    next: str | None


class Bucket(msgspec.Struct, omit_defaults=True, gc=False):  # no cycles: not the collector's
    bucket: datetime
    metric: str
    avg: float | None = None
    min: float | None = None
    max: float | None = None
    count: int | None = None
    last: float | None = None


class Event(msgspec.Struct):
    time: datetime
    type: str
    data: dict[str, Any]


class EventPage(msgspec.Struct):
    items: list[Event]
    next: str | None


class Quarantined(msgspec.Struct):
    id: int
    received_at: datetime
    topic: str
    device: str | None
    reason: str
    payload: str  # base64: payloads are not always text
    size: int


class QuarantinePage(msgspec.Struct):
    items: list[Quarantined]
    next: int | None


def _window(start: datetime | None, end: datetime | None) -> tuple[datetime, datetime]:
    end = _aware(end) if end else datetime.now(UTC)
    start = _aware(start) if start else end - timedelta(days=1)
    if start >= end:
        raise InvalidInput("'from' must be before 'to'")
    if end - start > MAX_SPAN:
        raise InvalidInput(f"the time range may span at most {MAX_SPAN.days} days")
    return start, end


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _cursor(*parts: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(parts, default=str).encode()).decode()


def _uncursor(cursor: str | None) -> tuple[datetime, str] | None:
    """The (time, name) a cursor of :func:`_cursor` holds; anything else is the caller's
    error, however it was forged (not base64, not JSON, wrong shapes or types, NUL)."""
    if not cursor:
        return None
    try:
        parts = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        if not (isinstance(parts, list) and len(parts) == 2 and isinstance(parts[0], str)
                and isinstance(parts[1], str) and not unstorable(parts[1])):
            raise ValueError
        return _aware(datetime.fromisoformat(parts[0])), parts[1]
    except (ValueError, TypeError):
        raise InvalidInput("the cursor is not one this API issued") from None


def parse_bucket(text: str) -> timedelta:
    m = _BUCKET.fullmatch(text)
    if not m:
        raise InvalidInput("bucket must look like 30s, 5m, 1h or 1d")
    seconds = int(m.group(1)) * _UNITS[m.group(2)]
    if not 1 <= seconds <= 86400:
        raise InvalidInput("bucket must be between 1s and 1d")
    return timedelta(seconds=seconds)


#: The metrics of one device, by a loose index scan: one index probe per metric.
_METRICS_SQL = """
    WITH RECURSIVE m(metric) AS (
        (SELECT metric FROM readings WHERE device_id = $1 ORDER BY metric LIMIT 1)
        UNION ALL
        SELECT (SELECT r.metric FROM readings r WHERE r.device_id = $1 AND r.metric > m.metric
                ORDER BY r.metric LIMIT 1)
        FROM m WHERE m.metric IS NOT NULL)
    SELECT metric FROM m WHERE metric IS NOT NULL"""


#: The newest reading of each metric of device $1.
LATEST_SQL = f"""
    WITH metrics AS ({_METRICS_SQL})
    SELECT l.* FROM metrics m CROSS JOIN LATERAL (
        SELECT time, metric, value, text_value FROM readings r
        WHERE r.device_id = $1 AND r.metric = m.metric ORDER BY time DESC LIMIT 1) l
    ORDER BY l.metric"""

#: Buckets of width $4 from $2 to $3 for device $1 and the metrics $5.
AGGREGATE_SQL = """
    SELECT date_bin($4::interval, time, $2) AS bucket, metric, avg(value) AS avg, min(value) AS min,
           max(value) AS max, count(*) AS count, (array_agg(value ORDER BY time DESC))[1] AS last
    FROM readings
    WHERE device_id = $1 AND metric = ANY ($5::text[]) AND time >= $2 AND time < $3
    GROUP BY 1, 2 ORDER BY 1, 2"""


#: The same buckets from rollups where they can answer (lms_core/rollups.py plan): hours in
#: [$7[i], $8[i]), minutes in [$5[i], $6[i]), raw rows in [$9[i], $10[i]) - disjoint pieces,
#: each rollup row inside one requested bucket. Buckets of ($3 wide from $2) for device $1
#: and metrics $4. avg is the sum over the count of numeric readings; count counts text
#: readings too, and last is the value of the newest reading (NULL if it is text), as in
#: AGGREGATE_SQL. Each piece is its own index range scan (``OFFSET 0`` keeps the subqueries from
#: being flattened into a join, whose generic plan read the device's whole history per piece).
ROLLUP_AGGREGATE_SQL = """
    WITH parts AS (
        SELECT date_bin($3::interval, r.bucket, $2) AS bucket, r.metric, r.n, r.nv, r.sum, r.min, r.max,
               r.last_time, r.last_value
        FROM unnest($7::timestamptz[], $8::timestamptz[]) AS p(lo, hi) CROSS JOIN LATERAL (
            SELECT * FROM readings_1h WHERE device_id = $1 AND metric = ANY ($4::text[])
                AND bucket >= p.lo AND bucket < p.hi OFFSET 0) r
        UNION ALL
        SELECT date_bin($3::interval, r.bucket, $2), r.metric, r.n, r.nv, r.sum, r.min, r.max, r.last_time, r.last_value
        FROM unnest($11::timestamptz[], $12::timestamptz[]) AS p(lo, hi) CROSS JOIN LATERAL (
            SELECT * FROM readings_5m WHERE device_id = $1 AND metric = ANY ($4::text[])
                AND bucket >= p.lo AND bucket < p.hi OFFSET 0) r
        UNION ALL
        SELECT date_bin($3::interval, r.bucket, $2), r.metric, r.n, r.nv, r.sum, r.min, r.max, r.last_time, r.last_value
        FROM unnest($5::timestamptz[], $6::timestamptz[]) AS p(lo, hi) CROSS JOIN LATERAL (
            SELECT * FROM readings_1m WHERE device_id = $1 AND metric = ANY ($4::text[])
                AND bucket >= p.lo AND bucket < p.hi OFFSET 0) r
        UNION ALL
        SELECT date_bin($3::interval, r.time, $2), r.metric, 1, (r.value IS NOT NULL)::integer, coalesce(r.value, 0),
               r.value, r.value, r.time, r.value
        FROM unnest($9::timestamptz[], $10::timestamptz[]) AS p(lo, hi) CROSS JOIN LATERAL (
            SELECT time, metric, value FROM readings WHERE device_id = $1 AND metric = ANY ($4::text[])
                AND time >= p.lo AND time < p.hi OFFSET 0) r)
    SELECT bucket, metric, sum(sum) / nullif(sum(nv), 0)::float8 AS avg, min(min) AS min, max(max) AS max,
           sum(n)::bigint AS count, (array_agg(last_value ORDER BY last_time DESC))[1] AS last
    FROM parts GROUP BY 1, 2 ORDER BY 1, 2"""


def _pieces(pieces: list[rollups.Piece], source: int) -> tuple[list[datetime], list[datetime]]:
    return [p.start for p in pieces if p.source == source], [p.end for p in pieces if p.source == source]


async def _metric_list(pool: Any, dev_id: int, wanted: list[str] | None) -> list[str]:
    """The metrics to query, always as a list: ``metric = ANY($n)`` then bounds the index
    (device_id, metric, time) by time for each of them. An "all metrics" query written as
    ``$n IS NULL OR metric = ANY($n)`` cannot, and once asyncpg's prepared statement gets
    PostgreSQL's generic plan it walks the device's whole history (bench/api_queries.py)."""
    if wanted:
        return wanted
    return [r["metric"] for r in await pool.fetch(_METRICS_SQL, dev_id)]



#: A page of raw readings in (time, metric) order after the cursor ($5, $6): the first $7 of
#: each metric, each read along the index (device_id, metric, time) from the cursor on, then
#: merged. A page costs at most metrics x $7 rows. One ``metric = ANY`` scan ordered by
#: (time, metric) would read and sort every row of the range first (864k rows for 24 hours of
#: 10 metrics at 1 Hz; bench/api_queries.py).
READINGS_PAGE_SQL = """
    SELECT r.* FROM unnest($4::text[]) AS m(metric) CROSS JOIN LATERAL (
        SELECT time, metric, value, text_value FROM readings
        WHERE device_id = $1 AND metric = m.metric AND time < $3
          AND time >= CASE WHEN $5::timestamptz IS NULL OR $5 < $2 THEN $2 ELSE $5 END
          AND ($5 IS NULL OR time > $5 OR m.metric > $6::text)
        ORDER BY time LIMIT $7) r
    ORDER BY r.time, r.metric LIMIT $7"""

#: Rows per fetch from the export cursor and per chunk written to the client.
EXPORT_CHUNK_ROWS = 2000
#: A hint only: exports finish or are cut off within the stall time.
EXPORT_RETRY_AFTER_S = 5

#: One window of an export, from ($2, after metric $5) on: at most $6 rows, in (time, metric) order.
_EXPORT_SQL = """SELECT time, metric, value, text_value FROM readings
                 WHERE device_id = $1 AND metric = ANY ($4::text[]) AND time >= $2 AND time < $3
                   AND ($5::text IS NULL OR time > $2 OR metric > $5)
                 ORDER BY time, metric LIMIT $6"""
#: An export reads the range in time windows, each sorted by (time, metric) on its own, rather
#: than sorting the whole range before its first row (a 30-day export of 10 metrics at 1 Hz is
#: 26M rows). The window starts at a minute and follows the data: doubled while a window
#: yields under half a chunk, halved when it holds more than a chunk (whose rest is then read
#: from the last row on, by keyset).
EXPORT_FIRST_WINDOW = timedelta(minutes=1)
EXPORT_MIN_WINDOW = timedelta(milliseconds=1)


class ExportSlots:
    """Exports streaming now, per API process and per user (an API key counts for the user
    who made it). Taken without waiting: a request over the limit is refused at once, so
    no request ever queues behind an export. One event loop: no lock is needed."""

    def __init__(self, per_process: int, per_user: int) -> None:
        self.per_process = per_process
        self.per_user = per_user
        self.active = 0
        self.by_user: dict[int, int] = {}

    def take(self, user_id: int) -> bool:
        if self.active >= self.per_process or self.by_user.get(user_id, 0) >= self.per_user:
            return False
        self.active += 1
        self.by_user[user_id] = self.by_user.get(user_id, 0) + 1
        return True

    def give(self, user_id: int) -> None:
        self.active -= 1
        left = self.by_user[user_id] - 1
        if left:
            self.by_user[user_id] = left
        else:
            del self.by_user[user_id]


#: A cell starting with one of these is a formula to a spreadsheet (tab and carriage return
#: too: some programs skip them before looking). OWASP's "CSV injection" advice.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_text(value: str | None) -> str:
    """A text cell for the CSV export: device-supplied text is not trusted to open safely in
    a spreadsheet (``=HYPERLINK(...)`` leaks data, ``=cmd|...`` ran programs), so a value
    that starts like a formula gets a leading single quote, which spreadsheets read as
    "this is text". The JSON-lines export keeps values exactly as stored."""
    if not value:
        return ""
    return "'" + value if value.startswith(_FORMULA_START) else value


class Export:
    """One export: a connection of the export pool, a read-only repeatable-read transaction
    (one snapshot for every window), and the slot it holds. :meth:`close` gives all of them
    back, once."""

    def __init__(self, pool: Any, conn: Any, tx: Any, args: tuple[Any, ...], slots: ExportSlots,
                 user: int, format: str) -> None:
        self._pool, self._conn, self._tx = pool, conn, tx
        self._dev, self._start, self._end, self._metrics = args
        self._window = EXPORT_FIRST_WINDOW
        self._after: str | None = None  # the metric of the last row sent, at time _start
        self._first: list[Any] | None = None
        self._slots, self._user, self._format = slots, user, format
        self._closed = False

    @classmethod
    async def open(cls, pool: Any, slots: ExportSlots, user: int, format: str, args: tuple[Any, ...]) -> Export:
        # The export pool has a connection per slot, so this does not wait on other exports.
        conn = await pool.acquire(timeout=10)
        try:
            tx = conn.transaction(readonly=True, isolation="repeatable_read")
            await tx.start()
            export = cls(pool, conn, tx, args, slots, user, format)
            export._first = await export._next()
        except BaseException:
            await pool.release(conn)  # releasing rolls the transaction back
            raise
        return export

    async def _next(self) -> list[Any]:
        """The next rows in (time, metric) order: at least one, unless the export is done."""
        while self._start < self._end:
            hi = min(self._start + self._window, self._end)
            rows = await self._conn.fetch(_EXPORT_SQL, self._dev, self._start, hi, self._metrics, self._after,
                                          EXPORT_CHUNK_ROWS)
            if len(rows) == EXPORT_CHUNK_ROWS:  # more in this window: go on from the last row, narrower
                self._start, self._after = rows[-1]["time"], rows[-1]["metric"]
                self._window = max(self._window / 2, EXPORT_MIN_WINDOW)
                return rows
            self._start, self._after = hi, None
            if len(rows) < EXPORT_CHUNK_ROWS // 2:
                self._window = min(self._window * 2, MAX_SPAN)
            if rows:
                return rows
        return []

    async def chunks(self) -> AsyncIterator[bytes]:
        if self._format == "csv":
            yield b"time,metric,value,text\r\n"
        rows, self._first = self._first or [], None
        while rows:
            yield self._encode(rows)
            rows = await self._next()
        await self.close()  # release early: before the last bytes reach the client

    def _encode(self, rows: list[Any]) -> bytes:
        if self._format == "csv":
            buf = io.StringIO()
            writer = csv.writer(buf)
            for r in rows:
                # Numbers (a negative one starts with "-") are written by us, not the device.
                writer.writerow([r["time"].isoformat(), csv_text(r["metric"]),
                                 "" if r["value"] is None else repr(r["value"]), csv_text(r["text_value"])])
            return buf.getvalue().encode()
        return "".join(json.dumps({"time": r["time"].isoformat(), "metric": r["metric"], "value": r["value"],
                                   "text": r["text_value"]}) + "\n" for r in rows).encode()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            try:
                await self._tx.rollback()
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                # A fetch cut short by the client's leaving can leave the connection
                # mid-query: it is of no further use, and the pool replaces it.
                self._conn.terminate()
            await self._pool.release(self._conn)
        finally:
            self._slots.give(self._user)


class DataService:
    def __init__(self, pool: asyncpg.Pool, export_pool: asyncpg.Pool, export_slots: ExportSlots) -> None:
        self.pool = pool
        self.export_pool = export_pool  # streamed exports only: see Export
        self.export_slots = export_slots

    async def _device_id(self, access: OrgAccess, device: str) -> int:
        dev_id = await self.pool.fetchval(
            "SELECT id FROM devices WHERE org_id = $1 AND slug = $2", access.org_id, device)
        if dev_id is None:
            raise NotFound(f"device {device!r} not found")
        return int(dev_id)

    async def readings(self, access: OrgAccess, device: str, metric: list[str] | None, start: datetime | None,
                       end: datetime | None, limit: int, cursor: str | None) -> ReadingPage:
        dev_id = await self._device_id(access, device)
        t0, t1 = _window(start, end)
        after = _uncursor(cursor)
        after_t = after[0] if after else None
        rows = await self.pool.fetch(
            READINGS_PAGE_SQL, dev_id, t0, t1, await _metric_list(self.pool, dev_id, metric), after_t,
            after[1] if after else None, limit + 1)
        items = [Reading(time=r["time"], metric=r["metric"], value=r["value"], text=r["text_value"])
                 for r in rows[:limit]]
        nxt = _cursor(items[-1].time.isoformat(), items[-1].metric) if len(rows) > limit else None
        return ReadingPage(items=items, next=nxt)

    async def aggregate(self, access: OrgAccess, device: str, metric: list[str] | None, start: datetime | None,
                        end: datetime | None, bucket: str, fn: list[str] | None) -> list[Bucket]:
        dev_id = await self._device_id(access, device)
        t0, t1 = _window(start, end)
        width = parse_bucket(bucket)
        if (t1 - t0) / width > MAX_BUCKETS:
            raise InvalidInput(f"more than {MAX_BUCKETS} buckets: widen the bucket or narrow the range")
        wanted = fn or list(AGGREGATES)
        bad = [f for f in wanted if f not in AGGREGATES]
        if bad:
            raise InvalidInput(f"unknown aggregate {bad[0]!r}; use {', '.join(AGGREGATES)}")
        metrics = await _metric_list(self.pool, dev_id, metric)
        pieces = rollups.plan(t0, t1, width) if await rollups.complete(self.pool) else []
        if any(p.source for p in pieces):
            rows = await self.pool.fetch(ROLLUP_AGGREGATE_SQL, dev_id, t0, width, metrics, *_pieces(pieces, 60),
                                         *_pieces(pieces, 3600), *_pieces(pieces, 0), *_pieces(pieces, 300))
        else:  # nothing a rollup can answer (or they are still being built): raw rows alone
            rows = await self.pool.fetch(AGGREGATE_SQL, dev_id, t0, t1, width, metrics)
        if set(wanted) == set(AGGREGATES):
            # Every function (the usual request): positionally, the columns in Bucket's order
            # (~1 µs a bucket less than by name; a day of 5-minute buckets has 2,880).
            return [Bucket(*r) for r in rows]
        return [Bucket(bucket=r["bucket"], metric=r["metric"], **{f: r[f] for f in wanted}) for r in rows]

    async def latest(self, access: OrgAccess, device: str) -> list[Reading]:
        dev_id = await self._device_id(access, device)
        # A loose index scan: one index probe per metric, however many rows a metric has.
        rows = await self.pool.fetch(LATEST_SQL, dev_id)
        return [Reading(time=r["time"], metric=r["metric"], value=r["value"], text=r["text_value"]) for r in rows]

    async def events(self, access: OrgAccess, device: str, type: str | None, start: datetime | None,
                     end: datetime | None, limit: int, cursor: str | None) -> EventPage:
        dev_id = await self._device_id(access, device)
        t0, t1 = _window(start, end)
        after = _uncursor(cursor)
        rows = await self.pool.fetch(
            """SELECT time, type, data FROM events
               WHERE device_id = $1 AND time >= $2 AND time < $3 AND ($4::text IS NULL OR type = $4)
                 AND ($5::timestamptz IS NULL OR (time, type) > ($5, $6::text))
               ORDER BY time, type LIMIT $7""",
            dev_id, t0, t1, type, after[0] if after else None, after[1] if after else None, limit + 1)
        items = [Event(time=r["time"], type=r["type"], data=json.loads(r["data"])) for r in rows[:limit]]
        nxt = _cursor(items[-1].time.isoformat(), items[-1].type) if len(rows) > limit else None
        return EventPage(items=items, next=nxt)

    async def export(self, access: OrgAccess, device: str, metric: list[str] | None, start: datetime | None,
                     end: datetime | None, format: str) -> Export:
        """An open export of the range, holding one of the caller's export slots until closed;
        RateLimited when the caller (or this process) has as many streaming as allowed."""
        dev_id = await self._device_id(access, device)
        t0, t1 = _window(start, end)
        metrics = await _metric_list(self.pool, dev_id, metric)
        slots = self.export_slots
        user = access.principal.user_id
        if not slots.take(user):
            raise RateLimited(EXPORT_RETRY_AFTER_S, "too many exports at once; try again when one has finished")
        try:
            # The query runs and its first rows arrive before any header is sent, so an
            # error up to here is an ordinary JSON answer, not a cut connection.
            return await Export.open(self.export_pool, slots, user, format, (dev_id, t0, t1, metrics))
        except BaseException:
            slots.give(user)
            raise

    async def quarantine(self, access: OrgAccess, limit: int, before: int | None) -> QuarantinePage:
        rows = await self.pool.fetch(
            """SELECT id, received_at, topic, device_slug, reason, payload FROM quarantine
               WHERE org_id = $1 AND ($2::bigint IS NULL OR id < $2) ORDER BY id DESC LIMIT $3""",
            access.org_id, before, limit + 1)
        items = [Quarantined(id=r["id"], received_at=r["received_at"], topic=r["topic"], device=r["device_slug"],
                             reason=r["reason"], payload=base64.b64encode(r["payload"][:65536]).decode(),
                             size=len(r["payload"])) for r in rows[:limit]]
        return QuarantinePage(items=items, next=items[-1].id if len(rows) > limit else None)
