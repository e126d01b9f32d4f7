"""Issue 11, "How it must be shown" 6: ``lms up --demo`` from an empty folder shows stored
readings from five devices (the firmware on CPython) within 60 s, through the API."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx

from lms_cli.localstack import free_port
from tests.harness import wait_until
from tests.test_cli import UpProcess


def test_lms_up_demo_shows_readings_of_five_firmware_devices_within_a_minute(tmp_path: Path) -> None:
    state = tmp_path / "state"
    api_port = free_port()
    started = time.monotonic()
    up = UpProcess(state, "--demo", "--mqtt-port", str(free_port()), "--pg-port", str(free_port()),
                   "--api-port", str(api_port))
    api = httpx.Client(base_url=f"http://127.0.0.1:{api_port}/api/v1/orgs/demo", timeout=15)
    try:
        up.wait_ready()
        password = json.loads((state / "stack.json").read_text())["demo_password"]
        assert f"user demo@example.com / {password}" in up.text()
        login = httpx.post(f"http://127.0.0.1:{api_port}/api/v1/auth/login", timeout=10,
                           json={"email": "demo@example.com", "password": password})
        assert login.status_code == 200, login.text
        api.headers["Authorization"] = f"Bearer {login.json()['access_token']}"
        devices = [f"sensor-{i}" for i in range(1, 6)]

        def with_readings() -> list[str]:
            return [d for d in devices if "temp" in api.get(f"/devices/{d}/latest").text]

        wait_until(lambda: with_readings() == devices, max(1.0, 60 - (time.monotonic() - started)),
                   "readings from the five demo devices")
        assert time.monotonic() - started < 60
        assert [d["slug"] for d in api.get("/assets/greenhouse/devices").json()] == devices
        assert [r["name"] for r in api.get("/rules").json()] == ["greenhouse too warm"]
        wait_until(lambda: api.get("/devices/sensor-1/config").json()["in_sync"], 20, "the desired config applied")
        r = api.post("/devices/sensor-2/commands?wait=10", json={"name": "ping"})
        assert r.status_code == 200 and r.json()["state"] == "succeeded", r.text
        assert r.json()["reply"]["result"]["firmware"] == "1.0.0"  # the firmware itself answered
    finally:
        api.close()
        assert up.interrupt() == 0, up.text()

    # A second start finds the demo as it was and starts its boards again.
    again = UpProcess(state, "--demo")
    try:
        again.wait_ready()
        assert "reusing the stack" in again.text() and "created the user" not in again.text()
        login = httpx.post(f"http://127.0.0.1:{api_port}/api/v1/auth/login", timeout=10,
                           json={"email": "demo@example.com", "password": password})
        token = login.json()["access_token"]
        with httpx.Client(base_url=f"http://127.0.0.1:{api_port}/api/v1/orgs/demo", timeout=15,
                          headers={"Authorization": f"Bearer {token}"}) as api2:
            assert len(api2.get("/rules").json()) == 1
            r = api2.post("/devices/sensor-5/commands?wait=15", json={"name": "ping"})
            assert r.status_code == 200 and r.json()["state"] == "succeeded", r.text
    finally:
        assert again.interrupt() == 0, again.text()
