"""Command round trip and fleet command throughput, through the real API, broker and bridge.

usage (from the repository root):
    .venv/bin/python bench/commands.py [--devices 100] [--fleet 1000] [--single 200] [--rounds 10]

It builds its own stack in a temporary folder (PostgreSQL with durable settings, Mosquitto,
one `lms bridge`, one `lms api`), registers a user and creates organization "bench" with
--fleet devices (the first --devices of them also tagged "rt") through the REST API. A
second process runs one MQTT client per device (MQTT 3.1.1, as the firmware) that answers
every command at once with `{"status": "ok", "result": {...}}`.

Measured, from the API call to the result visible through the API:
  single   --single commands one after another, each `POST .../commands?wait=10` answered
           200 with the final state: p50 / p99 / max;
  at once  --rounds rounds of one such call per device of --devices, all at once
           (--devices in flight): p50 / p99 / max over every call;
  fleet    one fleet command to all --fleet devices (`POST /command-groups`), then the group
           summary polled every 20 ms until every command has succeeded: seconds and
           commands per second.
Everything shares this machine's cores (client, API, bridge, broker, PostgreSQL, devices).
Results are printed as Markdown and written as JSON to bench/results/.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from typing import Any

import httpx

from bench.common import BenchError, durable_stack, pct, say

ROOT = Path(__file__).resolve().parent.parent


def server_times(log: str, marks: list[float]) -> dict[str, list[float]]:
    """The API's own time per command request (its access log's ``ms``), split into the
    one-at-a-time phase (before ``marks[0]``) and the all-at-once phase: how much of the
    round trip the client's own queueing adds on a machine it shares."""
    out: dict[str, list[float]] = {"single": [], "at_once": []}
    for line in log.splitlines():
        if '"/api/v1/orgs/bench/devices/' not in line or '"method": "POST"' not in line or "/commands" not in line:
            continue
        rec = json.loads(line)
        at = datetime.fromisoformat(rec["ts"].replace("Z", "+00:00")).timestamp()
        if at < marks[0]:
            out["single"].append(rec["ms"] / 1000)
        elif at <= marks[1] + 1:
            out["at_once"].append(rec["ms"] / 1000)
    return out


# -- the devices (a process of their own) -----------------------------------------------

async def run_devices(creds_file: str, port: int) -> None:
    import paho.mqtt.client as paho

    from lms_core.mqtt import AsyncMqttClient
    from lms_core.settings import MqttUrl

    creds = json.loads(Path(creds_file).read_text())  # noqa: ASYNC240  (once, before anything runs)
    clients: list[AsyncMqttClient] = []

    def responder(prefix: str) -> Any:
        holder: list[AsyncMqttClient] = []

        def on_message(msg: paho.MQTTMessage) -> None:
            cmd = json.loads(msg.payload)
            holder[0].publish_nowait(f"{prefix}/commands/{cmd['id']}/result",
                                     json.dumps({"status": "ok", "result": {"id": cmd["id"]}}), 1)
        return holder, on_message

    for c in creds:
        holder, on_message = responder(c["topic_prefix"])
        client = AsyncMqttClient(MqttUrl("127.0.0.1", port, c["username"], c["password"], False),
                                 client_id=c["client_id"], on_message=on_message, name=c["username"])
        holder.append(client)
        await client.__aenter__()
        await client.subscribe([f"{c['topic_prefix']}/commands/+"])
        clients.append(client)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    for client in clients:
        await client.close()


# -- the measurement --------------------------------------------------------------------

async def create_devices(api: httpx.AsyncClient, n: int, rt: int) -> list[dict[str, Any]]:
    creds: list[dict[str, Any]] = [{}] * n
    sem = asyncio.Semaphore(4)

    async def one(i: int) -> None:
        async with sem:
            tags = ["fleet", "rt"] if i < rt else ["fleet"]
            r = await api.post("/api/v1/orgs/bench/devices", json={"slug": f"dev-{i:05d}", "tags": tags})
            if r.status_code != 201:
                raise BenchError(f"device creation failed: {r.status_code} {r.text}")
            creds[i] = r.json()["credentials"]
            if (i + 1) % 100 == 0:
                say(f"  {i + 1} devices")

    await asyncio.gather(*(one(i) for i in range(n)))
    return creds


async def command(api: httpx.AsyncClient, device: str) -> float:
    started = time.perf_counter()
    r = await api.post(f"/api/v1/orgs/bench/devices/{device}/commands?wait=10", json={"name": "ping"})
    took = time.perf_counter() - started
    if r.status_code != 200 or r.json()["state"] != "succeeded":
        raise BenchError(f"command not answered in time: {r.status_code} {r.text[:300]}")
    return took


