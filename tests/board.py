"""The firmware on CPython as a test sees a board: its own process (``firmware/host/run.py``),
its filesystem a folder, its serial console a log file."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.harness import REPO, wait_until

RUN = REPO / "firmware" / "host" / "run.py"


class Board:
    def __init__(self, root: Path, config: dict[str, Any]) -> None:
        self.dir = root
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "lms_config.json").write_text(json.dumps(config))
        self.console_path = self.dir / "console.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Board:
        with open(self.console_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, str(RUN), str(self.dir)], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self

    def power_off(self) -> None:
        """Pull the plug: no DISCONNECT, so the broker publishes the Last Will."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def console(self) -> str:
        return self.console_path.read_text(errors="replace") if self.console_path.exists() else ""

    def lines(self, prefix: str) -> list[str]:
        """Console lines after ``lms: PREFIX `` (the firmware's own log)."""
        head = f"lms: {prefix} "
        return [line[len(head):] for line in self.console().splitlines() if line.startswith(head)]

    def readings(self) -> list[dict[str, Any]]:
        """Every reading the sensor produced, as the firmware logged it: {"ts", "values"}."""
        return [json.loads(line) for line in self.lines("read")]

    def wait_console(self, text: str, timeout: float = 15, after: int = 0) -> None:
        def seen() -> bool:
            if not self.alive() and self.proc is not None:
                raise AssertionError(f"the firmware exited ({self.proc.returncode}):\n{self.console()[-3000:]}")
            return text in self.console()[after:]

        try:
            wait_until(seen, timeout, f"{text!r} on the firmware's console", interval=0.05)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the console ends with:\n{self.console()[-2000:]}") from None
