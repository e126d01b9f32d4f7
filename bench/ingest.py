"""Ingest benchmark: the bridge against a bare paho subscriber, on one machine.

usage (from the repository root):
    .venv/bin/python bench/ingest.py [--messages 25000] [--devices 4] [--repeat 1] [--window 500]

It builds its own stack in a temporary folder (PostgreSQL with default, durable settings
- fsync on - and Mosquitto with mosquitto/mosquitto.conf), provisions devices in org
"bench", compiles bench/pub.c (one compiled QoS-1 publisher per device, stamped 3-metric
telemetry, so one message = 3 rows) and measures, per repeat:

  bridge drain  a backlog queued by the broker while the bridge was stopped, drained by a
                freshly started bridge process (messages committed to PostgreSQL);
  bridge live   publishers and bridge running at the same time;
  bare drain    the same backlog drained by bench/bare_sub.py (paho, count only, ack on
  bare live     receipt), with the bridge's session removed so that no other group gets
                a copy of the messages.

Unless --paho-only, the bridge (rollups on) and the bare subscriber run once more on
LMS_BRIDGE_RECEIVER=asyncio (lms_core/mqtt_fast.py; bare_sub.py --receiver asyncio), and a
second table sets the two receivers side by side.

Everything (broker, database, bridge, subscriber, publishers) shares this machine's cores:
the numbers are whole-box figures. Results are printed as Markdown and written as JSON to
bench/results/. Every wait has a timeout and the stack is torn down on any exit.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import json
import os
import platform
import queue
import shlex
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from datetime import UTC, datetime
from typing import Any

from bench.common import CLK_TCK, BenchError, box_cpu, proc_cpu, say, tree_cpu
from lms_cli.localstack import find_mosquitto, find_pg_bin
from tests.harness import BridgeProcess, Stack

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
ORG = "bench"
BRIDGE_CLIENT_ID = "lms-bridge-1"
BARE_CLIENT_ID = "bench-bare"
# The same subscription as the bridge in its default (exclusive) mode, so both read the
# same deliveries from the broker.
BARE_FILTER = "lms/+/+/telemetry"
ROWS_PER_MSG = 3
#: time.time() - time.monotonic(): converts the bridge's wall-clock log stamps.
WALL_TO_MONO = time.time() - time.monotonic()


def fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:,.0f}"


class CpuMeter:
    """CPU seconds used by the broker, PostgreSQL, the bridge and the machine during a phase."""

    def __init__(self, stack: Stack, bridge: BridgeProcess | None = None) -> None:
        self.stack = stack
        self.bridge = bridge
        self.start = self._sample()
        self.t0 = time.monotonic()

    def _sample(self) -> dict[str, float]:
        s: dict[str, float] = {}
        assert self.stack.mq.proc and self.stack.pg.proc
        s["mosquitto"] = proc_cpu(self.stack.mq.proc.pid)
        s["postgres"] = tree_cpu(self.stack.pg.proc.pid)
        if self.bridge is not None and self.bridge.proc is not None and self.bridge.proc.poll() is None:
            s["bridge"] = proc_cpu(self.bridge.proc.pid)
        busy, total = box_cpu()
        s["box_busy"], s["box_total"] = busy / CLK_TCK, total / CLK_TCK
        return s

    def stop(self, bridge_started_in_phase: bool = False) -> dict[str, float]:
        end = self._sample()
        wall = time.monotonic() - self.t0
        out = {"wall_s": round(wall, 3)}
        for k in ("mosquitto", "postgres", "bridge"):
            if k in end:
                base = 0.0 if bridge_started_in_phase and k == "bridge" else self.start.get(k, 0.0)
                out[f"{k}_cpu_s"] = round(end[k] - base, 2)
        total = end["box_total"] - self.start["box_total"]
        out["box_busy_pct"] = round(100 * (end["box_busy"] - self.start["box_busy"]) / total, 1) if total else 0.0
        return out


# -- load generator ------------------------------------------------------------------------

def compile_pub(tmp: Path) -> Path:
    out = tmp / "pub"
    cmd = ["gcc", "-O2", "-o", str(out), str(BENCH / "pub.c"), "-lmosquitto", "-lpthread"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        r = None
        err = str(exc)
    if r is None or r.returncode != 0:
        detail = err if r is None else (r.stderr.strip().splitlines() or ["?"])[-1]
        print(f"cannot compile bench/pub.c ({detail}): apt-get install -y libmosquitto-dev gcc", flush=True)
        raise SystemExit(1)
    return out


class Publishers:
    """One compiled publisher process per device, each in its own waiter thread."""

    def __init__(self, pub: Path, port: int, creds: list[Any], count: int, window: int,
                 ts_starts: list[int], timeout: float, rate: float = 0) -> None:
        self.count = count
        self.timeout = timeout
        self.t0 = time.monotonic()
        self.procs: list[subprocess.Popen[str]] = []
        self.ends: list[float | None] = [None] * len(creds)
        self.outputs: list[str] = [""] * len(creds)
        self.errors: list[str] = []
        for c, ts in zip(creds, ts_starts, strict=True):
            args = [str(pub), "127.0.0.1", str(port), c.username, c.password, c.client_id,
                    f"{c.topic_prefix}/telemetry", str(count), str(window), str(ts), str(rate)]
            self.procs.append(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        self.threads = [threading.Thread(target=self._wait, args=(i,), daemon=True) for i in range(len(creds))]
        for t in self.threads:
            t.start()

    def _wait(self, i: int) -> None:
        p = self.procs[i]
        try:
            out, err = p.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            self.errors.append(f"publisher {i} timed out after {self.timeout:.0f} s")
        self.ends[i] = time.monotonic()
        self.outputs[i] = out.strip()
        if p.returncode != 0:
            self.errors.append(f"publisher {i} exited {p.returncode}: {err.strip()[-300:]}")

    @property
    def done(self) -> bool:
        return all(e is not None for e in self.ends)

    def check(self) -> None:
        if self.errors:
            raise BenchError("; ".join(self.errors))

    def wait(self) -> dict[str, Any]:
        for t in self.threads:
            t.join(self.timeout + 30)
        self.check()
        wall = max(e for e in self.ends if e is not None) - self.t0
        total = self.count * len(self.procs)
        # pub.c's own figure: from its first publish (after CONNACK) to its last PUBACK.
        own = [float(o.split()[3]) for o in self.outputs if o.startswith("published")]
        return {"messages": total, "wall_s": round(wall, 3), "msg_per_s": round(total / wall, 1),
                "slowest_publisher_s": round(max(own), 3) if own else None}

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()


# -- bare subscriber -----------------------------------------------------------------------

class BareSub:
    """bench/bare_sub.py as a child process; its JSON event lines are collected."""

    def __init__(self, url: str, client_id: str, target: int, timeout: float, clean: bool = False,
                 receiver: str = "paho") -> None:
        args = [sys.executable, str(BENCH / "bare_sub.py"), url, client_id, BARE_FILTER, str(target),
                "--timeout", str(timeout), "--receiver", receiver] + (["--clean"] if clean else [])
        self.t_start = time.monotonic()
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.timeout = timeout
        self.events: dict[str, dict[str, Any]] = {}
        self.count = 0
        self.q: queue.Queue[dict[str, Any]] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            self.events[ev["event"]] = ev
            if "count" in ev:
                self.count = ev["count"]
            self.q.put(ev)

    def wait_event(self, name: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while name not in self.events:
            if "refused" in self.events or "timeout" in self.events:
                raise BenchError(f"bare subscriber: {self.events}")
            if self.proc.poll() is not None and name not in self.events:
                self.reader.join(2)
                if name in self.events:
                    break
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise BenchError(f"bare subscriber exited {self.proc.returncode} before '{name}': {err[-500:]}")
            if time.monotonic() > deadline:
                raise BenchError(f"timed out after {timeout:.0f} s waiting for the bare subscriber's '{name}'")
            time.sleep(0.02)
        return self.events[name]

    def finish(self, timeout: float = 30) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise BenchError("bare subscriber did not exit") from None
        self.reader.join(5)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def mqtt_session(url: str, client_id: str, *, clean: bool) -> None:
    """Create (subscribe, clean=False) or delete (clean=True) a session of ``client_id``."""
    s = BareSub(url, client_id, 0, timeout=30, clean=clean)
    try:
        s.wait_event("connected" if clean else "subscribed", 30)
        s.finish()
    finally:
        s.kill()
    if s.proc.returncode != 0:
        raise BenchError(f"session {'removal' if clean else 'creation'} of {client_id} failed: {s.events}")


# -- bridge ----------------------------------------------------------------------------------

def bridge_stored(b: BridgeProcess) -> float | None:
    try:
        return b.metric("lms_bridge_messages_stored_total")
    except OSError:
        return None


def bridge_rss(b: BridgeProcess) -> dict[str, int]:
    out: dict[str, int] = {}
    if b.proc is None or b.proc.poll() is not None:
        return out
    with open(f"/proc/{b.proc.pid}/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                k, v = line.split(":")
                out[k.strip()] = int(v.split()[0])  # kB
    return out


def log_times(b: BridgeProcess, offset: int) -> dict[str, float]:
    """Monotonic times of the bridge's 'connected' and 'subscribed' log lines after ``offset``."""
    out: dict[str, float] = {}
    with open(b.log, "rb") as f:
        f.seek(offset)
        for raw in f:
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            msg = rec.get("msg", "")
            key = ("connected" if msg.startswith("bridge: connected to")
                   else "subscribed" if msg == "subscribed" else None)
            if key and key not in out:
                wall = datetime.strptime(rec["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
                out[key] = wall - WALL_TO_MONO
    return out


def wait_stored(b: BridgeProcess, target: float, timeout: float, label: str, base: float = 0.0,
                pubs: Publishers | None = None) -> dict[str, float]:
    """Poll the bridge's stored-messages counter until it reaches ``target``.

    ``base`` is the counter's value before the phase (0 for a freshly started bridge).
    Returns monotonic times of the first poll that saw a commit (and the count then) and
    of the first poll that saw ``target``. Polls every 0.05 s until the first commit, then
    every 0.5 s, and every 0.02 s near the end
    (the resolution of the end time), and prints progress every 2 s.
    """
    t0 = time.monotonic()
    deadline = t0 + timeout
    first_t = first_n = None
    next_report = t0 + 2
    while True:
        now = time.monotonic()
        assert b.proc is not None
        if b.proc.poll() is not None:
            raise BenchError(f"bridge exited with {b.proc.returncode} during {label}; log: {b.log}")
        if pubs is not None:
            pubs.check()
        n = bridge_stored(b)
        if n is not None:
            if first_t is None and n > base:
                first_t, first_n = now, n
            if n >= target:
                return {"first_t": first_t or now, "first_n": first_n or n, "last_t": now}
        if now >= next_report:
            extra = f", publishers {'done' if pubs.done else 'running'}" if pubs is not None else ""
            say(f"  {label}: stored {int(n or 0):,} / {int(target):,} messages{extra}")
            next_report = now + 2
        if now > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s in {label}: stored {n} of {target}")
        remaining = target - (n or 0)
        # Each scrape costs the bridge a little CPU (its metrics thread takes the GIL):
        # poll slowly, and fast only for the end time.
        if first_t is None:
            time.sleep(0.05)  # the start of the steady window
        else:
            time.sleep(0.02 if remaining <= max(5000, 0.05 * target) else 0.5)


# -- phases --------------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.stack = Stack(tmp / "stack")
        # Durable PostgreSQL: the harness turns fsync off for tests; the benchmark must not.
        self.stack.pg.extra_conf = {}
        self.pub: Path | None = None
        self.creds: list[Any] = []
        self.ts_base = int(time.time() * 1000) - 20 * 86400 * 1000
        self.ts_block = 0
        self.live_children: list[Any] = []
        self.rows_expected = 0

    @property
    def per_phase(self) -> int:
        return self.args.messages * self.args.devices

    def timeout_for(self, messages: int) -> float:
        return max(120.0, messages / 300)  # a 300 msg/s floor: anything slower is a failure anyway

    def ts_starts(self, count: int | None = None) -> list[int]:
        """Fresh, non-overlapping timestamp ranges of ``count`` (default ``--messages``)
        messages, one per device (1 ms per message)."""
        blocks = -(-(count or self.args.messages) // self.args.messages)
        starts = []
        for _ in self.creds:
            starts.append(self.ts_base + self.ts_block * self.args.messages)
            self.ts_block += blocks
        if starts[-1] + blocks * self.args.messages > int(time.time() * 1000) - 86400 * 1000:
            raise BenchError("timestamp ranges would leave the 20-days-ago band; use fewer messages/repeats")
        return starts

    def publish(self, label: str, count: int | None = None, rate: float = 0) -> Publishers:
        """Start one publisher per device, ``count`` messages each (default ``--messages``),
        ``rate`` msg/s in all (0: as fast as they can)."""
        assert self.pub is not None
        count = count or self.args.messages
        p = Publishers(self.pub, self.stack.mq.port, self.creds, count, self.args.window, self.ts_starts(count),
                       self.timeout_for(count * len(self.creds)), rate / len(self.creds))
        self.live_children.append(p)
        paced = f" at {rate:,.0f} msg/s in all" if rate else ""
        say(f"  {label}: {len(self.creds)} publishers x {count:,} messages started{paced}")
        return p

    def setup(self) -> None:
        say(f"stack in {self.tmp}: PostgreSQL (default settings, fsync on) + Mosquitto (mosquitto/mosquitto.conf)")
        self.stack.start()
        self.pub = compile_pub(self.tmp)
        self.creds = [self.stack.create_device(ORG, f"dev{i}") for i in range(self.args.devices)]
        say(f"provisioned {len(self.creds)} devices in org '{ORG}'; publisher compiled")

    # bridge ----------------------------------------------------------------------------

    def bridge_phases(self, rep: int, rollups: bool = True, receiver: str = "paho") -> dict[str, Any]:
        n = self.per_phase
        res: dict[str, Any] = {"rollups": rollups, "receiver": receiver}
        rep_label = f"{rep}, rollups {'on' if rollups else 'off'}, receiver {receiver}"
        say(f"[{rep_label}] bridge drain: start the bridge once (session + subscription), stop it")
        b = self.stack.start_bridge(BRIDGE_CLIENT_ID, LMS_BRIDGE_ROLLUPS="on" if rollups else "off",
                                    LMS_BRIDGE_RECEIVER=receiver)
        if b.stop() != 0:
            raise BenchError(f"bridge exited with {b.proc.returncode if b.proc else '?'} on SIGTERM")
        pubs = self.publish(f"[{rep_label}] bridge drain: backlog")
        res["drain_publishers"] = pubs.wait()
        say(f"  backlog of {n:,} messages queued in {res['drain_publishers']['wall_s']} s "
            f"({res['drain_publishers']['msg_per_s']:,.0f} msg/s); restarting the bridge")

        offset = b.log.stat().st_size
        meter = CpuMeter(self.stack, b)
        t_start = time.monotonic()
        b.start(wait=False)
        meter.bridge = b
        w = wait_stored(b, n, self.timeout_for(n), f"[{rep_label}] bridge drain")
        cpu = meter.stop(bridge_started_in_phase=True)
        lt = log_times(b, offset)
        rss_drain = bridge_rss(b)
        t_conn = lt.get("connected", t_start)
        t_last = w["last_t"]
        res["drain"] = {
            "messages": n,
            "from_process_start_s": round(t_last - t_start, 3),
            "from_mqtt_connect_s": round(t_last - t_conn, 3),
            "bridge_startup_to_connect_s": round(t_conn - t_start, 3),
            "bridge_startup_to_subscribed_s": round(lt.get("subscribed", t_conn) - t_start, 3),
            "first_commit_after_connect_s": round(w["first_t"] - t_conn, 3),
            "steady_first_to_last_commit_s": round(t_last - w["first_t"], 3),
            "msg_per_s_from_process_start": round(n / (t_last - t_start), 1),
            "msg_per_s_from_connect": round(n / (t_last - t_conn), 1),
            # None when the whole drain fell between two polls (tiny runs)
            "msg_per_s_steady": (round((n - w["first_n"]) / (t_last - w["first_t"]), 1)
                                 if t_last - w["first_t"] > 0.1 else None),
            "rss_kb": rss_drain,
            "cpu": cpu,
        }
        self.rows_expected += n * ROWS_PER_MSG
        d = res["drain"]
        say(f"  bridge drained {n:,} in {d['from_process_start_s']} s from process start "
            f"({d['msg_per_s_from_process_start']:,.0f} msg/s), {d['from_mqtt_connect_s']} s from MQTT connect "
            f"({d['msg_per_s_from_connect']:,.0f} msg/s), steady {fmt(d['msg_per_s_steady'])} msg/s; cpu {cpu}")

        say(f"[{rep_label}] bridge live: publishers and bridge together")
        base = bridge_stored(b) or 0.0
        meter = CpuMeter(self.stack, b)
        pubs = self.publish(f"[{rep_label}] bridge live")
        w = wait_stored(b, base + n, self.timeout_for(n), f"[{rep_label}] bridge live", base, pubs)
        cpu = meter.stop()
        res["live_publishers"] = pubs.wait()
        t_last = w["last_t"]
        res["live"] = {
            "messages": n,
            "publishers_start_to_last_commit_s": round(t_last - pubs.t0, 3),
            "msg_per_s": round(n / (t_last - pubs.t0), 1),
            "lag_after_publishers_done_s": round(t_last - (pubs.t0 + res["live_publishers"]["wall_s"]), 3),
            "cpu": cpu,
        }
        self.rows_expected += n * ROWS_PER_MSG
        res["bridge_rss_kb"] = bridge_rss(b)
        res["bridge_metrics"] = {k: b.metric(k) for k in (
            "lms_bridge_messages_stored_total", "lms_bridge_rows_stored_total",
            "lms_bridge_messages_quarantined_total", "lms_bridge_dedup_batches_total",
            "lms_bridge_db_errors_total", "lms_bridge_batch_messages_sum", "lms_bridge_batch_messages_count",
            "lms_bridge_flush_seconds_sum", "lms_bridge_flush_seconds_count")}
        lv = res["live"]
        say(f"  bridge live: publishers {res['live_publishers']['msg_per_s']:,.0f} msg/s, "
            f"persisted {lv['msg_per_s']:,.0f} msg/s (last commit {lv['lag_after_publishers_done_s']} s after the "
            f"last PUBACK); bridge RSS {res['bridge_rss_kb']}; cpu {cpu}")
        if b.stop() != 0:
            raise BenchError("bridge did not exit cleanly on SIGTERM")
        rows = self.stack.scalar("SELECT count(*) FROM readings")
        res["readings_rows_in_table"] = rows
        if rows != self.rows_expected:
            raise BenchError(f"readings holds {rows} rows, expected {self.rows_expected}")
        m = res["bridge_metrics"]
        if m["lms_bridge_messages_quarantined_total"] or m["lms_bridge_dedup_batches_total"]:
            say(f"  WARNING: quarantined/de-dup batches seen: {m}")
        say(f"  readings table: {rows:,} rows (as expected)")
        # Remove the bridge's session, or the broker would queue a copy of every message
        # of the bare-subscriber phases for it.
        mqtt_session(self.stack.mq.service_url, BRIDGE_CLIENT_ID, clean=True)
        return res

    # bare subscriber ------------------------------------------------------------------

    def bare_phases(self, n_rep: int, receiver: str = "paho") -> dict[str, Any]:
        n = self.per_phase
        rep = f"{n_rep}, receiver {receiver}"
        url = self.stack.mq.service_url
        res: dict[str, Any] = {}
        say(f"[{rep}] bare drain: create the subscriber's session, queue the backlog")
        mqtt_session(url, BARE_CLIENT_ID, clean=False)
        pubs = self.publish(f"[{rep}] bare drain: backlog")
        res["drain_publishers"] = pubs.wait()
        say(f"  backlog of {n:,} queued in {res['drain_publishers']['wall_s']} s "
            f"({res['drain_publishers']['msg_per_s']:,.0f} msg/s); starting the bare subscriber")
        meter = CpuMeter(self.stack)
        s = BareSub(url, BARE_CLIENT_ID, n, self.timeout_for(n), receiver=receiver)
        self.live_children.append(s)
        self._follow(s, f"[{rep}] bare drain", n)
        cpu = meter.stop()
        s.finish()
        done, first, conn = s.events["done"], s.events["first"], s.events["connected"]
        res["drain"] = {
            "messages": n,
            "from_process_start_s": round(done["t"] - s.t_start, 3),
            "from_mqtt_connect_s": round(done["t"] - conn["t"], 3),
            "startup_to_connect_s": round(conn["t"] - s.t_start, 3),
            "steady_first_to_last_s": round(done["t"] - first["t"], 3),
            "msg_per_s_from_process_start": round(n / (done["t"] - s.t_start), 1),
            "msg_per_s_from_connect": round(n / (done["t"] - conn["t"]), 1),
            "msg_per_s_steady": round((n - 1) / (done["t"] - first["t"]), 1) if done["t"] - first["t"] > 0.1 else None,
            "subscriber_cpu_s": done.get("cpu"),
            "cpu": cpu,
        }
        d = res["drain"]
        say(f"  bare drained {n:,} in {d['from_process_start_s']} s from process start "
            f"({d['msg_per_s_from_process_start']:,.0f} msg/s), from connect {d['msg_per_s_from_connect']:,.0f} msg/s, "
            f"steady {fmt(d['msg_per_s_steady'])} msg/s; cpu {cpu}")

        say(f"[{rep}] bare live: subscriber and publishers together")
        s = BareSub(url, BARE_CLIENT_ID, n, self.timeout_for(n), receiver=receiver)
        self.live_children.append(s)
        s.wait_event("subscribed", 30)
        meter = CpuMeter(self.stack)
        pubs = self.publish(f"[{rep}] bare live")
        self._follow(s, f"[{rep}] bare live", n, pubs)
        cpu = meter.stop()
        res["live_publishers"] = pubs.wait()
        s.finish()
        done = s.events["done"]
        res["live"] = {
            "messages": n,
            "publishers_start_to_last_message_s": round(done["t"] - pubs.t0, 3),
            "msg_per_s": round(n / (done["t"] - pubs.t0), 1),
            "lag_after_publishers_done_s": round(done["t"] - (pubs.t0 + res["live_publishers"]["wall_s"]), 3),
            "subscriber_cpu_s": done.get("cpu"),
            "cpu": cpu,
        }
        say(f"  bare live: publishers {res['live_publishers']['msg_per_s']:,.0f} msg/s, "
            f"received {res['live']['msg_per_s']:,.0f} msg/s; cpu {cpu}")
        mqtt_session(url, BARE_CLIENT_ID, clean=True)
        return res

    def _follow(self, s: BareSub, label: str, n: int, pubs: Publishers | None = None) -> None:
        deadline = time.monotonic() + self.timeout_for(n)
        next_report = time.monotonic() + 2
        while "done" not in s.events:
            if pubs is not None:
                pubs.check()
            if "timeout" in s.events or "refused" in s.events or s.proc.poll() is not None:
                s.reader.join(2)
                if "done" in s.events:
                    break
                raise BenchError(f"{label}: bare subscriber stopped early: {s.events}")
            now = time.monotonic()
            if now > deadline:
                raise BenchError(f"{label}: timed out with {s.count} of {n} received")
            if now >= next_report:
                extra = f", publishers {'done' if pubs.done else 'running'}" if pubs is not None else ""
                say(f"  {label}: received {s.count:,} / {n:,}{extra}")
                next_report = now + 2
            time.sleep(0.05)

    def cleanup(self) -> None:
        for c in self.live_children:
            try:
                c.kill()
            except Exception:
                pass
        try:
            self.stack.stop()
        except Exception as exc:
            say(f"cleanup: {exc}")


# -- report --------------------------------------------------------------------------------

def machine_info(stack: Stack | None) -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mosq = subprocess.run([find_mosquitto(), "-h"], capture_output=True, text=True, timeout=10).stdout
        mosq = mosq.splitlines()[0].strip() if mosq else "?"
    except Exception:
        mosq = "?"
    try:
        pg = subprocess.run([str(find_pg_bin() / "postgres"), "--version"], capture_output=True, text=True,
                            timeout=10).stdout.strip()
    except Exception:
        pg = "?"
    import paho.mqtt
    mem = "?"
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":")[1].strip()
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu_model": cpu, "memory": mem, "kernel": platform.release(),
            "python": platform.python_version(), "paho_mqtt": paho.mqtt.__version__,
            "mosquitto": mosq, "postgresql": pg}


def med(values: list[float]) -> float:
    return statistics.median(values)


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def pick(*path: str) -> float | None:
        vals = []
        for r in runs:
            v: Any = r
            for p in path:
                v = v[p]
            if v is not None:
                vals.append(float(v))
        return med(vals) if vals else None

    s: dict[str, Any] = {}
    for kind, bk in (("from_process_start", "msg_per_s_from_process_start"),
                     ("from_connect", "msg_per_s_from_connect"), ("steady", "msg_per_s_steady")):
        s[f"drain_{kind}"] = {"bridge": pick("bridge", "drain", bk), "bare": pick("bare", "drain", bk)}
    s["drain_publishers"] = {"bridge": pick("bridge", "drain_publishers", "msg_per_s"),
                             "bare": pick("bare", "drain_publishers", "msg_per_s")}
    s["live"] = {"bridge": pick("bridge", "live", "msg_per_s"), "bare": pick("bare", "live", "msg_per_s")}
    s["live_publishers"] = {"bridge": pick("bridge", "live_publishers", "msg_per_s"),
                            "bare": pick("bare", "live_publishers", "msg_per_s")}
    if all("bridge_off" in r for r in runs):
        s["rollups_off"] = {k: pick("bridge_off", *path) for k, path in (
            ("drain_from_process_start", ("drain", "msg_per_s_from_process_start")),
            ("drain_from_connect", ("drain", "msg_per_s_from_connect")),
            ("drain_steady", ("drain", "msg_per_s_steady")), ("live", ("live", "msg_per_s")))}
    if all("bridge_asyncio" in r and "bare_asyncio" in r for r in runs):
        s["asyncio"] = {c: {k: pick(c, *path) for k, path in (
            ("drain_from_process_start", ("drain", "msg_per_s_from_process_start")),
            ("drain_from_connect", ("drain", "msg_per_s_from_connect")),
            ("drain_steady", ("drain", "msg_per_s_steady")), ("live", ("live", "msg_per_s")))}
            for c in ("bridge_asyncio", "bare_asyncio", "bare_mosquitto_sub") if all(c in r for r in runs)}
        s["asyncio"]["bridge_peak_rss_kb"] = max(r["bridge_asyncio"]["bridge_rss_kb"].get("VmHWM", 0) for r in runs)
    # Where the time goes: CPU per message of each process during the drains.
    s["cpu_us_per_msg"] = {}
    for c in ("bridge", "bridge_off", "bridge_asyncio", "bare", "bare_asyncio", "bare_mosquitto_sub"):
        if not all(c in r for r in runs):
            continue
        row = {}
        for part in ("mosquitto_cpu_s", "postgres_cpu_s", "bridge_cpu_s", "box_busy_pct"):
            vals = [r[c]["drain"]["cpu"].get(part) for r in runs]
            if all(v is not None for v in vals):
                row[part] = med([float(v) / (1 if part == "box_busy_pct" else r[c]["drain"]["messages"] / 1e6)
                                 for v, r in zip(vals, runs, strict=True)])
        sub = [r[c]["drain"].get("subscriber_cpu_s") for r in runs]
        if all(v is not None for v in sub):
            row["subscriber_cpu_s"] = med([float(v) / (r[c]["drain"]["messages"] / 1e6)
                                           for v, r in zip(sub, runs, strict=True)])
        s["cpu_us_per_msg"][c] = row
    s["bridge_peak_rss_kb"] = max(r["bridge"]["bridge_rss_kb"].get("VmHWM", 0) for r in runs)
    s["bridge_drain_peak_rss_kb"] = max(r["bridge"]["drain"]["rss_kb"].get("VmHWM", 0) for r in runs)
    s["bridge_startup_to_connect_s"] = pick("bridge", "drain", "bridge_startup_to_connect_s")
    s["bare_startup_to_connect_s"] = pick("bare", "drain", "startup_to_connect_s")
    return s


def table(s: dict[str, Any], n: int, repeat: int) -> str:
    def row(phase: str, b: float | None, bare: float | None, pub_b: str, pub_bare: str) -> str:
        if b is None or bare is None:
            return f"| {phase} | n/a (run too short) | | | | {pub_b} | {pub_bare} |"
        return (f"| {phase} | {b:,.0f} | {b * ROWS_PER_MSG:,.0f} | {bare:,.0f} | {b / bare:.2f} | "
                f"{pub_b} | {pub_bare} |")

    dp = s["drain_publishers"]
    lp = s["live_publishers"]
    lines = [
        f"{n:,} messages ({n * ROWS_PER_MSG:,} rows) per phase; "
        + ("single run" if repeat == 1 else f"medians of {repeat} runs"),
        "",
        "| phase | bridge msg/s | bridge rows/s | bare subscriber msg/s | bridge/bare | publishers msg/s (bridge run) "
        "| publishers msg/s (bare run) |",
        "|---|---:|---:|---:|---:|---:|---:|",
        row("drain, from process start to last commit / last message", s["drain_from_process_start"]["bridge"],
            s["drain_from_process_start"]["bare"], f"{dp['bridge']:,.0f} (into queue)",
            f"{dp['bare']:,.0f} (into queue)"),
        row("drain, from MQTT connect", s["drain_from_connect"]["bridge"], s["drain_from_connect"]["bare"], "", ""),
        row("drain, steady (first commit / first message to last)", s["drain_steady"]["bridge"],
            s["drain_steady"]["bare"], "", ""),
        row("live, from publishers' start to last commit / last message", s["live"]["bridge"], s["live"]["bare"],
            f"{lp['bridge']:,.0f}", f"{lp['bare']:,.0f}"),
    ]
    off = s.get("rollups_off")
    if off:
        on = {"drain_from_process_start": s["drain_from_process_start"]["bridge"],
              "drain_from_connect": s["drain_from_connect"]["bridge"], "drain_steady": s["drain_steady"]["bridge"],
              "live": s["live"]["bridge"]}
        lines += ["", "The bridge with rollups on (as it ships) against LMS_BRIDGE_ROLLUPS=off, same run:", "",
                  "| phase | rollups on msg/s | rollups off msg/s | on / off |", "|---|---:|---:|---:|"]
        for k, label in (("drain_from_process_start", "drain, from process start"),
                         ("drain_from_connect", "drain, from MQTT connect"), ("drain_steady", "drain, steady"),
                         ("live", "live")):
            a, b = on[k], off[k]
            lines.append(f"| {label} | {fmt(a)} | {fmt(b)} | "
                         f"{'n/a' if a is None or b is None else f'{a / b:.3f}'} |")
    fast = s.get("asyncio")
    if fast:
        lines += ["", "The receivers (LMS_BRIDGE_RECEIVER, rollups on), same run; ratios against the bare paho "
                  "subscriber:", "",
                  "| phase | bridge paho | bridge asyncio | bare paho | bare asyncio | mosquitto_sub "
                  "| bridge paho / bare paho | bridge asyncio / bare paho | bridge asyncio / bridge paho |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for k, label in (("drain_from_process_start", "drain, from process start"),
                         ("drain_from_connect", "drain, from MQTT connect"), ("drain_steady", "drain, steady"),
                         ("live", "live")):
            bp, ba = s[k]["bridge"], fast["bridge_asyncio"][k]
            sp, sa = s[k]["bare"], fast["bare_asyncio"][k]
            ms = fast.get("bare_mosquitto_sub", {}).get(k)

            def ratio(a: float | None, b: float | None) -> str:
                return "n/a" if a is None or not b else f"{a / b:.2f}"

            lines.append(f"| {label} | {fmt(bp)} | {fmt(ba)} | {fmt(sp)} | {fmt(sa)} | {fmt(ms)} | {ratio(bp, sp)} | "
                         f"{ratio(ba, sp)} | {ratio(ba, bp)} |")
    cpu = s.get("cpu_us_per_msg")
    if cpu:
        names = {"bridge": "bridge, paho", "bridge_off": "bridge, paho, rollups off",
                 "bridge_asyncio": "bridge, asyncio",
                 "bare": "bare paho", "bare_asyncio": "bare asyncio", "bare_mosquitto_sub": "mosquitto_sub"}
        lines += ["", "Where the time goes while draining: CPU µs per message of each process (3 rows a message), "
                  "and how busy the whole box was:", "",
                  "| consumer | broker | PostgreSQL | consumer | box busy % |", "|---|---:|---:|---:|---:|"]
        for c, row in cpu.items():
            own = row.get("bridge_cpu_s", row.get("subscriber_cpu_s"))
            lines.append(f"| {names[c]} | {row.get('mosquitto_cpu_s', 0):.1f} | {row.get('postgres_cpu_s', 0):.1f} | "
                         f"{'n/a' if own is None else f'{own:.1f}'} | {row.get('box_busy_pct', 0):.0f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=25000, help="messages per device per phase (default 25000)")
    ap.add_argument("--devices", type=int, default=4, help="devices = publisher processes (default 4)")
    ap.add_argument("--repeat", type=int, default=1, help="run each phase N times, report medians (default 1)")
    ap.add_argument("--window", type=int, default=500, help="publisher in-flight window (default 500)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs) after the run")
    ap.add_argument("--rollups-only", action="store_true",
                    help="skip the bridge phases with rollups off (LMS_BRIDGE_ROLLUPS=off)")
    ap.add_argument("--paho-only", action="store_true",
                    help="skip the bridge and bare subscriber on LMS_BRIDGE_RECEIVER=asyncio (lms_core/mqtt_fast.py)")
    args = ap.parse_args()
    if args.messages < 1 or args.devices < 1 or args.repeat < 1 or args.window < 1:
        ap.error("all numbers must be positive")

    command = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    # SIGTERM/SIGHUP unwind through the finally blocks like Ctrl-C.
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)

    tmp = Path(tempfile.mkdtemp(prefix="lms-bench-"))
    bench = Bench(args, tmp)
    runs: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    t_all = time.monotonic()
    ok = False
    try:
        bench.setup()
        info = machine_info(bench.stack)
        for rep in range(1, args.repeat + 1):
            run: dict[str, Any] = {}
            # Rollups on and off back to back, in alternating order, so drift hits both alike.
            for rollups in ((True, False) if rep % 2 else (False, True))[:1 if args.rollups_only else 2]:
                run["bridge" if rollups else "bridge_off"] = bench.bridge_phases(rep, rollups)
            if not args.paho_only:
                run["bridge_asyncio"] = bench.bridge_phases(rep, True, "asyncio")
            run["bare"] = bench.bare_phases(rep)
            if not args.paho_only:
                run["bare_asyncio"] = bench.bare_phases(rep, "asyncio")
                run["bare_mosquitto_sub"] = bench.bare_phases(rep, "mosquitto_sub")
            runs.append(run)
        ok = True
    except (BenchError, AssertionError) as exc:
        say(f"FAILED: {exc}")
    except KeyboardInterrupt:
        say("interrupted")
    finally:
        say("tearing down the stack")
        bench.cleanup()
        if not ok:
            for log in sorted((tmp / "stack").glob("*.log")):
                lines = log.read_text(errors="replace").splitlines()[-8:]
                print(f"--- last lines of {log.name}:\n" + "\n".join(lines), flush=True)
        if args.keep:
            say(f"kept {tmp} (logs: {tmp / 'stack'})")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            if not ok:
                say("temporary folder removed; rerun with --keep to keep the logs")
    if not ok:
        return 1

    s = summarize(runs)
    n = bench.per_phase
    out = [
        "",
        "## Ingest benchmark",
        "",
        table(s, n, args.repeat),
        "",
        f"- bridge peak RSS (VmHWM): {s['bridge_peak_rss_kb'] / 1024:.1f} MiB over drain + live "
        f"(after drain alone: {s['bridge_drain_peak_rss_kb'] / 1024:.1f} MiB)",
        f"- bridge process start -> MQTT connected: {s['bridge_startup_to_connect_s']:.2f} s "
        f"(bare subscriber: {s['bare_startup_to_connect_s']:.2f} s)",
        *([f"- bridge on the asyncio receiver, peak RSS (VmHWM): {s['asyncio']['bridge_peak_rss_kb'] / 1024:.1f} MiB"]
          if "asyncio" in s else []),
        "- drain: backlog queued by Mosquitto for the consumer's persistent session while it was stopped; "
        "bridge = messages committed to PostgreSQL (lms_bridge_messages_stored_total, polled), "
        "bare = messages received and auto-acknowledged by bench/bare_sub.py",
        "- live: publishers' msg/s = messages / wall time from spawning them until all were PUBACKed by the broker",
        f"- {args.devices} compiled publishers (bench/pub.c, QoS 1, window {args.window}), stamped 3-metric telemetry; "
        "PostgreSQL default settings (fsync on, synchronous_commit on)",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()),
        "",
        f"Command: `{command}` (cwd {os.getcwd()}); total time {time.monotonic() - t_all:.0f} s",
    ]
    print("\n".join(out), flush=True)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"ingest-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps({"command": command, "args": vars(args), "machine": info, "summary": s,
                                "runs": runs}, indent=2))
    print(f"\nJSON: {path.relative_to(REPO)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
