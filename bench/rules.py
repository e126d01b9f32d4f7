"""Alert-rule benchmark: the ingest drain and live rate with 0, 100 and 1,000 enabled rules,
and alert latency, in one run (issue 9).

usage (from the repository root):
    .venv/bin/python bench/rules.py [--messages 25000] [--devices 4] [--repeat 1] [--rules 0,100,1000]
                                    [--rule-metrics 30] [--probes 50] [--latency-rate MSG_PER_S]

It reuses bench/ingest.py's stack, compiled publishers and bridge phases (drain of a queued
backlog, then live). For each rule count, the rules are written straight into the database
(org "bench"), spread round-robin over ``--rule-metrics`` metric names - the benchmark
devices' three (temp, hum, bat) and made-up ones - and over the benchmark devices (one
device each), with thresholds the data never crosses: with 1,000 rules and the defaults,
each of the 4 devices' 3 metrics has about 8 rules, so every reading is evaluated and every
batch locks and writes ~100 ``rule_state`` rows. The rule cache, the metric index and the
per-batch state writes are what is measured; firing is measured by the probe.

Then, with the same rules and the benchmark devices publishing a steady load the bridge
sustains (``--latency-rate`` msg/s in all, evenly spaced; by default half the live rate
measured with the first rule count in the same repeat), a probe device crosses the
threshold of its own rule (``probe > 50``, at once) ``--probes`` times, resolving in
between, and the latency is taken from each crossing message's publish to the alert row's
``fired_evaluated_at`` (decided in the batch's transaction, committed right after) and to
the alert message on ``lms/bench/probe/alerts`` (published after the commit). A load the
bridge cannot keep up with would measure the queue behind a growing backlog, not the alert
path: the phase reports how long after the last publish the last message was stored
(``load_lag_s``), which stays small when the load was sustained.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import json
import re
import shutil
import statistics
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from bench.common import BenchError, say
from bench.ingest import RESULTS, ROWS_PER_MSG, Bench, wait_stored
from tests.harness import BridgeProcess, Device, stop_client, wait_until

ORG = "bench"
BENCH_METRICS = ("temp", "hum", "bat")


def set_rules(bench: Bench, count: int, metrics: int) -> None:
    s = bench.stack
    s.query("DELETE FROM alert_rules")
    if not count:
        return
    names = [*BENCH_METRICS, *(f"m{k}" for k in range(max(0, metrics - len(BENCH_METRICS))))]
    devices = [c.client_id.split(".", 1)[1] for c in bench.creds]
    comparisons = [">", ">=", "<", "<="]
    rows = []
    for i in range(count):
        cmp = comparisons[i % 4]
        rows.append((f"rule {i}", names[i % len(names)], cmp, 1e9 if cmp.startswith(">") else -1e9,
                     devices[(i // len(names)) % len(devices)]))
    s.query(
        """INSERT INTO alert_rules (org_id, name, kind, metric, comparison, threshold, duration_s, severity,
                                    scope_kind, scope_device_id)
           SELECT o.id, u.name, 'threshold', u.metric, u.cmp, u.thr, 60, 'warning', 'device', d.id
           FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[], $5::text[]) AS u(name, metric, cmp, thr, dev)
           JOIN organizations o ON o.slug = $6 JOIN devices d ON d.org_id = o.id AND d.slug = u.dev""",
        *[list(c) for c in zip(*rows, strict=True)], ORG)


class Probe:
    """The probe device and a subscriber on its alert topic."""

    def __init__(self, bench: Bench) -> None:
        s = bench.stack
        self.stack = s
        self.dev = Device(s.mq.port, bench.probe_creds)
        assert self.dev.connect().value == 0
        self.received: dict[int, float] = {}  # alert ts (device ms) -> wall time of the firing message
        url = s.mqtt_url
        got = threading.Event()
        c = self.sub = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-alert-watch")
        c.username_pw_set(url.username, url.password)
        c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(f"lms/{ORG}/probe/alerts", qos=1)
        c.on_subscribe = lambda cl, u, mid, rcs, p: got.set()
        c.on_message = self._on_message
        c.connect("127.0.0.1", s.mq.port)
        c.loop_start()
        if not got.wait(10):
            raise BenchError("alert subscriber: no SUBACK")

    def _on_message(self, client: Any, userdata: Any, m: paho.MQTTMessage) -> None:
        p = json.loads(m.payload)
        if p["state"] == "firing":
            self.received.setdefault(p["ts"], time.time())

    def run(self, probes: int, gap: float) -> dict[int, float]:
        """Cross ``probes`` times; returns crossing ts (ms) -> wall time of its publish."""
        sent: dict[int, float] = {}
        for _ in range(probes):
            ts = int(time.time() * 1000)
            sent[ts] = time.time()
            self.dev.publish("telemetry", json.dumps({"ts": ts, "values": {"probe": 100}}))
            time.sleep(gap)
            self.dev.publish("telemetry", json.dumps({"ts": ts + 1, "values": {"probe": 0}}))
            time.sleep(gap)
        return sent

    def close(self) -> None:
        self.dev.close()
        stop_client(self.sub)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, int(q * len(v)))] * 1000, 1)


def commit_times(b: BridgeProcess) -> dict[str, Any]:
    """The bridge's batches so far: how many, their mean write-and-commit time, and how many
    took longer than 100 ms (lms_bridge_flush_seconds) - what a slow disk adds to a latency."""
    with urllib.request.urlopen(f"http://127.0.0.1:{b.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()

    def value(series: str) -> float:
        m = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    count = value("lms_bridge_flush_seconds_count")
    return {"batches": int(count),
            "commit_mean_ms": round(1000 * value("lms_bridge_flush_seconds_sum") / count, 1) if count else None,
            "commits_over_100ms": int(count - value('lms_bridge_flush_seconds_bucket{le="0.1"}'))}


#: Between a probe's crossing and its resolving message, and between probes (seconds).
PROBE_GAP_S = 0.1
#: The load runs this long before the first probe and after the last (seconds).
LOAD_MARGIN_S = 1.0


def latency_phase(bench: Bench, label: str, probes: int, rate: float) -> dict[str, Any]:
    s = bench.stack
    rule = int(s.scalar(
        """INSERT INTO alert_rules (org_id, name, kind, metric, comparison, threshold, severity, scope_kind,
                                    scope_device_id)
           SELECT o.id, 'probe', 'threshold', 'probe', '>', 50, 'critical', 'device', d.id
           FROM organizations o JOIN devices d ON d.org_id = o.id AND d.slug = 'probe' WHERE o.slug = $1
           RETURNING id""", ORG))
    b = s.start_bridge("lms-bridge-1")
    probe = Probe(bench)
    try:
        per_device = max(1, round(rate * (probes * 2 * PROBE_GAP_S + 2 * LOAD_MARGIN_S) / len(bench.creds)))
        n = per_device * len(bench.creds)
        pubs = bench.publish(f"{label} latency: load", per_device, rate)
        time.sleep(LOAD_MARGIN_S)  # the load in its steady state before the first crossing
        sent = probe.run(probes, PROBE_GAP_S)
        w = wait_stored(b, n + 2 * probes, bench.timeout_for(n), f"{label} latency", 0.0, pubs)
        load = pubs.wait()
        bench.rows_expected += n * ROWS_PER_MSG + 2 * probes
        wait_until(lambda: len(probe.received) >= probes, 30, "the probe's alert messages")
        rows = s.query("SELECT fired_at, fired_evaluated_at FROM alerts WHERE rule_id = $1", rule)
        commits = commit_times(b)
    finally:
        probe.close()
        b.stop()
        s.bridges.remove(b)
        s.query("DELETE FROM alert_rules WHERE id = $1", rule)
    to_row = [r["fired_evaluated_at"].timestamp() - sent[int(r["fired_at"].timestamp() * 1000 + 0.5)]
              for r in rows if int(r["fired_at"].timestamp() * 1000 + 0.5) in sent]
    to_msg = [probe.received[ts] - sent[ts] for ts in sent if ts in probe.received]
    if len(rows) != probes:
        raise BenchError(f"{label}: {len(rows)} probe alerts for {probes} crossings")
    return {"probes": probes, "load_msg_per_s": round(rate), "load_published_msg_per_s": load["msg_per_s"],
            "load_lag_s": round(w["last_t"] - (pubs.t0 + load["wall_s"]), 3), **commits,
            "to_row_p50_ms": pct(to_row, 0.5), "to_row_p99_ms": pct(to_row, 0.99),
            "to_message_p50_ms": pct(to_msg, 0.5), "to_message_p99_ms": pct(to_msg, 0.99)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=25000, help="messages per device per phase (default 25000)")
    ap.add_argument("--devices", type=int, default=4, help="devices = publisher processes (default 4)")
    ap.add_argument("--repeat", type=int, default=1, help="run each configuration N times (default 1)")
    ap.add_argument("--window", type=int, default=500, help="publisher in-flight window (default 500)")
    ap.add_argument("--rules", default="0,100,1000", help="rule counts, comma-separated (default 0,100,1000)")
    ap.add_argument("--rule-metrics", type=int, default=30, help="metric names the rules spread over (default 30)")
    ap.add_argument("--probes", type=int, default=50, help="threshold crossings per latency phase (default 50)")
    ap.add_argument("--latency-rate", type=float, default=0,
                    help="msg/s of the load during the latency phase, all devices together (default: half the "
                         "live rate measured with the first rule count in the same repeat)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs) after the run")
    args = ap.parse_args()
    counts = [int(c) for c in args.rules.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="lms-bench-rules-"))
    bench = Bench(args, tmp)
    results: dict[int, list[dict[str, Any]]] = {c: [] for c in counts}
    ok = False
    try:
        bench.setup()
        bench.probe_creds = bench.stack.create_device(ORG, "probe")  # type: ignore[attr-defined]
        for rep in range(1, args.repeat + 1):
            rate = args.latency_rate
            for count in counts:  # interleaved, so that drift of the machine hits every count alike
                set_rules(bench, count, args.rule_metrics)
                say(f"[{rep}] {count} enabled rules")
                res = bench.bridge_phases(rep)
                rate = rate or round(res["live"]["msg_per_s"] / 2, -2)
                res["latency"] = latency_phase(bench, f"[{rep}] {count} rules", args.probes, rate)
                say(f"  latency: {res['latency']}")
                results[count].append(res)
        ok = True
    except (BenchError, AssertionError) as exc:
        say(f"FAILED: {exc}")
    except KeyboardInterrupt:
        say("interrupted")
    finally:
        bench.cleanup()
        if args.keep:
            say(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if not ok:
        return 1

    def med(count: int, *path: str) -> float | None:
        vals = []
        for r in results[count]:
            v: Any = r
            for p in path:
                v = v.get(p) if isinstance(v, dict) else None
            if v is not None:
                vals.append(float(v))
        return round(statistics.median(vals), 1) if vals else None

    base_drain, base_live = med(counts[0], "drain", "msg_per_s_from_connect"), med(counts[0], "live", "msg_per_s")
    lines = ["", "## Rules benchmark", "",
             "| enabled rules | drain msg/s | vs first | live msg/s | vs first | latency load msg/s "
             "| alert row p50 / p99 ms | alert message p50 / p99 ms |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in counts:
        d, lv = med(c, "drain", "msg_per_s_from_connect"), med(c, "live", "msg_per_s")
        lines.append(
            f"| {c:,} | {d or 0:,.0f} | {(d or 0) / (base_drain or 1):.2f} | {lv or 0:,.0f} | "
            f"{(lv or 0) / (base_live or 1):.2f} | {med(c, 'latency', 'load_msg_per_s') or 0:,.0f} | "
            f"{med(c, 'latency', 'to_row_p50_ms')} / "
            f"{med(c, 'latency', 'to_row_p99_ms')} | {med(c, 'latency', 'to_message_p50_ms')} / "
            f"{med(c, 'latency', 'to_message_p99_ms')} |")
    lines += ["", f"{args.devices} devices x {args.messages:,} messages per phase, medians of {args.repeat}; "
              f"rules over {args.rule_metrics} metric names, one device each; latency: {args.probes} crossings "
              f"per phase under the steady load shown"]
    print("\n".join(lines), flush=True)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"rules-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps({"args": vars(args), "results": results}, indent=2, default=str))
    print(f"\nJSON: {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
