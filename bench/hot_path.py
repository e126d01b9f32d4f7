"""The bridge's Python work per message, without broker or database: the MQTT callback
(``Ingest._on_message``) and the decoding of a batch into rows (``Store.build``).

usage (from the repository root):
    .venv/bin/python bench/hot_path.py [--messages 2000] [--repeat 40] [REPO ...]

Each REPO (default: this checkout) is measured in a process of its own with its own
``bridge`` and ``lms_core`` imported, so two checkouts - before and after a change - can be
compared on the same machine at the same moment; run them interleaved and more than once,
the machine's load moves the numbers more than small changes do. The messages are real
``paho`` messages (4 devices, stamped 3-metric telemetry, QoS 1), the batch is the size of
LMS_BRIDGE_BATCH_SIZE's default; printed is the best of ``--repeat`` runs in ns/message.
bench/ingest.py measures the whole path (paho's parser and PostgreSQL's COPY dominate it).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def measure(messages: int, repeat: int) -> tuple[float, float]:
    import paho.mqtt.client as paho

    from bridge.decode import TelemetryDecoder
    from bridge.metrics import BridgeMetrics
    from bridge.store import Store
    from bridge.subscribe import Ingest
    from lms_core.settings import Settings
    from lms_core.topics import TopicScheme

    settings = Settings.from_env({"LMS_SECRET_KEY": "bench-" * 8, "LMS_DATABASE_URL": "postgresql://u:p@127.0.0.1/db",
                                  "LMS_MQTT_URL": "mqtt://u:p@127.0.0.1:1883"})
    metrics = BridgeMetrics()
    store = Store(None, TelemetryDecoder(settings.limits), TopicScheme(settings.topic_root), metrics)
    ingest = Ingest(settings, store, metrics)  # not entered: nothing connects
    for d in range(4):
        store._devices[("bench", f"dev{d}")] = d + 1  # as if resolved from the database
    base = int(time.time() * 1000)
    msgs = []
    for i in range(messages):
        m = paho.MQTTMessage(i % 65535 + 1, f"{settings.topic_root}/bench/dev{i % 4}/telemetry".encode())
        m.payload = b'{"ts": %d, "values": {"temp": 21.5, "hum": 40, "seq": %d}}' % (base + i, i)
        m.qos = 1
        msgs.append(m)
    best_cb = best_build = float("inf")
    for _ in range(repeat):
        ingest.buffer.clear()
        t0 = time.perf_counter_ns()
        for m in msgs:
            ingest._on_message(m)
        t1 = time.perf_counter_ns()
        batch = store.build(ingest.buffer)
        t2 = time.perf_counter_ns()
        assert len(batch.readings) == 3 * messages, "every message must become its rows"
        best_cb = min(best_cb, (t1 - t0) / messages)
        best_build = min(best_build, (t2 - t1) / messages)
    return best_cb, best_build


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=40)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("repos", nargs="*", type=Path)
    args = ap.parse_args()
    if args.child:
        cb, build = measure(args.messages, args.repeat)
        print(f"{cb:.0f} {build:.0f}")
        return
    print("| checkout | callback ns/msg | build ns/msg | total ns/msg |")
    print("|---|---:|---:|---:|")
    for repo in args.repos or [REPO]:
        repo = repo.resolve()
        # A process per checkout: its own modules; the checkout first on the path.
        out = subprocess.run([sys.executable, "-c", "import runpy, sys; sys.path.insert(0, sys.argv[1]); "
                              "sys.argv = [sys.argv[2], '--child', *sys.argv[3:]]; "
                              "runpy.run_path(sys.argv[0], run_name='__main__')",
                              str(repo), __file__, "--messages", str(args.messages), "--repeat", str(args.repeat)],
                             cwd=repo, capture_output=True, text=True, check=True).stdout.split()
        cb, build = float(out[0]), float(out[1])
        print(f"| {repo} | {cb:.0f} | {build:.0f} | {cb + build:.0f} |")


if __name__ == "__main__":
    main()
