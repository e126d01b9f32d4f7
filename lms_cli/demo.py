"""``lms up --demo``: a demo organization a newcomer can look at within a minute.

Set up through the running API, as a user would (so it exercises what it shows): a demo
user who owns organization ``demo``, a site (asset ``greenhouse``) with five devices, one
desired config and one alert rule on the site. The five devices are the real firmware on
CPython (``firmware/host/run.py``), each with a simulated sensor (a daily curve, noise and
now and then a warm spell that trips the rule), its board folder under ``STATE/demo/``.
Everything is made once; a later ``lms up --demo`` finds it and starts the boards again.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

import httpx

from lms_cli.localstack import StackError

ORG = "demo"
SITE = "greenhouse"
DEVICES = [f"sensor-{i}" for i in range(1, 6)]
EMAIL = "demo@example.com"
INTERVAL_S = 5
RULE = {"name": "greenhouse too warm", "metric": "temp", "comparison": ">", "threshold": 27,
        "clear_threshold": 26, "duration_s": 8, "cooldown_s": 60, "severity": "minor", "scope": {"asset": SITE}}
DESIRED = {"interval_s": INTERVAL_S, "led": "on"}


def _check(r: httpx.Response, *ok: int) -> httpx.Response:
    if r.status_code not in ok:
        raise StackError(f"demo set-up: {r.request.method} {r.request.url.path} answered {r.status_code}: "
                         f"{r.text[:300]}")
    return r


def board_config(cfg: dict[str, Any], index: int) -> dict[str, Any]:
    """The firmware file of demo board ``index``: a simulated sensor per board, each a little
    warmer than the one before, with rare warm spells (about one in 60 readings, 6 readings
    long: the rule above fires for one of the five boards every minute or two)."""
    return {**cfg, "sensor": {"type": "sim", "base": 19.0 + 1.2 * index, "amp": 2.0, "noise": 0.15,
                              "spike_chance": 1 / 60, "spike": 8.0, "spike_len": 6},
            "interval_s": INTERVAL_S, "backoff_max_s": 10}


def set_up(api_url: str, state: dict[str, Any], state_dir: Path) -> list[Path]:
    """Make what is missing of the demo; return the five board folders."""
    boards = state_dir / "demo"
    boards.mkdir(mode=0o700, exist_ok=True)
    with httpx.Client(base_url=api_url + "/api/v1", timeout=30) as api:
        r = _check(api.post("/auth/login", json={"email": EMAIL, "password": state["demo_password"]}), 200)
        api.headers["Authorization"] = f"Bearer {r.json()['access_token']}"
        api.cookies.clear()
        _check(api.post("/orgs", json={"slug": ORG, "name": "Demo"}), 201, 409)
        base = f"/orgs/{ORG}"
        _check(api.post(f"{base}/assets", json={"slug": SITE, "name": "Greenhouse", "kind": "site"}), 201, 409)
        dirs = []
        for i, device in enumerate(DEVICES):
            folder = boards / device
            folder.mkdir(mode=0o700, exist_ok=True)
            path = folder / "lms_config.json"
            r = _check(api.post(f"{base}/devices", json={"slug": device, "name": f"Greenhouse sensor {i + 1}",
                                                         "tags": ["demo"]}), 201, 409)
            if r.status_code == 201:
                cfg = r.json()["firmware_config"]
            elif not path.exists():  # the device is there but its file is lost: new credentials
                cfg = _check(api.post(f"{base}/devices/{device}/firmware-config"), 200).json()["firmware_config"]
            else:
                cfg = None
            if cfg is not None:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as f:
                    json.dump(board_config(cfg, i), f, indent=2)
            _check(api.put(f"{base}/assets/{SITE}/devices/{device}"), 204)
            dirs.append(folder)
        if _check(api.get(f"{base}/devices/{DEVICES[0]}/config"), 200).json()["desired_version"] == 0:
            _check(api.put(f"{base}/devices/{DEVICES[0]}/config", json=DESIRED), 200)
        if not any(rule["name"] == RULE["name"] for rule in _check(api.get(f"{base}/rules"), 200).json()):
            _check(api.post(f"{base}/rules", json=RULE), 201)
    return dirs


def new_password() -> str:
    return secrets.token_urlsafe(12)
