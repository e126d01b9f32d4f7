"""Settings validation and the migration runner's guarantees, on a real database."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import asyncpg
import pytest

from lms_core import migrations
from lms_core.errors import MigrationError, SettingsError
from lms_core.settings import Settings
from tests.harness import Stack

BASE = {"LMS_DATABASE_URL": "postgresql://lms@127.0.0.1/lms", "LMS_MQTT_URL": "mqtt://svc:pw@127.0.0.1:1883"}


def test_defaults_and_overrides() -> None:
    s = Settings.from_env(BASE)
    assert s.mqtt.username == "svc" and s.mqtt.port == 1883 and s.device_mqtt_url == "mqtt://127.0.0.1:1883"
    assert s.bridge.subscription == "exclusive" and s.limits.max_metrics == 200
    s = Settings.from_env({**BASE, "LMS_MAX_METRICS": "5", "LMS_BRIDGE_SUBSCRIPTION": "SHARED"})
    assert s.limits.max_metrics == 5 and s.bridge.subscription == "shared"


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
    ({"LMS_ENV": "production"}, "LMS_SECRET_KEY must be set"),
    ({"LMS_ENV": "staging"}, "LMS_ENV must be one of"),
    ({"LMS_API_TRUSTED_PROXIES": "10.0.0.1, lb.example"}, "not an address or network"),
    ({"LMS_API_CORS_ORIGINS": "dash.example.com"}, "is not an origin"),
])
def test_bad_settings_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env({**BASE, **env})


async def _fresh_db(stack: Stack, name: str) -> str:
    conn = await asyncpg.connect(stack.pg.url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return stack.pg.url.rsplit("/", 1)[0] + "/" + name


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
