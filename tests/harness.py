"""Test harness: real PostgreSQL and Mosquitto on free ports, bridges as real processes.

Nothing here mocks the broker or the database. Faults are real actions: SIGKILL of a
bridge, a fast shutdown of PostgreSQL, a restart of Mosquitto.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from lms_cli.localstack import Mosquitto, Postgres, free_port, new_password
from lms_core import db, migrations
from lms_core.broker import BrokerAdmin
from lms_core.provisioning import DeviceCredentials, Provisioner
from lms_core.settings import MqttUrl
from lms_core.topics import TopicScheme

REPO = Path(__file__).resolve().parent.parent
SECRET = "test-secret-" + "x" * 32


def wait_until(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Stack:
    """One PostgreSQL cluster, one Mosquitto broker and the bridges started on them."""

    root: Path
    pg: Postgres = field(init=False)
    mq: Mosquitto = field(init=False)
    bridges: list[BridgeProcess] = field(default_factory=list)
    apis: list[ApiProcess] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.pg = Postgres(self.root / "postgres", free_port(), new_password(),
                           extra_conf={"fsync": "off", "full_page_writes": "off"})
        self.mq = Mosquitto(self.root / "mosquitto", free_port(), new_password())

    def start(self) -> Stack:
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        self.pg.init()
        self.pg.start()
        self.pg.create_database()
        asyncio.run(self._migrate())
        self.mq.init()
        self.mq.start()
        return self

    async def _migrate(self) -> None:
        conn = await db.connect(self.pg.url)
        try:
            await migrations.migrate(conn)
        finally:
            await conn.close()

    def stop(self) -> None:
        for a in self.apis:
            a.stop()
        for b in self.bridges:
            b.stop()
        self.mq.stop()
        self.pg.stop()

    @property
    def mqtt_url(self) -> MqttUrl:
        return MqttUrl.parse(self.mq.service_url)

    def env(self, **overrides: str) -> dict[str, str]:
        # LMS_BRIDGE_RECEIVER passes through: `LMS_BRIDGE_RECEIVER=asyncio pytest ...` runs every
        # bridge of the suite on the asyncio receiver (lms_core/mqtt_fast.py).
        env = {k: v for k, v in os.environ.items() if not k.startswith("LMS_") or k == "LMS_BRIDGE_RECEIVER"}
        env.update({
            "LMS_DATABASE_URL": self.pg.url,
            "LMS_MQTT_URL": self.mq.service_url,
            "LMS_DEVICE_MQTT_URL": f"mqtt://127.0.0.1:{self.mq.port}",
            "LMS_SECRET_KEY": SECRET,
            "LMS_BRIDGE_METRICS_PORT": "0",
            "LMS_STATE_DIR": str(self.root / "no-local-stack"),
            # Self-service sign-up is off by default; the tests register their users through it,
            # all from 127.0.0.1. Tests of the off switch and the limit override these.
            "LMS_API_REGISTRATION": "on",
            "LMS_API_REGISTRATION_MAX_PER_ADDRESS": "1000000",
            # Every test fails logins from 127.0.0.1 into the one shared database: the per-address
            # limit across accounts would make one test's attack another's lock-out. Tests of
            # that limit set it themselves.
            "LMS_LOGIN_ADDRESS_MAX_FAILURES": "100000",
        })
        env.update(overrides)
        return env

    def start_bridge(self, client_id: str = "lms-bridge-1", *, wait: bool = True, **overrides: str) -> BridgeProcess:
        port = free_port()
        env = self.env(LMS_BRIDGE_CLIENT_ID=client_id, LMS_BRIDGE_METRICS_PORT=str(port), **overrides)
        b = BridgeProcess(env, self.root / f"bridge-{client_id}.log", port)
        b.start(wait=wait)
        self.bridges.append(b)
        return b

    def start_api(self, **overrides: str) -> ApiProcess:
        port = free_port()
        env = self.env(LMS_API_PORT=str(port), **overrides)
        a = ApiProcess(env, self.root / f"api-{port}.log", port)
        a.start()
        self.apis.append(a)
        return a

    # -- provisioning -----------------------------------------------------------------

    async def _provision(self, fn: str, *args: Any, **kwargs: Any) -> Any:
        topics = TopicScheme()
        async with db.create_pool(self.pg.url, min_size=1, max_size=2) as pool, \
                BrokerAdmin(self.mqtt_url, topics) as admin:
            prov = Provisioner(pool, admin, topics, SECRET, f"mqtt://127.0.0.1:{self.mq.port}")
            return await getattr(prov, fn)(*args, **kwargs)

    def create_device(self, org: str, device: str) -> DeviceCredentials:
        # Tests make organizations on the fly; the CLI and the API never do (see Provisioner).
        return asyncio.run(self._provision("create_device", org, device, create_org=True))

    def set_enabled(self, org: str, device: str, enabled: bool) -> None:
        asyncio.run(self._provision("set_enabled", org, device, enabled))

    # -- queries --------------------------------------------------------------------

    def query(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        async def run() -> list[asyncpg.Record]:
            conn = await asyncpg.connect(self.pg.url)
            try:
                return list(await conn.fetch(sql, *args))
            finally:
                await conn.close()

        return asyncio.run(run())

    def scalar(self, sql: str, *args: Any) -> Any:
        rows = self.query(sql, *args)
        return rows[0][0] if rows else None

    def admin_query(self, sql: str, *args: Any, database: str = "postgres") -> list[asyncpg.Record]:
        """As the cluster's superuser: the application's role ``lms`` only owns its database,
        so whatever needs more (creating databases, inspecting other sessions) comes here."""
        async def run() -> list[asyncpg.Record]:
            conn = await asyncpg.connect(self.pg.admin_url(database))
            try:
                return list(await conn.fetch(sql, *args))
            finally:
                await conn.close()

        return asyncio.run(run())

    def fresh_database(self, name: str) -> str:
        """Drop and create database ``name`` owned by the application's role; its URL as that role."""
        self.admin_query(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.admin_query(f'CREATE DATABASE "{name}" OWNER "{self.pg.user}"')
        return self.pg.database_url(name)


class BridgeProcess:
    """``lms bridge`` as a child process, the way it runs in production."""

    def __init__(self, env: dict[str, str], log: Path, metrics_port: int) -> None:
        self.env = env
        self.log = log
        self.metrics_port = metrics_port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> None:
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "lms_cli.main", "bridge"], env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        if wait:
            wait_until(lambda: self._subscribed(offset), 30, f"the bridge to subscribe (log {self.log})")

    def _subscribed(self, offset: int) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"bridge exited with {self.proc.returncode}: {self.log_text()[-2000:]}")
        with open(self.log, "rb") as f:
            f.seek(offset)
            return b'"subscribed"' in f.read()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("bridge did not stop within 30 s of SIGTERM") from None

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        total = 0.0
        for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M):
            total += float(m.group(1))
        return total


