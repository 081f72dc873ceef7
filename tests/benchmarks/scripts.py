"""Running a `benchmarks/` script the way a user does: a subprocess from the repository root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT_TIMEOUT_S = 280  # one script run (below the tests' 300 s pytest-timeout)


def run_script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`python benchmarks/<name> <args>`: its exit code, stdout and stderr."""
    return subprocess.run([sys.executable, f"benchmarks/{name}", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=SCRIPT_TIMEOUT_S)
