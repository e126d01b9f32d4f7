"""A simulated fleet held against the real stack: ``lms simulate`` devices (the firmware's
protocol, one stamped 2-metric reading every ``--rate`` s each) for ``--minutes``, then a
broker restart.

    .venv/bin/python bench/fleet.py --devices 10000 --minutes 10        # the issue's run
    .venv/bin/python bench/fleet.py --devices 2000 --minutes 1          # a short one

It builds its own stack in a temporary folder (tests/harness.py: PostgreSQL, Mosquitto with
mosquitto/mosquitto.conf, one bridge), runs ``lms simulate`` as its own process and reports:
broker, bridge and simulator CPU (% of one core, over the hold) and RSS (at the end of the
hold, and peak), readings published (acknowledged by the broker) vs stored (must be equal),
the time for the whole fleet to connect at start, and to reconnect after the broker restart.

Open files: the broker and the simulator each hold one socket per device; this raises the
soft ``ulimit -n`` to the hard one for itself and its children (the broker included) and
refuses a fleet that cannot fit. ``mosquitto.conf`` sets no ``max_connections`` (unlimited).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import json
import re
import resource
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from typing import Any

from bench.common import BenchError, proc_cpu, say
from tests.harness import REPO, Stack

LINE = re.compile(r"connected (\d+)/(\d+) · readings (\d+) made, (\d+) acknowledged")


def rss_mib(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of ``pid`` in MiB."""
    vals: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                vals[k] = int(v.split()[0]) / 1024
    return vals.get("VmRSS", 0.0), vals.get("VmHWM", 0.0)


def provision_offline(stack: Stack, n: int) -> None:
    """The fleet's rows in the database, and its logins written into the broker's file while
    the broker is stopped: through the running dynamic-security plugin (which rewrites its
    whole file after every command) ten thousand devices would take most of an hour.
    ``lms simulate`` then finds every device and only derives their passwords again."""
    from lms_core import db
    from lms_core.broker import BrokerAdmin, add_devices_offline
    from lms_core.provisioning import Provisioner
    from lms_core.topics import TopicScheme
    from tests.harness import SECRET

    topics = TopicScheme()

    async def rows() -> list[Any]:
        async with db.create_pool(stack.pg.url, min_size=1, max_size=2) as pool, \
                BrokerAdmin(stack.mqtt_url, topics) as admin:
            await pool.execute("INSERT INTO organizations (slug, name) VALUES ('bench', 'bench') "
                               "ON CONFLICT (slug) DO NOTHING")
            prov = Provisioner(pool, admin, topics, SECRET, f"mqtt://127.0.0.1:{stack.mq.port}")
            return await prov.ensure_devices("bench", [f"sim-{i:05d}" for i in range(1, n + 1)],
                                             tags=["simulated"], in_broker=False)

    creds = asyncio.run(rows())
    stack.mq.stop()
    add_devices_offline(str(stack.mq.dynsec_path), topics,
                        [("bench", c.username.split(".", 1)[1], c.password) for c in creds])
    stack.mq.start()


