"""Rollups of readings: per (device, metric), 1-minute, 5-minute and 1-hour buckets of
count, sum, min, max and the newest value (migrations 0009, 0010: the 5-minute level answers
the dashboard's default chart, a day in 5-minute buckets, from 288 rows a metric instead of
1,440). What writes them, what reads them, and why
they stay equal to the aggregate of the raw rows:

- The bridge adds the rows it *actually inserted* to them in the batch's own transaction
  (:func:`add_inserted`): COPY inserts all of a batch or fails, the de-duplicating path
  reports the rows it inserted with ``RETURNING``. A crash between the two is impossible
  (one transaction); a redelivery adds nothing (no row inserted).
- Additions commute (count, sum, min, max, and "last" as the value of the greatest time), so
  bridges adding to the same bucket concurrently need no coordination beyond the row lock of
  ``ON CONFLICT DO UPDATE``. Rows are upserted in key order, hours, then 5 minutes, then
  minutes, so two transactions never wait on each other in a cycle.
- Deleting readings (a device's purge, an organization's deletion, :sql:`readings_retention`)
  deletes the rollups in the same transaction - rollups first, see :func:`purge_device`.
- The backfill (:func:`backfill`) *replaces* the rollups of a slice with the aggregate of the
  slice's raw rows. That is only right when no writer is between "inserted readings" and
  "committed" for the slice, so every writer holds :data:`LOCK_KEY` shared for its
  transaction and the backfill takes it exclusively, one short slice at a time.
- The planner (:func:`plan`) splits a query into pieces each answered by one source: whole
  hours, whole minutes, raw rows for the rest. Each piece lies within one requested bucket or
  is raw, and the pieces are disjoint: every raw row is counted exactly once.

Pure SQL and pure functions; no I/O at import.
"""

from __future__ import annotations

import time as _time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

#: Advisory lock (pg_advisory_xact_lock*) that writers of rollups hold shared and the backfill
#: exclusively. Also written, as a number, in migrations/0009_rollups.sql.
LOCK_KEY = 0x4C4D5304
#: Rollup resolutions in seconds, coarsest first, and their tables.
RESOLUTIONS: tuple[int, ...] = (3600, 300, 60)
TABLES = {3600: "readings_1h", 300: "readings_5m", 60: "readings_1m"}
#: Every bucket boundary is a whole number of its resolution after this instant (date_bin's
#: origin; the same instants as UTC minutes and hours since the Unix epoch).
ORIGIN = datetime(2000, 1, 1, tzinfo=UTC)
_ORIGIN_SQL = "TIMESTAMPTZ '2000-01-01 00:00:00+00'"

_SET = """n = r.n + EXCLUDED.n, nv = r.nv + EXCLUDED.nv, sum = r.sum + EXCLUDED.sum,
          min = LEAST(r.min, EXCLUDED.min), max = GREATEST(r.max, EXCLUDED.max),
          last_value = CASE WHEN EXCLUDED.last_time > r.last_time THEN EXCLUDED.last_value ELSE r.last_value END,
          last_time = GREATEST(r.last_time, EXCLUDED.last_time)"""


def _upsert_from_minutes(table: str, width: str, after: str) -> str:
    """A data-modifying CTE adding the minute aggregates ``m`` to ``table`` at ``width``; it
    reads ``after`` (a CTE's name) through an InitPlan, so that one runs first and completely."""
    return f"""INSERT INTO {table} AS r
          SELECT device_id, metric, date_bin('{width}', bucket, {_ORIGIN_SQL}), sum(n)::integer, sum(nv)::integer,
                 sum(sum), min(min), max(max), max(last_time), (array_agg(last_value ORDER BY last_time DESC))[1]
          FROM m {f"WHERE (SELECT count(*) FROM {after}) >= 0" if after else ""}
          GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
          ON CONFLICT (device_id, metric, bucket) DO UPDATE SET {_SET}
          RETURNING 1"""


def add_sql(source: str) -> str:
    """One statement adding the rows of ``source`` (a query or a data-modifying statement with
    ``RETURNING``, yielding ``time, device_id, metric, value``) to every rollup table.

    The minute aggregates are computed once and the coarser levels from them. The hour
    upsert is a data-modifying CTE that the 5-minute upsert reads through an InitPlan, which
    the minute upsert reads the same way, so they run in that order and each completely:
    every transaction locks hour rows, then 5-minute rows, then minute rows, each in key
    order."""
    return f"""
    WITH src AS ({source}),
    m AS (SELECT device_id, metric, date_bin('1 minute', time, {_ORIGIN_SQL}) AS bucket,
                 count(*)::integer AS n, count(value)::integer AS nv, coalesce(sum(value), 0) AS sum,
                 min(value) AS min, max(value) AS max, max(time) AS last_time,
                 (array_agg(value ORDER BY time DESC))[1] AS last_value
          FROM src GROUP BY 1, 2, 3),
    h AS ({_upsert_from_minutes("readings_1h", "1 hour", "")}),
    f AS ({_upsert_from_minutes("readings_5m", "5 minutes", "h")})
    INSERT INTO readings_1m AS r
    SELECT * FROM m WHERE (SELECT count(*) FROM f) >= 0 ORDER BY 1, 2, 3
    ON CONFLICT (device_id, metric, bucket) DO UPDATE SET {_SET}"""


