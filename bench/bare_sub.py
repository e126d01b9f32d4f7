"""A bare paho-mqtt QoS-1 subscriber that only counts: the yardstick for bench/ingest.py.

What the bridge does minus the database: paho 2.x callback API, ``loop_forever``, MQTT
3.1.1, a persistent session (clean_session=False), a QoS-1 subscription, and
automatic acknowledgement on receipt. It does nothing with a message but count it.

usage: bare_sub.py URL CLIENT_ID FILTER TARGET [--timeout S] [--clean] [--receiver paho|asyncio|mosquitto_sub]

``--receiver asyncio`` counts through lms_core/mqtt_fast.py instead (the bridge's
``LMS_BRIDGE_RECEIVER=asyncio``), acknowledging each read's messages in one write: the
client-side limit of that path. ``--receiver mosquitto_sub`` runs Mosquitto's own client
(libmosquitto, C; ``-c -q 1 -C TARGET -F x``: a persistent session, QoS 1, acknowledged on
receipt, one byte and a newline printed per message) and counts the newlines it writes: the
field technician's tool as a yardstick. It cannot say when it connected, so ``connected``
and ``subscribed`` are given 0.5 s after it started (or at its first message, if earlier);
``first`` is the first output read.

It prints one JSON object per line on stdout (times are ``time.monotonic()``, i.e.
CLOCK_MONOTONIC, comparable with the parent process's clock):
  {"event": "connected", "t": ..., "session_present": bool}
  {"event": "subscribed", "t": ...}
  {"event": "first", "t": ...}
  {"event": "progress", "count": n, "t": ...}      about once a second while receiving
  {"event": "done", "count": n, "t": ..., "first": t_first, "cpu": process CPU s}
and exits 0 when TARGET messages were received, 1 on timeout or refusal.
With --clean it connects with clean_session=True (which deletes the stored session and
its subscriptions), disconnects and exits: the way the benchmark removes a session.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # lms_core, for --receiver asyncio
from paho.mqtt.enums import CallbackAPIVersion


def emit(**fields: object) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def count(state: dict[str, Any], target: int) -> bool:
    """Count one message (the same for both receivers): the first, progress once a second,
    and ``done`` at ``target``; returns whether this was the target-th."""
    n = state["count"] = state["count"] + 1
    if n == 1:
        now = state["first"] = time.monotonic()
        emit(event="first", t=now)
    if n % 1000 == 0:
        now = time.monotonic()
        if now >= state["next_progress"]:
            state["next_progress"] = now + 1.0
            emit(event="progress", count=n, t=now)
    if n == target:
        emit(event="done", count=n, t=time.monotonic(), first=state["first"], cpu=round(time.process_time(), 3))
        return True
    return False


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("url", help="mqtt://user:password@host:port")
    ap.add_argument("client_id")
    ap.add_argument("filter")
    ap.add_argument("target", type=int)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--clean", action="store_true")
    ap.add_argument("--receiver", choices=["paho", "asyncio", "mosquitto_sub"], default="paho")
    args = ap.parse_args()
    if args.receiver == "asyncio":
        return asyncio.run(fast(args))
    if args.receiver == "mosquitto_sub" and not args.clean and args.target > 0:
        return mosquitto_sub(args)
    u = urlsplit(args.url)

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=args.client_id, protocol=paho.MQTTv311,
                         clean_session=args.clean)
    client.username_pw_set(unquote(u.username or ""), unquote(u.password or ""))
    state = {"count": 0, "first": None, "next_progress": 0.0, "ok": False}
    target = args.target

    def on_connect(c: paho.Client, userdata: object, flags: object, reason: object, props: object) -> None:
        if reason.is_failure:  # type: ignore[attr-defined]
            emit(event="refused", reason=str(reason), t=time.monotonic())
            c.disconnect()
            return
        emit(event="connected", t=time.monotonic(), session_present=bool(flags.session_present))  # type: ignore[attr-defined]
        if args.clean:
            state["ok"] = True
            c.disconnect()
            return
        c.subscribe(args.filter, qos=1)

    def on_subscribe(c: paho.Client, userdata: object, mid: int, reasons: list, props: object) -> None:
        if any(r.is_failure for r in reasons):
            emit(event="refused", reason=str(reasons), t=time.monotonic())
            c.disconnect()
            return
        emit(event="subscribed", t=time.monotonic())
        if target <= 0:
            state["ok"] = True
            c.disconnect()

    def on_message(c: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        if count(state, target):
            state["ok"] = True
            c.disconnect()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message

    def watchdog() -> None:
        emit(event="timeout", count=state["count"], t=time.monotonic())
        client.disconnect()

    timer = threading.Timer(args.timeout, watchdog)
    timer.daemon = True
    timer.start()
    client.connect(u.hostname or "127.0.0.1", u.port or 1883, keepalive=60)
    client.loop_forever()
    timer.cancel()
    return 0 if state["ok"] else 1


async def fast(args: argparse.Namespace) -> int:
    from lms_core.mqtt_fast import FastMessage, FastMqttClient
    from lms_core.settings import MqttUrl

    target = args.target
    state = {"count": 0, "first": 0.0, "next_progress": 0.0}
    done = asyncio.Event()

    def on_message(msg: FastMessage) -> None:
        if count(state, target):
            done.set()

    client = FastMqttClient(MqttUrl.parse(args.url), client_id=args.client_id, persistent=not args.clean,
                            keepalive=60, on_message=on_message,
                            on_connect=lambda present: emit(event="connected", t=time.monotonic(),
                                                            session_present=present))
    async with client:
        if args.clean:
            return 0
        await client.subscribe([args.filter], qos=1)
        emit(event="subscribed", t=time.monotonic())
        if target <= 0:
            return 0
        try:
            await asyncio.wait_for(done.wait(), args.timeout)
        except TimeoutError:
            emit(event="timeout", count=state["count"], t=time.monotonic())
            return 1
        await client.barrier()
    return 0


def mosquitto_sub(args: argparse.Namespace) -> int:
    import os
    import select
    import subprocess

    u = urlsplit(args.url)
    cmd = ["mosquitto_sub", "-h", u.hostname or "127.0.0.1", "-p", str(u.port or 1883),
           "-u", unquote(u.username or ""), "-P", unquote(u.password or ""), "-i", args.client_id,
           "-c", "-q", "1", "-k", "60", "-t", args.filter, "-C", str(args.target), "-F", "x"]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    n, told, first = 0, False, 0.0
    next_progress = 0.0
    deadline = started + args.timeout
    while True:
        now = time.monotonic()
        if not told and (n or now - started >= 0.5):
            told = True
            emit(event="connected", t=min(now, started + 0.5), session_present=True)
            emit(event="subscribed", t=min(now, started + 0.5))
        if now > deadline:
            proc.kill()
            emit(event="timeout", count=n, t=now)
            return 1
        ready, _, _ = select.select([fd], [], [], 0.1)
        if not ready:
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        if not n:
            first = time.monotonic()
            emit(event="first", t=first)
        n += chunk.count(b"\n")
        if time.monotonic() >= next_progress:
            next_progress = time.monotonic() + 1.0
            emit(event="progress", count=n, t=time.monotonic())
    end = time.monotonic()
    rc = proc.wait()
    import resource
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0 or n < args.target:
        err = proc.stderr.read().decode(errors="replace")[-300:] if proc.stderr else ""
        emit(event="refused", reason=f"mosquitto_sub exited {rc} after {n} messages: {err}", t=end)
        return 1
    emit(event="done", count=n, t=end, first=first, cpu=round(cpu.ru_utime + cpu.ru_stime, 3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
