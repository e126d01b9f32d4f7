"""The ``lms`` command line as a user runs it: real processes, real services."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from lms_cli.localstack import free_port
from tests.harness import REPO, ApiProcess, Device, Stack, wait_until

LMS = [sys.executable, "-m", "lms_cli.main"]


def run_lms(*args: str, env: dict[str, str] | None = None, timeout: float = 60, cwd: Path = REPO,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("LMS_")}
    return subprocess.run([*LMS, *args], env={**base, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, input=input)


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_device_create_prints_credentials_as_json_and_they_work(stack: Stack, unique: str) -> None:
    assert run_lms("org", "create", unique, env=stack.env()).returncode == 0
    r = run_lms("device", "create", unique, "sensor-1", "--json", env=stack.env())
    assert r.returncode == 0, r.stderr
    creds = json.loads(r.stdout)
    assert set(creds) == {"username", "password", "client_id", "topic_prefix", "mqtt_url"}
    assert creds["topic_prefix"] == f"lms/{unique}/sensor-1"
    assert creds["mqtt_url"] == f"mqtt://127.0.0.1:{stack.mq.port}"
    # mosquitto_pub, as a user would, with exactly what was printed.
    pub = subprocess.run(["mosquitto_pub", "-p", str(stack.mq.port), "-u", creds["username"], "-P", creds["password"],
                          "-i", creds["client_id"], "-q", "1", "-t", creds["topic_prefix"] + "/telemetry",
                          "-m", '{"temp": 21.5}'], capture_output=True, text=True, timeout=10)
    assert pub.returncode == 0, pub.stderr
    wait_until(lambda: stack.scalar("SELECT count(*) FROM readings r JOIN devices d ON d.id = r.device_id "
                                    "JOIN organizations o ON o.id = d.org_id WHERE o.slug = $1", unique) == 1,
               10, "the reading")

    again = run_lms("device", "create", unique, "sensor-1", env=stack.env())
    assert "already exists" in one_line_error(again)

    r = run_lms("device", "disable", unique, "sensor-1", env=stack.env())
    assert r.returncode == 0 and "disabled" in r.stdout
    assert subprocess.run(["mosquitto_pub", "-p", str(stack.mq.port), "-u", creds["username"], "-P",
                           creds["password"], "-i", creds["client_id"], "-t", creds["topic_prefix"] + "/telemetry",
                           "-m", "{}"], capture_output=True, timeout=10).returncode != 0
    missing = run_lms("device", "disable", unique, "nope", env=stack.env())
    assert "does not exist" in one_line_error(missing)


def test_rotate_stops_the_old_password(stack: Stack, unique: str) -> None:
    assert run_lms("org", "create", unique, env=stack.env()).returncode == 0
    old = json.loads(run_lms("device", "create", unique, "d", "--json", env=stack.env()).stdout)
    new = json.loads(run_lms("device", "rotate", unique, "d", "--json", env=stack.env()).stdout)
    assert new["password"] != old["password"]
    from lms_core.provisioning import DeviceCredentials

    assert Device(stack.mq.port, DeviceCredentials(**old)).connect().is_failure
    d = Device(stack.mq.port, DeviceCredentials(**new))
    assert d.connect().value == 0
    d.close()


@pytest.mark.parametrize("args, expected", [
    (["device", "create", "Bad Org", "d"], "not a valid slug"),
    (["device", "create", "acme", "_x"], "not a valid slug"),
    (["up", "--mqtt-port", "99999"], "port must be 1-65535"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_give_one_line_usage_errors(args: list[str], expected: str) -> None:
    r = run_lms(*args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert expected in r.stderr


def test_unreachable_database_and_broker_and_bad_settings_are_one_line_errors(stack: Stack, tmp_path: Path) -> None:
    dead = free_port()
    env = stack.env(LMS_DATABASE_URL=f"postgresql://lms:x@127.0.0.1:{dead}/lms")
    assert "cannot connect to PostgreSQL" in one_line_error(run_lms("migrate", env=env))
    assert "cannot connect to PostgreSQL" in one_line_error(run_lms("device", "create", "acme", "d", env=env))
    env = stack.env(LMS_MQTT_URL=f"mqtt://lms-service:x@127.0.0.1:{dead}")
    assert "cannot reach MQTT broker" in one_line_error(run_lms("device", "create", "acme", "d", env=env))
    env = stack.env(LMS_MQTT_URL=f"mqtt://lms-service:wrong@127.0.0.1:{stack.mq.port}")
    assert "refused the connection" in one_line_error(run_lms("device", "create", "acme", "d", env=env))
    assert "LMS_BRIDGE_BATCH_SIZE must be an integer" in one_line_error(
        run_lms("bridge", env=stack.env(LMS_BRIDGE_BATCH_SIZE="lots")))
    assert "LMS_SECRET_KEY" in one_line_error(run_lms("bridge", env=stack.env(LMS_ENV="production",
                                                                             LMS_SECRET_KEY="short")))
    env = {"LMS_STATE_DIR": str(tmp_path / "none")}
    assert "LMS_DATABASE_URL is not set" in one_line_error(run_lms("migrate", env=env))
    assert "run `lms up` first" in one_line_error(run_lms("env", "--state", str(tmp_path / "none")))


def test_bridge_refuses_an_unmigrated_database(stack: Stack) -> None:
    url = stack.fresh_database("empty")
    err = one_line_error(run_lms("bridge", env=stack.env(LMS_DATABASE_URL=url)))
    assert "run `lms migrate`" in err
    assert run_lms("migrate", env=stack.env(LMS_DATABASE_URL=url)).returncode == 0
    again = run_lms("migrate", env=stack.env(LMS_DATABASE_URL=url))
    assert "0 migration(s) applied" in again.stdout


def test_missing_binaries_are_named_with_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    # A machine without the packages: nothing on PATH, nothing in the usual folders.
    from lms_cli import localstack
    from lms_cli.main import main

    monkeypatch.setattr(localstack.shutil, "which", lambda *a, **k: None)
    monkeypatch.setattr(localstack.glob, "glob", lambda pattern: [])
    assert main(["up", "--state", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lms: error: mosquitto is not installed: sudo apt-get install -y mosquitto mosquitto-clients"]
    monkeypatch.setattr(localstack, "find_mosquitto", lambda: "/usr/sbin/mosquitto")
    monkeypatch.setattr(localstack, "find_dynsec_plugin", lambda: "/x.so")
    from lms_cli import stack as stack_mod

    monkeypatch.setattr(stack_mod, "find_mosquitto", lambda: "/usr/sbin/mosquitto")
    monkeypatch.setattr(stack_mod, "find_dynsec_plugin", lambda: "/x.so")
    assert main(["up", "--state", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lms: error: PostgreSQL is not installed: sudo apt-get install -y postgresql"]
    assert not (tmp_path / "s" / "stack.json").exists()


def test_port_in_use_is_a_one_line_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        r = run_lms("up", "--state", str(tmp_path / "s"), "--mqtt-port", str(busy), "--pg-port", str(free_port()),
                    timeout=120)
    assert f"port {busy} (MQTT) is already in use" in one_line_error(r)


def assert_read_only(port: int, user: str, password: str, client_id: str) -> None:
    """The login connects only under its own id, may not publish, may not administer."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from tests.harness import stop_client

    seen: dict[str, list[int]] = {"connack": [], "puback": [], "suback": []}
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    c.username_pw_set(user, password)
    c.on_connect = lambda cl, u, f, rc, p: seen["connack"].append(rc.value)
    c.on_publish = lambda cl, u, mid, rc, p: seen["puback"].append(rc.value)
    c.on_subscribe = lambda cl, u, mid, rcs, p: seen["suback"].append(rcs[0].value)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        wait_until(lambda: seen["connack"], 10, "CONNACK")
        assert seen["connack"] == [0]
        for topic in ("lms/acme/sensor-1/telemetry", "lms/acme/sensor-1/config", "$CONTROL/dynamic-security/v1"):
            c.publish(topic, "{}", qos=1)
        c.subscribe("$CONTROL/dynamic-security/#", qos=1)
        wait_until(lambda: len(seen["puback"]) == 3 and seen["suback"], 10, "PUBACKs and SUBACK")
        assert seen["puback"] == [0x87, 0x87, 0x87] and seen["suback"][0] >= 0x80, seen
    finally:
        stop_client(c)
    from tests.test_security_takeover import connack

    assert connack(port, user, password, "lms-bridge-1", clean=True) == 0x87


