"""API read-path benchmark: latest values and 24-hour aggregates over >= 10M readings.

usage (from the repository root):
    .venv/bin/python bench/api_queries.py [--rows 10000000] [--requests 200] [--concurrency 8] [--seconds 10]

It builds its own stack in a temporary folder (PostgreSQL with default, durable settings -
fsync, full_page_writes and synchronous_commit on; the only addition is auto_explain
preloaded but switched off, so the plans the API really runs can be logged for a moment at
the end - and Mosquitto, which device creation needs), starts one `lms api` process,
registers a user, creates organization "bench" with device "main" and ten other devices
through the REST API, then bulk-loads readings directly in PostgreSQL:

  main      --rows readings: 10 metrics, one reading per metric per second, ending now
            (10,000,000 rows = 1,000,000 s = 11.6 days);
  others    --rows / 10 readings over the same span across 10 devices x 5 metrics.

The load runs in time order, all devices interleaved (as ingest writes them), with the
unique index in place, followed by VACUUM (ANALYZE) readings - the steady state of a table
autovacuum has seen; without it autovacuum's insert trigger would start mid-measurement.

Measured through the API with a bearer token, per query: sequential latency (warm-up, then
--requests requests, one connection), then --concurrency clients (one httpx.AsyncClient
each) for --seconds seconds: requests/s and latency under load. Then EXPLAIN (ANALYZE,
BUFFERS) of the SQL of api/data.py with the parameters filled in, and the plans the API's
own (prepared) statements used, captured with auto_explain. Everything shares this
machine's cores (client, API, PostgreSQL): the numbers are whole-box figures.

Results are printed as Markdown and written as JSON to bench/results/. Every wait has a
timeout and the stack is torn down on any exit, Ctrl-C included.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import collections
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx

from bench.common import CLK_TCK, BenchError, box_cpu, pct, proc_cpu, say, tree_cpu
from lms_cli.localstack import find_pg_bin
from lms_core import rollups
from tests.harness import ApiProcess, Stack

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
ORG = "bench"
MAIN = "main"
PASSWORD = "correct horse battery"
METRICS = [f"m{i:02d}" for i in range(10)]  # the main device's metrics
OTHER_DEVICES = 10
OTHER_METRICS = [f"o{i}" for i in range(5)]
CHUNK_SECONDS = 50_000  # one INSERT per 50,000 s of data (500,000 main-device rows)
HTTP_TIMEOUT = 60.0
LOAD_TIMEOUT = 1800.0
STATEMENT_TIMEOUT = 300.0


def lat_summary(ms: list[float]) -> dict[str, Any]:
    if not ms:
        return {"n": 0}
    return {"n": len(ms), "p50_ms": round(pct(ms, 50), 2), "p90_ms": round(pct(ms, 90), 2),
            "p99_ms": round(pct(ms, 99), 2), "mean_ms": round(statistics.fmean(ms), 2),
            "min_ms": round(min(ms), 2), "max_ms": round(max(ms), 2)}


# -- CPU accounting ------------------------------------------------------------------------

class CpuMeter:
    def __init__(self, stack: Stack, api: ApiProcess) -> None:
        self.stack, self.api = stack, api
        self.start = self._sample()

    def _sample(self) -> dict[str, float]:
        assert self.stack.pg.proc and self.api.proc
        busy, total = box_cpu()
        return {"api": proc_cpu(self.api.proc.pid), "postgres": tree_cpu(self.stack.pg.proc.pid),
                "client": time.process_time(), "box_busy": busy / CLK_TCK, "box_total": total / CLK_TCK,
                "wall": time.monotonic()}

    def stop(self) -> dict[str, float]:
        end = self._sample()
        d = {k: end[k] - self.start[k] for k in end}
        return {"api_cpu_s": round(d["api"], 2), "postgres_cpu_s": round(d["postgres"], 2),
                "client_cpu_s": round(d["client"], 2),
                "box_busy_pct": round(100 * d["box_busy"] / d["box_total"], 1) if d["box_total"] else 0.0,
                "wall_s": round(d["wall"], 2)}


# -- the SQL the API runs ------------------------------------------------------------------

def api_sql() -> tuple[dict[str, str], str]:
    """The SQL of DataController.aggregate and .latest, as api/data.py defines it."""
    from api.services.data import AGGREGATE_SQL, LATEST_SQL

    return {"aggregate": AGGREGATE_SQL, "latest": LATEST_SQL}, "api/data.py AGGREGATE_SQL, LATEST_SQL"


def fill(sql: str, params: list[str]) -> str:
    """$n -> the literal text of parameter n."""
    return re.sub(r"\$(\d+)", lambda m: params[int(m.group(1)) - 1], sql)


def ts_literal(t: datetime) -> str:
    return f"'{t.isoformat()}'::timestamptz"


# -- the benchmark -------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.stack = Stack(tmp / "stack")
        # Durable PostgreSQL: the harness turns fsync and full_page_writes off for tests; not
        # here. auto_explain is preloaded but off (log_min_duration -1, its default) until the end.
        self.stack.pg.extra_conf = {"shared_preload_libraries": "auto_explain"}
        self.api: ApiProcess | None = None
        self.token = ""
        self.dev_ids: dict[str, int] = {}
        self.load_end: datetime | None = None
        self.result: dict[str, Any] = {}

    # setup ---------------------------------------------------------------------------------

    def setup(self) -> None:
        say(f"starting PostgreSQL and Mosquitto in {self.tmp}")
        self.stack.start()
        self.api = self.stack.start_api()
        say(f"API up at {self.api.url} (one `lms api` process)")
        with httpx.Client(base_url=self.api.url, timeout=HTTP_TIMEOUT) as c:
            email = "bench@example.com"
            r = c.post("/api/v1/auth/register", json={"email": email, "password": PASSWORD})
            if r.status_code not in (201, 409):
                raise BenchError(f"register: {r.status_code} {r.text[:300]}")
            r = c.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD})
            if r.status_code != 200:
                raise BenchError(f"login: {r.status_code} {r.text[:300]}")
            self.token = r.json()["access_token"]
            c.cookies.clear()
            c.headers["Authorization"] = f"Bearer {self.token}"
            r = c.post("/api/v1/orgs", json={"slug": ORG, "name": "Benchmark"})
            if r.status_code != 201:
                raise BenchError(f"create org: {r.status_code} {r.text[:300]}")
            for slug in [MAIN, *[f"other-{i}" for i in range(1, OTHER_DEVICES + 1)]]:
                r = c.post(f"/api/v1/orgs/{ORG}/devices", json={"slug": slug, "name": slug})
                if r.status_code != 201:
                    raise BenchError(f"create device {slug}: {r.status_code} {r.text[:300]}")
        rows = self.stack.query("SELECT d.slug, d.id FROM devices d JOIN organizations o ON o.id = d.org_id "
                                "WHERE o.slug = $1", ORG)
        self.dev_ids = {r["slug"]: r["id"] for r in rows}
        say(f"user, organization {ORG!r} and {len(self.dev_ids)} devices created through the API")

    # load ------------------------------------------------------------------------------------

    async def load(self) -> dict[str, Any]:
        main_rows = self.args.rows
        span = -(-main_rows // len(METRICS))  # seconds of data, one reading per metric per second
        other_rows = main_rows // 10
        per_dev_metric = max(1, other_rows // (OTHER_DEVICES * len(OTHER_METRICS)))
        other_step = max(1, span // per_dev_metric)
        end = datetime.now(UTC).replace(microsecond=0)
        start = end - timedelta(seconds=span)
        self.load_end = end
        main_id = self.dev_ids[MAIN]
        others = [self.dev_ids[f"other-{i}"] for i in range(1, OTHER_DEVICES + 1)]
        expected_main = span * len(METRICS)
        expected_other = len(range(0, span, other_step)) * OTHER_DEVICES * len(OTHER_METRICS)
        say(f"loading {expected_main:,} rows for {ORG}/{MAIN} ({len(METRICS)} metrics, 1 s apart, "
            f"{span / 86400:.1f} days ending {end.isoformat()}) and {expected_other:,} rows for "
            f"{OTHER_DEVICES} other devices ({len(OTHER_METRICS)} metrics, {other_step} s apart), "
            f"in time order, unique index in place")
        # One statement per chunk of time; each chunk has all devices' rows of that time range,
        # in time order (metrics and devices interleaved), as the bridge would have written them.
        sql = """
            INSERT INTO readings (time, device_id, metric, value)
            SELECT t, device_id, metric, value FROM (
                SELECT $1::timestamptz + make_interval(secs => i) AS t, $3::bigint AS device_id, m AS metric,
                       20 + 5 * sin(i / 3600.0 + k) + (i % 97) / 97.0 AS value, i, k
                FROM generate_series($4::int, $5::int - 1) i
                CROSS JOIN unnest($2::text[]) WITH ORDINALITY AS mm(m, k)
                UNION ALL
                SELECT $1::timestamptz + make_interval(secs => i), d, m, (i % 1000) / 10.0 + k, i, k
                FROM generate_series($4::int + (($7::int - $4::int % $7::int) % $7::int), $5::int - 1, $7::int) i
                CROSS JOIN unnest($6::bigint[]) AS dd(d)
                CROSS JOIN unnest($8::text[]) WITH ORDINALITY AS mm(m, k)
            ) s ORDER BY i, device_id, k"""
        conn = await asyncpg.connect(self.stack.pg.url)
        await conn.execute("SET work_mem = '256MB'")  # this session only: the per-chunk sort in memory
        t0 = time.monotonic()
        done = 0
        total = expected_main + expected_other
        try:
            async def run() -> None:
                nonlocal done
                next_report = 0.0
                for a in range(0, span, CHUNK_SECONDS):
                    b = min(span, a + CHUNK_SECONDS)
                    status = await conn.execute(sql, start, METRICS, main_id, a, b, others, other_step,
                                                OTHER_METRICS, timeout=STATEMENT_TIMEOUT)
                    done += int(status.split()[-1])
                    now = time.monotonic()
                    if now >= next_report or b == span:
                        el = now - t0
                        say(f"  loaded {done:,} / {total:,} rows ({100 * done / total:.0f}%), "
                            f"{done / el:,.0f} rows/s, {el:.0f} s")
                        next_report = now + 5

            await asyncio.wait_for(run(), LOAD_TIMEOUT)
            t_insert = time.monotonic() - t0
            say("VACUUM (ANALYZE) readings (sets hint bits and the visibility map, as autovacuum would)")
            t1 = time.monotonic()
            await conn.execute("VACUUM (ANALYZE) readings", timeout=STATEMENT_TIMEOUT)
            t_vacuum = time.monotonic() - t1
            n_total = await conn.fetchval("SELECT count(*) FROM readings", timeout=STATEMENT_TIMEOUT)
            n_main = await conn.fetchval("SELECT count(*) FROM readings WHERE device_id = $1", main_id,
                                         timeout=STATEMENT_TIMEOUT)
            sizes = await conn.fetchrow(
                "SELECT pg_size_pretty(pg_table_size('readings')) AS heap, "
                "pg_size_pretty(pg_indexes_size('readings')) AS indexes, "
                "pg_size_pretty(pg_database_size(current_database())) AS db")
            newest = await conn.fetchval("SELECT max(time) FROM readings WHERE device_id = $1 AND metric = $2",
                                         main_id, METRICS[0])
            oldest = await conn.fetchval("SELECT min(time) FROM readings WHERE device_id = $1 AND metric = $2",
                                         main_id, METRICS[0])
        finally:
            await conn.close()
        if n_main != expected_main:
            raise BenchError(f"loaded {n_main:,} rows for the main device, expected {expected_main:,}")
        res = {"rows_total": n_total, "rows_main_device": n_main, "rows_other_devices": n_total - n_main,
               "devices": 1 + OTHER_DEVICES, "main_metrics": len(METRICS), "span_days": round(span / 86400, 2),
               "oldest": oldest.isoformat(), "newest": newest.isoformat(),
               "insert_s": round(t_insert, 1), "insert_rows_per_s": round(n_total / t_insert),
               "vacuum_analyze_s": round(t_vacuum, 1), "heap_size": sizes["heap"],
               "index_size": sizes["indexes"], "database_size": sizes["db"]}
        say(f"loaded {n_total:,} rows in {t_insert:.0f} s ({n_total / t_insert:,.0f} rows/s), "
            f"VACUUM ANALYZE {t_vacuum:.0f} s; heap {sizes['heap']}, indexes {sizes['indexes']}")
        return res

    # requests ------------------------------------------------------------------------------

    def queries(self) -> list[dict[str, Any]]:
        base = f"/api/v1/orgs/{ORG}/devices/{MAIN}"

        def agg(span: timedelta, bucket: str, metric: str | None = None, align: timedelta | None = None) -> Any:
            """from = now - span (on a multiple of ``align`` when given, as a dashboard snaps its
            range to its buckets), to = now."""
            def params(now: datetime | None = None) -> dict[str, Any]:
                now = now or datetime.now(UTC)
                t0 = now - span
                if align:
                    t0 -= (t0 - datetime(2000, 1, 1, tzinfo=UTC)) % align
                p: dict[str, Any] = {"bucket": bucket, "from": t0.isoformat(), "to": now.isoformat()}
                if metric:
                    p["metric"] = metric
                return p
            return params

        day, five, hour = timedelta(days=1), timedelta(minutes=5), timedelta(hours=1)
        return [
            {"name": "latest", "label": "latest values (`/latest`)", "path": f"{base}/latest",
             "params": lambda now=None: {}},
            {"name": "aggregate_all", "label": "24 h, 5 m buckets, all metrics, from = now - 24 h",
             "path": f"{base}/readings/aggregate", "params": agg(day, "5m"), "buckets": 289},
            {"name": "aggregate_all_aligned", "label": "24 h, 5 m buckets, all metrics, from on a 5 m boundary",
             "path": f"{base}/readings/aggregate", "params": agg(day, "5m", align=five), "buckets": 289},
            {"name": "aggregate_one", "label": f"24 h, 5 m buckets, metric={METRICS[3]}, from on a 5 m boundary",
             "path": f"{base}/readings/aggregate", "params": agg(day, "5m", METRICS[3], five), "buckets": 289},
            {"name": "aggregate_7d", "label": "7 d, 1 h buckets, all metrics, from on an hour",
             "path": f"{base}/readings/aggregate", "params": agg(7 * day, "1h", align=hour), "buckets": 169},
            {"name": "aggregate_30d", "label": "30 d, 1 h buckets, all metrics, from on an hour",
             "path": f"{base}/readings/aggregate", "params": agg(30 * day, "1h", align=hour), "buckets": 721},
            {"name": "readings_page", "label": "raw readings, all metrics, 1,000 from now - 24 h",
             "path": f"{base}/readings",
             "params": lambda now=None: {"limit": 1000,
                                         "from": ((now or datetime.now(UTC)) - day).isoformat()}},
        ]

    def check(self, q: dict[str, Any], body: Any) -> dict[str, Any]:
        """What one response holds; raises when it is not what the data says it must be."""
        if q["name"] == "latest":
            if len(body) != len(METRICS) or sorted(r["metric"] for r in body) != METRICS:
                raise BenchError(f"latest returned {[r['metric'] for r in body]}")
            newest = max(datetime.fromisoformat(r["time"]) for r in body)
            assert self.load_end is not None
            if abs((newest - self.load_end).total_seconds()) > 5:
                raise BenchError(f"latest: newest {newest} is not the end of the loaded data {self.load_end}")
            return {"items": len(body), "rows_touched": len(body),
                    "rows_touched_note": f"{len(body)} rows, {2 * len(body) + 1} index descents"}
        if q["name"] == "readings_page":
            items = body["items"]
            if len(items) != 1000 or items != sorted(items, key=lambda i: (i["time"], i["metric"])):
                raise BenchError(f"readings page: {len(items)} items, or not in (time, metric) order")
            return {"items": len(items), "rows_touched": len(items), "rows_touched_note": "1,000 rows returned"}
        counts = sum(b["count"] for b in body)
        metrics = {b["metric"] for b in body}
        buckets = {b["bucket"] for b in body}
        want = {METRICS[3]} if q["name"] == "aggregate_one" else set(METRICS)
        if metrics != want or not 1 <= len(buckets) <= q["buckets"]:
            raise BenchError(f"{q['name']}: {len(buckets)} buckets, metrics {sorted(metrics)}")
        return {"items": len(body), "buckets": len(buckets), "rows_touched": counts,
                "rows_touched_note": f"{counts:,} readings in the buckets"}

    def answers(self, now: datetime) -> dict[str, Any]:
        """Every query's answer for one fixed ``now``: the raw path's and the rollups' must be equal."""
        assert self.api is not None
        with httpx.Client(base_url=self.api.url, timeout=HTTP_TIMEOUT,
                          headers={"Authorization": f"Bearer {self.token}"}) as c:
            return {q["name"]: c.get(q["path"], params=q["params"](now)).json() for q in self.queries()}

    def set_rollups(self, complete: bool) -> float:
        """Rollups off (``rollup_state`` incomplete: the API reads raw rows, as before issue 12) or
        built by ``lms_core.rollups.backfill``; returns the backfill's seconds."""
        async def run() -> float:
            conn = await asyncpg.connect(self.stack.pg.url)
            try:
                if not complete:
                    await conn.execute("TRUNCATE readings_1m, readings_5m, readings_1h")
                    await conn.execute("UPDATE rollup_state SET complete_at = NULL")
                    return 0.0
                t = time.monotonic()
                await rollups.backfill(conn, progress=say)
                took = time.monotonic() - t
                await conn.execute("VACUUM (ANALYZE) readings_1m, readings_5m, readings_1h", timeout=STATEMENT_TIMEOUT)
                return took
            finally:
                await conn.close()
        return asyncio.run(run())

    def sequential(self, q: dict[str, Any]) -> dict[str, Any]:
        assert self.api is not None
        statuses: collections.Counter[int] = collections.Counter()
        errors: list[str] = []
        ms: list[float] = []
        sizes: list[int] = []
        with httpx.Client(base_url=self.api.url, timeout=HTTP_TIMEOUT,
                          headers={"Authorization": f"Bearer {self.token}"}) as c:
            r = c.get(q["path"], params=q["params"]())
            if r.status_code != 200:
                raise BenchError(f"{q['name']}: {r.status_code} {r.text[:500]}")
            shape = self.check(q, r.json())
            say(f"{q['label']}: {shape['rows_touched_note']}, {shape['items']} items, {len(r.content):,} bytes")
            stop_at = time.monotonic() + self.args.sequential_max_seconds
            for i in range(self.args.warmup + self.args.requests):
                if time.monotonic() > stop_at:
                    say(f"  sequential phase stopped at its time cap ({self.args.sequential_max_seconds:g} s)")
                    break
                t = time.perf_counter()
                r = c.get(q["path"], params=q["params"]())
                dt = (time.perf_counter() - t) * 1000
                statuses[r.status_code] += 1
                if r.status_code != 200 and len(errors) < 5:
                    errors.append(f"{r.status_code} {r.text[:300]}")
                if i >= self.args.warmup:
                    ms.append(dt)
                    sizes.append(len(r.content))
        s = lat_summary(ms)
        say(f"  sequential: p50 {s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms, mean {s['mean_ms']:.1f} ms "
            f"over {len(ms)} requests (after {self.args.warmup} warm-up); statuses {dict(statuses)}")
        return {**shape, "response_bytes": int(statistics.fmean(sizes)) if sizes else 0, "sequential": s,
                "sequential_statuses": dict(statuses), "sequential_errors": errors}

    async def _concurrent(self, q: dict[str, Any]) -> dict[str, Any]:
        assert self.api is not None
        url = self.api.url
        n, seconds, cap = self.args.concurrency, self.args.seconds, self.args.max_requests
        ms: list[float] = []
        statuses: collections.Counter[str] = collections.Counter()
        errors: list[str] = []
        issued = 0
        connected = 0
        start = asyncio.Event()
        deadline = [0.0]  # set when every client is connected

        async def worker() -> None:
            nonlocal issued, connected
            async with httpx.AsyncClient(base_url=url, timeout=HTTP_TIMEOUT,
                                         headers={"Authorization": f"Bearer {self.token}"}) as c:
                r = await c.get(q["path"], params=q["params"]())  # connection set up outside the clock
                if r.status_code != 200:
                    raise BenchError(f"{q['name']}: {r.status_code} {r.text[:300]}")
                connected += 1
                await start.wait()
                while time.monotonic() < deadline[0] and issued < cap:
                    issued += 1
                    t = time.perf_counter()
                    try:
                        r = await c.get(q["path"], params=q["params"]())
                        code = str(r.status_code)
                        if r.status_code != 200 and len(errors) < 5:
                            errors.append(f"{r.status_code} {r.text[:300]}")
                    except httpx.HTTPError as exc:
                        code = type(exc).__name__
                        if len(errors) < 5:
                            errors.append(repr(exc))
                    statuses[code] += 1
                    if code == "200":
                        ms.append((time.perf_counter() - t) * 1000)

        tasks = [asyncio.create_task(worker()) for _ in range(n)]

        async def run() -> tuple[float, dict[str, float]]:
            t_conn = time.monotonic()
            while connected < n:
                for t in tasks:
                    if t.done() and t.exception() is not None:
                        raise t.exception()  # type: ignore[misc]
                if time.monotonic() - t_conn > 2 * HTTP_TIMEOUT:
                    raise BenchError(f"only {connected} of {n} clients got a first answer")
                await asyncio.sleep(0.01)
            assert self.api is not None
            meter = CpuMeter(self.stack, self.api)
            t0 = time.monotonic()
            deadline[0] = t0 + seconds
            start.set()
            await asyncio.gather(*tasks)
            return time.monotonic() - t0, meter.stop()

        try:
            wall, cpu = await asyncio.wait_for(run(), seconds + 3 * HTTP_TIMEOUT + 30)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        ok = statuses.get("200", 0)
        return {"clients": n, "wall_s": round(wall, 2), "requests": sum(statuses.values()), "ok": ok,
                "req_per_s": round(ok / wall, 1), "latency": lat_summary(ms), "statuses": dict(statuses),
                "errors": errors, "cpu": cpu, "capped": issued >= cap}

    def concurrent(self, q: dict[str, Any]) -> dict[str, Any]:
        res = asyncio.run(self._concurrent(q))
        s = res["latency"]
        say(f"  {res['clients']} concurrent clients, {res['wall_s']:.1f} s: {res['req_per_s']:,.1f} req/s, "
            f"p50 {s.get('p50_ms', float('nan')):.1f} ms, p99 {s.get('p99_ms', float('nan')):.1f} ms; "
            f"statuses {res['statuses']}; cpu {res['cpu']}")
        return res

    # plans ---------------------------------------------------------------------------------

    async def explain(self) -> dict[str, Any]:
        sqls, source = api_sql()
        now = datetime.now(UTC)
        t0, t1 = now - timedelta(hours=24), now
        main_id = str(self.dev_ids[MAIN])
        agg_params = [main_id, ts_literal(t0), ts_literal(t1), "'00:05:00'"]
        all_metrics = "ARRAY[" + ", ".join(f"'{m}'" for m in METRICS) + "]::text[]"
        filled = {
            "latest": fill(sqls["latest"], [main_id]),
            # The API resolves "all metrics" to the device's list of metrics first.
            "aggregate_all": fill(sqls["aggregate"], [*agg_params, all_metrics]),
            "aggregate_one": fill(sqls["aggregate"], [*agg_params, f"ARRAY['{METRICS[3]}']::text[]"]),
        }
        out: dict[str, Any] = {"source": source}
        conn = await asyncpg.connect(self.stack.pg.url)
        try:
            for name, sql in filled.items():
                await conn.fetch("EXPLAIN (ANALYZE, BUFFERS) " + sql, timeout=STATEMENT_TIMEOUT)  # warm
                rows = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS) " + sql, timeout=STATEMENT_TIMEOUT)
                out[name] = {"sql": re.sub(r"\n\s+", "\n  ", sql.strip()), "plan": "\n".join(r[0] for r in rows)}
            # The plan PostgreSQL may switch to for a prepared statement after five executions
            # when it is not costlier than the custom ones (asyncpg prepares every statement).
            await conn.execute("PREPARE agg AS " + sqls["aggregate"])
            await conn.execute("SET plan_cache_mode = force_generic_plan")
            rows = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) EXECUTE agg({', '.join([*agg_params, all_metrics])})",
                                    timeout=STATEMENT_TIMEOUT)
            out["aggregate_all_generic"] = {"plan": "\n".join(r[0] for r in rows)}
        finally:
            await conn.close()
        return out

    def auto_explain(self) -> dict[str, str]:
        """Log the plans of one request of each kind as the API's own statements run them."""
        assert self.api is not None
        log = self.stack.pg.log_path
        settings = {"auto_explain.log_min_duration": "0", "auto_explain.log_analyze": "on",
                    "auto_explain.log_buffers": "on", "auto_explain.log_timing": "on"}

        async def configure(on: bool) -> None:
            # ALTER SYSTEM is the cluster superuser's; the application's role only owns its database.
            conn = await asyncpg.connect(self.stack.pg.admin_url(self.stack.pg.database))
            try:
                for k, v in settings.items():
                    await conn.execute(f"ALTER SYSTEM SET {k} = '{v}'" if on else f"ALTER SYSTEM RESET {k}",
                                       timeout=30)
                await conn.execute("SELECT pg_reload_conf()", timeout=30)
            finally:
                await conn.close()

        asyncio.run(configure(True))
        plans: dict[str, str] = {}
        try:
            time.sleep(1)  # backends pick up the reload between statements
            with httpx.Client(base_url=self.api.url, timeout=HTTP_TIMEOUT,
                              headers={"Authorization": f"Bearer {self.token}"}) as c:
                for q in self.queries():
                    before = log.stat().st_size
                    r = c.get(q["path"], params=q["params"]())
                    if r.status_code != 200:
                        raise BenchError(f"{q['name']}: {r.status_code}")
                    deadline = time.monotonic() + 10
                    text = ""
                    while time.monotonic() < deadline:
                        with open(log, "rb") as f:
                            f.seek(before)
                            text = f.read().decode(errors="replace")
                        if "FROM readings" in text:
                            break
                        time.sleep(0.1)
                    plans[q["name"]] = extract_plan(text)
        finally:
            asyncio.run(configure(False))
        return plans


