"""The code base stays ruff- and mypy-clean (the configuration lives in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["sharding", "contracts", "protocol", "node", "pmn", "simulations", "benchmarks", "tests"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.timeout(600)
def test_ruff_is_clean() -> None:
    out = _run("ruff", "check", ".")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


@pytest.mark.timeout(600)
def test_mypy_is_clean() -> None:
    out = _run("mypy", *PACKAGES)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
