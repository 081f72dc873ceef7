"""`benchmarks/async_recipe.py --quick --horizons`: every recipe trained once per horizon, side by side.

The quick budget checks the machinery only: each horizon is its own pair of runs at equal tokens, the longest
horizon is the headline run, and a bad horizon is refused with a line naming it.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.benchmarks.scripts import run_script

pytestmark = pytest.mark.timeout(300)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return run_script("async_recipe.py", *args)


def test_quick_horizons_give_one_ratio_per_horizon() -> None:
    proc = _run("--quick", "--horizons", "12,6", "--workers", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["steps"] == 12 and out["model"]["d_model"] == 64  # the longest horizon; --quick is the tiny model
    by = out["loss_ratio_by_steps"]
    assert sorted(by, key=int) == ["6", "12"]
    assert by["12"] == out["loss_ratio_same_recipe"]  # the headline run is the longest horizon's
    assert by["6"]["0.001:10"] != by["12"]["0.001:10"]  # a separate, shorter pair of runs
    assert all(0.5 < r < 2.0 for d in by.values() for r in d.values())


def test_a_bad_horizon_is_refused_naming_it() -> None:
    proc = _run("--quick", "--horizons", "10,0")
    assert proc.returncode != 0
    assert "--horizons '10,0'" in proc.stderr and "positive step count" in proc.stderr
