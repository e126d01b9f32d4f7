"""Settings are declared once (lms_core/settings.py); the README's table is generated from them."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest

from lms_cli.main import main
from lms_core.settings import README_END, README_START, Settings, declared, markdown_table
from tests.harness import REPO

REGENERATE = "python -m lms_cli.main settings --update README.md"

#: Every variable Settings.from_env read before the settings were declared once. None may go.
BEFORE = {
    "LMS_DATABASE_URL", "LMS_MQTT_URL", "LMS_DEVICE_MQTT_URL", "LMS_TOPIC_ROOT", "LMS_SECRET_KEY", "LMS_ENV",
    "LMS_DEV_INSECURE_SECRET", "LMS_LOG_LEVEL",
    "LMS_MAX_PAYLOAD_BYTES", "LMS_MAX_METRICS", "LMS_MAX_BATCH_ENTRIES", "LMS_MAX_DEPTH", "LMS_MAX_TEXT_CHARS",
    "LMS_METRIC_PATTERN", "LMS_MAX_PAST_SECONDS", "LMS_MAX_FUTURE_SECONDS",
    "LMS_BRIDGE_CLIENT_ID", "LMS_BRIDGE_SUBSCRIPTION", "LMS_BRIDGE_GROUP", "LMS_BRIDGE_BATCH_SIZE",
    "LMS_BRIDGE_FLUSH_MS", "LMS_BRIDGE_METRICS_PORT", "LMS_BRIDGE_METRICS_HOST", "LMS_BRIDGE_RETAINED_SWEEP_S",
    "LMS_API_HOST", "LMS_API_PORT", "LMS_API_REGISTRATION", "LMS_API_REGISTRATION_MAX_PER_ADDRESS",
    "LMS_API_REGISTRATION_WINDOW_SECONDS", "LMS_API_CORS_ORIGINS", "LMS_API_COOKIE_SECURE",
    "LMS_API_ACCESS_TTL_SECONDS", "LMS_API_REMEMBER_TTL_SECONDS", "LMS_LOGIN_MAX_FAILURES",
    "LMS_LOGIN_ACCOUNT_MAX_FAILURES", "LMS_LOGIN_ADDRESS_MAX_FAILURES", "LMS_LOGIN_WINDOW_SECONDS",
    "LMS_LOGIN_KNOWN_ADDRESS_DAYS", "LMS_AUDIT_RETENTION_DAYS", "LMS_RETENTION_SWEEP_SECONDS",
    "LMS_API_TRUSTED_PROXIES", "LMS_API_EXPORT_CONCURRENCY", "LMS_API_EXPORTS_PER_USER",
    "LMS_API_EXPORT_STALL_SECONDS",
}
#: LMS_ names in the code that are not settings of a service: the CLI's state folder, and the
#: passwords compose.yaml hands to PostgreSQL's and Mosquitto's first start.
NOT_SETTINGS = {"LMS_STATE_DIR", "LMS_DB_PASSWORD", "LMS_DB_ADMIN_PASSWORD", "LMS_SERVICE_PASSWORD", "LMS_VENV"}


def readme_table(text: str) -> str:
    start, end = text.find(README_START), text.find(README_END)
    assert 0 <= start < end, f"README.md lost its {README_START} / {README_END} markers"
    return text[start + len(README_START):end].lstrip("\n")


def test_the_readme_table_is_the_generated_one() -> None:
    table = readme_table((REPO / "README.md").read_text())
    assert table == markdown_table(), (
        f"README.md's settings table differs from the declarations in lms_core/settings.py; regenerate it "
        f"with `{REGENERATE}`")


def test_every_setting_is_declared_once_and_none_was_lost() -> None:
    names = [d.var for d in declared(Settings)]
    assert len(names) == len(set(names)), "a variable is declared twice"
    assert BEFORE <= set(names), f"no longer declared: {sorted(BEFORE - set(names))}"
    # A variable the code reads must be declared (and so documented), not read on the side.
    used = set()
    for folder in ("lms_core", "bridge", "api", "lms_cli"):
        for path in (REPO / folder).rglob("*.py"):
            used |= set(re.findall(r"\bLMS_[A-Z0-9_]+", path.read_text()))
    assert used - NOT_SETTINGS <= set(names), f"read but not declared: {sorted(used - NOT_SETTINGS - set(names))}"


def test_each_declaration_is_complete_and_its_default_within_its_own_bounds() -> None:
    for d in declared(Settings):
        assert d.meta.description and "\n" not in d.meta.description, d.var
        if d.type is int:
            assert d.meta.ge is not None and d.meta.le is not None, f"{d.var} needs bounds"
        if d.type is bool:
            assert len(d.extra["words"]) == 2, d.var
        if d.default is not msgspec.NODEFAULT and d.var != "LMS_SECRET_KEY":
            msgspec.convert(d.default, d.annotated)  # raises if a default breaks its own bounds or pattern


def test_lms_settings_prints_the_table_and_updates_a_readme(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["settings", "--markdown"]) == 0
    assert capsys.readouterr().out == markdown_table()
    assert main(["settings"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("LMS_DATABASE_URL  ")

    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Settings\n\n{README_START}\n| stale |\n{README_END}\n\nafter\n")
    assert main(["settings", "--update", str(readme)]) == 0
    text = readme.read_text()
    assert readme_table(text) == markdown_table() and "stale" not in text
    assert text.startswith(f"# x\n\n## Settings\n\n{README_START}\n") and text.endswith(f"{README_END}\n\nafter\n")
    capsys.readouterr()
    readme.write_text("no markers\n")
    assert main(["settings", "--update", str(readme)]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"lms: error: {readme} has no {README_START} ... {README_END} markers"]
