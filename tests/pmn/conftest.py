"""Helpers for CLI tests: run `pmn` in a subprocess exactly as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLI_WORKERS = 3  # `pmn` processes run at once by run_pmn_many (start-up is mostly imports: CPU, then chain waits)


def run_pmn(*args: str, env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run `pmn ARGS` with ResourceWarnings printed, and fail if the user would have seen one."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "always::ResourceWarning", **(env or {})}
    full_env.pop("PMN_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "pmn.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=REPO)
    assert "ResourceWarning" not in proc.stderr, f"`pmn {' '.join(args)}` leaked resources:\n{proc.stderr[-3000:]}"
    return proc


def assert_clean_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    """A user error: non-zero exit, one line on stderr, no traceback, naming what was wrong (besides the
    start-up line naming the device, which a node prints before its checks)."""
    assert proc.returncode != 0, proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("device ")]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines
    for needle in needles:
        assert needle in lines[0], lines[0]


def run_pmn_many(calls: Sequence[Sequence[str]]) -> list[subprocess.CompletedProcess[str]]:
    """Run independent `pmn` invocations side by side (CLI_WORKERS at a time); results in the order given."""
    with ThreadPoolExecutor(max_workers=CLI_WORKERS) as pool:
        return list(pool.map(lambda args: run_pmn(*args), calls))


def assert_clean_errors(cases: Sequence[tuple[Sequence[str], Sequence[str]]]) -> None:
    """Each (args, needles): `pmn ARGS` fails with one clean line naming every needle. The invocations must not
    depend on each other: they run side by side (run_pmn_many)."""
    for (args, needles), proc in zip(cases, run_pmn_many([a for a, _ in cases]), strict=True):
        try:
            assert_clean_error(proc, *needles)
        except AssertionError as exc:
            raise AssertionError(f"`pmn {' '.join(args)}`: {exc}") from exc


@pytest.fixture
def pmn() -> object:
    return run_pmn