class Simulator:
    """``lms simulate`` as a child process; its progress lines, timestamped, in a list."""

    def __init__(self, stack: Stack, devices: int, rate: float, connect_rate: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lms_cli.main", "simulate", "--devices", str(devices), "--rate", str(rate),
             "--org", "bench", "--progress", "0.5", "--connect-rate", str(connect_rate)],
            env=stack.env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[tuple[float, str]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip()))

    def last(self) -> tuple[int, int, int, int] | None:
        for _, line in reversed(self.lines):
            m = LINE.search(line)
            if m:
                return int(m[1]), int(m[2]), int(m[3]), int(m[4])
        return None

    def wait(self, pred: Any, timeout: float, what: str) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"the simulator exited: {[x for _, x in self.lines[-5:]]}")
            got = self.last()
            if got is not None and pred(got):
                return time.monotonic()
            time.sleep(0.1)
        raise BenchError(f"timed out waiting for {what}; last: {self.lines[-1:] if self.lines else None}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=10_000)
    p.add_argument("--minutes", type=float, default=10.0, help="how long the fleet is held (default 10)")
    p.add_argument("--rate", type=float, default=10.0, help="seconds between two readings of a device")
    p.add_argument("--connect-rate", type=float, default=2000.0, help="the simulator's connections per second")
    p.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = p.parse_args()

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.devices + 200 > hard:
        raise BenchError(f"{args.devices} devices need more than {hard} open files (ulimit -n)")

    tmp = Path(tempfile.mkdtemp(prefix="lms-fleet-"))
    stack = Stack(tmp / "stack")
    sim: Simulator | None = None
    try:
        say(f"starting a stack in {tmp}")
        stack.start()
        say(f"provisioning {args.devices} devices (database rows, then the stopped broker's file)")
        t = time.monotonic()
        provision_offline(stack, args.devices)
        say(f"provisioned in {time.monotonic() - t:.0f} s")
        bridge = stack.start_bridge()
        assert stack.mq.proc is not None and bridge.proc is not None
        say(f"connecting them ({args.connect_rate:.0f}/s at most)")
        sim = Simulator(stack, args.devices, args.rate, args.connect_rate)
        sim.wait(lambda s: s[1] == args.devices, 900, "the devices to be provisioned")
        t0 = next(t for t, line in sim.lines if "Ctrl-C stops" in line)  # connecting starts here
        t_all = sim.wait(lambda s: s[0] == args.devices, 600, "every device to connect")
        connect_s = t_all - t0
        say(f"all {args.devices} connected in {connect_s:.1f} s; holding for {args.minutes} min")

        pids = {"broker": stack.mq.proc.pid, "bridge": bridge.proc.pid, "simulator": sim.proc.pid}
        cpu0 = {k: proc_cpu(pid) for k, pid in pids.items()}
        start = time.monotonic()
        hold = args.minutes * 60
        while time.monotonic() - start < hold:
            time.sleep(min(10.0, hold - (time.monotonic() - start)))
            s = sim.last()
            say(f"{time.monotonic() - start:5.0f} s: {s[0] if s else '?'} connected, "
                f"{s[3] if s else '?'} readings acknowledged")
        wall = time.monotonic() - start
        cpu = {k: 100 * (proc_cpu(pid) - cpu0[k]) / wall for k, pid in pids.items()}
        rss = {k: rss_mib(pid) for k, pid in pids.items()}

        say("restarting the broker")
        stack.mq.stop()
        sim.wait(lambda s: s[0] < args.devices, 60, "the simulator to see the broker gone")
        restarted = time.monotonic()
        stack.mq.start()
        back = sim.wait(lambda s: s[0] == args.devices, 900, "every device to reconnect")
        reconnect_s = back - restarted
        say(f"all {args.devices} reconnected {reconnect_s:.1f} s after the broker started again")
        time.sleep(3 * args.rate)  # the outage's buffered readings flushed
        sim.proc.send_signal(signal.SIGINT)
        sim.proc.wait(60)
        final = [x for _, x in sim.lines if x.startswith("stopped:")]
        m = LINE.search(final[-1]) if final else None
        if not m:
            raise BenchError(f"no final line from the simulator: {sim.lines[-3:]}")
        made, acked = int(m[3]), int(m[4])

        def stored() -> int:
            return int(stack.scalar("SELECT count(*) FROM readings") or 0) // 2  # two metrics a reading

        deadline = time.monotonic() + 120
        while stored() < acked and time.monotonic() < deadline:
            time.sleep(1)
        result = {
            "devices": args.devices, "rate_s": args.rate, "minutes": args.minutes,
            "connect_all_s": round(connect_s, 1), "reconnect_all_s": round(reconnect_s, 1),
            "cpu_pct_of_one_core": {k: round(v, 1) for k, v in cpu.items()},
            "rss_mib": {k: round(v[0], 1) for k, v in rss.items()},
            "peak_rss_mib": {k: round(v[1], 1) for k, v in rss.items()},
            "readings_made": made, "readings_published": acked, "readings_stored": stored(),
        }
        print(json.dumps(result, indent=2))
        print("\n| part | CPU (% of a core) | RSS MiB (peak) |\n|---|---:|---:|")
        for k in pids:
            print(f"| {k} | {cpu[k]:.1f} | {rss[k][0]:.0f} ({rss[k][1]:.0f}) |")
        print(f"\npublished {acked}, stored {result['readings_stored']}; all connected in {connect_s:.1f} s, "
              f"reconnected in {reconnect_s:.1f} s after a broker restart")
        if args.out:
            args.out.write_text(json.dumps(result, indent=2))
        return 0 if result["readings_stored"] == acked else 1
    finally:
        if sim is not None and sim.proc.poll() is None:
            sim.proc.kill()
        stack.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"fleet: {exc}", file=sys.stderr)
        sys.exit(1)
