"""The protocolnanogpt and home1000 presets through run_wan."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulations.errors import PresetError
from simulations.presets import steps_multiplier
from simulations.wan import run_wan


def test_protocolnanogpt_subspace_is_at_least_3x_faster_to_target(tmp_path: Path) -> None:
    out = run_wan("protocolnanogpt", compare_schedules=False, plots_dir=tmp_path)
    assert out["speedup_vs_dense"] >= 3.0 and out["goal_met"] is True
    assert out["tokens_per_s"] == out["codecs"]["subspace"]["tokens_per_s"] > out["dense_tokens_per_s"] > 0
    assert out["compression_ratio"] >= 100
    dense, sub = out["codecs"]["dense"], out["codecs"]["subspace"]
    assert dense["steps_to_target"] == 2925 and sub["steps_to_target"] > 2925
    assert out["speedup_vs_dense"] == pytest.approx(dense["time_to_target_s"] / sub["time_to_target_s"])
    assert set(out["inputs"]) == {"measured", "assumed"}
    assert "subspace_loss_ratio_source" in out["inputs"]["assumed"]
    assert out["inputs"]["measured"]["dense"]["wire_bytes_per_token_fwd"] == 1024 * 4 + 2
    assert all(Path(p).is_file() and Path(p).stat().st_size > 0 for p in out["plots"])


def test_run_wan_is_deterministic_and_rejects_unknown_presets() -> None:
    a = run_wan("protocolnanogpt", compare_schedules=False, steps=2)
    b = run_wan("protocolnanogpt", compare_schedules=False, steps=2)
    assert a == b
    # additive: the local-swarm validation recorded in the calibration file by benchmarks/sim_validate.py
    val = a["local_swarm_validation"]
    assert set(val) == {"2x16", "3x16"}
    assert all(row["error"] >= 0 and row["measured_tokens_per_s"] > 0 for row in val.values())
    with pytest.raises(PresetError, match="unknown WAN preset"):
        run_wan("nope")
    with pytest.raises(ValueError, match="schedule"):
        run_wan("protocolnanogpt", schedule="zigzag")  # type: ignore[arg-type]


def test_steps_multiplier() -> None:
    assert steps_multiplier(1.0) == 1.0
    assert steps_multiplier(0.9) == 1.0
    assert steps_multiplier(1.017, alpha=0.28) == pytest.approx(1.017 ** (1 / 0.28))
    with pytest.raises(ValueError, match="loss_ratio"):
        steps_multiplier(float("nan"))