async def measure(base: str, args: argparse.Namespace, port: int, tmp: Path) -> dict[str, Any]:
    # Idle connections are dropped before uvicorn's keep-alive timeout (5 s) would close them
    # under a request about to be sent on one (a reset, not an answer).
    limits = httpx.Limits(max_connections=args.devices + 10, max_keepalive_connections=args.devices + 10,
                          keepalive_expiry=2)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as api:
        r = await api.post("/api/v1/auth/register", json={"email": "bench@example.com", "password": "bench pass 123"})
        r = await api.post("/api/v1/auth/login", json={"email": "bench@example.com", "password": "bench pass 123"})
        api.cookies.clear()
        api.headers["Authorization"] = f"Bearer {r.json()['access_token']}"
        assert (await api.post("/api/v1/orgs", json={"slug": "bench"})).status_code == 201
        say(f"creating {args.fleet} devices through the API")
        creds = await create_devices(api, args.fleet, args.devices)
        creds_file = tmp / "devices.json"
        creds_file.write_text(json.dumps(creds))
        say("connecting the devices")
        argv = [sys.executable, __file__, "--run-devices", str(creds_file), "--port", str(port)]
        # Once; its pipe is read off the loop.
        devices = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT)  # noqa: ASYNC220
        try:
            assert devices.stdout is not None
            line = await asyncio.get_running_loop().run_in_executor(None, devices.stdout.readline)
            if line.strip() != b"ready":
                raise BenchError(f"the device process did not start: {line!r}")
            out: dict[str, Any] = {}
            say(f"single: {args.single} commands one after another")
            for _ in range(10):
                await command(api, "dev-00000")  # warm-up: connections, prepared statements
            single = [await command(api, f"dev-{i % args.devices:05d}") for i in range(args.single)]
            out["single"] = single
            out["marks"] = [time.time()]
            say(f"at once: {args.rounds} rounds of {args.devices} commands at once")
            together: list[float] = []
            for _ in range(args.rounds):
                together += await asyncio.gather(*(command(api, f"dev-{i:05d}") for i in range(args.devices)))
            out["at_once"] = together
            out["marks"].append(time.time())
            say(f"fleet: one command to {args.fleet} devices")
            started = time.perf_counter()
            r = await api.post("/api/v1/orgs/bench/command-groups", json={"name": "ping", "tag": "fleet"})
            if r.status_code != 202:
                raise BenchError(f"fleet command refused: {r.status_code} {r.text[:300]}")
            accepted = time.perf_counter() - started
            gid = r.json()["id"]
            while True:
                g = (await api.get(f"/api/v1/orgs/bench/command-groups/{gid}")).json()
                if g["summary"]["succeeded"] == args.fleet:
                    break
                if time.perf_counter() - started > 120:
                    raise BenchError(f"fleet command not done after 120 s: {g['summary']}")
                await asyncio.sleep(0.02)
            out["fleet_s"] = time.perf_counter() - started
            out["fleet_accepted_s"] = accepted
            return out
        finally:
            if devices.stdin is not None:
                devices.stdin.close()
            try:
                devices.wait(30)
            except subprocess.TimeoutExpired:
                devices.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=100, help="devices answering at once (round trip)")
    ap.add_argument("--fleet", type=int, default=1000, help="devices of the fleet command")
    ap.add_argument("--single", type=int, default=200, help="commands one after another")
    ap.add_argument("--rounds", type=int, default=10, help="rounds of --devices commands at once")
    ap.add_argument("--run-devices", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_devices:
        asyncio.run(run_devices(args.run_devices, args.port))
        return 0
    if not 1 <= args.devices <= args.fleet <= 100_000:
        print("bench/commands.py: need 1 <= --devices <= --fleet <= 100000", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="lms-bench-cmd-") as tmp:
        stack = durable_stack(Path(tmp) / "stack")
        try:
            say("starting PostgreSQL, Mosquitto, bridge and API")
            stack.start()
            stack.start_bridge()
            api = stack.start_api()
            out = asyncio.run(measure(api.url, args, stack.mq.port, Path(tmp)))
            out["server"] = server_times(api.log.read_text(), out["marks"])
        except BenchError as exc:
            print(f"bench/commands.py: {exc}", file=sys.stderr)
            return 1
        except Exception:
            for a in stack.apis:  # what the API said, before the folder goes
                print(a.log.read_text()[-3000:], file=sys.stderr)
            raise
        finally:
            stack.stop()

    def ms(v: float) -> str:
        return f"{v * 1000:.1f}"

    rows = [("single (one at a time)", out["single"]), (f"{args.devices} at once", out["at_once"]),
            ("single, inside the API", out["server"]["single"]),
            (f"{args.devices} at once, inside the API", out["server"]["at_once"])]
    when = f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    print(f"\n## Command round trip ({platform.node()}, {os.cpu_count()} cores, {when})\n")
    print("| calls | n | p50 ms | p99 ms | max ms |")
    print("|---|---:|---:|---:|---:|")
    for name, values in rows:
        if not values:
            continue
        print(f"| {name} | {len(values)} | {ms(statistics.median(values))} | {ms(pct(values, 99))} | "
              f"{ms(max(values))} |")
    rate = args.fleet / out["fleet_s"]
    print(f"\nFleet command to {args.fleet} devices: all succeeded after {out['fleet_s']:.2f} s "
          f"({rate:,.0f} commands/s; the POST answered after {out['fleet_accepted_s']:.2f} s).")
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    path = results / f"commands-{datetime.now(UTC):%Y%m%dT%H%M%S}.json"
    path.write_text(json.dumps({"args": vars(args), **out}, indent=1))
    print(f"\n(raw numbers: {path.relative_to(ROOT)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
