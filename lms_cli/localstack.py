"""A private PostgreSQL cluster and Mosquitto broker in a folder, on chosen ports.

Used by ``lms up`` (state folder ``.lms/``) and by the test harness (a temporary
folder). Both servers run as child processes. Run as root, PostgreSQL is started as the
``postgres`` user (it refuses root) and Mosquitto drops to ``mosquitto`` by itself, so
their folders are handed to those users.
"""

from __future__ import annotations

import asyncio
import glob
import hashlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import asyncpg

from lms_core.broker import write_bootstrap
from lms_core.topics import TopicScheme

REPO = Path(__file__).resolve().parent.parent
MOSQUITTO_CONF = REPO / "mosquitto" / "mosquitto.conf"
#: The broker plugin refusing devices' retained messages outside ``status``: its source, and
#: where the launcher's mosquitto/plugin/build.sh puts it (with the source's sha256 beside).
RETAIN_PLUGIN_SRC = REPO / "mosquitto" / "plugin" / "lms_retain.c"
RETAIN_PLUGIN = REPO / ".lms-build" / "lms_retain.so"
SERVICE_USER = "lms-service"


class StackError(Exception):
    """A one-line, user-facing reason the local stack cannot start."""


# -- discovery -----------------------------------------------------------------------

def find_mosquitto() -> str:
    path = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if not path:
        raise StackError("mosquitto is not installed: sudo apt-get install -y mosquitto mosquitto-clients")
    return path


def find_dynsec_plugin() -> str:
    candidates = (
        glob.glob("/usr/lib/*/mosquitto_dynamic_security.so")
        + glob.glob("/usr/lib/mosquitto_dynamic_security.so")
        + glob.glob("/usr/local/lib/mosquitto_dynamic_security.so")
        + glob.glob("/usr/local/lib/*/mosquitto_dynamic_security.so")
    )
    if not candidates:
        raise StackError("mosquitto's dynamic-security plugin is missing: sudo apt-get install -y mosquitto")
    return candidates[0]


def find_retain_plugin() -> Path:
    """The built lms_retain plugin, current with its source.

    No fallback: without it a device could fill the broker with retained messages, and a
    broker that quietly started without a security control would hide that.
    """
    build = "run ./lms (it builds it) or: bash mosquitto/plugin/build.sh"
    if not RETAIN_PLUGIN.is_file():
        raise StackError(f"the broker plugin {RETAIN_PLUGIN} is not built: {build}")
    want = hashlib.sha256(RETAIN_PLUGIN_SRC.read_bytes()).hexdigest()
    stamp = RETAIN_PLUGIN.with_name("lms_retain.sha256")
    have = stamp.read_text().strip() if stamp.is_file() else ""
    if have != want:
        raise StackError(f"the broker plugin {RETAIN_PLUGIN} is older than its source: {build}")
    return RETAIN_PLUGIN


