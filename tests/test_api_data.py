"""Data through the API: telemetry published to the real broker, stored by the real bridge,
read back as raw pages, buckets, latest values, events, exports and the quarantine."""

from __future__ import annotations

import base64
import csv
import io
import json
import statistics
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from lms_core.provisioning import DeviceCredentials
from tests.harness import ApiProcess, Device, Stack, wait_until
from tests.test_api_access import User

N = 360  # one reading of temp and hum every 10 s for an hour, plus a text metric every minute


@pytest.fixture(scope="module")
def fed(api: ApiProcess, stack: Stack) -> Iterator[dict[str, Any]]:
    org = f"data{int(time.time())}"
    owner = User(api, f"{org}@example.com")
    assert owner.call("POST", "/api/v1/orgs", {"slug": org}).status_code == 201
    creds = DeviceCredentials(**owner.call("POST", f"/api/v1/orgs/{org}/devices", {"slug": "s1"}).json()["credentials"])
    dev = Device(stack.mq.port, creds)
    assert dev.connect().value == 0
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    t0 = int(start.timestamp() * 1000)
    entries = []
    for i in range(N):
        values: dict[str, Any] = {"temp": 20 + (i % 7) * 0.5, "hum": 40 + i % 11}
        if i % 6 == 0:
            values["mode"] = f"m{i // 6 % 3}"
        entries.append({"ts": t0 + i * 10_000, "values": values})
    for i in range(0, N, 50):  # the shared bridge takes batches of up to 50 entries
        dev.publish_wait("telemetry", json.dumps(entries[i:i + 50]))
    dev.publish_wait("events", json.dumps({"type": "boot", "ts": t0 + 5, "data": {"fw": "1.0"}}))
    dev.publish_wait("events", json.dumps({"type": "door", "ts": t0 + 60_000}))
    dev.publish_wait("telemetry", b"garbage")
    total = 2 * N + N // 6
    wait_until(lambda: stack.scalar("SELECT count(*) FROM readings r JOIN devices d ON d.id = r.device_id "
                                    "JOIN organizations o ON o.id = d.org_id WHERE o.slug = $1", org) == total,
               20, "the readings")
    dev.close()
    yield {"org": org, "owner": owner, "entries": entries, "start": start, "total": total,
            "base": f"/api/v1/orgs/{org}/devices/s1"}
    owner.client.close()


