"""`benchmarks/receipts.py`: the node's receipts and eth-account's general encoder sign the same frames alike."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks.scripts import run_script

pytestmark = pytest.mark.timeout(120)


def test_both_arms_countersign_every_frame_identically_and_report_cpu_per_frame() -> None:
    proc = run_script("receipts.py", "--frames", "20", "--repeats", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["signatures_identical"] is True and out["frames"] == 20
    assert set(out["cpu_ms_per_frame"]) == {"general", "node"} and all(v > 0 for v in out["cpu_ms_per_frame"].values())
    assert out["speedup"] == pytest.approx(out["cpu_ms_per_frame"]["general"] / out["cpu_ms_per_frame"]["node"])


def test_a_run_without_frames_is_refused() -> None:
    proc = run_script("receipts.py", "--frames", "0")
    assert proc.returncode == 2 and "--frames 0" in proc.stderr
