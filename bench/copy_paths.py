"""Why the bridge COPYs straight into ``readings`` and only falls back to a staging table.

Times the two write paths of bridge/store.py on the real schema, in a private PostgreSQL
(default, durable settings): batches of 6,000 reading rows (2,000 messages x 3 metrics),
one transaction each, into a table that grows as they go.

  direct   COPY into readings (the unique index refuses a duplicate; used while none come)
  staged   COPY into a temporary table, INSERT ... ON CONFLICT DO NOTHING, TRUNCATE

usage: .venv/bin/python bench/copy_paths.py [--batches 100]
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

import asyncpg

from lms_cli.localstack import Postgres, free_port, new_password
from lms_core import migrations

COLUMNS = ("time", "device_id", "metric", "value", "text_value")


async def run(url: str, batches: int) -> dict[str, float]:
    conn = await asyncpg.connect(url)
    await migrations.migrate(conn)
    await conn.execute("""CREATE TEMP TABLE readings_stage
        (time timestamptz, device_id bigint, metric text, value double precision, text_value text)""")
    base = datetime.now(UTC) - timedelta(days=1)
    results = {}
    for path in ("direct", "staged", "direct", "staged"):  # interleaved: same table growth for both
        started = time.perf_counter()
        for b in range(batches // 2):
            offset = (b + (0 if path == "direct" else batches)) * 2000 + len(results) * 10 * batches * 2000
            rows = [(base + timedelta(milliseconds=offset + i), 1 + i % 4, m, float(i), None)
                    for i in range(2000) for m in ("temp", "hum", "bat")]
            async with conn.transaction():
                if path == "direct":
                    await conn.copy_records_to_table("readings", records=rows, columns=COLUMNS)
                else:
                    await conn.copy_records_to_table("readings_stage", records=rows, columns=COLUMNS)
                    await conn.execute("INSERT INTO readings SELECT * FROM readings_stage ON CONFLICT DO NOTHING")
                    await conn.execute("TRUNCATE readings_stage")
        elapsed = time.perf_counter() - started
        results[path] = results.get(path, 0.0) + elapsed
        print(f"  {path}: {batches // 2} batches in {elapsed:.2f} s", flush=True)
    await conn.close()
    return {p: (batches * 6000) / t for p, t in results.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=100)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lms-bench-copy-"))
    pg = Postgres(root / "pg", free_port(), new_password())
    try:
        pg.init()
        pg.start()
        pg.create_database()
        rates = asyncio.run(run(pg.url, args.batches))
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
    print("\n| path | rows/s |\n|---|---:|")
    for p, r in rates.items():
        print(f"| {p} | {r:,.0f} |")
    print(f"\nstaged / direct: {rates['staged'] / rates['direct']:.2f}")


if __name__ == "__main__":
    main()
