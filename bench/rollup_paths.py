"""How the bridge adds a COPYed batch to the rollups: the candidates, timed on the real schema.

Batches of 6,000 reading rows (2,000 messages x 3 metrics, 4 devices, 1 ms apart per device,
as bench/ingest.py publishes them), one transaction each, in a private PostgreSQL (default,
durable settings), interleaved so every path sees the same table growth:

  off       COPY into readings, no rollups (the bridge before issue 12)
  shipped   what the bridge does: COPY into a temporary table (ON COMMIT DELETE ROWS), then one
            statement: INSERT ... RETURNING into readings, the inserted rows grouped into
            both rollups (lms_core/rollups.py INSERT_BATCH_SQL)
  dedup     the same with ON CONFLICT DO NOTHING (the bridge's path after a redelivery)
  arrays    COPY into readings, then the rows sent again as four arrays; PostgreSQL groups
            them and upserts 1 h and 1 min rollups (one statement)
  python    COPY into readings, the batch grouped per (device, metric, minute) in Python,
            the groups upserted (one statement)

Prints rows/s of wall time and the client's CPU per row (the bridge's CPU is what limits
its drain rate; PostgreSQL's is the rest of the wall time here).

usage: .venv/bin/python bench/rollup_paths.py [--batches 40] [--devices 4] [--paths off,shipped]
                                               [--time-index]

--time-index adds an index on readings (device_id, time) first: run with and without it to
see what that index costs every write path.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import shutil
import tempfile
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from lms_cli.localstack import Postgres, free_port, new_password
from lms_core import migrations, rollups

COLUMNS = ("time", "device_id", "metric", "value", "text_value")
PATHS = ("off", "shipped", "dedup", "arrays", "python")

_ARRAYS_SQL = rollups.add_sql(
    """SELECT * FROM unnest($1::timestamptz[], $2::bigint[], $3::text[], $4::float8[])
       AS u(time, device_id, metric, value)""")


def group(rows: list[Any]) -> tuple[list[Any], ...]:
    """The batch per (device, metric, minute): the minute's newest time and value stand for
    the group; only to time the Python side (count, sum, min, max are folded the same way)."""
    g: dict[tuple[int, str, datetime], list[Any]] = {}
    for when, dev, metric, value, _text in rows:
        k = (dev, metric, when.replace(second=0, microsecond=0))
        a = g.get(k)
        if a is None:
            g[k] = [1, value, value, value, when, value]
            continue
        a[0] += 1
        if value is not None:
            a[1] += value
            if value < a[2]:
                a[2] = value
            if value > a[3]:
                a[3] = value
        if when > a[4]:
            a[4], a[5] = when, value
    keys = sorted(g)
    return ([g[k][4] for k in keys], [k[0] for k in keys], [k[1] for k in keys], [g[k][5] for k in keys])


async def write(conn: asyncpg.Connection, path: str, rows: list[Any]) -> None:
    async with conn.transaction():
        if path in ("shipped", "dedup"):
            await conn.copy_records_to_table("readings_batch", records=rows, columns=COLUMNS)
            await conn.execute(rollups.LOCK_SHARED_SQL)
            await conn.execute(rollups.INSERT_BATCH_SQL if path == "shipped" else rollups.INSERT_BATCH_DEDUP_SQL)
            return
        await conn.copy_records_to_table("readings", records=rows, columns=COLUMNS)
        if path == "arrays":
            t, d, m, v, _ = zip(*rows, strict=True)
            await conn.execute(rollups.LOCK_SHARED_SQL)
            await conn.execute(_ARRAYS_SQL, t, d, m, v)
        elif path == "python":
            await conn.execute(rollups.LOCK_SHARED_SQL)
            await conn.execute(_ARRAYS_SQL, *group(rows))  # timing only: not the exact aggregate


async def run(url: str, batches: int, devices: int, paths: tuple[str, ...],
              time_index: bool) -> dict[str, tuple[float, float]]:
    conn = await asyncpg.connect(url)
    await migrations.migrate(conn)
    if time_index:  # the index issue 12 asks about: is it worth its cost on ingest?
        await conn.execute("CREATE INDEX readings_device_time ON readings (device_id, time)")
    await conn.execute("""CREATE TEMP TABLE readings_batch
        (time timestamptz, device_id bigint, metric text, value double precision, text_value text)
        ON COMMIT DELETE ROWS""")
    base = datetime.now(UTC) - timedelta(days=1)
    wall = dict.fromkeys(paths, 0.0)
    cpu = dict.fromkeys(paths, 0.0)
    clock = [0] * devices
    for b in range(batches):
        for path in paths:  # interleaved: the same table growth for every path
            rows = []
            for i in range(2000):
                dev = i % devices
                clock[dev] += 1
                when = base + timedelta(milliseconds=clock[dev])
                rows += [(when, 1 + dev + devices * PATHS.index(path), m, float(i % 97), None)
                         for m in ("temp", "hum", "bat")]
            w0, c0 = time.perf_counter(), time.process_time()
            await write(conn, path, rows)
            wall[path] += time.perf_counter() - w0
            cpu[path] += time.process_time() - c0
        if b % 10 == 9:
            print(f"  {b + 1} batches per path", flush=True)
    await conn.close()
    n = batches * 6000
    return {p: (n / wall[p], cpu[p] / n * 1e9) for p in paths}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {', '.join(PATHS)}")
    ap.add_argument("--time-index", action="store_true", help="with an index on readings (device_id, time)")
    args = ap.parse_args()
    paths = tuple(args.paths.split(","))
    if not set(paths) <= set(PATHS):
        ap.error(f"--paths: choose from {', '.join(PATHS)}")
    root = Path(tempfile.mkdtemp(prefix="lms-bench-rollup-"))
    pg = Postgres(root / "pg", free_port(), new_password())
    try:
        pg.init()
        pg.start()
        pg.create_database()
        rates = asyncio.run(run(pg.url, args.batches, args.devices, paths, args.time_index))
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
    print("\n| path | rows/s (wall) | client CPU ns/row |\n|---|---:|---:|")
    for p, (r, c) in rates.items():
        print(f"| {p} | {r:,.0f} | {c:,.0f} |")


if __name__ == "__main__":
    main()
