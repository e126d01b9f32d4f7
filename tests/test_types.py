"""The type check is part of the test run, so CI runs it: mypy, strict on lms_core/ and bridge/ (pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys

from tests.harness import REPO

CHECKED = ["lms_core", "bridge"]


def test_mypy_passes() -> None:
    r = subprocess.run([sys.executable, "-m", "mypy", *CHECKED], cwd=REPO, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, f"mypy {' '.join(CHECKED)} failed:\n{r.stdout}{r.stderr}"