#: The bridge's batch (its temporary table ``readings_batch``) into readings and the rollups;
#: a redelivered reading makes it fail (unique index).
INSERT_BATCH_SQL = add_sql(
    """INSERT INTO readings SELECT time, device_id, metric, value, text_value FROM readings_batch
       RETURNING time, device_id, metric, value""")
#: The same, skipping the readings stored already: only those inserted count.
INSERT_BATCH_DEDUP_SQL = add_sql(
    """INSERT INTO readings SELECT time, device_id, metric, value, text_value FROM readings_batch
       ON CONFLICT DO NOTHING RETURNING time, device_id, metric, value""")
#: The raw rows of one (device, metric) in [$3, $4): the backfill's source.
_SLICE_SQL = add_sql(
    """SELECT time, device_id, metric, value FROM readings
       WHERE device_id = $1 AND metric = $2 AND time >= $3 AND time < $4""")

LOCK_SHARED_SQL = f"SELECT pg_advisory_xact_lock_shared({LOCK_KEY})"


async def purge_device(conn: asyncpg.Connection, where: str, *args: Any) -> None:
    """Delete the readings of the devices ``device_id <where>`` and their rollups, inside the
    caller's transaction.

    Rollups first: a bridge that added to one of these rollup rows and has not committed yet
    holds its lock, so the delete waits for that commit, and the readings delete that follows
    (a new snapshot under READ COMMITTED) sees the readings that bridge inserted. Readings
    first could miss them while deleting their rollups."""
    await conn.execute(LOCK_SHARED_SQL)
    for table in TABLES.values():  # hours, 5 minutes, minutes, each in key order: as bridges lock them
        await conn.execute(f"""DELETE FROM {table} WHERE (device_id, metric, bucket) IN (
                                   SELECT device_id, metric, bucket FROM {table} WHERE device_id {where}
                                   ORDER BY device_id, metric, bucket FOR UPDATE)""", *args)
    await conn.execute(f"DELETE FROM readings WHERE device_id {where}", *args)


async def complete(conn: Any) -> bool:
    """Whether the rollups hold every stored reading (``rollup_state``, migration 0009)."""
    return bool(await conn.fetchval("SELECT complete_at IS NOT NULL FROM rollup_state"))


# -- reading: the planner -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Piece:
    """[start, end) answered by ``source``: a resolution in seconds, or 0 for raw rows."""
    source: int
    start: datetime
    end: datetime