class UpProcess:
    def __init__(self, state: Path, *extra: str) -> None:
        base = {k: v for k, v in os.environ.items() if not k.startswith("LMS_")}
        self.proc = subprocess.Popen([*LMS, "up", "--state", str(state), *extra], env=base, cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)

    def wait_ready(self) -> None:
        wait_until(lambda: "ready" in self.text() or self.proc.poll() is not None, 120, "lms up to be ready")
        assert self.proc.poll() is None, self.text()

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        rc = self.proc.wait(60)
        self.reader.join(5)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return rc


def test_lms_up_starts_from_nothing_and_a_second_run_reuses_the_state(tmp_path: Path) -> None:
    state = tmp_path / "state"
    mqtt_port, pg_port, api_port = free_port(), free_port(), free_port()
    up = UpProcess(state, "--mqtt-port", str(mqtt_port), "--pg-port", str(pg_port), "--api-port", str(api_port))
    try:
        up.wait_ready()
        out = up.text()
        assert "creating a new stack" in out
        assert f"mqtt://127.0.0.1:{mqtt_port}" in out
        assert "device create acme sensor-1" in out and "mosquitto_pub" in out and "mosquitto_sub" in out
        assert -1 < out.find(" org create acme\n") < out.find(" device create acme sensor-1\n"), out
        assert f"http://127.0.0.1:{api_port}" in out
        admin = json.loads((state / "stack.json").read_text())
        # It ends with the dashboard's address, which a person opens (tests/test_dashboard.py).
        assert f"Dashboard: open http://127.0.0.1:{api_port}/ and sign in as {admin['admin_email']}" in out
        page = httpx.get(f"http://127.0.0.1:{api_port}/", timeout=10)
        assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
        assert f"superuser {admin['admin_email']} / {admin['admin_password']}" in out
        login = httpx.post(f"http://127.0.0.1:{api_port}/api/v1/auth/login",
                           json={"email": admin["admin_email"], "password": admin["admin_password"]}, timeout=10)
        assert login.status_code == 200 and login.json()["user"]["is_superuser"] is True
        signup = {"email": "someone@example.com", "password": "correct horse battery"}
        closed = httpx.post(f"http://127.0.0.1:{api_port}/api/v1/auth/register", json=signup, timeout=10)
        assert closed.status_code == 403  # self-service sign-up is off unless `lms up --registration`

        env_out = run_lms("env", "--state", str(state))
        assert env_out.returncode == 0
        exports = dict(line.removeprefix("export ").split("=", 1) for line in env_out.stdout.splitlines())
        assert exports["LMS_DATABASE_URL"].strip("'").endswith(f"@127.0.0.1:{pg_port}/lms")

        # The CLI finds the local stack by its state folder, no exports needed; the quick start's
        # two explicit steps: the organization, then a device in it.
        assert "lms org create acme" in one_line_error(
            run_lms("device", "create", "acme", "sensor-1", env={"LMS_STATE_DIR": str(state)}))
        r = run_lms("org", "create", "acme", env={"LMS_STATE_DIR": str(state)})
        assert r.returncode == 0, r.stderr
        r = run_lms("device", "create", "acme", "sensor-1", "--json", env={"LMS_STATE_DIR": str(state)})
        assert r.returncode == 0, r.stderr
        from lms_core.provisioning import DeviceCredentials

        creds = DeviceCredentials(**json.loads(r.stdout))
        # The banner hands out a read-only watch login, never the service account (which
        # administers the broker); its mosquitto_sub line, as printed, reads everything.
        assert admin["service_password"] not in out
        (line,) = [x.strip() for x in out.splitlines() if x.strip().startswith("mosquitto_sub")]
        watch = subprocess.Popen([*shlex.split(line), "-C", "1", "-W", "20"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        time.sleep(1)
        d = Device(mqtt_port, creds)
        assert d.connect().value == 0
        d.publish_wait("telemetry", json.dumps({"ts": int(time.time() * 1000), "values": {"temp": 21.5}}))
        d.close()
        seen, err = watch.communicate(timeout=30)
        assert seen.startswith("lms/acme/sensor-1/telemetry "), (seen, err)
        args = shlex.split(line)
        user, password, client_id = (args[args.index(flag) + 1] for flag in ("-u", "-P", "-i"))
        assert_read_only(mqtt_port, user, password, client_id)
        psql = ["psql", exports["LMS_DATABASE_URL"].strip("'"), "-tAc", "SELECT count(*) FROM readings"]
        wait_until(lambda: subprocess.run(psql, capture_output=True, text=True).stdout.strip() == "1", 15,
                   "the reading to be stored")
        # The application's database role owns its database, without superuser powers.
        role = subprocess.run([*psql[:-1], "SELECT rolsuper, rolcreaterole, rolcreatedb FROM pg_roles "
                               "WHERE rolname = current_user"], capture_output=True, text=True)
        assert role.stdout.strip() == "f|f|f", role
        # Logs (payload excerpts, e-mails) and the state folder are not for other users.
        logs = sorted(p.name for p in state.glob("*.log"))
        assert logs == ["api.log", "bridge.log", "mosquitto.log", "postgres.log"], logs
        for log in state.glob("*.log"):
            assert log.stat().st_mode & 0o777 == 0o600, log
        assert state.stat().st_mode & 0o077 in (0, 0o011)  # at most the search bit, for the servers' users
        assert (state / "mosquitto").stat().st_mode & 0o077 == 0
        assert (state / "stack.json").stat().st_mode & 0o777 == 0o600

        second = run_lms("up", "--state", str(state))
        assert "already running" in one_line_error(second)
    finally:
        assert up.interrupt() == 0, up.text()
    assert "stopped" in up.text()
    assert not (state / "postgres" / "postmaster.pid").exists()

    again = UpProcess(state, "--registration")
    try:
        again.wait_ready()
        assert httpx.post(f"http://127.0.0.1:{api_port}/api/v1/auth/register", json=signup, timeout=10
                          ).status_code == 201
        assert "reusing the stack" in again.text()
        assert "creating a new stack" not in again.text()
        d = Device(mqtt_port, creds)  # the same credentials still work
        assert d.connect().value == 0
        d.close()
        assert subprocess.run(psql, capture_output=True, text=True).stdout.strip() == "1"
        assert "created the superuser" not in again.text()
        assert httpx.post(f"http://127.0.0.1:{api_port}/api/v1/auth/login", timeout=10,
                          json={"email": admin["admin_email"], "password": admin["admin_password"]}).status_code == 200
    finally:
        assert again.interrupt() == 0, again.text()


def test_broker_init_writes_a_bootstrap_the_broker_accepts(tmp_path: Path) -> None:
    from lms_cli.localstack import Mosquitto

    mq = Mosquitto(tmp_path / "mq", free_port(), "service-pw-0123456789")
    mq.workdir.mkdir(parents=True)
    env = {"LMS_DATABASE_URL": "postgresql://x@127.0.0.1/x",
           "LMS_MQTT_URL": f"mqtt://lms-service:{mq.service_password}@127.0.0.1:{mq.port}"}
    r = run_lms("broker-init", str(mq.dynsec_path), env=env)
    assert r.returncode == 0 and "wrote" in r.stdout
    assert mq.dynsec_path.stat().st_mode & 0o777 == 0o600
    assert "left as it is" in run_lms("broker-init", str(mq.dynsec_path), env=env).stdout
    mq.start()
    try:
        ok = subprocess.run(["mosquitto_sub", "-p", str(mq.port), "-u", "lms-service", "-P", mq.service_password,
                             "-t", "lms/#", "-W", "1"], capture_output=True, text=True, timeout=10)
        bad = subprocess.run(["mosquitto_sub", "-p", str(mq.port), "-u", "lms-service", "-P", "nope",
                              "-t", "lms/#", "-W", "1"], capture_output=True, text=True, timeout=10)
    finally:
        mq.stop()
    assert "not authorised" not in ok.stderr
    assert "not authorised" in bad.stderr


def test_lms_up_can_let_devices_on_the_network_in(tmp_path: Path) -> None:
    state = tmp_path / "state"
    mqtt_port = free_port()
    up = UpProcess(state, "--mqtt-port", str(mqtt_port), "--pg-port", str(free_port()), "--api-port",
                   str(free_port()), "--listen", "0.0.0.0", "--device-host", "hub.example")
    try:
        up.wait_ready()
        assert f"devices connect to mqtt://hub.example:{mqtt_port}" in up.text()
        assert f"listener {mqtt_port} 0.0.0.0" in (state / "mosquitto" / "mosquitto.conf").read_text()
        assert run_lms("org", "create", "acme", env={"LMS_STATE_DIR": str(state)}).returncode == 0
        r = run_lms("device", "create", "acme", "d1", "--json", env={"LMS_STATE_DIR": str(state)})
        creds = json.loads(r.stdout)
        assert creds["mqtt_url"] == f"mqtt://hub.example:{mqtt_port}"
        from lms_core.provisioning import DeviceCredentials

        d = Device(mqtt_port, DeviceCredentials(**creds))  # still reachable here on loopback
        assert d.connect().value == 0
        d.close()
    finally:
        assert up.interrupt() == 0, up.text()
    bad = run_lms("up", "--state", str(tmp_path / "x"), "--listen", "everywhere")
    assert bad.returncode == 2 and "not an IP address" in bad.stderr


def test_org_create_is_explicit_and_device_create_never_adopts_an_organization(stack: Stack, unique: str,
                                                                                api: ApiProcess) -> None:
    # A stranger registers and creates the organization the operator meant to use.
    from tests.test_api_access import User

    stranger = User(api, f"{unique}-stranger@example.com")
    taken = f"{unique}-acme"
    assert stranger.call("POST", "/api/v1/orgs", {"slug": taken}).status_code == 201
    stranger.client.close()
    # The operator's explicit creation is refused instead of joining the stranger's organization.
    assert f"organization {taken} already exists" in one_line_error(run_lms("org", "create", taken, env=stack.env()))

    # Adding a device to an organization that does not exist says how to create it.
    mine = f"{unique}-mine"
    err = one_line_error(run_lms("device", "create", mine, "sensor-1", env=stack.env()))
    assert f"organization {mine} does not exist" in err and f"lms org create {mine}" in err
    assert stack.scalar("SELECT count(*) FROM organizations WHERE slug = $1", mine) == 0

    # Bad slug, unknown owner: one line each; nothing is created.
    assert run_lms("org", "create", "Bad Org", env=stack.env()).returncode == 2
    assert "no user nobody@example.com" in one_line_error(
        run_lms("org", "create", mine, "--owner", "nobody@example.com", env=stack.env()))
    assert stack.scalar("SELECT count(*) FROM organizations WHERE slug = $1", mine) == 0

    owner = f"{unique}-owner@example.com"
    assert run_lms("user", "create", owner, env=stack.env(), input="owner-pw-123456\n").returncode == 0
    r = run_lms("org", "create", mine, "--name", "My Plant", "--owner", owner.upper(), env=stack.env())
    assert r.returncode == 0, r.stderr
    assert f"organization {mine} created" in r.stdout
    assert stack.query("""SELECT o.name, m.role, u.email FROM organizations o JOIN memberships m ON m.org_id = o.id
                          JOIN users u ON u.id = m.user_id WHERE o.slug = $1""", mine)[0][:] == (
        "My Plant", "owner", owner)
    r = run_lms("device", "create", mine, "sensor-1", "--json", env=stack.env())
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["topic_prefix"] == f"lms/{mine}/sensor-1"


def _without_secret(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k != "LMS_SECRET_KEY"}


@pytest.mark.parametrize("command", ["api", "bridge", "reconcile"])
def test_services_refuse_to_start_without_a_secret(stack: Stack, command: str) -> None:
    env = _without_secret(stack.env(LMS_API_PORT=str(free_port())))
    base = {k: v for k, v in os.environ.items() if not k.startswith("LMS_")}
    r = subprocess.run([*LMS, command], env={**base, **env}, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert "LMS_SECRET_KEY is not set" in one_line_error(r)
    assert "LMS_DEV_INSECURE_SECRET=1" in r.stderr
    # The published development default is no better than none.
    r = subprocess.run([*LMS, command], env={**base, **env, "LMS_SECRET_KEY": "dev-insecure-secret-change-me"},
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert "LMS_SECRET_KEY" in one_line_error(r)


def test_api_with_the_development_flag_starts_and_warns(stack: Stack, tmp_path: Path) -> None:
    port = free_port()
    env = _without_secret(stack.env(LMS_API_PORT=str(port), LMS_DEV_INSECURE_SECRET="1"))
    a = ApiProcess(env, tmp_path / "api.log", port)
    a.start()
    try:
        warnings = [json.loads(line) for line in a.log.read_text().splitlines() if line.startswith("{")]
        assert any(w["level"] == "warning" and "LMS_DEV_INSECURE_SECRET" in w["msg"] for w in warnings), warnings
    finally:
        a.stop()
    # Production never takes the default, flag or not.
    r = run_lms("api", env={**env, "LMS_ENV": "production"})
    assert "LMS_SECRET_KEY" in one_line_error(r)


def test_lms_up_splits_the_superuser_off_a_state_folder_made_before(tmp_path: Path) -> None:
    """An older `lms up` made 'lms' the cluster's superuser (initdb -U lms). The next start
    turns it into the new layout in place, and the data and passwords keep working."""
    import asyncio

    import asyncpg

    from lms_cli.localstack import Postgres, new_password
    from lms_core import migrations

    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    old = {"mqtt_port": free_port(), "pg_port": free_port(), "bridge_metrics_port": free_port(),
           "api_port": free_port(), "admin_email": "admin@example.com", "admin_password": new_password(),
           "pg_password": new_password(), "service_password": new_password(), "secret_key": "k" * 48}
    pg = Postgres(state / "postgres", old["pg_port"], old["pg_password"], admin_password=None)  # the old layout
    pg.init()
    pg.start()
    try:
        pg.create_database()

        async def fill() -> None:
            conn = await asyncpg.connect(pg.url)
            try:
                await migrations.migrate(conn)
                await conn.execute("INSERT INTO organizations (slug, name) VALUES ('old', 'Old')")
                assert await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
            finally:
                await conn.close()

        asyncio.run(fill())
    finally:
        pg.stop()
    (state / "stack.json").write_text(json.dumps(old))
    os.chmod(state / "stack.json", 0o600)

    up = UpProcess(state)
    try:
        up.wait_ready()
        assert "PostgreSQL's superuser is now 'postgres'" in up.text()
        new = json.loads((state / "stack.json").read_text())
        assert new["pg_password"] == old["pg_password"] and new["pg_admin_password"]
        url = f"postgresql://lms:{old['pg_password']}@127.0.0.1:{old['pg_port']}/lms"
        check = ["psql", url, "-tAc", "SELECT rolsuper, rolcreatedb, (SELECT string_agg(DISTINCT tableowner, ',') "
                 "FROM pg_tables WHERE schemaname = 'public') FROM pg_roles WHERE rolname = current_user"]
        assert subprocess.run(check, capture_output=True, text=True).stdout.strip() == "f|f|lms"
        admin = (f"postgresql://postgres:{new['pg_admin_password']}@127.0.0.1:{old['pg_port']}/lms")
        out = subprocess.run(["psql", admin, "-tAc", "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"],
                             capture_output=True, text=True)
        assert out.stdout.strip() == "t", out
        # The data is there and the application still writes: a device in the old organization.
        r = run_lms("device", "create", "old", "d1", "--json", env={"LMS_STATE_DIR": str(state)})
        assert r.returncode == 0, r.stderr
        assert run_lms("org", "create", "newer", env={"LMS_STATE_DIR": str(state)}).returncode == 0
    finally:
        assert up.interrupt() == 0, up.text()

    again = UpProcess(state)  # and the converted folder starts as any other
    try:
        again.wait_ready()
        assert "superuser is now" not in again.text()
    finally:
        assert again.interrupt() == 0, again.text()
