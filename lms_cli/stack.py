"""``lms up``: the whole local stack from nothing, supervised, stopped cleanly on Ctrl-C.

State folder (``.lms/`` by default)::

    stack.json       ports, generated passwords and secret (mode 0600), including the
                     PostgreSQL superuser's (``postgres``); the application's ``lms``
                     role only owns the ``lms`` database
    postgres/        the PostgreSQL cluster          postgres.log
    mosquitto/       broker persistence and dynsec   mosquitto.log
    bridge.log       the bridge's JSON log
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lms_cli.localstack import (
    Mosquitto,
    Postgres,
    StackError,
    find_dynsec_plugin,
    find_mosquitto,
    find_pg_bin,
    free_port,
    new_password,
    open_log,
    port_free,
)
from lms_core import db, migrations, rollups

STATE_FILE = "stack.json"


def _load_state(state_dir: Path) -> dict[str, Any] | None:
    path = state_dir / STATE_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StackError(f"{path} is unreadable ({exc}); remove the folder to start afresh") from None
    return data if isinstance(data, dict) else None


def settings_env(state_dir: Path | None = None) -> dict[str, str]:
    """The ``LMS_*`` settings of the local stack in ``state_dir`` ({} if there is none)."""
    state_dir = state_dir or Path(os.environ.get("LMS_STATE_DIR", ".lms"))
    state = _load_state(state_dir)
    if not state:
        return {}
    return {
        "LMS_DATABASE_URL": f"postgresql://lms:{state['pg_password']}@127.0.0.1:{state['pg_port']}/lms",
        "LMS_MQTT_URL": f"mqtt://lms-service:{state['service_password']}@127.0.0.1:{state['mqtt_port']}",
        "LMS_DEVICE_MQTT_URL": f"mqtt://{state.get('device_host', '127.0.0.1')}:{state['mqtt_port']}",
        "LMS_SECRET_KEY": state["secret_key"],
        "LMS_BRIDGE_METRICS_PORT": str(state["bridge_metrics_port"]),
        **({"LMS_API_PORT": str(state["api_port"])} if "api_port" in state else {}),
    }


def _pick_port(wanted: int | None, default: int, what: str) -> int:
    if wanted is not None:
        return wanted
    if port_free(default):
        return default
    port = free_port()
    print(f"port {default} ({what}) is in use; this stack uses {port}", flush=True)
    return port


def _device_host(listen: str) -> str:
    """The host name devices are told, given where the broker listens."""
    if listen in ("0.0.0.0", "::"):
        return socket.gethostname()
    return listen


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


class LocalStack:
    def __init__(self, state_dir: Path, *, mqtt_port: int | None = None, pg_port: int | None = None,
                 api_port: int | None = None, listen: str | None = None, device_host: str | None = None,
                 registration: bool = False, demo: bool = False) -> None:
        self.dir = state_dir.resolve()
        self.demo = demo
        self.want_mqtt, self.want_pg, self.want_api = mqtt_port, pg_port, api_port
        self.want_listen, self.want_device_host = listen, device_host
        self.registration = registration
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self._stopping = False

    # -- state -----------------------------------------------------------------------

    def _prepare(self) -> dict[str, Any]:
        find_mosquitto()
        find_dynsec_plugin()
        find_pg_bin()
        self.dir.mkdir(parents=True, exist_ok=True)
        # Nobody else lists or reads the state (passwords, logs). Run as root, the servers run
        # as the 'postgres' and 'mosquitto' users, who must still pass through to their own
        # subfolders: they get the search bit only.
        os.chmod(self.dir, 0o711 if os.geteuid() == 0 else 0o700)
        state = _load_state(self.dir)
        if state is None:
            print(f"creating a new stack in {self.dir}", flush=True)
            state = {
                "mqtt_port": _pick_port(self.want_mqtt, 1883, "MQTT"),
                "pg_port": _pick_port(self.want_pg, 5432, "PostgreSQL"),
                "bridge_metrics_port": _pick_port(None, 9101, "bridge metrics"),
                "api_port": _pick_port(self.want_api, 8000, "API"),
                "mqtt_listen": self.want_listen or "127.0.0.1",
                "device_host": self.want_device_host or _device_host(self.want_listen or "127.0.0.1"),
                "admin_email": "admin@example.com",
                "admin_password": new_password(),
                "pg_password": new_password(),
                "pg_admin_password": new_password(),
                "service_password": new_password(),
                "secret_key": secrets.token_urlsafe(48),
            }
            self._save(state)
        else:
            print(f"reusing the stack in {self.dir}", flush=True)
            if "api_port" not in state:  # a state folder from before the API
                state["api_port"] = _pick_port(self.want_api, 8000, "API")
                state["admin_email"], state["admin_password"] = "admin@example.com", new_password()
                self._save(state)
            if "pg_admin_password" not in state:
                # A folder from before PostgreSQL's superuser was split from the application's
                # role; Postgres.create_database converts the cluster in place at this start.
                state["pg_admin_password"] = new_password()
                self._save(state)
            if self.want_listen is not None or self.want_device_host is not None:
                # Where the broker listens may change between runs; the ports may not.
                state["mqtt_listen"] = self.want_listen or state.get("mqtt_listen", "127.0.0.1")
                state["device_host"] = self.want_device_host or _device_host(state["mqtt_listen"])
                self._save(state)
            for key, wanted in (("mqtt_port", self.want_mqtt), ("pg_port", self.want_pg),
                                ("api_port", self.want_api)):
                if wanted is not None and wanted != state[key]:
                    raise StackError(f"this stack was created with {key.replace('_', ' ')} {state[key]}; "
                                     f"drop --{key.replace('_', '-')} or use another --state folder")
        if self.demo and "demo_password" not in state:
            state["demo_password"] = new_password()
            self._save(state)
        return state

    def _save(self, state: dict[str, Any]) -> None:
        fd = os.open(self.dir / STATE_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(state, f, indent=2)

    def _lock(self) -> Any:
        lock = open(self.dir / "lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StackError(f"another `lms up` is already running on {self.dir}") from None
        return lock

    # -- run ---------------------------------------------------------------------------

    def run(self) -> int:
        self.dir.mkdir(parents=True, exist_ok=True)
        lock = self._lock()
        try:
            state = self._prepare()
            self._run(state)
        finally:
            lock.close()
        return 0

    def _run(self, state: dict[str, Any]) -> None:
        pg = Postgres(self.dir / "postgres", state["pg_port"], state["pg_password"],
                      admin_password=state["pg_admin_password"])
        mq = Mosquitto(self.dir / "mosquitto", state["mqtt_port"], state["service_password"],
                       listen=state.get("mqtt_listen", "127.0.0.1"))
        env = {**os.environ, **settings_env(self.dir)}
        env["LMS_API_REGISTRATION"] = "on" if self.registration else env.get("LMS_API_REGISTRATION", "off")
        signal.signal(signal.SIGTERM, _interrupt)
        # Started in the background of a non-interactive shell, SIGINT arrives ignored;
        # Ctrl-C and `kill -INT` must stop the stack all the same.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            if not pg.initialized():
                print("initializing PostgreSQL ...", flush=True)
                pg.init()
            print(f"starting PostgreSQL on 127.0.0.1:{pg.port} ...", flush=True)
            pg.start()
            pg.create_database()
            self._migrate(pg.url)
            self._ensure_admin(pg.url, state)
            mq.init()
            print(f"starting Mosquitto on 127.0.0.1:{mq.port} ...", flush=True)
            mq.start()
            self._ensure_watch(mq, state)
            if not port_free(state["api_port"]):
                raise StackError(f"port {state['api_port']} (API) is already in use")
            self._start_bridge(env)
            self._start_api(env, state["api_port"])
            if self.demo:
                self._start_demo(state)
            self._banner(state)
            self._supervise(pg, mq, env)
        except KeyboardInterrupt:
            pass
        finally:
            self._stopping = True
            print("\nstopping ...", flush=True)
            for child in self.children.values():
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)
            for child in self.children.values():
                try:
                    child.wait(30)
                except subprocess.TimeoutExpired:
                    child.kill()
            mq.stop()
            pg.stop()
            print("stopped", flush=True)

    @staticmethod
    def _migrate(url: str) -> None:
        async def main() -> None:
            conn = await db.connect(url)
            try:
                await migrations.migrate(conn, progress=lambda m: print(f"  {m}", flush=True))
                if not await rollups.complete(conn):
                    # Nothing writes readings yet (the bridge starts after this): build them now.
                    await rollups.backfill(conn, progress=lambda m: print(f"  {m}", flush=True))
            finally:
                await conn.close()

        asyncio.run(main())

    def _start_child(self, name: str, env: dict[str, str]) -> None:
        log = open_log(self.dir / f"{name}.log")  # handed to the child, closed here
        self.children[name] = subprocess.Popen(
            [sys.executable, "-m", "lms_cli.main", name], env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()

    def _start_bridge(self, env: dict[str, str]) -> None:
        self._start_child("bridge", env)

    def _start_api(self, env: dict[str, str], port: int) -> None:
        self._start_child("api", env)
        proc = self.children["api"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            if not port_free(port):
                return
            time.sleep(0.1)
        raise StackError(f"the API did not start; see {self.dir}/api.log")

    def _start_demo(self, state: dict[str, Any]) -> None:
        """The demo (lms_cli/demo.py): its user, then its organization through the API, then
        five boards running the firmware, each a supervised child."""
        from lms_cli import demo

        pg_url = settings_env(self.dir)["LMS_DATABASE_URL"]
        self._ensure_user(pg_url, state, demo.EMAIL, state["demo_password"], superuser=False)
        print("setting up the demo organization ...", flush=True)
        for folder in demo.set_up(f"http://127.0.0.1:{state['api_port']}", state, self.dir):
            self._start_board(folder)

    def _start_board(self, folder: Path) -> None:
        """The firmware on CPython for the board whose filesystem is ``folder``."""
        run = Path(__file__).resolve().parent.parent / "firmware" / "host" / "run.py"
        log = open_log(folder / "console.log")
        self.children[f"board {folder.name}"] = subprocess.Popen(
            [sys.executable, str(run), str(folder)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()

    @staticmethod
    def _ensure_user(url: str, state: dict[str, Any], email: str, password: str, *, superuser: bool) -> None:
        from api.auth.service import AuthService
        from lms_core.errors import AlreadyExists
        from lms_core.settings import ApiSettings

        async def main() -> None:
            async with db.create_pool(url, min_size=1, max_size=2) as pool:
                try:
                    await AuthService(pool, ApiSettings(), state["secret_key"]).create_user(
                        email, password, superuser=superuser)
                    print(f"  created the {'superuser' if superuser else 'user'} {email}", flush=True)
                except AlreadyExists:
                    pass

        asyncio.run(main())

    @staticmethod
    def _ensure_admin(url: str, state: dict[str, Any]) -> None:
        from api.auth.service import AuthService
        from lms_core.errors import AlreadyExists
        from lms_core.settings import ApiSettings

        async def main() -> None:
            async with db.create_pool(url, min_size=1, max_size=2) as pool:
                try:
                    await AuthService(pool, ApiSettings(), state["secret_key"]).create_user(
                        state["admin_email"], state["admin_password"], superuser=True)
                    print(f"  created the superuser {state['admin_email']}", flush=True)
                except AlreadyExists:
                    pass

        asyncio.run(main())

    def _ensure_watch(self, mq: Mosquitto, state: dict[str, Any]) -> None:
        """The read-only watch login the banner hands out (never the service account, which
        administers the broker): created or repaired at every start, password in the state."""
        from lms_core.broker import BrokerAdmin
        from lms_core.settings import MqttUrl

        if "watch_password" not in state:  # also a state folder from before the watch login
            state["watch_password"] = new_password()
            self._save(state)

        async def main() -> str:
            async with BrokerAdmin(MqttUrl.parse(mq.service_url), mq.topics) as admin:
                return await admin.ensure_watch(state["watch_password"])

        state["watch_user"] = asyncio.run(main())

    def _banner(self, s: dict[str, Any]) -> None:
        lms = "./lms" if Path("lms").is_file() and os.access("lms", os.X_OK) else "lms"
        lan = ("" if s.get("mqtt_listen", "127.0.0.1") != "127.0.0.1"
               else f"  (this machine only; `{lms} up --listen 0.0.0.0` lets devices on your network in)")
        print(f"""
