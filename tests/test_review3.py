"""Review 3: the firmware, the simulator, the demo and the dashboard, attacked (issues 11, 13).

Each test is what a hostile platform message, broker or file system did to the code as
reviewed, against real processes (the firmware on CPython in its own process, the real
stack, the real `lms` command line); the TCP peer of the framing test is a hostile broker
written for it, which is the fault being injected."""

from __future__ import annotations

import json
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import REPO, ApiProcess, Stack, wait_until
from tests.test_api_commands import Org
from tests.test_firmware import cli, platform_publish, rest_board

FIRMWARE = REPO / "firmware"


@pytest.fixture
def org(api: ApiProcess, stack: Stack, unique: str) -> Iterator[Org]:
    o = Org(api, stack, unique)
    yield o
    o.close()


# -- firmware: a desired config larger than the device takes ------------------------------

def test_a_desired_config_too_large_for_the_device_does_not_clear_the_one_in_force(
        org: Org, stack: Stack, tmp_root: Path) -> None:
    """The client hands an oversized message to the firmware as ``None``; the config parser
    read that as "the retained config was cleared" and went back to the defaults, deleting
    the one on flash. LMS_CONFIG_MAX_BYTES goes up to 256 KiB, the device takes 16.5 KiB: a
    legitimate large desired config (or a retained one of junk) wiped the device's settings."""
    board = rest_board(org, tmp_root, "esp-1", interval_s=1)
    board.start()
    try:
        board.wait_console("MQTT connected")
        assert org.call("PUT", "/devices/esp-1/config", {"interval_s": 0.4, "led": "on"}).status_code == 200
        wait_until(lambda: org.call("GET", "/devices/esp-1/config").json()["reported_version"] == 1, 10,
                   "the report of version 1")
        before = len(board.console())
        huge = json.dumps({"version": 2, "interval_s": 0.5, "note": "x" * 40_000}).encode()
        platform_publish(stack, f"lms/{org.slug}/esp-1/config", huge, retain=True)
        board.wait_console("config ignored", after=before)
        assert "desired config cleared" not in board.console()[before:]
        assert json.loads((board.dir / "lms_desired.json").read_text())["version"] == 1
        assert board.alive()
    finally:
        board.power_off()


# -- firmware: MQTT framing from a hostile broker -------------------------------------------

CLIENT = """
import sys, time, tracemalloc
tracemalloc.start()
sys.path[:0] = [{host!r}, {firmware!r}]
import lms_mqtt
c = lms_mqtt.Client("c", "127.0.0.1", {port}, "u", "p", timeout_ms=3000)
t0 = time.monotonic()
try:
    c.connect()
    while True:
        c.poll()
        time.sleep(0.01)
except Exception as e:
    peak_mb = tracemalloc.get_traced_memory()[1] // 2**20
    print(type(e).__name__, round(time.monotonic() - t0, 2), peak_mb)
"""

#: A remaining length of 268,435,455 bytes: the most MQTT can say.
HUGE_LEN = b"\xff\xff\xff\x7f"


def hostile_broker(answer: bytes) -> tuple[int, threading.Thread]:
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def run() -> None:
        conn, _ = srv.accept()
        with conn, srv:
            conn.recv(4096)  # the CONNECT
            conn.sendall(answer)
            conn.settimeout(15)
            try:
                while conn.recv(4096):
                    pass
            except OSError:
                pass

    thread = threading.Thread(target=run, name="hostile-broker", daemon=True)
    thread.start()
    return port, thread


@pytest.mark.parametrize("answer", [
    b"\x20\x02\x00\x00" + b"\x40" + HUGE_LEN,  # a PUBACK of 256 MiB after a good CONNACK
    b"\x20\x02\x00\x00" + b"\x90" + HUGE_LEN,  # a SUBACK of 256 MiB
    b"\x20" + HUGE_LEN,  # a CONNACK of 256 MiB
], ids=["puback", "suback", "connack"])
def test_a_broker_packet_far_larger_than_its_kind_allows_is_refused_at_once(answer: bytes) -> None:
    """A PUBACK is 2 bytes, a CONNACK 2, a SUBACK 2 + one per filter; the client allocated
    whatever length the broker announced (``bytearray(n)``: MemoryError on a board with
    100 KB of heap, which the firmware's loop answers by dropping half its offline buffer)
    and then sat in the read until its timeout. It must refuse the packet instead."""
    port, thread = hostile_broker(answer)
    code = CLIENT.format(host=str(FIRMWARE / "host"), firmware=str(FIRMWARE), port=port)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    kind, seconds, peak_mb = out.stdout.split()
    assert kind == "MQTTError", out.stdout + out.stderr
    assert float(seconds) < 1.5 and int(peak_mb) < 8, out.stdout
    thread.join(20)


# -- lms device create --firmware-config FILE ------------------------------------------------

