"""What one received message's record costs: construction in the MQTT callback plus the
field reads of the store and the flusher, for each candidate type of ``bridge.store.Message``.

usage (from the repository root):
    .venv/bin/python bench/record_cost.py [--messages 200000] [--batch 500] [--repeat 7]

Each candidate runs the bridge's pattern: the callback builds one record per message from
a paho-like message object and appends it to the buffer; every ``--batch`` records the
store reads topic, payload, time and retained flag of each, the flusher reads packet id and
connection generation of each, and the batch is dropped. The garbage collector stays on:
a record type the collector tracks makes it walk the buffer while it fills. Printed: the
best of ``--repeat`` runs, in nanoseconds per message, and relative to a plain tuple (the
6-tuple read by position the bridge used before).
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import msgspec


class FakeMessage:
    """The attributes of ``paho.mqtt.client.MQTTMessage`` the callback reads."""

    __slots__ = ("mid", "payload", "qos", "retain", "topic")

    def __init__(self, i: int) -> None:
        self.topic = f"lms/bench/dev{i % 4}/telemetry"
        self.payload = b'{"ts": 1732550000123, "values": {"temp": 21.5, "hum": 40, "seq": %d}}' % i
        self.mid = i % 65535 + 1
        self.qos = 1
        self.retain = False


class NT(NamedTuple):
    topic: str
    payload: bytes
    mid: int
    generation: int
    received_at: float
    retained: bool


class StructGc(msgspec.Struct):
    topic: str
    payload: bytes
    mid: int
    generation: int
    received_at: float
    retained: bool


class StructNoGc(msgspec.Struct, gc=False):
    topic: str
    payload: bytes
    mid: int
    generation: int
    received_at: float
    retained: bool


class StructNoGcFrozen(msgspec.Struct, gc=False, frozen=True):
    topic: str
    payload: bytes
    mid: int
    generation: int
    received_at: float
    retained: bool


class StructNoGcArray(msgspec.Struct, gc=False, array_like=True):
    topic: str
    payload: bytes
    mid: int
    generation: int
    received_at: float
    retained: bool


class Slots:
    __slots__ = ("generation", "mid", "payload", "received_at", "retained", "topic")

    def __init__(self, topic: str, payload: bytes, mid: int, generation: int, received_at: float,
                 retained: bool) -> None:
        self.topic = topic
        self.payload = payload
        self.mid = mid
        self.generation = generation
        self.received_at = received_at
        self.retained = retained


@dataclass(slots=True)
class DataSlots:
    topic: str
    payload: bytes
    mid: int
    generation: int
    received_at: float
    retained: bool


def run_tuple(msgs: list[FakeMessage], batch: int) -> float:
    buf: list[tuple[str, bytes, int, int, float, bool]] = []
    gen = 1
    sink = 0
    now = time.time
    t0 = time.perf_counter_ns()
    for msg in msgs:
        buf.append((msg.topic, msg.payload, msg.mid if msg.qos else 0, gen, now(), bool(msg.retain)))
        if len(buf) >= batch:
            for topic, payload, _mid, _gen, at, retained in buf:
                sink += len(topic) + len(payload) + int(at) + retained
            sink += len([m[2] for m in buf if m[3] == gen and m[2]])
            buf = []
    return (time.perf_counter_ns() - t0) / len(msgs) + 0 * sink


def run_attrs(cls: Callable[..., object]) -> Callable[[list[FakeMessage], int], float]:
    def run(msgs: list[FakeMessage], batch: int) -> float:
        buf: list = []
        gen = 1
        sink = 0
        now = time.time
        t0 = time.perf_counter_ns()
        for msg in msgs:
            buf.append(cls(msg.topic, msg.payload, msg.mid if msg.qos else 0, gen, now(), bool(msg.retain)))
            if len(buf) >= batch:
                for m in buf:
                    sink += len(m.topic) + len(m.payload) + int(m.received_at) + m.retained
                sink += len([m.mid for m in buf if m.generation == gen and m.mid])
                buf = []
        return (time.perf_counter_ns() - t0) / len(msgs) + 0 * sink
    return run


CANDIDATES: dict[str, Callable[[list[FakeMessage], int], float]] = {
    "tuple (read by position)": run_tuple,
    "NamedTuple": run_attrs(NT),
    "msgspec.Struct": run_attrs(StructGc),
    "msgspec.Struct gc=False": run_attrs(StructNoGc),
    "msgspec.Struct gc=False frozen": run_attrs(StructNoGcFrozen),
    "msgspec.Struct gc=False array_like": run_attrs(StructNoGcArray),
    "class with __slots__": run_attrs(Slots),
    "dataclass(slots=True)": run_attrs(DataSlots),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=500, help="records per batch (LMS_BRIDGE_BATCH_SIZE)")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    msgs = [FakeMessage(i) for i in range(args.messages)]
    best: dict[str, float] = {}
    for _ in range(args.repeat):  # interleaved, so a noisy moment hurts every candidate alike
        for name, fn in CANDIDATES.items():
            gc.collect()
            ns = fn(msgs, args.batch)
            best[name] = min(best.get(name, ns), ns)
    base = best["tuple (read by position)"]
    print(f"{args.messages:,} messages, batches of {args.batch}, best of {args.repeat}; "
          "ns per message (construct + append + field reads)")
    print("| record type | ns/message | vs tuple |")
    print("|---|---:|---:|")
    for name, ns in best.items():
        print(f"| {name} | {ns:.0f} | {ns / base:.2f} |")


if __name__ == "__main__":
    main()