LMS Core is running (state in {self.dir})
  MQTT broker   mqtt://127.0.0.1:{s['mqtt_port']}   (log: {self.dir}/mosquitto.log)
                devices connect to mqtt://{s.get('device_host', '127.0.0.1')}:{s['mqtt_port']}{lan}
  PostgreSQL    postgresql://lms@127.0.0.1:{s['pg_port']}/lms
  bridge        metrics http://127.0.0.1:{s['bridge_metrics_port']}/metrics   (log: {self.dir}/bridge.log)
  API           http://127.0.0.1:{s['api_port']}   OpenAPI: http://127.0.0.1:{s['api_port']}/schema
                superuser {s['admin_email']} / {s['admin_password']}

Create an organization, add a device to it and publish as it:
  {lms} org create acme
  {lms} device create acme sensor-1
  mosquitto_pub -p {s['mqtt_port']} -u acme.sensor-1 -P PASSWORD -i acme.sensor-1 -q 1 \\
      -t lms/acme/sensor-1/telemetry -m '{{"temp": 21.5}}'
Watch everything (a read-only login: subscribe only, its client id pinned):
  mosquitto_sub -p {s['mqtt_port']} -u {s['watch_user']} -P '{s['watch_password']}' -i {s['watch_user']} -t 'lms/#' -v