def test_the_firmware_config_file_is_owner_only_even_when_the_name_existed(
        stack: Stack, unique: str, tmp_path: Path) -> None:
    """The file holds the device's MQTT password and the command says "mode 0600"; os.open's
    mode only applies to a file it creates, so an existing file (a previous run, a file made
    by an editor, a name a co-user prepared in a shared folder) kept its mode 0644, or was
    written through a symlink to wherever it pointed."""
    assert cli(stack, "org", "create", unique).returncode == 0
    target = tmp_path / "lms_config.json"
    target.write_text("old\n")
    target.chmod(0o644)
    r = cli(stack, "device", "create", unique, "esp-1", "--firmware-config", str(target))
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert json.loads(target.read_text())["mqtt"]["username"]

    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("")
    elsewhere.chmod(0o644)
    link = tmp_path / "link.json"
    link.symlink_to(elsewhere)
    r = cli(stack, "device", "create", unique, "esp-2", "--firmware-config", str(link))
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert elsewhere.read_text() == ""


# -- dashboard files: what held ----------------------------------------------------------------

@pytest.mark.parametrize("path", [
    "/app/../web.py", "/app/%2e%2e/web.py", "/app/%2E%2E%2Fweb.py", "/app/..%2fweb.py", "/app/..%5cweb.py",
    "/app/..\\web.py", "/app//etc/passwd", "/app/%2fetc%2fpasswd", "/app/views/../../web.py",
    "/app/views/%2e%2e/%2e%2e/access.py", "/app/%00main.js", "/app/main.js%00.css",
], ids=lambda p: p)
def test_dashboard_files_never_leave_their_folder(api: ApiProcess, path: str) -> None:
    with socket.create_connection(("127.0.0.1", int(api.url.rsplit(":", 1)[1]))) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    assert status in (400, 404, 422), data[:300]
    assert b"import " not in data and b"root:" not in data


def test_dashboard_files_have_their_types_and_nosniff(api: ApiProcess) -> None:
    with httpx.Client(base_url=api.url) as c:
        for path, kind in [("/app/main.js", "javascript"), ("/app/style.css", "text/css"),
                           ("/app/icon.svg", "image/svg+xml"), ("/", "text/html")]:
            r = c.get(path)
            assert r.status_code == 200 and kind in r.headers["content-type"], (path, r.headers)
            assert r.headers["x-content-type-options"] == "nosniff"
            assert r.headers["x-frame-options"] == "DENY"
        page = c.get("/", headers={"Host": "evil.example'; script-src *"})
        assert page.status_code == 400  # the server refuses such a Host before the app sees it
        page = c.get("/", headers={"Host": "under_score.example"})  # taken by the server, not by the policy
        assert page.status_code == 200
        csp = page.headers["content-security-policy"]
        assert "under_score" not in csp and "frame-ancestors 'none'" in csp and "script-src 'self';" in csp


# -- lms simulate: arguments ---------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["--connect-rate", "0"], ["--connect-rate", "-5"], ["--connect-rate", "nan"], ["--spike-chance", "2"],
    ["--spike-chance", "nan"], ["--prefix", "p" * 60, "--devices", "2"],
], ids=["rate-0", "rate-negative", "rate-nan", "chance-2", "chance-nan", "prefix-too-long"])
def test_lms_simulate_refuses_bad_arguments_in_one_line(stack: Stack, unique: str, args: list[str]) -> None:
    """``--connect-rate`` and ``--spike-chance`` were bare floats (0 divided by zero in the
    fleet after the devices were provisioned; nan and out-of-range values went through), and
    a prefix that is a slug can still make device slugs longer than 63 characters."""
    r = cli(stack, "simulate", "--org", unique, "--seconds", "1", "--progress", "0.5", *args)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1].startswith("lms simulate: error: "), \
        r.stderr  # argparse's usage, then one line saying what is wrong
    assert not stack.query("SELECT 1 FROM organizations WHERE slug = $1", unique)


# -- firmware: a connection attempt failing in a way the code did not list ------------------

def test_a_connect_failure_of_any_kind_waits_its_backoff_and_keeps_the_offline_buffer(
        org: Org, tmp_root: Path) -> None:
    """Device.connect caught only OSError and MQTTError. Anything else raised while
    connecting - here the TLS set-up (``tls`` true without ``ca_file`` raises ValueError on
    CPython); on a board without PSRAM a MemoryError in the TLS handshake - went up to the
    main loop: no backoff (a new attempt every 220 ms, a hammering fleet), and for a
    MemoryError the loop's handler dropped half of the offline buffer on every attempt."""
    board = rest_board(org, tmp_root, "esp-1", interval_s=0.5, backoff_min_ms=1000, backoff_max_s=4)
    cfg = json.loads((board.dir / "lms_config.json").read_text())
    cfg["mqtt"]["tls"] = True
    (board.dir / "lms_config.json").write_text(json.dumps(cfg))
    board.start()
    try:
        board.wait_console("read ")
        wait_until(lambda: len(board.readings()) >= 8, 10, "four seconds of readings")
        console = board.console()
        assert "loop error" not in console, console[-1500:]
        attempts = console.count("MQTT connect failed")
        assert 1 <= attempts <= 4, console[-1500:]
    finally:
        board.power_off()
