"""Numbered plain-SQL migrations (``migrations/0001_name.sql``), applied in order.

Each file runs in its own transaction and is recorded in ``schema_migrations`` with its
SHA-256. A recorded file whose content changed, or that disappeared, stops the run: a
schema that differs from what the files say is never papered over — except for the
edits listed in :data:`SUPERSEDED`, each reviewed to leave an applied database correct
(a later migration brings it level), whose old checksum is accepted and replaced. An advisory lock
keeps concurrent runners (several bridges or API processes starting) from racing.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from lms_core.errors import MigrationError

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "migrations"
_NAME = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")
_LOCK_KEY = 0x4C4D5301  # "LMS\x01"

#: Checksums of earlier versions of a file that a database may have applied and that
#: the current version replaces in place: {version: {old sha256, ...}}. Add one only with
#: a reason, and a later migration for what the old version did differently.
SUPERSEDED: dict[int, frozenset[str]] = {
    # 0001 read current_setting('shared_preload_libraries'), which only a superuser may,
    # and segmented compressed events by device_id alone; 0005 fixes the latter on
    # TimescaleDB installs made by the old file.
    1: frozenset({"d857bb4c08537437f97cb0b7050cdbc3cd940479e6aa48b475200e130e0edb10"}),
}


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load(directory: Path = DEFAULT_DIR) -> list[Migration]:
    if not directory.is_dir():
        raise MigrationError(f"migrations folder {directory} does not exist")
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        m = _NAME.fullmatch(path.name)
        if not m:
            raise MigrationError(f"{path.name}: migration files are named NNNN_name.sql")
        version = int(m.group(1))
        if version in found:
            raise MigrationError(f"two migrations numbered {version:04d}")
        found[version] = Migration(version, m.group(2), path.read_text())
    return [found[v] for v in sorted(found)]


async def migrate(conn: asyncpg.Connection, directory: Path = DEFAULT_DIR,
                  progress: Callable[[str], None] | None = None,
                  superseded: Mapping[int, frozenset[str]] = SUPERSEDED) -> list[Migration]:
    """Apply pending migrations; return those applied now."""
    migrations = load(directory)
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   checksum text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        applied = {r["version"]: r for r in await conn.fetch("SELECT version, name, checksum FROM schema_migrations")}
        by_version = {m.version: m for m in migrations}
        for version, row in sorted(applied.items()):
            m = by_version.get(version)
            if m is None:
                raise MigrationError(f"migration {version:04d}_{row['name']} was applied but its file is missing")
            if m.checksum != row["checksum"] and row["checksum"] in superseded.get(version, ()):
                await conn.execute("UPDATE schema_migrations SET checksum = $2 WHERE version = $1",
                                   version, m.checksum)
                if progress:
                    progress(f"accepted the revised {version:04d}_{m.name}.sql (its earlier version was applied)")
            elif m.checksum != row["checksum"]:
                raise MigrationError(
                    f"migration {version:04d}_{m.name}.sql changed after it was applied; "
                    "add a new migration instead of editing an applied one"
                )
        done = []
        for m in migrations:
            if m.version in applied:
                continue
            if progress:
                progress(f"applying {m.version:04d}_{m.name}.sql")
            try:
                async with conn.transaction():
                    await conn.execute(m.sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                        m.version, m.name, m.checksum,
                    )
            except asyncpg.PostgresError as exc:
                raise MigrationError(f"migration {m.version:04d}_{m.name}.sql failed: {exc}") from None
            done.append(m)
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