def _floor(t: datetime, r: int) -> datetime:
    return t - timedelta(microseconds=(t - ORIGIN) // timedelta(microseconds=1) % (r * 1_000_000))


def _ceil(t: datetime, r: int) -> datetime:
    f = _floor(t, r)
    return f if f == t else f + timedelta(seconds=r)


def plan(start: datetime, end: datetime, width: timedelta,
         resolutions: tuple[int, ...] = RESOLUTIONS) -> list[Piece]:
    """Split [start, end) into time-ordered, disjoint pieces for buckets of ``width`` from
    origin ``start`` (``date_bin(width, time, start)``): each rollup piece holds whole
    rollup buckets that each lie inside one requested bucket; raw pieces hold the rest (the
    parts of buckets not aligned to a minute, the unfinished last minute of the range).
    Adjacent pieces of one source are merged."""
    pieces: list[Piece] = []

    def add(source: int, lo: datetime, hi: datetime) -> None:
        if lo >= hi:
            return
        if pieces and pieces[-1].source == source and pieces[-1].end == lo:
            pieces[-1] = Piece(source, pieces[-1].start, hi)
        else:
            pieces.append(Piece(source, lo, hi))

    def fill(lo: datetime, hi: datetime, level: int) -> None:
        """[lo, hi) lies inside one requested bucket: whole cells of resolutions[level:]."""
        if level == len(resolutions):
            add(0, lo, hi)
            return
        r = resolutions[level]
        a, b = _ceil(lo, r), _floor(hi, r)
        if a >= b:
            fill(lo, hi, level + 1)
            return
        fill(lo, a, level + 1)
        add(r, a, b)
        fill(b, hi, level + 1)

    w = width // timedelta(microseconds=1)
    usable = [r for r in resolutions if w % (r * 1_000_000) == 0 and _floor(start, r) == start]
    if usable:
        # Every bucket boundary is a multiple of the coarsest such resolution: no rollup cell
        # of it straddles one, so the whole range is one piece of work (the last, partial
        # bucket ends at `end`, beyond the last whole cell).
        fill(start, end, resolutions.index(usable[0]))
        return pieces
    if w < min(resolutions) * 1_000_000:
        add(0, start, end)  # every cell would straddle a boundary
        return pieces
    lo = start
    while lo < end:
        hi = min(lo + width, end)
        fill(lo, hi, 0)
        lo = hi
    return pieces


# -- the backfill -----------------------------------------------------------------------

#: Readings per backfill slice: the slice's transaction holds the exclusive lock, during which
#: every bridge waits before adding to the rollups (~50 ms per slice on the 2-core box).
BACKFILL_SLICE_ROWS = 50_000

_PAIRS_SQL = """
    WITH RECURSIVE p(device_id, metric) AS (
        (SELECT device_id, metric FROM readings ORDER BY device_id, metric LIMIT 1)
        UNION ALL
        SELECT n.device_id, n.metric FROM p CROSS JOIN LATERAL (
            SELECT device_id, metric FROM readings r WHERE (r.device_id, r.metric) > (p.device_id, p.metric)
            ORDER BY device_id, metric LIMIT 1) n)
    SELECT device_id, metric FROM p"""

_FAR_PAST = datetime(1, 1, 1, tzinfo=UTC) + timedelta(days=1)
_FAR_FUTURE = datetime(9999, 1, 1, tzinfo=UTC)


async def backfill(conn: asyncpg.Connection, progress: Callable[[str], None] | None = None,
                   slice_rows: int = BACKFILL_SLICE_ROWS) -> int:
    """Rebuild the rollups of every stored reading, one (device, metric, hour-aligned slice of
    about ``slice_rows`` readings) per transaction, then mark them complete
    (``rollup_state.complete_at``). Safe while bridges write: see the module docstring.
    Returns the number of readings aggregated. Run it after every bridge runs code that
    maintains rollups (a bridge of an older version writes readings without them)."""
    say = progress or (lambda _msg: None)
    total = int(await conn.fetchval(
        "SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = 'readings'::regclass") or 0)
    pairs = await conn.fetch(_PAIRS_SQL)
    say(f"backfill: {len(pairs)} (device, metric) pairs, about {total:,} readings")
    done = 0
    started = last_said = _time.monotonic()
    for i, p in enumerate(pairs, 1):
        dev, metric = p["device_id"], p["metric"]
        lo = _FAR_PAST
        while True:
            first = await conn.fetchval(
                "SELECT time FROM readings WHERE device_id = $1 AND metric = $2 AND time >= $3 ORDER BY time LIMIT 1",
                dev, metric, lo)
            if first is None:
                hi = _FAR_FUTURE
            else:
                past = await conn.fetchval(
                    """SELECT time FROM readings WHERE device_id = $1 AND metric = $2 AND time >= $3
                       ORDER BY time OFFSET $4 LIMIT 1""", dev, metric, first, slice_rows)
                hi = _FAR_FUTURE if past is None else _ceil(past + timedelta(microseconds=1), 3600)
            async with conn.transaction():
                await conn.execute(f"SELECT pg_advisory_xact_lock({LOCK_KEY})")
                for table in TABLES.values():
                    await conn.execute(
                        f"DELETE FROM {table} WHERE device_id = $1 AND metric = $2 AND bucket >= $3 AND bucket < $4",
                        dev, metric, lo, hi)
                await conn.execute(_SLICE_SQL, dev, metric, lo, hi)
                n = await conn.fetchval(
                    "SELECT coalesce(sum(n), 0) FROM readings_1h WHERE device_id = $1 AND metric = $2 "
                    "AND bucket >= $3 AND bucket < $4", dev, metric, lo, hi)
            done += int(n)
            lo = hi
            now = _time.monotonic()
            if now - last_said >= 2:
                last_said = now
                share = f" ({100 * done / total:.0f}%)" if total else ""
                say(f"backfill: pair {i}/{len(pairs)}, {done:,} readings{share}, "
                    f"{done / max(now - started, 1e-9):,.0f}/s")
            if hi == _FAR_FUTURE:
                break
    await conn.execute("UPDATE rollup_state SET complete_at = now()")
    say(f"backfill: done, {done:,} readings in {_time.monotonic() - started:.1f} s; the aggregate endpoint "
        "now answers from rollups")
    return done