def find_pg_bin() -> Path:
    """The folder of ``initdb`` and ``postgres`` (Debian keeps them off PATH)."""
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: int(p.split("/")[-3]) if p.split("/")[-3].isdigit() else 0)
    if not versions:
        raise StackError("PostgreSQL is not installed: sudo apt-get install -y postgresql")
    return Path(versions[-1]).parent


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
            raise StackError(f"{what} exited at start ({'; '.join(tail) or 'no output'}); log: {log}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise StackError(f"{what} did not open port {port} within {timeout:.0f} s; log: {log}")


def _unprivileged(name: str) -> pwd.struct_passwd | None:
    """The account to run a server as when we are root, else None (run as ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise StackError(f"running as root needs a '{name}' user to run the server as "
                         f"(the Debian package creates it)") from None


def _chown_tree(path: Path, user: pwd.struct_passwd | None) -> None:
    if user is None:
        return
    for root, _dirs, files in os.walk(path):
        os.chown(root, user.pw_uid, user.pw_gid)
        for name in files:
            os.chown(os.path.join(root, name), user.pw_uid, user.pw_gid)
    # Parents must be traversable by the server's user (mkdtemp makes 0700 folders, and
    # /root is 0700). Only the search bit is added, never read, and it is said out loud.
    parent = path.parent
    while parent != parent.parent:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            os.chmod(parent, mode | 0o001)
            if not str(parent).startswith(tempfile.gettempdir()):
                print(f"lms: note: made {parent} traversable by other users (o+x) so that the "
                      f"'{user.pw_name}' user can reach {path}", file=sys.stderr)
        parent = parent.parent


def open_log(path: Path) -> BinaryIO:
    """A log file for a child's output, readable by us alone (0600, also when it exists).

    Logs carry payload excerpts and e-mail addresses. The child writes through the
    inherited descriptor, so the server's own OS user never needs to open the file.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)  # a log from before this rule
    return os.fdopen(fd, "ab")


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


_SPLIT_HELPER = "lms_split_helper"

#: ALTER ... OWNER statements handing what the bootstrap superuser (oid 10) owns in the
#: application's schemas to the new owner ($1). Tables take their indexes and owned
#: sequences along; the second query runs after the first in one statement list, so an
#: owned sequence is never altered on its own (PostgreSQL refuses that).
_HAND_OVER = """
WITH schemas AS (
    SELECT oid, nspname FROM pg_namespace
    WHERE nspname NOT IN ('pg_catalog', 'information_schema') AND nspname NOT LIKE 'pg\\_%'
)
SELECT format('ALTER SCHEMA %I OWNER TO %I', nspname, $1::text) FROM pg_namespace
 WHERE oid IN (SELECT oid FROM schemas) AND nspowner = 10
UNION ALL
SELECT format('ALTER %s %s OWNER TO %I',
              CASE c.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                             WHEN 'f' THEN 'FOREIGN TABLE' WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END,
              c.oid::regclass, $1::text)
  FROM pg_class c
 WHERE c.relnamespace IN (SELECT oid FROM schemas) AND c.relowner = 10 AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
   AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                   AND d.deptype IN ('a', 'i') AND c.relkind = 'S')
UNION ALL
SELECT format('ALTER ROUTINE %s OWNER TO %I', p.oid::regprocedure, $1::text) FROM pg_proc p
 WHERE p.pronamespace IN (SELECT oid FROM schemas) AND p.proowner = 10
UNION ALL
SELECT format('ALTER TYPE %s OWNER TO %I', t.oid::regtype, $1::text) FROM pg_type t
 WHERE t.typnamespace IN (SELECT oid FROM schemas) AND t.typowner = 10 AND t.typtype IN ('e', 'd', 'r', 'm')
"""


def _stop(proc: subprocess.Popen[bytes] | None, sig: int, timeout: float = 30) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- PostgreSQL ----------------------------------------------------------------------

@dataclass
class Postgres:
    """A PostgreSQL cluster in ``datadir`` listening on 127.0.0.1:``port``.

    The cluster's superuser (``admin_user``) is not the application's role: ``user`` logs
    in, owns ``database`` and nothing else (NOSUPERUSER NOCREATEDB NOCREATEROLE), so a
    leaked application password or an injected statement cannot read files, run programs
    or touch other databases. ``admin_password=None`` describes a cluster made before that
    split, where ``user`` is itself the superuser; it keeps working as it was.
    """

    datadir: Path
    port: int
    password: str
    user: str = "lms"
    database: str = "lms"
    extra_conf: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    admin_password: str | None = field(default_factory=lambda: new_password())
    admin_user: str = "postgres"

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    @property
    def superuser(self) -> tuple[str, str]:
        """(name, password) of the cluster's superuser."""
        if self.admin_password is None:
            return self.user, self.password
        return self.admin_user, self.admin_password

    def admin_url(self, database: str = "postgres") -> str:
        """The superuser's URL: for creating roles and databases, stopping, inspecting."""
        name, password = self.superuser
        return f"postgresql://{name}:{password}@127.0.0.1:{self.port}/{database}"

    @property
    def log_path(self) -> Path:
        return self.datadir.parent / "postgres.log"

    def initialized(self) -> bool:
        return (self.datadir / "PG_VERSION").exists()

    def init(self) -> None:
        bindir = find_pg_bin()
        runas = _unprivileged("postgres")
        self.datadir.mkdir(parents=True, exist_ok=True)
        pwfile = self.datadir.parent / ".pgpass-init"
        admin, admin_password = self.superuser
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the superuser's password
        with os.fdopen(fd, "w") as f:
            f.write(admin_password + "\n")
        _chown_tree(self.datadir, runas)
        if runas:
            os.chown(pwfile, runas.pw_uid, runas.pw_gid)
        try:
            out = subprocess.run(
                [str(bindir / "initdb"), "-D", str(self.datadir), "-U", admin, "--pwfile", str(pwfile),
                 "--auth-host=scram-sha-256", "--auth-local=scram-sha-256", "-E", "UTF8",
                 "--locale=C", "--no-sync"],
                capture_output=True, user=runas.pw_uid if runas else None,
                group=runas.pw_gid if runas else None, check=False,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if out.returncode != 0:
            msg = (out.stderr or out.stdout).decode(errors="replace").strip().splitlines()
            raise StackError(f"initdb failed: {msg[-1] if msg else out.returncode}")

    def start(self) -> None:
        if not port_free(self.port):
            raise StackError(f"port {self.port} (PostgreSQL) is already in use")
        bindir = find_pg_bin()
        runas = _unprivileged("postgres")
        opts = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.datadir),
            "max_connections": "100",
            **self.extra_conf,
        }
        args = [str(bindir / "postgres"), "-D", str(self.datadir)]
        for k, v in opts.items():
            args += ["-c", f"{k}={v}"]
        log = open_log(self.log_path)
        self.proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            user=runas.pw_uid if runas else None, group=runas.pw_gid if runas else None,
            start_new_session=True,
        )
        log.close()
        wait_port(self.port, self.proc, "PostgreSQL", self.log_path)
        self._wait_accepting()

    def _wait_accepting(self, timeout: float = 30) -> None:
        bindir = find_pg_bin()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = subprocess.run([str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"],
                               check=False)
            if r.returncode == 0:
                return
            time.sleep(0.1)
        raise StackError(f"PostgreSQL did not accept connections; log: {self.log_path}")

    def create_database(self) -> None:
        """Create the application's role and database if missing (idempotent).

        As the superuser: the role gets its password from ``password`` at every start (so
        the state folder stays the source of truth) and no power beyond owning its database.
        """
        async def main() -> None:
            try:
                try:
                    conn = await asyncpg.connect(self.admin_url(), timeout=10)
                except asyncpg.InvalidAuthorizationSpecificationError:
                    if self.admin_password is None:
                        raise
                    try:
                        conn = await self._split_bootstrap_superuser()
                    except asyncpg.PostgresError as exc:  # rolled back: the old layout is intact
                        raise StackError(f"cannot give this older cluster a separate superuser "
                                         f"'{self.admin_user}': {exc}") from None
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                raise StackError(f"cannot connect to PostgreSQL as {self.superuser[0]}: {exc}") from None
            try:
                if self.admin_password is not None:
                    # Left behind if a start stopped between the split's commit and its end.
                    await conn.execute(f"DROP ROLE IF EXISTS {_ident(_SPLIT_HELPER)}")
                    exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", self.user)
                    await conn.execute(
                        f"{'ALTER' if exists else 'CREATE'} ROLE {_ident(self.user)} LOGIN NOSUPERUSER NOCREATEDB "
                        f"NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD {_literal(self.password)}")
                await self._create_database(conn, self.database)
            except asyncpg.PostgresError as exc:
                raise StackError(f"cannot create the database {self.database}: {exc}") from None
            finally:
                await conn.close()

        asyncio.run(main())

    async def _split_bootstrap_superuser(self) -> asyncpg.Connection:
        """Turn a cluster made before the split (``user`` is its superuser) into the layout
        of a new one, in place; return a connection as the superuser.

        PostgreSQL never demotes the bootstrap superuser (the role initdb made), so that role
        is renamed to ``admin_user`` and takes ``admin_password``, and ``user`` is made anew
        without powers and given the database and everything in it. One transaction: a
        failure leaves the old layout, still working. Re-raises the admin login's refusal
        when the cluster is not such a one.
        """
        old = await asyncpg.connect(self.url.rsplit("/", 1)[0] + "/postgres", timeout=10)
        helper, helper_password = _SPLIT_HELPER, new_password()
        try:
            if not await old.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user AND oid = 10"):
                raise StackError(f"cannot log in to PostgreSQL as {self.admin_user}, and {self.user} is not the "
                                 "cluster's superuser; check the passwords in the state folder")
            # The session user cannot rename itself: a helper superuser does it.
            await old.execute(f"DROP ROLE IF EXISTS {_ident(helper)}")
            await old.execute(f"CREATE ROLE {_ident(helper)} LOGIN SUPERUSER PASSWORD {_literal(helper_password)}")
        finally:
            await old.close()
        url = f"postgresql://{helper}:{helper_password}@127.0.0.1:{self.port}/{self.database}"
        conn = await asyncpg.connect(url, timeout=10)
        try:
            async with conn.transaction():
                await conn.execute(f"ALTER ROLE {_ident(self.user)} RENAME TO {_ident(self.admin_user)}")
                assert self.admin_password is not None
                await conn.execute(f"ALTER ROLE {_ident(self.admin_user)} PASSWORD {_literal(self.admin_password)}")
                await conn.execute(f"CREATE ROLE {_ident(self.user)} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE "
                                   f"NOREPLICATION NOBYPASSRLS PASSWORD {_literal(self.password)}")
                await conn.execute(f"ALTER DATABASE {_ident(self.database)} OWNER TO {_ident(self.user)}")
                for statement in await conn.fetch(_HAND_OVER, self.user):
                    await conn.execute(statement[0])
        finally:
            await conn.close()
        admin = await asyncpg.connect(self.admin_url(), timeout=10)
        await admin.execute(f"DROP ROLE {_ident(helper)}")
        print(f"lms: note: PostgreSQL's superuser is now '{self.admin_user}' (password in the state folder); "
              f"'{self.user}' owns database {self.database} and has no other power", file=sys.stderr, flush=True)
        return admin

    async def _create_database(self, conn: asyncpg.Connection, name: str) -> None:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f"CREATE DATABASE {_ident(name)} OWNER {_ident(self.user)}")

    def database_url(self, name: str) -> str:
        """The application role's URL for another database on this cluster."""
        return self.url.rsplit("/", 1)[0] + "/" + name

    def stop(self) -> None:
        """Fast shutdown: roll back open transactions, checkpoint, exit."""
        _stop(self.proc, signal.SIGINT)


