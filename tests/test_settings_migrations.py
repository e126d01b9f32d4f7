"""Settings validation and the migration runner's guarantees, on a real database."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import asyncpg
import pytest

from lms_core import migrations
from lms_core.errors import MigrationError, SettingsError
from lms_core.settings import DEV_SECRET, Settings
from tests.harness import Stack

BASE = {"LMS_DATABASE_URL": "postgresql://lms@127.0.0.1/lms", "LMS_MQTT_URL": "mqtt://svc:pw@127.0.0.1:1883",
        "LMS_SECRET_KEY": "s" * 40}


def test_defaults_and_overrides() -> None:
    s = Settings.from_env(BASE)
    assert s.mqtt.username == "svc" and s.mqtt.port == 1883 and s.device_mqtt_url == "mqtt://127.0.0.1:1883"
    assert s.bridge.subscription == "exclusive" and s.limits.max_metrics == 200
    s = Settings.from_env({**BASE, "LMS_MAX_METRICS": "5", "LMS_BRIDGE_SUBSCRIPTION": "SHARED"})
    assert s.limits.max_metrics == 5 and s.bridge.subscription == "shared"
    assert not s.api.cookie_secure and Settings.from_env({**BASE, "LMS_ENV": "Production"}).api.cookie_secure
    assert not Settings.from_env({**BASE, "LMS_ENV": "production", "LMS_API_COOKIE_SECURE": "off"}).api.cookie_secure
    s = Settings.from_env({**BASE, "LMS_API_TRUSTED_PROXIES": " 10.0.0.1, ,fd00::/8", "LMS_LOG_LEVEL": "debug",
                           "LMS_MAX_DEPTH": "", "LMS_API_CORS_ORIGINS": "https://a.example,http://b:8080"})
    assert s.api.trusted_proxies == ("10.0.0.1", "fd00::/8") and s.log_level == "DEBUG" and s.limits.max_depth == 8
    assert s.api.cors_origins == ("https://a.example", "http://b:8080")


@pytest.mark.parametrize("env, message", [
    ({"LMS_DATABASE_URL": ""}, "LMS_DATABASE_URL is not set"),
    ({"LMS_DATABASE_URL": "mysql://x"}, "must start with postgresql://"),
    ({"LMS_MQTT_URL": "http://x"}, "scheme must be mqtt://"),
    ({"LMS_MQTT_URL": "mqtt://127.0.0.1:1883"}, "service account"),
    ({"LMS_MQTT_URL": "mqtt://a:b@host:notaport"}, "bad port"),
    ({"LMS_MAX_METRICS": "0"}, "between 1 and"),
    ({"LMS_MAX_PAYLOAD_BYTES": "1e6"}, "must be an integer"),
    ({"LMS_METRIC_PATTERN": "("}, "not a valid regular expression"),
    ({"LMS_TOPIC_ROOT": "a/b"}, "LMS_TOPIC_ROOT"),
    ({"LMS_BRIDGE_CLIENT_ID": "has space"}, "LMS_BRIDGE_CLIENT_ID"),
    ({"LMS_BRIDGE_SUBSCRIPTION": "both"}, "exclusive, shared"),
    ({"LMS_ENV": "production", "LMS_SECRET_KEY": "short"}, "LMS_SECRET_KEY must be set"),
    ({"LMS_ENV": "staging"}, "LMS_ENV must be one of"),
    ({"LMS_API_TRUSTED_PROXIES": "10.0.0.1, lb.example"}, "not an address or network"),
    ({"LMS_API_CORS_ORIGINS": "dash.example.com"}, "is not an origin"),
    ({"LMS_BRIDGE_BATCH_SIZE": "x"}, r"^LMS_BRIDGE_BATCH_SIZE must be an integer between 1 and 100000, got 'x'$"),
    ({"LMS_API_REGISTRATION": "yes"}, r"^LMS_API_REGISTRATION must be one of off, on, got 'yes'$"),
    ({"LMS_TOPIC_ROOT": "lms\n"}, "LMS_TOPIC_ROOT must match"),
    # Every declared variable is checked when set, this one too (it was read only without a secret).
    ({"LMS_DEV_INSECURE_SECRET": "yes"}, "LMS_DEV_INSECURE_SECRET must be one of 0, 1"),
])
def test_bad_settings_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env({**BASE, **env})


def test_the_secret_is_required_unless_the_insecure_default_is_asked_for_by_name() -> None:
    no_secret = {k: v for k, v in BASE.items() if k != "LMS_SECRET_KEY"}
    for env in (no_secret, {**no_secret, "LMS_SECRET_KEY": ""}, {**no_secret, "LMS_SECRET_KEY": DEV_SECRET}):
        with pytest.raises(SettingsError, match=r"LMS_SECRET_KEY is not set.*LMS_DEV_INSECURE_SECRET=1"):
            Settings.from_env(env)
    s = Settings.from_env({**no_secret, "LMS_DEV_INSECURE_SECRET": "1"})
    assert s.secret_key == DEV_SECRET and s.insecure_secret
    assert not Settings.from_env(BASE).insecure_secret
    with pytest.raises(SettingsError, match="LMS_SECRET_KEY must be set"):
        Settings.from_env({**no_secret, "LMS_DEV_INSECURE_SECRET": "1", "LMS_ENV": "production"})
    with pytest.raises(SettingsError, match="LMS_DEV_INSECURE_SECRET must be one of"):
        Settings.from_env({**no_secret, "LMS_DEV_INSECURE_SECRET": "yes"})
    # Commands that sign and derive nothing (migrate, broker-init) do not need it.
    assert Settings.from_env(no_secret, require_secret=False).secret_key == DEV_SECRET


def test_the_application_role_owns_its_database_and_nothing_more(stack: Stack) -> None:
    (me,) = stack.query("""SELECT r.rolsuper, r.rolcreaterole, r.rolcreatedb, r.rolreplication, r.rolbypassrls,
                                  pg_get_userbyid(d.datdba) = current_user AS owns_db
                           FROM pg_roles r, pg_database d
                           WHERE r.rolname = current_user AND d.datname = current_database()""")
    assert dict(me) == {"rolsuper": False, "rolcreaterole": False, "rolcreatedb": False, "rolreplication": False,
                        "rolbypassrls": False, "owns_db": True}
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        stack.query("SELECT pg_read_file('PG_VERSION')")
    # The cluster's superuser is a separate role, for the harness only.
    assert stack.admin_query("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")[0][0] is True
    assert stack.admin_query("SELECT current_user")[0][0] != stack.pg.user


async def _fresh_db(stack: Stack, name: str) -> str:
    return await asyncio.to_thread(stack.fresh_database, name)


def test_migrations_apply_once_and_refuse_an_edited_file(stack: Stack, tmp_path: Path) -> None:
    folder = tmp_path / "migrations"
    shutil.copytree(migrations.DEFAULT_DIR, folder)

    async def run() -> None:
        url = await _fresh_db(stack, "migtest")
        conn = await asyncpg.connect(url)
        try:
            applied = await migrations.migrate(conn, folder)
            assert [m.version for m in applied] == [m.version for m in migrations.load(folder)]
            assert await migrations.migrate(conn, folder) == []
            # A new file is applied on its own.
            (folder / "0999_extra.sql").write_text("CREATE TABLE extra (id int);")
            assert [m.name for m in await migrations.migrate(conn, folder)] == ["extra"]
            # Editing an applied file is refused, and so is deleting one.
            (folder / "0999_extra.sql").write_text("CREATE TABLE extra (id bigint);")
            with pytest.raises(MigrationError, match="changed after it was applied"):
                await migrations.migrate(conn, folder)
            (folder / "0999_extra.sql").unlink()
            with pytest.raises(MigrationError, match="its file is missing"):
                await migrations.migrate(conn, folder)
            # A failing migration leaves nothing behind (it runs in a transaction).
            (folder / "0999_extra.sql").write_text("CREATE TABLE extra (id int);")
            (folder / "1000_broken.sql").write_text("CREATE TABLE half (id int); SELECT no_such_function();")
            with pytest.raises(MigrationError, match=r"1000_broken\.sql failed"):
                await migrations.migrate(conn, folder)
            assert await conn.fetchval("SELECT to_regclass('half')") is None
            assert await conn.fetchval("SELECT max(version) FROM schema_migrations") == 999
        finally:
            await conn.close()

    asyncio.run(run())


def test_badly_named_migration_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "1_init.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"named NNNN_name\.sql"):
        migrations.load(tmp_path)


def test_migrations_apply_as_a_database_owner_without_superuser_powers(stack: Stack) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(await _fresh_db(stack, "migowner"))
        try:
            assert await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user") is False
            # What broke the first 0001 on TimescaleDB hosts: this setting is the superuser's.
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetchval("SELECT current_setting('shared_preload_libraries')")
            applied = await migrations.migrate(conn)
            assert [m.version for m in applied] == [m.version for m in migrations.load()]
            assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(applied)
        finally:
            await conn.close()

    asyncio.run(run())
    # Here TimescaleDB is absent and the old check short-circuited before reading it, so the
    # files themselves are held to it: no migration reads a superuser-only setting.
    for m in migrations.load():
        code = "\n".join(line.split("--", 1)[0] for line in m.sql.splitlines())
        assert "current_setting('shared_preload_libraries')" not in code, m.name


def test_a_listed_superseded_checksum_is_accepted_and_replaced(stack: Stack, tmp_path: Path) -> None:
    folder = tmp_path / "migrations"
    shutil.copytree(migrations.DEFAULT_DIR, folder)

    async def run() -> None:
        conn = await asyncpg.connect(await _fresh_db(stack, "migsuper"))
        try:
            await migrations.migrate(conn, folder)
            # A database that applied the first 0001 (as every install before this change did).
            (old,) = migrations.SUPERSEDED[1]
            await conn.execute("UPDATE schema_migrations SET checksum = $1 WHERE version = 1", old)
            assert await migrations.migrate(conn, folder) == []
            current = next(m for m in migrations.load(folder) if m.version == 1).checksum
            assert await conn.fetchval("SELECT checksum FROM schema_migrations WHERE version = 1") == current

            # The mechanism on a file of our own: v1 applied, v2 replaces it in place.
            v1, v2 = "CREATE TABLE revised (id int);", "CREATE TABLE revised (id int); -- reviewed edit"
            (folder / "0999_revised.sql").write_text(v1)
            assert [m.name for m in await migrations.migrate(conn, folder)] == ["revised"]
            (folder / "0999_revised.sql").write_text(v2)
            with pytest.raises(MigrationError, match="changed after it was applied"):
                await migrations.migrate(conn, folder)  # not listed: refused as ever
            table = {999: frozenset({migrations.Migration(999, "revised", v1).checksum})}
            assert await migrations.migrate(conn, folder, superseded=table) == []
            assert await migrations.migrate(conn, folder) == []  # recorded as v2 now
            # Only the listed old version is accepted, not any edit.
            (folder / "0999_revised.sql").write_text(v2 + "\nSELECT 1;")
            with pytest.raises(MigrationError, match="changed after it was applied"):
                await migrations.migrate(conn, folder, superseded=table)
        finally:
            await conn.close()

    asyncio.run(run())


def test_a_bad_broker_url_is_reported_without_its_password() -> None:
    import pytest

    from lms_core.errors import SettingsError
    from lms_core.settings import MqttUrl

    for url in ("mqtt://svc:s3cr3t-pw@host:notaport", "http://svc:s3cr3t-pw@host:1883", "mqtt://svc:s3cr3t-pw@:1883"):
        with pytest.raises(SettingsError) as err:
            MqttUrl.parse(url)
        assert "s3cr3t-pw" not in str(err.value) and "svc:***@" in str(err.value), str(err.value)
