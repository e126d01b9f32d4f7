"""WebSocket relay benchmark: publish -> WebSocket frame latency with many connected clients
while the bridge ingests, and the API's CPU and memory per client (issue 10).

usage (from the repository root):
    .venv/bin/python bench/stream.py [--clients 100,1000] [--rate 5000] [--devices 1000] [--seconds 15]
                                     [--watch 3] [--idle 1000]

It builds its own stack in a temporary folder (PostgreSQL with durable settings, Mosquitto,
one `lms bridge`, one `lms api`), creates organization "bench" through the API and --devices
devices in it (rows written straight into the database: the load is published with the
platform's account, so no broker logins are needed), then:

  idle     --idle clients connect and each subscribes to one silent device: the API process's
           resident memory before and after, per client;
  load     for each count of --clients: the clients connect, each watching --watch devices
           (client i watches devices i*watch ... mod --devices), a publisher sends --rate
           telemetry messages per second spread evenly over all devices (the bridge ingests
           all of them), and for --seconds every frame's latency is taken from the publish
           time written in its payload to its arrival; the API process's CPU over that window.

Publisher and clients each run in a process of their own (asyncio; the `websockets`
client); everything shares this machine's cores. Results are printed as Markdown and written
as JSON to bench/results/.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import base64
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
import urllib.parse
from datetime import UTC, datetime
from typing import Any

import httpx

from bench.common import BenchError, durable_stack, pct, proc_cpu, say

ROOT = Path(__file__).resolve().parent.parent


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for {pid}")


# -- child processes ------------------------------------------------------------------

class RawWebSocket(asyncio.Protocol):
    """A minimal WebSocket client for the load phase (RFC 6455, text frames, no extensions):
    it parses the server's unmasked frames in place and answers pings, at a few µs per frame
    where the `websockets` client spends tens. The clients stand for browsers on other
    machines; on this one their CPU is taken from the API under test, so the cheaper the
    better (``--client websockets`` measures with the library instead)."""

    def __init__(self, on_text: Any) -> None:
        self.on_text = on_text
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.handshake: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.upgraded = False
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @classmethod
    async def connect(cls, url: str, token: str, on_text: Any) -> RawWebSocket:
        parts = urllib.parse.urlsplit(url)
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(lambda: cls(on_text), parts.hostname, parts.port)
        key = base64.b64encode(os.urandom(16)).decode()
        assert proto.transport is not None
        proto.transport.write(
            f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
        head = await asyncio.wait_for(proto.handshake, 60)
        if not head.startswith(b"HTTP/1.1 101"):
            raise BenchError(f"upgrade refused: {head[:200]!r}")
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(BenchError(f"connection lost during the upgrade: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def send_text(self, text: str) -> None:
        data = text.encode()
        mask = os.urandom(4)
        n = len(data)
        head = bytes([0x81, 0x80 | n]) if n < 126 else bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        assert self.transport is not None
        self.transport.write(head + mask + masked)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.upgraded = True
            self.handshake.set_result(bytes(buf[:end]))
            del buf[:end + 4]
        pos, size = 0, len(buf)
        while size - pos >= 2:
            b0, n = buf[pos], buf[pos + 1] & 0x7F
            at = pos + 2
            if n == 126:
                if size - at < 2:
                    break
                n = int.from_bytes(buf[at:at + 2], "big")
                at += 2
            elif n == 127:
                if size - at < 8:
                    break
                n = int.from_bytes(buf[at:at + 8], "big")
                at += 8
            if size - at < n:
                break
            opcode = b0 & 0x0F
            if opcode == 1:
                self.on_text(buf[at:at + n])
            elif opcode == 9:  # ping: pong with the same data (masked, as from a client)
                payload = bytes(buf[at:at + n])
                assert self.transport is not None
                self.transport.write(bytes([0x8A, 0x80 | n, 0, 0, 0, 0]) + payload)
            elif opcode == 8:
                assert self.transport is not None
                self.transport.close()
            pos = at + n
        del buf[:pos]


def run_publisher(mqtt_url: str, devices: int, rate: int, seconds: float) -> None:
    """Publish ``rate`` msg/s for ``seconds``, round-robin over the devices, QoS 0."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from lms_core.settings import MqttUrl

    url = MqttUrl.parse(mqtt_url)
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{os.getpid()}")
    client.username_pw_set(url.username, url.password)
    client.max_queued_messages_set(0)
    client.connect(url.host, url.port)
    client.loop_start()
    start = time.monotonic()
    sent = 0
    while time.monotonic() - start < seconds:
        due = int((time.monotonic() - start) * rate)
        while sent < due:
            dev = sent % devices
            client.publish(f"lms/bench/dev-{dev:05d}/telemetry",
                           json.dumps({"seq": sent, "sent": time.time()}), qos=0)
            sent += 1
        time.sleep(0.002)
    time.sleep(0.5)
    client.disconnect()
    client.loop_stop()
    print(json.dumps({"sent": sent}), flush=True)


