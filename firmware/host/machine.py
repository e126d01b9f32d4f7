"""MicroPython's ``machine`` on CPython: what the firmware touches, behaving as on a board."""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

#: How to start this board again (set by run.py): a reset re-executes the runner, so RAM
#: is cleared and the board's files stay, as on an ESP32.
RESTART: list[str] | None = None


def reset() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    if RESTART is None:
        raise SystemExit("machine.reset() outside run.py")
    os.execv(RESTART[0], RESTART)


def soft_reset() -> None:
    reset()


def unique_id() -> bytes:
    return os.uname().nodename.encode()[:6].ljust(6, b"\0")


def freq() -> int:
    return 240_000_000


def reset_cause() -> int:
    return 1  # PWRON_RESET


class Pin:
    IN = 1
    OUT = 3
    PULL_UP = 1
    PULL_DOWN = 2

    def __init__(self, pin: int, mode: int = -1, pull: int = -1, value: int | None = None) -> None:
        self.id = pin
        self._value = value or 0

    def value(self, v: int | None = None) -> int | None:
        if v is None:
            return self._value
        self._value = 1 if v else 0
        return None

    def on(self) -> None:
        self._value = 1

    def off(self) -> None:
        self._value = 0


class I2C:
    """A bus with nothing on it: every device access fails with ENODEV, as on a board
    whose sensor is not wired."""

    def __init__(self, bus: int = 0, *, scl: Any = None, sda: Any = None, freq: int = 400_000) -> None:
        self.bus = bus

    def scan(self) -> list[int]:
        return []

    def readfrom_mem(self, addr: int, reg: int, n: int) -> bytes:
        raise OSError(19, "ENODEV")

    def writeto_mem(self, addr: int, reg: int, data: bytes) -> None:
        raise OSError(19, "ENODEV")


class WDT:
    """The hardware watchdog: once started it cannot be stopped, and a loop that does not
    feed it within ``timeout`` ms resets the board."""

    def __init__(self, id: int = 0, timeout: int = 5000) -> None:
        self.timeout = timeout / 1000
        self.fed = time.monotonic()
        threading.Thread(target=self._watch, name="wdt", daemon=True).start()

    def feed(self) -> None:
        self.fed = time.monotonic()

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout / 4))
            if time.monotonic() - self.fed > self.timeout:
                print("WDT: not fed for %.1f s: reset" % (time.monotonic() - self.fed), flush=True)
                reset()
