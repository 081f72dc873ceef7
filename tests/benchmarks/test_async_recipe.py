"""`benchmarks/async_recipe.py --quick --horizons --staleness`: every recipe trained once per horizon and bound.

The quick budget checks the machinery only: each horizon is its own pair of runs at equal tokens, the longest
horizon is the headline run, and a bad horizon is refused with a line naming it.
"""

from __future__ import annotations

import functools
import json
import subprocess
from typing import Any

import pytest

from tests.benchmarks.scripts import run_script

pytestmark = pytest.mark.timeout(300)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return run_script("async_recipe.py", *args)


@functools.cache
def _default_recipe() -> str:
    """The JSON line of the default recipe (AdamW, constant rate) at 12 steps: one run shared by the tests that
    compare another recipe with it."""
    proc = _run("--quick", "--steps", "12", "--workers", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


def _default() -> dict[str, Any]:
    return json.loads(_default_recipe())


def test_quick_horizons_give_one_ratio_per_horizon_and_bound() -> None:
    proc = _run("--quick", "--horizons", "12,6", "--staleness", "1,2", "--workers", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["steps"] == 12 and out["model"]["d_model"] == 64  # the longest horizon; --quick is the tiny model
    by = out["loss_ratio_by_steps"]
    assert sorted(by, key=int) == ["6", "12"]
    assert by["12"] == out["loss_ratio_same_recipe"]  # the headline run is the longest horizon's
    assert by["6"]["0.001:10"] != by["12"]["0.001:10"]  # a separate, shorter pair of runs
    assert all(0.5 < r < 2.0 for d in by.values() for r in d.values())
    bounds = out["loss_ratio_by_staleness"]
    assert out["staleness"] == 1 and bounds["1"] == by  # the first bound is the headline's
    assert sorted(bounds["2"], key=int) == ["6", "12"] and bounds["2"]["12"] != by["12"]  # its own async arm


def test_a_bad_horizon_or_bound_is_refused_naming_it() -> None:
    proc = _run("--quick", "--horizons", "10,0")
    assert proc.returncode != 0
    assert "--horizons '10,0'" in proc.stderr and "positive step count" in proc.stderr
    proc = _run("--quick", "--staleness", "1,0")
    assert proc.returncode != 0
    assert "--staleness '1,0'" in proc.stderr and "integer >= 1" in proc.stderr


def test_cosine_schedule_decays_both_arms_over_the_run_and_is_recorded() -> None:
    constant = _default()
    proc = _run("--quick", "--steps", "12", "--workers", "1", "--schedule", "cosine")
    assert proc.returncode == 0, proc.stderr[-2000:]
    cosine = json.loads(proc.stdout.strip().splitlines()[-1])
    assert constant["schedule"] == "constant" and cosine["schedule"] == "cosine"
    assert "lr schedule cosine" in proc.stdout
    # warm-up (10 steps) is shared, the decay changes the last steps of both arms (one recipe: best = its run)
    for arm in ("sync", "async"):
        assert cosine[f"val_loss_best_{arm}"] != constant[f"val_loss_best_{arm}"]


def test_the_muon_recipe_runs_both_arms_and_is_recorded() -> None:
    adamw = _default()
    proc = _run("--quick", "--steps", "12", "--workers", "2", "--optimizer", "muon", "--staleness", "1,2",
                "--lookahead", "2,1.5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    muon = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (adamw["optimizer"], muon["optimizer"], muon["lookahead"]) == ("adamw", "muon", 2.0)
    assert muon["lookahead_by_staleness"] == {"1": 2.0, "2": 1.5}  # one look-ahead per bound
    assert "optimizer muon" in proc.stdout
    for arm in ("sync", "async"):  # the same data and initial weights, another optimiser in both arms
        assert muon[f"val_loss_best_{arm}"] != adamw[f"val_loss_best_{arm}"]
    assert 0.5 < muon["loss_ratio_tuned"] < 2.0
    bad = _run("--quick", "--optimizer", "sgd")
    assert bad.returncode != 0 and "--optimizer" in bad.stderr
    bad = _run("--quick", "--staleness", "1,2", "--lookahead", "1,2,3")
    assert bad.returncode != 0 and "one per --staleness bound (2)" in bad.stderr