async def run_clients(url: str, token: str, n: int, watch: int, devices: int, seconds: float, idle: bool,
                      first: int = 0, kind: str = "raw") -> None:
    """Connect ``n`` clients; print "ready"; then collect latencies for ``seconds`` (or, idle,
    wait until stdin closes)."""
    from websockets.asyncio.client import connect

    latencies: list[float] = []
    frames = 0

    def filters_of(i: int) -> list[str]:
        return ["idle/telemetry"] if idle else \
            [f"dev-{((first + i) * watch + k) % devices:05d}/telemetry" for k in range(watch)]

    async def raw_client(i: int) -> None:
        inbox: asyncio.Queue[bytes] = asyncio.Queue()
        live = False

        def on_text(frame: bytearray) -> None:
            nonlocal frames
            if not live:
                inbox.put_nowait(bytes(frame))
            elif collecting:
                k = frame.rfind(b'"sent":')
                if k >= 0 and frame.startswith(b'{"type":"message"'):
                    latencies.append(time.time() - float(frame[k + 7:frame.index(b"}", k)]))
                    frames += 1

        ws = await RawWebSocket.connect(url, token, on_text)
        try:
            await inbox.get()  # welcome
            for f in filters_of(i):
                ws.send_text(json.dumps({"type": "subscribe", "filter": f}))
                answer = json.loads(await inbox.get())
                if answer["type"] != "subscribed":
                    raise BenchError(f"subscribe refused: {answer}")
            live = True
            ready.append(i)
            await ws.closed
        finally:
            assert ws.transport is not None
            ws.transport.close()

    async def client(i: int) -> None:
        nonlocal frames
        async with connect(url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=60,
                           max_queue=None, compression=None) as ws:
            await ws.recv()  # welcome
            for f in filters_of(i):
                await ws.send(json.dumps({"type": "subscribe", "filter": f}))
                answer = json.loads(await ws.recv())
                if answer["type"] != "subscribed":
                    raise BenchError(f"subscribe refused: {answer}")
            ready.append(i)
            async for text in ws:  # until cancelled at the end
                if collecting:
                    frame = json.loads(text)
                    if frame.get("type") == "message":
                        latencies.append(time.time() - frame["payload"]["sent"])
                        frames += 1

    ready: list[int] = []
    collecting = False
    tasks = []
    for i in range(n):
        tasks.append(asyncio.create_task((raw_client if kind == "raw" else client)(i)))
        if i % 50 == 49:
            await asyncio.sleep(0.05)  # don't storm the accept queue
    while len(ready) < n:
        await asyncio.sleep(0.1)
        for t in tasks:
            if t.done() and t.exception():
                raise t.exception()  # type: ignore[misc]
    print("ready", flush=True)
    if idle:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    else:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # "go"
        collecting = True
        await asyncio.sleep(seconds)
        collecting = False
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps({"latencies": latencies, "frames": frames}), flush=True)


# -- the measurement --------------------------------------------------------------------

def spawn(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            cwd=ROOT)