# -- Mosquitto -----------------------------------------------------------------------

@dataclass
class Mosquitto:
    """A Mosquitto broker with the project's configuration, state in ``workdir``."""

    workdir: Path
    port: int
    service_password: str
    topics: TopicScheme = field(default_factory=TopicScheme)
    listen: str = "127.0.0.1"  # 0.0.0.0 lets devices on the network in
    proc: subprocess.Popen[bytes] | None = None
    #: Load the lms_retain plugin (mosquitto/plugin/lms_retain.c). Always on for `lms up`;
    #: the tests switch it off only to show what the bridge's janitor does without it (as
    #: under compose.yaml when its plugin build is skipped).
    retain_plugin: bool = True

    @property
    def service_url(self) -> str:
        return f"mqtt://{SERVICE_USER}:{self.service_password}@127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir.parent / "mosquitto.log"

    @property
    def dynsec_path(self) -> Path:
        return self.workdir / "dynamic-security.json"

    def init(self) -> None:
        """Create the folder and the dynamic-security bootstrap (service account)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.dynsec_path.exists():
            write_bootstrap(str(self.dynsec_path), SERVICE_USER, self.service_password, self.topics)

    def write_config(self) -> Path:
        conf = self.workdir / "mosquitto.conf"
        header = [
            "# Generated by lms at every start; edit mosquitto/mosquitto.conf in the repository.",
            f"listener {self.port} {self.listen}",
            f"persistence_location {self.workdir}/",
        ]
        if self.retain_plugin:
            # First: the broker asks the plugins' ACL checks in this order and the first
            # answer that is not "defer" decides; lms_retain only ever refuses or defers.
            header += [
                f"plugin {find_retain_plugin()}",
                f"plugin_opt_topic_root {self.topics.root}",
                f"plugin_opt_service_user {SERVICE_USER}",
            ]
        header += [
            f"plugin {find_dynsec_plugin()}",
            f"plugin_opt_config_file {self.dynsec_path}",
            "log_dest stdout",
        ]
        conf.write_text("\n".join(header) + "\n\n" + MOSQUITTO_CONF.read_text())
        return conf

    def start(self) -> None:
        if not port_free(self.port, self.listen):
            raise StackError(f"port {self.port} (MQTT) is already in use")
        binary = find_mosquitto()
        conf = self.write_config()
        # As root Mosquitto switches to the 'mosquitto' user, which must own its state. The
        # persistence file holds queued payloads: only that user reads the folder.
        _chown_tree(self.workdir, _unprivileged("mosquitto"))
        os.chmod(self.workdir, 0o700)
        log = open_log(self.log_path)
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        wait_port(self.port, self.proc, "Mosquitto", self.log_path)

    def stop(self) -> None:
        """Clean stop: Mosquitto writes its persistence snapshot before exiting."""
        _stop(self.proc, signal.SIGTERM)


def new_password() -> str:
    return secrets.token_urlsafe(24)
