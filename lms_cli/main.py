"""The ``lms`` command line. Every failure a user can cause ends in one line on stderr."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from lms_cli.localstack import StackError
from lms_core.errors import LmsError

if TYPE_CHECKING:
    from lms_core.provisioning import Provisioner

T = TypeVar("T")

EXIT_USAGE = 2


def _settings(env: Mapping[str, str] | None = None, *, require_secret: bool = True) -> Any:
    from lms_cli.stack import settings_env
    from lms_core.settings import Settings

    merged = dict(settings_env())  # the local stack's, if there is one in this folder
    merged.update(os.environ if env is None else env)
    return Settings.from_env(merged, require_secret=require_secret)


def _warn_insecure_secret(settings: Any, what: str) -> None:
    """Say at start, at WARNING, that this process runs on the public development secret."""
    import logging

    if settings.insecure_secret:
        logging.getLogger("lms.cli").warning(
            "INSECURE: LMS_DEV_INSECURE_SECRET=1 and no LMS_SECRET_KEY: the %s runs on the public development "
            "secret; anyone can forge its tokens and derive device passwords. Never expose it to a network.", what)


# -- commands ------------------------------------------------------------------------

def cmd_up(args: argparse.Namespace) -> int:
    from lms_cli.stack import LocalStack

    stack = LocalStack(Path(args.state), mqtt_port=args.mqtt_port, pg_port=args.pg_port, api_port=args.api_port,
                       listen=args.listen, device_host=args.device_host, registration=args.registration,
                       demo=args.demo)
    return stack.run()


def cmd_env(args: argparse.Namespace) -> int:
    from lms_cli.stack import settings_env

    env = settings_env(Path(args.state))
    if not env:
        raise StackError(f"no local stack in {args.state}: run `lms up` first")
    for key, value in env.items():
        print(f"export {key}='{value}'")
    return 0


def cmd_settings(args: argparse.Namespace) -> int:
    from lms_core.settings import README_END, README_START, Settings, declared, markdown_table

    if args.update:
        path = Path(args.update)
        try:
            text = path.read_text()
        except OSError as exc:
            raise StackError(f"cannot read {path}: {exc.strerror}") from None
        start, end = text.find(README_START), text.find(README_END)
        if start < 0 or end < start:
            raise StackError(f"{path} has no {README_START} ... {README_END} markers")
        head = text[:start + len(README_START)]
        path.write_text(head + "\n" + markdown_table() + text[end:])
        print(f"updated the settings table in {path}")
    elif args.markdown:
        print(markdown_table(), end="")
    else:
        for d in declared(Settings):
            print(f"{d.var}  {d.meta.description}")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from lms_core import db, migrations, rollups

    settings = _settings(require_secret=False)  # migrations sign and derive nothing

    async def main() -> tuple[list[Any], bool]:
        conn = await db.connect(settings.database_url)
        try:
            done = await migrations.migrate(conn, progress=lambda m: print(m, flush=True))
            return done, await rollups.complete(conn)
        finally:
            await conn.close()

    done, complete = asyncio.run(main())
    print(f"{len(done)} migration(s) applied; schema is up to date")
    if not complete:
        print("the rollups of readings are incomplete: once every bridge runs this version, run "
              "`lms rollups backfill` (safe while the platform runs); until then charts read raw rows")
    return 0


def cmd_rollups(args: argparse.Namespace) -> int:
    """Build the rollups of readings stored before migration 0009 (or after a bridge ran with
    LMS_BRIDGE_ROLLUPS=off); safe while bridges and the API run (lms_core/rollups.py)."""
    from lms_core import db, rollups

    settings = _settings(require_secret=False)

    async def main() -> int:
        conn = await db.connect(settings.database_url)
        try:
            return await rollups.backfill(conn, progress=lambda m: print(m, flush=True), slice_rows=args.slice_rows)
        finally:
            await conn.close()

    asyncio.run(main())
    return 0


def cmd_bridge(args: argparse.Namespace) -> int:
    from bridge.main import run
    from lms_core import logs

    settings = _settings()
    logs.setup(settings.log_level)
    _warn_insecure_secret(settings, "bridge")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run(settings, stop)

    asyncio.run(main())
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    from api.app import create_app
    from lms_cli.localstack import port_free
    from lms_core import logs

    settings = _settings()
    logs.setup(settings.log_level)
    _warn_insecure_secret(settings, "API")
    if not port_free(settings.api.port, settings.api.host):
        raise StackError(f"port {settings.api.port} (API) is already in use")
    uvicorn.run(create_app(settings), host=settings.api.host, port=settings.api.port, log_config=None,
                access_log=False, server_header=False, proxy_headers=False,
                # WebSocket streams (api/stream/): requests are small JSON frames; a peer that
                # stops answering pings is dropped; no per-message compression (a deflate
                # context per client costs each frame's CPU once per client, not once). The
                # sans-I/O implementation: measured ~p99 167 ms vs 300 ms for 1,000 clients
                # (bench/stream.py), with the same flow control (a send waits while the
                # socket's buffer is full, which is what finds a slow client).
                ws="websockets-sansio", ws_max_size=64 * 1024, ws_ping_interval=20, ws_ping_timeout=20,
                ws_per_message_deflate=False)
    return 0


def cmd_user(args: argparse.Namespace) -> int:
    import getpass

    from api.auth.service import AuthService
    from lms_core import db

    settings = _settings()
    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            raise StackError("the two passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\n")

    async def main() -> int:
        async with db.create_pool(settings.database_url, min_size=1, max_size=2) as pool:
            return await AuthService(pool, settings.api, settings.secret_key).create_user(
                args.email, password, superuser=args.superuser)

    user_id = asyncio.run(main())
    print(f"user {args.email} created (id {user_id}{', superuser' if args.superuser else ''})")
    return 0


def _provisioner_call(org: str, call: Callable[[Provisioner], Awaitable[T]]) -> T:
    """Run ``call`` with a provisioner (a database pool and a broker connection, both closed
    after); a missing organization ``org`` is told how to create it."""
    from lms_core import db
    from lms_core.errors import NotFound
    from lms_core.provisioning import Provisioner

    settings = _settings()

    async def main() -> T:
        async with db.create_pool(settings.database_url, min_size=1, max_size=2) as pool, \
                Provisioner.open(settings, pool) as prov:
            try:
                return await call(prov)
            except NotFound as exc:
                if str(exc).startswith(f"organization {org} "):  # say how to make one
                    raise NotFound(f"{exc}; create it first with `lms org create {org}`") from None
                raise

    return asyncio.run(main())


def _print_credentials(creds: Any, as_json: bool, verb: str) -> None:
    import msgspec

    if as_json:
        print(msgspec.json.encode(creds).decode())
        return
    u = creds
    host_port = u.mqtt_url.split("://", 1)[1]
    host, port = host_port.rsplit(":", 1)
    print(f"device {u.topic_prefix.split('/', 1)[1]} {verb}; the password is shown only now\n"
          f"  mqtt url:     {u.mqtt_url}\n  username:     {u.username}\n  password:     {u.password}\n"
          f"  client id:    {u.client_id}\n  topic prefix: {u.topic_prefix}\n\n"
          f"  mosquitto_pub -h {host} -p {port} -u '{u.username}' -P '{u.password}' -i '{u.client_id}' -q 1 \\\n"
          f"    -t '{u.topic_prefix}/telemetry' -m '{{\"temp\": 21.5}}'")


def _write_firmware_config(creds: Any, target: str) -> None:
    """The firmware's ``lms_config.json`` for ``creds``: on stdout (``-``) or into a new file
    readable by its owner only (it holds the device's password)."""
    from lms_core.firmware import firmware_config

    text = json.dumps(firmware_config(creds), indent=2) + "\n"
    if target == "-":
        print(text, end="")
        return
    try:
        # The mode of os.open applies only to a file it creates: an existing one is made
        # owner-only before the password goes in, and a symlink is refused (in a shared
        # folder it could point anywhere).
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.ftruncate(fd, 0)
        except OSError:
            os.close(fd)
            raise
    except OSError as exc:
        raise StackError(f"cannot write {target}: {exc.strerror}; the password was not shown - "
                         f"`lms device rotate --firmware-config FILE` issues a new one") from None
    with os.fdopen(fd, "w") as f:
        f.write(text)
    print(f"wrote {target} (mode 0600, holds the device's password): set the Wi-Fi name and password in it, "
          "then copy it to the board as lms_config.json", file=sys.stderr)


def cmd_device(args: argparse.Namespace) -> int:
    if args.action in ("create", "rotate"):
        if args.action == "create":
            creds = _provisioner_call(args.org, lambda p: p.create_device(args.org, args.device, args.name or "",
                                                                          create_org=False))
        else:
            creds = _provisioner_call(args.org, lambda p: p.rotate_credentials(args.org, args.device))
        if args.firmware_config is not None:
            _write_firmware_config(creds, args.firmware_config)
        else:
            _print_credentials(creds, args.json, "created" if args.action == "create" else "has new credentials")
    else:
        enabled = args.action == "enable"
        _provisioner_call(args.org, lambda p: p.set_enabled(args.org, args.device, enabled))
        print(f"device {args.org}/{args.device} {'enabled' if enabled else 'disabled and disconnected'}")
    return 0


def _raise_open_files(need: int) -> None:
    """Lift the soft open-file limit to the hard one; refuse a fleet that cannot fit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if need > hard:
        raise StackError(f"{need} connections need {need} open files; this process may open {hard} "
                         "(raise it with `ulimit -n`)")


def cmd_simulate(args: argparse.Namespace) -> int:
    """``lms simulate``: N devices speaking the firmware's protocol (lms_cli/simulate.py)."""
    from lms_cli.simulate import run_fleet
    from lms_core import db
    from lms_core.provisioning import Provisioner
    from lms_core.settings import MqttUrl

    settings = _settings()
    _raise_open_files(args.devices + 64)
    slugs = [f"{args.prefix}-{i:05d}" for i in range(1, args.devices + 1)]

    async def provision() -> list[Any]:
        async with db.create_pool(settings.database_url, min_size=1, max_size=2) as pool:
            made = await pool.fetchval("INSERT INTO organizations (slug, name) VALUES ($1, $1) "
                                       "ON CONFLICT (slug) DO NOTHING RETURNING id", args.org)
            if made:
                print(f"created organization {args.org} for the simulated devices", flush=True)
            async with Provisioner.open(settings, pool) as prov:
                return await prov.ensure_devices(args.org, slugs, tags=["simulated"])

    creds = asyncio.run(provision())
    print(f"{len(creds)} devices {args.org}/{slugs[0]} … {slugs[-1]}, one reading every {args.rate} s each; "
          "Ctrl-C stops", flush=True)

    async def main() -> Any:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await run_fleet(MqttUrl.parse(settings.device_mqtt_url), creds, args.rate, seconds=args.seconds,
                               stop=stop, spike_chance=args.spike_chance, connect_rate=args.connect_rate,
                               progress=args.progress)

    stats = asyncio.run(main())
    print(f"stopped: {stats.line()}")
    return 0


def cmd_org(args: argparse.Namespace) -> int:
    """``lms org create``: the one way the command line makes an organization.

    Adding a device (``lms device create``) never creates or adopts one: an organization
    that already exists belongs to whoever made it, and a taken slug is said out loud.
    """
    import asyncpg

    from api.auth.service import audit
    from lms_core import db
    from lms_core.errors import AlreadyExists, NotFound

    settings = _settings(require_secret=False)  # nothing is signed or derived

    async def main() -> None:
        conn = await db.connect(settings.database_url)
        try:
            async with conn.transaction():
                owner = None
                if args.owner:
                    owner = await conn.fetchval("SELECT id FROM users WHERE lower(email) = lower($1)", args.owner)
                    if owner is None:
                        raise NotFound(f"no user {args.owner}; create it first with `lms user create {args.owner}`")
                try:
                    org_id = await conn.fetchval("INSERT INTO organizations (slug, name) VALUES ($1, $2) RETURNING id",
                                                 args.slug, args.name or args.slug)
                except asyncpg.UniqueViolationError:
                    raise AlreadyExists(f"organization {args.slug} already exists (slugs are unique; "
                                        "choose another)") from None
                if owner is not None:
                    await conn.execute("INSERT INTO memberships (org_id, user_id, role) VALUES ($1, $2, 'owner')",
                                       org_id, owner)
                await audit(conn, "org.created", actor=owner, org_id=org_id, target=args.slug,
                            detail={"via": "cli"})
        finally:
            await conn.close()

    asyncio.run(main())
    print(f"organization {args.slug} created" + (f", owned by {args.owner}" if args.owner else
                                                 " (no owner yet: --owner EMAIL gives it one)"))
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    from bridge.main import reconcile_broker
    from lms_core import db

    settings = _settings()

    async def main() -> dict[str, int]:
        async with db.create_pool(settings.database_url, min_size=1, max_size=2) as pool:
            return await reconcile_broker(settings, pool)

    print(json.dumps(asyncio.run(main())))
    return 0


def cmd_broker_init(args: argparse.Namespace) -> int:
    from lms_core.broker import write_bootstrap
    from lms_core.topics import TopicScheme

    settings = _settings(require_secret=False)  # only the broker's service account is written
    path = Path(args.path)
    if path.exists():
        print(f"{path} exists; left as it is (the bridge reconciles it with the database)")
        return 0
    assert settings.mqtt.username and settings.mqtt.password  # checked by Settings
    write_bootstrap(str(path), settings.mqtt.username, settings.mqtt.password, TopicScheme(settings.topic_root))
    print(f"wrote {path} with the service account {settings.mqtt.username}")
    return 0


# -- parser ----------------------------------------------------------------------------

def _slug(value: str) -> str:
    from lms_core.topics import check_slug

    try:
        return check_slug(value)
    except LmsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _device_prefix(value: str) -> str:
    """A slug that still is one with ``-100000`` after it (the simulator's device slugs)."""
    slug = _slug(value)
    if len(slug) > 56:
        raise argparse.ArgumentTypeError(f"at most 56 characters (device slugs add -NNNNN), got {len(slug)}")
    return slug


def _number_from(lo: float, hi: float, what: str) -> Any:
    """An argparse type: a finite number from ``lo`` to ``hi`` (float() also takes nan and inf)."""
    def parse(value: str) -> float:
        try:
            x = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
        if not lo <= x <= hi:  # false for nan too
            raise argparse.ArgumentTypeError(f"{what} must be {lo:g}-{hi:g}, got {value}")
        return x
    return parse


def _display_name(value: str) -> str:
    if not 1 <= len(value) <= 200 or not value.isprintable():
        raise argparse.ArgumentTypeError("a name is 1-200 printable characters")
    return value


def _address(value: str) -> str:
    import ipaddress

    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address: {value!r}") from None


def _hostname(value: str) -> str:
    import re

    if not re.fullmatch(r"[A-Za-z0-9.:-]{1,253}", value):
        raise argparse.ArgumentTypeError(f"not a host name or address: {value!r}")
    return value


def _count(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if not 1 <= n <= 100_000:
        raise argparse.ArgumentTypeError(f"must be 1-100000, got {n}")
    return n


def _seconds(value: str) -> float:
    try:
        s = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not 0.1 <= s <= 86400:
        raise argparse.ArgumentTypeError(f"must be 0.1-86400 seconds, got {s}")
    return s


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 1-65535, got {port}")
    return port


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lms", description="LMS Core: MQTT-native IoT platform")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    state_default = os.environ.get("LMS_STATE_DIR", ".lms")

    up = sub.add_parser("up", help="start the whole local stack (Mosquitto, PostgreSQL, bridge, API)")
    up.add_argument("--state", default=state_default, help="state folder (default: .lms)")
    up.add_argument("--mqtt-port", type=_port, help="MQTT port (default 1883, or a free one on first start)")
    up.add_argument("--pg-port", type=_port, help="PostgreSQL port (default 5432, or a free one on first start)")
    up.add_argument("--api-port", type=_port, help="API port (default 8000, or a free one on first start)")
    up.add_argument("--listen", type=_address, help="address the MQTT broker listens on (default 127.0.0.1; "
                                                     "0.0.0.0 lets devices on your network connect)")
    up.add_argument("--device-host", type=_hostname,
                    help="host name or address devices are told to connect to (default: this machine's name when "
                         "listening on all addresses)")
    up.add_argument("--registration", action="store_true",
                    help="let anyone who reaches the API sign up (off by default; limited per address)")
    up.add_argument("--demo", action="store_true",
                    help="also a demo organization: a user (printed), a site, five devices running the firmware, "
                         "a desired config and an alert rule")
    up.set_defaults(fn=cmd_up)

    env = sub.add_parser("env", help="print the running local stack's settings as shell exports")
    env.add_argument("--state", default=state_default)
    env.set_defaults(fn=cmd_env)

    st = sub.add_parser("settings", help="list the LMS_* settings (the README's table is generated from them)")
    st.add_argument("--markdown", action="store_true", help="print them as the README's Markdown table")
    st.add_argument("--update", metavar="README", help="rewrite the table between the settings-table markers "
                                                      "of this file")
    st.set_defaults(fn=cmd_settings)

    sub.add_parser("migrate", help="apply database migrations (LMS_DATABASE_URL)").set_defaults(fn=cmd_migrate)
    ro = sub.add_parser("rollups", help="rollups of readings (migration 0009)")
    rsub = ro.add_subparsers(dest="action", required=True)
    rb = rsub.add_parser("backfill", help="build the rollups of every stored reading, slice by slice, with "
                         "progress; safe on a live system once every bridge runs this version")
    rb.add_argument("--slice-rows", type=int, default=50_000, help="readings per transaction (default 50000)")
    rb.set_defaults(fn=cmd_rollups)
    sub.add_parser("bridge", help="run one bridge process (LMS_DATABASE_URL, LMS_MQTT_URL)").set_defaults(
        fn=cmd_bridge)
    sub.add_parser("api", help="run one API process (LMS_API_HOST:LMS_API_PORT)").set_defaults(fn=cmd_api)
    user = sub.add_parser("user", help="manage user accounts")
    usub = user.add_subparsers(dest="action", required=True, metavar="ACTION")
    uc = usub.add_parser("create", help="create a user; the password is read from a prompt or stdin")
    uc.add_argument("email")
    uc.add_argument("--superuser", action="store_true", help="platform superuser (all organizations)")
    uc.set_defaults(fn=cmd_user)
    sub.add_parser("reconcile", help="bring the broker's credentials in line with the database").set_defaults(
        fn=cmd_reconcile)

    bi = sub.add_parser("broker-init", help="write the broker's first dynamic-security file (service account "
                                           "from LMS_MQTT_URL); for deployments other than `lms up`")
    bi.add_argument("path", help="where the broker's plugin_opt_config_file points")
    bi.set_defaults(fn=cmd_broker_init)

    org = sub.add_parser("org", help="manage organizations")
    osub = org.add_subparsers(dest="action", required=True, metavar="ACTION")
    oc = osub.add_parser("create", help="create an organization (refused if the slug is taken)")
    oc.add_argument("slug", type=_slug, help="organization slug, as in topics: lms/SLUG/...")
    oc.add_argument("--name", type=_display_name, help="display name (default: the slug)")
    oc.add_argument("--owner", metavar="EMAIL", help="an existing user who becomes its owner")
    oc.set_defaults(fn=cmd_org)

    sim = sub.add_parser("simulate", help="run simulated devices that speak the firmware's protocol")
    sim.add_argument("--devices", type=_count, default=10, help="how many (default 10)")
    sim.add_argument("--rate", type=_seconds, default=10.0, help="seconds between two readings of a device "
                                                                 "(default 10)")
    sim.add_argument("--org", type=_slug, default="sim", help="their organization (default sim; created if missing)")
    sim.add_argument("--prefix", type=_device_prefix, default="sim", help="device slugs PREFIX-00001 … (default sim)")
    sim.add_argument("--seconds", type=_seconds, help="stop after this long (default: on Ctrl-C)")
    sim.add_argument("--spike-chance", type=_number_from(0, 1, "a chance"), default=0.0,
                     help="chance per reading of a warm spell (something for an alert rule)")
    sim.add_argument("--connect-rate", type=_number_from(0.1, 1_000_000, "connections per second"), default=500.0,
                     help="new connections per second at most, at start and after a broker restart (default 500)")
    sim.add_argument("--progress", type=_seconds, default=2.0, help="seconds between progress lines (default 2)")
    sim.set_defaults(fn=cmd_simulate)

    dev = sub.add_parser("device", help="provision and manage devices")
    dsub = dev.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (("create", "create a device and its MQTT credentials"),
                         ("rotate", "issue new MQTT credentials (the old password stops working)"),
                         ("disable", "disable a device and disconnect it"),
                         ("enable", "enable a disabled device")):
        a = dsub.add_parser(action, help=text)
        a.add_argument("org", type=_slug, help="organization slug (an existing one: `lms org create` makes it)")
        a.add_argument("device", type=_slug, help="device slug")
        if action in ("create", "rotate"):
            a.add_argument("--json", action="store_true", help="print the credentials as JSON")
            a.add_argument("--firmware-config", nargs="?", const="-", metavar="FILE",
                           help="instead, the firmware's lms_config.json (Wi-Fi placeholders, broker, credentials, "
                                "topic prefix): into FILE (mode 0600), or on stdout without FILE")
        if action == "create":
            a.add_argument("--name", help="display name")
        a.set_defaults(fn=cmd_device)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except (LmsError, StackError) as exc:
        print(f"lms: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