class ApiProcess:
    """``lms api`` as a child process on 127.0.0.1:``port``."""

    def __init__(self, env: dict[str, str], log: Path, port: int) -> None:
        self.env = env
        self.log = log
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "lms_cli.main", "api"], env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT, cwd=REPO)

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"api exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_until(up, 30, f"the API on port {self.port}", interval=0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- devices ----------------------------------------------------------------------------

def stop_client(client: paho.Client) -> None:
    """Stop a paho client's network thread and close its socket (paho leaves a refused or
    kicked client's socket open)."""
    client.loop_stop()
    sock = client.socket()
    if sock is not None:
        sock.close()
    # paho wakes its loop through a loopback TCP socket pair that it never closes itself.
    for name in ("_sockpairR", "_sockpairW"):
        pair = getattr(client, name, None)
        if pair is not None:
            pair.close()
            setattr(client, name, None)


class Device:
    """A device client on real credentials (paho in its own network thread)."""

    def __init__(self, port: int, creds: DeviceCredentials, *, protocol: int = paho.MQTTv311,
                 persistent: bool = False, will: bool = False) -> None:
        self.creds = creds
        self.port = port
        self.protocol = protocol
        kwargs: dict[str, Any] = {}
        if protocol != paho.MQTTv5:
            kwargs["clean_session"] = not persistent
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=creds.client_id, protocol=protocol,
                                  **kwargs)
        self.client.username_pw_set(creds.username, creds.password)
        self.client.max_inflight_messages_set(200)
        self.client.reconnect_delay_set(0.1, 1)
        if will:
            self.client.will_set(f"{creds.topic_prefix}/status", "offline", qos=1, retain=True)
        self.connect_result: Any = None
        self.disconnects: list[Any] = []
        self.messages: list[paho.MQTTMessage] = []
        self.acked: set[int] = set()
        self.n_acked = 0
        self.puback_reasons: dict[int, int] = {}
        self.suback: dict[int, list[int]] = {}
        self._connected = threading.Event()
        self._lock = threading.Condition()
        c = self.client
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = lambda cl, u, m: self.messages.append(m)
        c.on_publish = self._on_publish
        c.on_subscribe = lambda cl, u, mid, rc, p: self.suback.__setitem__(mid, [r.value for r in rc])

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.connect_result = reason
        self._connected.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.disconnects.append(reason)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with self._lock:
            self.acked.add(mid)
            self.n_acked += 1
            self.puback_reasons[mid] = getattr(reason, "value", 0)
            self._lock.notify_all()

    def connect(self, timeout: float = 10) -> Any:
        """Connect and return the CONNACK reason (a failure does not raise)."""
        self._connected.clear()
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        if not self._connected.wait(timeout):
            raise AssertionError("no CONNACK")
        if self.connect_result.is_failure:
            self.stop()  # refused: nothing more will happen on this client
        return self.connect_result

    def stop(self) -> None:
        stop_client(self.client)

    def close(self) -> None:
        self.client.disconnect()
        self.stop()

    def publish(self, kind: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> int:
        info = self.client.publish(f"{self.creds.topic_prefix}/{kind}", payload, qos=qos, retain=retain)
        return info.mid

    def publish_wait(self, kind: str, payload: bytes | str, timeout: float = 10) -> int:
        mid = self.publish(kind, payload)
        with self._lock:
            if not self._lock.wait_for(lambda: mid in self.acked, timeout):
                raise AssertionError(f"no PUBACK for {kind}")
        return self.puback_reasons.get(mid, 0)

    def publish_many(self, payloads: list[bytes], kind: str = "telemetry", window: int = 200,
                     timeout: float = 300) -> None:
        """Publish at QoS 1 with at most ``window`` unacknowledged; return when all are acked."""
        start = self.n_acked
        sent = 0
        deadline = time.monotonic() + timeout
        topic = f"{self.creds.topic_prefix}/{kind}"
        for p in payloads:
            with self._lock:
                while sent - (self.n_acked - start) >= window:
                    if not self._lock.wait(1) and time.monotonic() > deadline:
                        raise AssertionError("publisher stalled")
            info = self.client.publish(topic, p, qos=1)
            # NO_CONN: paho keeps the message queued and sends it after reconnecting.
            assert info.rc in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN), info.rc
            sent += 1
        with self._lock:
            done = self._lock.wait_for(lambda: self.n_acked - start >= sent, max(1, deadline - time.monotonic()))
            if not done:
                raise AssertionError(f"only {self.n_acked - start} of {sent} acknowledged")


def stamped(i: int, base_ms: int | None = None) -> bytes:
    base = base_ms if base_ms is not None else int(time.time() * 1000) - 3_600_000
    return json.dumps({"ts": base + i, "values": {"seq": i}}).encode()
