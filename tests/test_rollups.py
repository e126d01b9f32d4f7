"""Rollups (issue 12): always equal to the aggregate of the raw rows.

1. Property: random readings of a few devices and metrics, published through the real broker
   and stored by the real bridge in random batches, with redeliveries (whole batches and
   duplicates inside new ones), late data, text readings, a purge and retention; for random
   buckets and ranges the endpoint's answer equals the raw aggregate computed in SQL, for
   every fn, and every rollup row equals the aggregate of its raw rows.
2. The bridge SIGKILLed mid-stream: the rollups equal the raw aggregates after the restart.
3. The backfill gives the same rollups as ingest did, also while a bridge writes late data
   into the slices it rebuilds; a database migrated with readings already in it is marked
   incomplete (raw answers) until the backfill.

Values are multiples of 1/4 (sums of them are exact in binary floating point), so avg is
compared for equality like the rest; see README "Rollups" for sums of arbitrary values.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.services.data import AGGREGATE_SQL, parse_bucket
from lms_core import migrations, rollups
from lms_core.provisioning import DeviceCredentials
from tests.harness import REPO, ApiProcess, Device, Stack, wait_until
from tests.test_api_access import User

#: Every rollup row against the aggregate of its raw rows (devices $2; all when NULL).
MISMATCH_SQL = """
    WITH raw AS (
        SELECT device_id, metric, date_bin($1::interval, time, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS bucket,
               count(*)::integer AS n, count(value)::integer AS nv, coalesce(sum(value), 0) AS sum,
               min(value) AS min, max(value) AS max, max(time) AS last_time,
               (array_agg(value ORDER BY time DESC))[1] AS last_value
        FROM readings WHERE $2::bigint[] IS NULL OR device_id = ANY ($2) GROUP BY 1, 2, 3),
    r AS (SELECT * FROM {table} WHERE $2::bigint[] IS NULL OR device_id = ANY ($2))
    SELECT device_id, metric, bucket, raw.n AS raw_n, r.n, raw.sum AS raw_sum, r.sum, raw.last_value AS raw_last,
           r.last_value
    FROM raw FULL JOIN r USING (device_id, metric, bucket)
    WHERE (raw.n, raw.nv, raw.sum, raw.min, raw.max, raw.last_time, raw.last_value)
          IS DISTINCT FROM (r.n, r.nv, r.sum, r.min, r.max, r.last_time, r.last_value)
    LIMIT 5"""


def mismatches(s: Stack, devices: list[int] | None = None) -> list[Any]:
    """Rollup rows that differ from the aggregate of their raw rows (empty: exact)."""
    out = []
    for seconds, table in ((60, "readings_1m"), (300, "readings_5m"), (3600, "readings_1h")):
        out += [(table, dict(r)) for r in s.query(MISMATCH_SQL.format(table=table), timedelta(seconds=seconds),
                                                  devices)]
    return out


def snapshot(s: Stack) -> dict[str, list[Any]]:
    return {t: [tuple(r) for r in s.query(f"SELECT * FROM {t} ORDER BY device_id, metric, bucket")]
            for t in ("readings_1m", "readings_5m", "readings_1h")}


# -- the planner, alone ---------------------------------------------------------------

_T = st.integers(0, 3 * 86400 * 1_000_000).map(
    lambda us: datetime(2026, 11, 1, tzinfo=UTC) + timedelta(microseconds=us))
_ALIGNED_T = st.integers(0, 3 * 86400 // 60).map(lambda m: datetime(2026, 11, 1, tzinfo=UTC) + timedelta(minutes=m))
_WIDTH = st.sampled_from(["1s", "37s", "1m", "90s", "2m", "5m", "7m", "15m", "1h", "2h", "1d", "61m"]).map(
    parse_bucket)


@given(start=st.one_of(_T, _ALIGNED_T), span=st.integers(1, 2 * 86400 * 1_000_000), width=_WIDTH)
@settings(max_examples=400, deadline=None)
def test_the_plan_covers_the_range_once_with_cells_inside_buckets(start: datetime, span: int,
                                                                  width: timedelta) -> None:
    end = start + timedelta(microseconds=span)
    if (end - start) / width > 20_000:
        return
    pieces = rollups.plan(start, end, width)
    assert pieces[0].start == start and pieces[-1].end == end
    for a, b in itertools.pairwise(pieces):
        assert a.end == b.start and (a.source != b.source)  # contiguous, disjoint, merged
    for p in pieces:
        if not p.source:
            continue
        r = timedelta(seconds=p.source)
        assert (p.start - rollups.ORIGIN) % r == timedelta(0) and (p.end - rollups.ORIGIN) % r == timedelta(0)
        # No bucket boundary strictly inside any cell of the piece.
        k_first = (p.start - start) // width
        k_last = (p.end - timedelta(microseconds=1) - start) // width
        for k in range(k_first + 1, k_last + 1):
            boundary = start + k * width
            assert (boundary - rollups.ORIGIN) % r == timedelta(0), (p, boundary)
    if (width % timedelta(minutes=1) == timedelta(0) and (start - rollups.ORIGIN) % timedelta(minutes=1)
            == timedelta(0) and end - start >= timedelta(minutes=2)):
        assert any(p.source for p in pieces)  # aligned buckets do use rollups


# -- 1. the property, through the real bridge and API ---------------------------------


@pytest.fixture(scope="module")
def rstack(tmp_root: Path) -> Iterator[Stack]:
    """A stack of its own: retention deletes readings of every device in its database."""
    s = Stack(tmp_root / "rollups").start()
    s.start_bridge("lms-bridge-rollups", LMS_MAX_BATCH_ENTRIES="50")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def rapi(rstack: Stack) -> ApiProcess:
    return rstack.start_api()


@pytest.fixture(scope="module")
def owner(rapi: ApiProcess) -> Iterator[User]:
    u = User(rapi, "rollups@example.com")
    yield u
    u.client.close()


METRICS = ("a", "b", "t")
_examples = iter(range(1, 10_000))


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    devices = []
    for _ in range(2):
        offsets = draw(st.lists(st.integers(0, 3 * 3600 * 1000), min_size=1, max_size=60, unique=True))
        entries = []
        for off in offsets:
            names = draw(st.lists(st.sampled_from(METRICS), min_size=1, max_size=3, unique=True))
            values: dict[str, Any] = {}
            for m in names:
                if m == "t" and draw(st.booleans()):
                    values[m] = draw(st.sampled_from(["on", "off", "x"]))  # a text reading
                else:
                    values[m] = draw(st.integers(-4000, 4000)) / 4
            entries.append({"off": off, "values": values})
        # Random batches of up to 50 entries, in random order (late data), some sent twice,
        # some carrying entries already sent (a partial redelivery).
        order = draw(st.permutations(entries))
        batches: list[list[dict[str, Any]]] = []
        i = 0
        while i < len(order):
            n = draw(st.integers(1, 25))
            batch = list(order[i:i + n])
            if i and draw(st.booleans()):
                batch += draw(st.lists(st.sampled_from(order[:i]), max_size=3))
            batches.append(batch)
            if draw(st.integers(0, 3)) == 0:
                batches.append(batch)
            i += n
        devices.append(batches)
    queries = draw(st.lists(st.tuples(
        st.one_of(st.integers(-600, 4 * 3600).map(lambda s: s * 1000),  # aligned to a second
                  st.integers(-10, 4 * 60).map(lambda m: m * 60_000),  # to a minute
                  st.integers(-3600 * 1000, 4 * 3600 * 1000)),  # anywhere
        st.integers(1, 5 * 3600),
        st.sampled_from(["1m", "5m", "15m", "1h", "2h", "90s", "37s", "7m", "1d", "10s"])), min_size=3, max_size=6))
    return {"devices": devices, "queries": queries, "purge": draw(st.booleans()),
            "shift": draw(st.integers(0, 3_599_999)),
            "retention": draw(st.one_of(st.none(), st.integers(0, 3 * 3600 * 1000)))}


def _iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def _publish(dev: Device, batches: list[list[dict[str, Any]]], base_ms: int) -> None:
    for batch in batches:
        dev.publish_wait("telemetry", json.dumps([{"ts": base_ms + e["off"], "values": e["values"]} for e in batch]))
    # Messages of one client reach the bridge in order and commit in order: once this one is
    # stored, so is everything above.
    dev.publish_wait("telemetry", json.dumps({"ts": base_ms - 1, "values": {"zz": 1}}))


@given(sc=scenarios())
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_rollup_answers_equal_raw_aggregates(rstack: Stack, owner: User, sc: dict[str, Any]) -> None:
    org = f"ro{next(_examples)}x{int(time.time()) % 100000}"
    assert owner.call("POST", "/api/v1/orgs", {"slug": org}).status_code == 201
    # About a day ago, starting anywhere within an hour: the data spans hour boundaries.
    hour = (datetime.now(UTC) - timedelta(hours=30)).replace(minute=0, second=0, microsecond=0)
    base = hour + timedelta(milliseconds=sc["shift"])
    base_ms = int(base.timestamp() * 1000)
    ids = []
    for k, batches in enumerate(sc["devices"]):
        r = owner.call("POST", f"/api/v1/orgs/{org}/devices", {"slug": f"d{k}"})
        assert r.status_code == 201, r.text
        dev = Device(rstack.mq.port, DeviceCredentials(**r.json()["credentials"]))
        assert dev.connect().value == 0
        try:
            _publish(dev, batches, base_ms)
        finally:
            dev.close()
        ids.append(rstack.scalar("SELECT d.id FROM devices d JOIN organizations o ON o.id = d.org_id "
                                 "WHERE o.slug = $1 AND d.slug = $2", org, f"d{k}"))
    for dev_id in ids:
        wait_until(lambda d=dev_id: rstack.scalar(  # type: ignore[misc]
            "SELECT count(*) FROM readings WHERE device_id = $1 AND metric = 'zz'", d) == 1, 30, "the last message")
    expected = sum(len({(e["off"], m) for b in batches for e in b for m in e["values"]}) + 1
                   for batches in sc["devices"])
    assert rstack.scalar("SELECT count(*) FROM readings WHERE device_id = ANY ($1)", ids) == expected
    assert mismatches(rstack, ids) == []

    if sc["purge"]:
        r = owner.client.delete(f"/api/v1/orgs/{org}/devices/d1", params={"purge": "true"})
        assert r.status_code == 204, r.text
        for table in ("readings", "readings_1m", "readings_5m", "readings_1h"):
            assert rstack.scalar(f"SELECT count(*) FROM {table} WHERE device_id = $1", ids[1]) == 0
    if sc["retention"] is not None:
        cutoff = base + timedelta(milliseconds=sc["retention"])
        rstack.scalar("SELECT readings_retention($1)", cutoff)
        edge = cutoff.replace(minute=0, second=0, microsecond=0)
        assert rstack.scalar("SELECT count(*) FROM readings WHERE device_id = ANY ($1) AND time < $2", ids, edge) == 0
    assert mismatches(rstack, ids) == []

    used_rollups = 0
    # Always one that rollups answer (with a raw tail: 4 h 30 s is no whole minute).
    for start_ms, span_s, bucket in [*sc["queries"], (0, 4 * 3600 + 30, "5m")]:
        t0 = hour + timedelta(milliseconds=start_ms)
        t1 = t0 + timedelta(seconds=span_s)
        width = parse_bucket(bucket)
        used_rollups += any(p.source for p in rollups.plan(t0, t1, width))
        r = owner.client.get(f"/api/v1/orgs/{org}/devices/d0/readings/aggregate",
                             params={"from": _iso(t0), "to": _iso(t1), "bucket": bucket})
        assert r.status_code == 200, r.text
        got = [(datetime.fromisoformat(b["bucket"]), b["metric"], *(b.get(f) for f in ("avg", "min", "max", "count",
                                                                                      "last"))) for b in r.json()]
        raw = [(x["bucket"], x["metric"], x["avg"], x["min"], x["max"], x["count"], x["last"])
               for x in rstack.query(AGGREGATE_SQL, ids[0], t0, t1, width, [*METRICS, "zz"])]
        assert got == raw, (t0, t1, bucket)
    assert used_rollups


# -- 2. SIGKILL mid-stream ---------------------------------------------------------


@pytest.mark.slow
def test_rollups_equal_raw_after_the_bridge_is_sigkilled_mid_stream(own_stack: Stack, unique: str) -> None:
    bridge = own_stack.start_bridge()
    per_device = 8000
    base = int(time.time() * 1000) - 6 * 3_600_000
    devs = []
    for i in range(3):
        d = Device(own_stack.mq.port, own_stack.create_device(unique, f"d{i}"), persistent=True)
        assert d.connect().value == 0
        devs.append(d)
    errors: list[BaseException] = []

    def run(d: Device) -> None:
        # 2.7 s apart: 6 hours of minutes and hours; every 7th message a text reading too.
        payloads = [json.dumps({"ts": base + n * 2700, "values": {"seq": n, **({"mode": "x"} if n % 7 == 0 else {})}})
                    .encode() for n in range(per_device)]
        try:
            d.publish_many(payloads, window=100, timeout=240)
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(d,), name=f"publisher {d.creds.username}") for d in devs]
    for t in threads:
        t.start()
    total = 3 * (per_device + -(-per_device // 7))
    count = lambda: int(own_stack.scalar("SELECT count(*) FROM readings"))  # noqa: E731
    wait_until(lambda: count() >= 2000, 60, "the first rows")
    at_fault = count()
    bridge.kill()
    bridge.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert at_fault < total - 10_000, "the kill did not hit 10,000 readings in flight"
    wait_until(lambda: count() >= total, 180, f"{total} rows", interval=0.5)
    for d in devs:
        d.close()
    assert count() == total
    assert mismatches(own_stack) == []
    hours = own_stack.scalar("SELECT count(DISTINCT bucket) FROM readings_1h")
    assert hours >= 6 and own_stack.scalar("SELECT sum(n) FROM readings_1h") == total


# -- 3. the backfill -------------------------------------------------------------------


def _backfill_cli(s: Stack, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "lms_cli.main", "rollups", "backfill", *args], env=s.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)


def test_backfill_gives_the_rollups_ingest_gave_also_while_bridges_write(rstack: Stack, unique: str) -> None:
    s = rstack
    dev = Device(s.mq.port, s.create_device(unique, "b0"))
    assert dev.connect().value == 0
    base = int(time.time() * 1000) - 20 * 3_600_000
    try:
        dev.publish_many([json.dumps({"ts": base + n * 3001, "values": {"v": (n % 37) / 4, "w": n}}).encode()
                          for n in range(6000)], window=100, timeout=120)
        dev_id = s.scalar("SELECT d.id FROM devices d JOIN organizations o ON o.id = d.org_id "
                          "WHERE o.slug = $1 AND d.slug = 'b0'", unique)
        wait_until(lambda: s.scalar("SELECT count(*) FROM readings WHERE device_id = $1", dev_id) == 12000, 60,
                   "the readings")
        assert mismatches(s) == []
        by_ingest = snapshot(s)

        # The same rollups, rebuilt from nothing.
        s.query("TRUNCATE readings_1m, readings_5m, readings_1h")
        s.query("UPDATE rollup_state SET complete_at = NULL")
        p = _backfill_cli(s, "--slice-rows", "1000")
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
        assert "pairs" in out and "done" in out, out
        assert snapshot(s) == by_ingest
        assert s.scalar("SELECT complete_at IS NOT NULL FROM rollup_state")

        # Again, while the bridge writes late readings into the very slices being rebuilt.
        s.query("TRUNCATE readings_1m, readings_5m, readings_1h")
        p = _backfill_cli(s, "--slice-rows", "300")
        late = [json.dumps({"ts": base + n * 3001 + 1500, "values": {"v": -n / 4}}).encode() for n in range(3000)]
        dev.publish_many(late, window=100, timeout=120)
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
        wait_until(lambda: s.scalar("SELECT count(*) FROM readings WHERE device_id = $1", dev_id) == 15000, 60,
                   "the late readings")
        dev.publish_wait("telemetry", json.dumps({"ts": base - 1, "values": {"zz": 1}}))
        wait_until(lambda: s.scalar("SELECT count(*) FROM readings WHERE device_id = $1", dev_id) == 15001, 30,
                   "the last message")
        assert mismatches(s) == []
    finally:
        dev.close()


def test_a_database_with_readings_gets_rollups_only_from_the_backfill(rstack: Stack, tmp_path: Path) -> None:
    url = rstack.fresh_database("rollups_upgrade")
    old = tmp_path / "migrations"
    old.mkdir()
    for f in sorted(migrations.DEFAULT_DIR.glob("*.sql")):
        if int(f.name[:4]) < 8:
            shutil.copy(f, old / f.name)

    async def run() -> tuple[bool, bool, list[Any], list[Any]]:
        conn = await asyncpg.connect(url)
        try:
            await migrations.migrate(conn, old)
            await conn.execute(
                """INSERT INTO readings (time, device_id, metric, value, text_value)
                   SELECT now() - i * interval '7 s', 1 + i % 3, 'm' || (i % 2),
                          CASE WHEN i % 5 = 0 THEN NULL ELSE (i % 41) / 4.0 END,
                          CASE WHEN i % 5 = 0 THEN 'txt' END
                   FROM generate_series(1, 20000) i""")
            await migrations.migrate(conn)
            before = await rollups.complete(conn)
            said: list[str] = []
            await rollups.backfill(conn, progress=said.append, slice_rows=2000)
            after = await rollups.complete(conn)
            wrong = []
            for seconds, table in ((60, "readings_1m"), (300, "readings_5m"), (3600, "readings_1h")):
                wrong += await conn.fetch(MISMATCH_SQL.format(table=table), timedelta(seconds=seconds), None)
            return before, after, wrong, said
        finally:
            await conn.close()

    before, after, wrong, said = asyncio.run(run())
    assert not before and after
    assert wrong == []
    assert said[0].startswith("backfill: 6 (device, metric) pairs") and "done, 20,000 readings" in said[-1]