def wait_ready(proc: subprocess.Popen[bytes], what: str) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != b"ready":
        raise BenchError(f"{what} did not start: {line!r}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", default="100,1000", help="client counts, comma-separated")
    ap.add_argument("--rate", type=int, default=5000, help="messages per second ingested meanwhile")
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--watch", type=int, default=3, help="devices each client watches")
    ap.add_argument("--idle", type=int, default=1000, help="idle clients for the memory measurement (0: skip)")
    ap.add_argument("--client-procs", type=int, default=2, help="processes the clients are spread over")
    ap.add_argument("--client", choices=["raw", "websockets"], default="raw",
                    help="the load clients: a minimal frame parser (default) or the `websockets` library")
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--args", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode == "publish":
        a = json.loads(args.args)
        run_publisher(a["mqtt"], a["devices"], a["rate"], a["seconds"])
        return 0
    if args.mode == "clients":
        a = json.loads(args.args)
        asyncio.run(run_clients(a["url"], a["token"], a["n"], a["watch"], a["devices"], a["seconds"], a["idle"],
                                a.get("first", 0), a.get("client", "raw")))
        return 0
    counts = [int(c) for c in args.clients.split(",") if c]

    results: dict[str, Any] = {"args": vars(args), "load": {}}
    with tempfile.TemporaryDirectory(prefix="lms-bench-stream-") as tmp:
        stack = durable_stack(Path(tmp) / "stack")
        try:
            say("starting PostgreSQL, Mosquitto, bridge and API")
            stack.start()
            stack.start_bridge()
            limit = str(max([*counts, args.idle]) + 10)
            api = stack.start_api(LMS_API_WS_MAX_CLIENTS=limit, LMS_API_WS_MAX_PER_USER=limit)
            assert api.proc is not None
            pid = api.proc.pid
            with httpx.Client(base_url=api.url, timeout=30) as http:
                http.post("/api/v1/auth/register", json={"email": "bench@example.com", "password": "bench pass 123"})
                r = http.post("/api/v1/auth/login", json={"email": "bench@example.com", "password": "bench pass 123"})
                token = r.json()["access_token"]
                http.cookies.clear()
                http.headers["Authorization"] = f"Bearer {token}"
                if http.post("/api/v1/orgs", json={"slug": "bench"}).status_code != 201:
                    raise BenchError("could not create the organization")
            stack.query("""INSERT INTO devices (org_id, slug, credential_nonce)
                           SELECT o.id, 'dev-' || lpad(i::text, 5, '0'), 'x' FROM organizations o,
                                  generate_series(0, $1 - 1) i WHERE o.slug = 'bench'""", args.devices)
            url = api.url.replace("http://", "ws://") + "/api/v1/orgs/bench/stream"
            if args.idle:
                time.sleep(1)
                before = rss_kib(pid)
                say(f"idle: {args.idle} clients")
                clients = spawn("--mode", "clients", "--args", json.dumps(
                    {"url": url, "token": token, "n": args.idle, "watch": 1, "devices": args.devices,
                     "seconds": 0, "idle": True}))
                wait_ready(clients, "the idle clients")
                time.sleep(2)
                after = rss_kib(pid)
                assert clients.stdin is not None
                clients.stdin.close()
                clients.wait(60)
                results["idle"] = {"clients": args.idle, "rss_before_kib": before, "rss_after_kib": after,
                                   "per_client_kib": (after - before) / args.idle}
            for n in counts:
                say(f"load: {n} clients watching {args.watch} devices each, {args.rate} msg/s for {args.seconds} s")
                procs = max(1, min(args.client_procs, n))
                clients_list = [spawn("--mode", "clients", "--args", json.dumps(
                    {"url": url, "token": token, "n": n // procs + (1 if k < n % procs else 0), "watch": args.watch,
                     "devices": args.devices, "seconds": args.seconds, "idle": False, "client": args.client,
                     "first": k * (n // procs) + min(k, n % procs)})) for k in range(procs)]
                for c in clients_list:
                    wait_ready(c, "the clients")
                publisher = spawn("--mode", "publish", "--args", json.dumps(
                    {"mqtt": stack.mq.service_url, "devices": args.devices, "rate": args.rate,
                     "seconds": args.seconds + 3}))
                time.sleep(2)  # the publisher reaches its rate
                cpu0, t0 = proc_cpu(pid), time.monotonic()
                ccpu0 = sum(proc_cpu(c.pid) for c in clients_list)
                for c in clients_list:
                    assert c.stdin is not None
                    c.stdin.write(b"go\n")
                    c.stdin.flush()
                out = {"latencies": [], "frames": 0}
                for c in clients_list:
                    assert c.stdout is not None
                    part = json.loads(c.stdout.readline())
                    out["latencies"] += part["latencies"]
                    out["frames"] += part["frames"]
                window = time.monotonic() - t0
                cpu = (proc_cpu(pid) - cpu0) / window
                client_cpu = (sum(proc_cpu(c.pid) for c in clients_list) - ccpu0) / window
                for c in clients_list:
                    c.wait(60)
                publisher.wait(60)
                lat = out["latencies"]
                if not lat:
                    raise BenchError("no frames arrived")
                results["load"][n] = {"frames": out["frames"], "frames_per_s": out["frames"] / args.seconds,
                                      "p50_ms": statistics.median(lat) * 1000, "p99_ms": pct(lat, 99) * 1000,
                                      "max_ms": max(lat) * 1000, "api_cpu": cpu, "api_rss_kib": rss_kib(pid),
                                      "client_cpu": client_cpu}
        except BenchError as exc:
            print(f"bench/stream.py: {exc}", file=sys.stderr)
            return 1
        finally:
            stack.stop()

    when = f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    print(f"\n## WebSocket relay ({platform.node()}, {os.cpu_count()} cores, {when}; "
          f"{args.rate} msg/s ingested meanwhile)\n")
    print(f"| clients | frames/s | p50 ms | p99 ms | max ms | API CPU (cores) | API µs/frame | API RSS MiB "
          f"| clients' CPU (cores, {args.client}) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, r in results["load"].items():
        print(f"| {n} | {r['frames_per_s']:,.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['max_ms']:.1f} | "
              f"{r['api_cpu']:.2f} | {r['api_cpu'] / r['frames_per_s'] * 1e6:.0f} | {r['api_rss_kib'] / 1024:.0f} | "
              f"{r['client_cpu']:.2f} |")
    if "idle" in results:
        i = results["idle"]
        print(f"\nIdle clients: {i['clients']} added {(i['rss_after_kib'] - i['rss_before_kib']) / 1024:.1f} MiB "
              f"to the API process ({i['per_client_kib']:.1f} KiB per client).")
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(exist_ok=True)
    path = out_dir / f"stream-{datetime.now(UTC):%Y%m%dT%H%M%S}.json"
    for r in results["load"].values():
        r.pop("latencies", None)
    path.write_text(json.dumps(results, indent=1))
    print(f"\n(raw numbers: {path.relative_to(ROOT)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
