"""Session fixtures: one real PostgreSQL and one real Mosquitto, started by the tests."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

from tests.harness import ApiProcess, BridgeProcess, Stack

# Property-based tests are derandomized by default, so CI is red or green by the code alone;
# `HYPOTHESIS_PROFILE=random` draws new examples (the longer run before a release, see README).
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
hypothesis_settings.register_profile("random", derandomize=False, print_blob=True)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

_names = itertools.count(1)


@pytest.fixture(scope="session")
def tmp_root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="lms-tests-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def stack(tmp_root: Path) -> Iterator[Stack]:
    """The shared stack with one bridge running; tests use their own devices on it."""
    s = Stack(tmp_root / "shared").start()
    # A small payload limit so the "too large" case is the bridge's, not the broker's.
    s.start_bridge("lms-bridge-shared", LMS_MAX_PAYLOAD_BYTES="4096", LMS_MAX_METRICS="20",
                   LMS_MAX_BATCH_ENTRIES="50")
    yield s
    s.stop()


@pytest.fixture(scope="session")
def bridge(stack: Stack) -> BridgeProcess:
    return stack.bridges[0]


@pytest.fixture(scope="session")
def api(stack: Stack) -> ApiProcess:
    """The API on the shared stack; login throttling tuned so a test can watch it recover."""
    return stack.start_api(LMS_LOGIN_MAX_FAILURES="3", LMS_LOGIN_ADDRESS_MAX_FAILURES="1000",
                           LMS_LOGIN_WINDOW_SECONDS="3")


@pytest.fixture
def own_stack(tmp_root: Path) -> Iterator[Stack]:
    """A stack of its own, for tests that kill or stop its parts."""
    s = Stack(tmp_root / f"own-{next(_names)}").start()
    yield s
    s.stop()


@pytest.fixture
def stack_without_retain_plugin(tmp_root: Path) -> Iterator[Stack]:
    """A stack of its own whose broker lacks the lms_retain plugin (compose.yaml without its
    plugin build): for what the bridge itself does about retained messages."""
    s = Stack(tmp_root / f"own-{next(_names)}")
    s.mq.retain_plugin = False
    s.start()
    yield s
    s.stop()


@pytest.fixture
def unique() -> str:
    """A fresh slug per test, so tests never read each other's devices."""
    return f"t{next(_names)}"