Settings for other shells:  eval "$({lms} env)"{self._demo_banner(s)}

Dashboard: open http://127.0.0.1:{s['api_port']}/ and sign in as {s['admin_email']}

ready — Ctrl-C stops everything""", flush=True)

    def _demo_banner(self, s: dict[str, Any]) -> str:
        if not self.demo:
            return ""
        from lms_cli import demo

        api = f"http://127.0.0.1:{s['api_port']}/api/v1"
        return f"""

Demo: organization {demo.ORG}, site {demo.SITE}, devices {', '.join(demo.DEVICES)} (the firmware on
CPython, consoles in {self.dir}/demo/*/console.log), one desired config, alert rule "{demo.RULE['name']}"
                user {demo.EMAIL} / {s['demo_password']}
  curl -s {api}/auth/login -H 'Content-Type: application/json' \\
      -d '{{"email": "{demo.EMAIL}", "password": "{s['demo_password']}"}}'    # TOKEN=its access_token
  curl -s -H "Authorization: Bearer $TOKEN" {api}/orgs/{demo.ORG}/devices/sensor-1/latest
  curl -s -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \\
      {api}/orgs/{demo.ORG}/devices/sensor-1/commands?wait=10 -d '{{"name": "ping"}}'
  curl -s -H "Authorization: Bearer $TOKEN" {api}/orgs/{demo.ORG}/alerts"""

    def _supervise(self, pg: Postgres, mq: Mosquitto, env: dict[str, str]) -> None:
        restarts: dict[str, list[float]] = {}

        def restart(name: str, start: Any) -> None:
            history = [t for t in restarts.get(name, []) if time.monotonic() - t < 60]
            if len(history) >= 5:
                raise StackError(f"{name} keeps exiting (5 times in a minute); see its log in {self.dir}")
            history.append(time.monotonic())
            restarts[name] = history
            print(f"{name} exited unexpectedly; restarting", flush=True)
            time.sleep(min(2 ** (len(history) - 1) * 0.5, 5))
            start()

        while True:
            time.sleep(0.5)
            if pg.proc is not None and pg.proc.poll() is not None:
                restart("PostgreSQL", pg.start)
            if mq.proc is not None and mq.proc.poll() is not None:
                restart("Mosquitto", mq.start)
            bridge = self.children.get("bridge")
            if bridge is not None and bridge.poll() is not None:
                restart("bridge", lambda: self._start_bridge(env))
            api = self.children.get("api")
            if api is not None and api.poll() is not None:
                restart("API", lambda: self._start_child("api", env))
            for name, child in list(self.children.items()):
                if name.startswith("board ") and child.poll() is not None:
                    folder = self.dir / "demo" / name.split(" ", 1)[1]
                    restart(name, lambda f=folder: self._start_board(f))