def extract_plan(log_text: str) -> str:
    """The auto_explain entry of the readings query in a slice of the PostgreSQL log."""
    entries = re.split(r"\n(?=\S[^\n]*?LOG:\s+duration: )", "\n" + log_text)
    for e in entries:
        if "FROM readings" in e and "Query Text" in e:
            lines = e.strip().splitlines()
            head = re.sub(r"^.*?LOG:\s+", "", lines[0])
            start = next((i for i, ln in enumerate(lines) if "(cost=" in ln or "(actual" in ln), 1)
            return head + "\n" + "\n".join(ln.replace("\t", "", 1) for ln in lines[start:])
    return "(no auto_explain entry found in the PostgreSQL log)"


# -- report --------------------------------------------------------------------------------

def same(a: Any, b: Any) -> bool:
    """Equal answers; an average to 1e-12 relative (values here are not exactly summable in
    binary floating point, so the order of summation rounds the sum differently; README)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(
            math.isclose(a[k], b[k], rel_tol=1e-12) if k == "avg" and a[k] is not None and b[k] is not None
            else same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def machine_info() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":")[1].strip()
    except OSError:
        pass
    try:
        pg = subprocess.run([str(find_pg_bin() / "postgres"), "--version"], capture_output=True, text=True,
                            timeout=10).stdout.strip()
    except Exception:
        pg = "?"
    return {"nproc": os.cpu_count(), "cpu_model": cpu, "memory": mem, "kernel": platform.release(),
            "python": platform.python_version(), "httpx": httpx.__version__, "asyncpg": asyncpg.__version__,
            "postgresql": pg}


def table(load: dict[str, Any], results: list[dict[str, Any]], n: int) -> str:
    lines = [
        f"| query | answered from | rows in table | rows touched | response | sequential n | p50 ms | p99 ms | mean ms "
        f"| req/s at concurrency {n} (requests) | p50 ms at {n} | p99 ms at {n} | non-200 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        s, c = r["sequential"], r["concurrent"]
        bad = sum(v for k, v in r["sequential_statuses"].items() if int(k) != 200) + \
            sum(v for k, v in c["statuses"].items() if k != "200")
        lines.append(
            f"| {r['label']} | {r.get('phase', '')} | {load['rows_total']:,} | {r['rows_touched_note']} | "
            f"{r['response_bytes'] / 1024:,.0f} KiB, {r['items']:,} items | {s['n']} | {s['p50_ms']:.1f} | "
            f"{s['p99_ms']:.1f} | {s['mean_ms']:.1f} | {c['req_per_s']:,.1f} ({c['ok']:,}) | "
            f"{c['latency'].get('p50_ms', 0):.1f} | "
            f"{c['latency'].get('p99_ms', 0):.1f} | {bad} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=10_000_000, help="readings of the measured device (default 10M)")
    ap.add_argument("--requests", type=int, default=200, help="sequential requests per query (default 200)")
    ap.add_argument("--warmup", type=int, default=20, help="warm-up requests per query (default 20)")
    ap.add_argument("--concurrency", type=int, default=8, help="concurrent clients (default 8)")
    ap.add_argument("--seconds", type=float, default=10, help="seconds of the concurrent phase (default 10)")
    ap.add_argument("--sequential-max-seconds", type=float, default=300,
                    help="time cap of one sequential phase, warm-up included (default 300)")
    ap.add_argument("--max-requests", type=int, default=100_000,
                    help="cap on requests of one concurrent phase (default 100000)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs) after the run")
    ap.add_argument("--phases", default="raw,rollups",
                    help="raw (rollups incomplete: raw rows, as before issue 12), rollups (after the backfill); "
                         "comma-separated, in order (default raw,rollups)")
    ap.add_argument("--only", default="all", help="comma-separated query names to time (default all)")
    args = ap.parse_args()
    if min(args.rows, args.requests, args.concurrency, args.max_requests) < 1 or args.seconds <= 0 \
            or args.sequential_max_seconds <= 0 \
            or args.warmup < 0:
        ap.error("all numbers must be positive")
    if args.rows < 24 * 3600 * len(METRICS):
        print(f"note: --rows {args.rows:,} is less than a full day of data ({24 * 3600 * len(METRICS):,}); "
              "the 24-hour aggregate will cover less than 24 h", flush=True)

    command = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)

    tmp = Path(tempfile.mkdtemp(prefix="lms-bench-api-"))
    bench = Bench(args, tmp)
    info: dict[str, Any] = machine_info()
    load: dict[str, Any] = {}
    results: list[dict[str, Any]] = []
    plans: dict[str, Any] = {}
    api_plans: dict[str, str] = {}
    pg_settings: dict[str, str] = {}
    t_all = time.monotonic()
    ok = False
    try:
        bench.setup()
        pg_settings = {r["name"]: r["setting"] for r in bench.stack.query(
            "SELECT name, setting FROM pg_settings WHERE name IN ('server_version', 'fsync', 'full_page_writes', "
            "'synchronous_commit', 'shared_buffers', 'work_mem', 'effective_cache_size', 'random_page_cost', "
            "'jit', 'plan_cache_mode', 'max_wal_size')")}
        info["postgresql_server"] = pg_settings.get("server_version", "?")
        load = asyncio.run(bench.load())
        fixed_now = datetime.now(UTC)
        reference: dict[str, Any] = {}
        for phase in args.phases.split(","):
            if phase == "rollups":
                say("building the rollups of the loaded readings (lms_core.rollups.backfill)")
                load["backfill_s"] = round(bench.set_rollups(True), 1)
                say(f"backfill: {load['backfill_s']} s")
            else:
                bench.set_rollups(False)
            answers = bench.answers(fixed_now)
            if reference and not same(answers, reference):
                bad = [k for k in answers if not same(answers[k], reference.get(k))]
                raise BenchError(f"the {phase} answers differ from the first phase's for {bad}")
            reference = reference or answers
            for q in bench.queries():
                if q["name"] not in args.only.split(",") and args.only != "all":
                    continue
                say(f"[{phase}] {q['label']}")
                r = {"name": q["name"], "label": q["label"], "phase": phase, **bench.sequential(q)}
                r["concurrent"] = bench.concurrent(q)
                results.append(r)
        say("EXPLAIN (ANALYZE, BUFFERS) of the API's SQL with the parameters filled in")
        plans = asyncio.run(bench.explain())
        say("plans of the API's own statements (auto_explain, one request each)")
        api_plans = bench.auto_explain()
        ok = True
    except (TimeoutError, BenchError, AssertionError, asyncpg.PostgresError, httpx.HTTPError) as exc:
        say(f"FAILED: {type(exc).__name__}: {exc}")
    except KeyboardInterrupt:
        say("interrupted")
    finally:
        say("tearing down the stack")
        for part, stop in (("api", lambda: [a.stop() for a in bench.stack.apis]), ("mosquitto", bench.stack.mq.stop),
                           ("postgres", bench.stack.pg.stop)):
            try:
                stop()
            except BaseException as exc:  # keep tearing down the rest
                say(f"cleanup of {part}: {exc!r}")
        if not ok:
            for log in sorted((tmp / "stack").glob("*.log")):
                lines = log.read_text(errors="replace").splitlines()[-8:]
                print(f"--- last lines of {log.name}:\n" + "\n".join(lines), flush=True)
        if args.keep:
            say(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if not ok:
        return 1

    n = args.concurrency
    out = [
        "",
        "## API read-path benchmark",
        "",
        f"`{ORG}/{MAIN}`: {load['rows_main_device']:,} rows ({load['main_metrics']} metrics x 1 s, "
        f"{load['span_days']} days up to the load time); {load['rows_other_devices']:,} rows of "
        f"{load['devices'] - 1} other devices; heap {load['heap_size']}, indexes {load['index_size']}.",
        f"Sequential: {args.requests} requests after {args.warmup} warm-up, one keep-alive connection. "
        f"Concurrent: {n} clients (one httpx.AsyncClient each) for {args.seconds:g} s. "
        "Aggregates: to = now, computed per request; phases: raw = rollups marked incomplete, the raw "
        "rows aggregated as before issue 12; rollups = after the backfill "
        f"({load.get('backfill_s', '-')} s). Both phases' answers for one fixed `now` were compared: equal.",
        "",
        table(load, results, n),
        "",
        "CPU during the concurrent phases (seconds of CPU over the phase; box = all cores):",
        "",
        "| query | API process | PostgreSQL | benchmark client | box busy |",
        "|---|---:|---:|---:|---:|",
        *[f"| {r['label']} ({r['phase']}) | {r['concurrent']['cpu']['api_cpu_s']} | "
          f"{r['concurrent']['cpu']['postgres_cpu_s']} | "
          f"{r['concurrent']['cpu']['client_cpu_s']} | {r['concurrent']['cpu']['box_busy_pct']}% |" for r in results],
        "",
        f"- load: {load['rows_total']:,} rows by INSERT ... SELECT generate_series in time order, unique index in "
        f"place, {load['insert_s']} s ({load['insert_rows_per_s']:,} rows/s), then VACUUM (ANALYZE) "
        f"{load['vacuum_analyze_s']} s",
        "- PostgreSQL: built by tests.harness.Stack with `stack.pg.extra_conf` replaced (no fsync=off / "
        "full_page_writes=off): " + ", ".join(f"{k}={v}" for k, v in pg_settings.items())
        + "; auto_explain preloaded, off except for the single requests of the last section",
        "- one `lms api` process (uvicorn, one worker, asyncpg pool max 10); client, API and PostgreSQL share "
        "the machine",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()),
        "",
        f"Command: `{command}` (cwd {os.getcwd()}); total time {time.monotonic() - t_all:.0f} s",
        "",
        f"### EXPLAIN (ANALYZE, BUFFERS) - SQL from {plans['source']}, parameters filled in (custom plans)",
    ]
    for name in ("latest", "aggregate_all", "aggregate_one"):
        out += ["", f"#### {name}", "", "```sql", plans[name]["sql"], "```", "", "```", plans[name]["plan"], "```"]
    out += ["", "#### aggregate_all as a generic plan (plan_cache_mode = force_generic_plan, parameters $1..$5; "
            "what a prepared statement may switch to after 5 executions)", "", "```",
            plans["aggregate_all_generic"]["plan"], "```", "",
            "### Plans of the API's own statements (auto_explain, one request each, after the measurements)"]
    for name, text in api_plans.items():
        out += ["", f"#### {name}", "", "```", text, "```"]
    print("\n".join(out), flush=True)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"api_queries-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps({"command": command, "args": vars(args), "machine": info,
                                "postgres_settings": pg_settings, "load": load, "results": results,
                                "explain": plans, "api_plans": api_plans}, indent=2, default=str))
    print(f"\nJSON: {path.relative_to(REPO)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
