"""What the benchmark scripts share: progress lines and CPU accounting from /proc."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.harness import Stack

CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    pass


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- CPU accounting ------------------------------------------------------------------------

def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    return s[s.rfind(")") + 2:].split()  # fields from 3 (state) on


def proc_cpu(pid: int, children: bool = False) -> float:
    """CPU seconds of ``pid`` (plus its reaped children with ``children``)."""
    f = _stat(pid)
    if f is None:
        return 0.0
    ticks = int(f[11]) + int(f[12]) + ((int(f[13]) + int(f[14])) if children else 0)
    return ticks / CLK_TCK


def tree_cpu(root: int) -> float:
    """CPU seconds of a process, its reaped children and its live children (PostgreSQL)."""
    total = proc_cpu(root, children=True)
    for d in os.listdir("/proc"):
        if d.isdigit():
            f = _stat(int(d))
            if f is not None and int(f[1]) == root:
                total += proc_cpu(int(d), children=True)
    return total


def box_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    total = sum(vals[:8])
    idle = vals[3] + vals[4]
    return total - idle, total


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile ``p`` (0-100) of ``values`` (not empty)."""
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))]


def durable_stack(root: Path) -> Stack:
    """The test harness's stack (not started) with PostgreSQL on its default, durable settings
    (fsync and full_page_writes on, unlike the tests')."""
    from tests.harness import Postgres, Stack, free_port, new_password

    stack = Stack(root)
    stack.pg = Postgres(stack.root / "postgres", free_port(), new_password())
    return stack
