"""MicroPython's ``time`` module on CPython (the firmware imports it as ``utime``)."""

import time as _t

TICKS_PERIOD = 1 << 30  # ESP32: ticks wrap at 2**30
_MASK = TICKS_PERIOD - 1
_HALF = TICKS_PERIOD // 2

gmtime = _t.gmtime
localtime = _t.localtime
mktime = _t.mktime
time = _t.time
time_ns = _t.time_ns
sleep = _t.sleep


def ticks_ms() -> int:
    return int(_t.monotonic() * 1000) & _MASK


def ticks_us() -> int:
    return int(_t.monotonic() * 1_000_000) & _MASK


def ticks_add(ticks: int, delta: int) -> int:
    return (ticks + delta) & _MASK


def ticks_diff(a: int, b: int) -> int:
    return ((a - b + _HALF) & _MASK) - _HALF


def sleep_ms(ms: int) -> None:
    _t.sleep(max(0, ms) / 1000)


def sleep_us(us: int) -> None:
    _t.sleep(max(0, us) / 1_000_000)