def _iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def test_raw_readings_page_by_cursor_without_gaps_or_repeats(fed: dict[str, Any]) -> None:
    owner, base = fed["owner"], fed["base"]
    window = {"from": _iso(fed["start"] - timedelta(minutes=1)), "to": _iso(fed["start"] + timedelta(hours=2))}
    seen: list[tuple[str, str]] = []
    cursor = None
    pages = 0
    while True:
        params = {**window, "limit": 97, **({"cursor": cursor} if cursor else {})}
        r = owner.client.get(base + "/readings", params=params)
        assert r.status_code == 200, r.text
        page = r.json()
        seen += [(i["time"], i["metric"]) for i in page["items"]]
        pages += 1
        cursor = page["next"]
        if not cursor:
            break
    assert len(seen) == fed["total"] == len(set(seen))
    assert seen == sorted(seen, key=lambda x: (datetime.fromisoformat(x[0]), x[1]))
    assert pages == -(-fed["total"] // 97)
    only = owner.client.get(base + "/readings", params={**window, "metric": ["mode"], "limit": 1000}).json()
    assert {i["metric"] for i in only["items"]} == {"mode"} and len(only["items"]) == N // 6
    assert only["items"][0]["text"] == "m0" and only["items"][0]["value"] is None


def test_buckets_match_the_raw_data(fed: dict[str, Any]) -> None:
    owner, base, start = fed["owner"], fed["base"], fed["start"]
    r = owner.client.get(base + "/readings/aggregate", params={
        "from": _iso(start), "to": _iso(start + timedelta(hours=1)), "bucket": "5m", "metric": ["temp"]})
    assert r.status_code == 200, r.text
    buckets = r.json()
    assert len(buckets) == 12
    for k, b in enumerate(buckets):
        vals = [e["values"]["temp"] for e in fed["entries"][k * 30:(k + 1) * 30]]
        assert datetime.fromisoformat(b["bucket"]) == start + timedelta(minutes=5 * k)
        assert b["count"] == 30 and b["min"] == min(vals) and b["max"] == max(vals) and b["last"] == vals[-1]
        assert b["avg"] == pytest.approx(statistics.fmean(vals))
    only = owner.client.get(base + "/readings/aggregate", params={
        "from": _iso(start), "to": _iso(start + timedelta(hours=1)), "bucket": "1h", "fn": ["count"]}).json()
    assert {b["metric"]: b["count"] for b in only} == {"temp": N, "hum": N, "mode": N // 6}
    assert set(only[0]) == {"bucket", "metric", "count"}


def test_latest_value_of_each_metric(fed: dict[str, Any]) -> None:
    latest = {r["metric"]: r for r in fed["owner"].client.get(fed["base"] + "/latest").json()}
    last = fed["entries"][-1]
    assert set(latest) == {"temp", "hum", "mode"}
    assert latest["temp"]["value"] == last["values"]["temp"]
    assert datetime.fromisoformat(latest["temp"]["time"]).timestamp() * 1000 == last["ts"]
    assert latest["mode"]["text"] == fed["entries"][(N - 1) // 6 * 6]["values"]["mode"]


def test_events_and_quarantine(fed: dict[str, Any]) -> None:
    owner, org = fed["owner"], fed["org"]
    params = {"from": _iso(fed["start"] - timedelta(minutes=1))}
    events = owner.client.get(fed["base"] + "/events", params=params).json()
    assert [(e["type"], e["data"]) for e in events["items"]] == [("boot", {"fw": "1.0"}), ("door", {})]
    assert owner.client.get(fed["base"] + "/events", params={**params, "type": "door"}).json()["items"][0][
        "type"] == "door"
    q = owner.client.get(f"/api/v1/orgs/{org}/quarantine").json()
    assert q["items"][0]["device"] == "s1" and "not valid JSON" in q["items"][0]["reason"]
    assert base64.b64decode(q["items"][0]["payload"]) == b"garbage"


def test_exports_stream_every_row(fed: dict[str, Any]) -> None:
    owner, base = fed["owner"], fed["base"]
    window = {"from": _iso(fed["start"] - timedelta(minutes=1))}
    with owner.client.stream("GET", base + "/export", params=window) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
        assert "attachment" in r.headers["content-disposition"]
        text = b"".join(r.iter_bytes()).decode()
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["time", "metric", "value", "text"] and len(rows) == fed["total"] + 1
    lines = owner.client.get(base + "/export", params={**window, "format": "json", "metric": ["hum"]}).text
    parsed = [json.loads(x) for x in lines.splitlines()]
    assert len(parsed) == N and {p["metric"] for p in parsed} == {"hum"}


@pytest.mark.parametrize("path, params, message", [
    ("/readings/aggregate", {"bucket": "7x"}, "bucket must look like"),
    ("/readings/aggregate", {"bucket": "2d"}, "between 1s and 1d"),
    ("/readings/aggregate", {"bucket": "1s", "from": "2026-01-01T00:00:00Z", "to": "2026-03-01T00:00:00Z"},
     "more than"),
    ("/readings/aggregate", {"fn": ["median"]}, "unknown aggregate"),
    ("/readings", {"from": "2026-02-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, "before"),
    ("/readings", {"from": "2020-01-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, "at most"),
    ("/readings", {"cursor": "garbage!"}, "cursor"),
    ("/readings", {"limit": "0"}, ""),
    ("/readings", {"from": "yesterday"}, ""),
    ("/export", {"format": "xml"}, ""),
])
def test_bad_queries_are_4xx_with_a_reason(fed: dict[str, Any], path: str, params: dict[str, Any],
                                          message: str) -> None:
    r = fed["owner"].client.get(fed["base"] + path, params=params)
    assert r.status_code in (400, 422), r.text
    assert message in r.json()["error"]["message"] + json.dumps(r.json()["error"].get("details", ""))


def test_unknown_device_is_404(fed: dict[str, Any]) -> None:
    r = fed["owner"].client.get(f"/api/v1/orgs/{fed['org']}/devices/nope/latest")
    assert r.status_code == 404 and "device" in r.json()["error"]["message"]
