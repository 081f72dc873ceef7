"""Calibration from the real stage code, and the comparison of the simulation with a measured run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from simulations.calibrate import DEFAULT_PATH, CalibrationConfig, calibrate, load_calibration
from simulations.errors import CalibrationError, ValidationDataError
from simulations.pipeline import simulate
from simulations.presets import stage_params
from simulations.validation import compare, compare_with_benchmark_json, local_config, measure_in_process

FAST = CalibrationConfig(model="tiny", num_stages=2, microbatch_size=2, warmup=1, repeats=2)


@pytest.fixture(scope="module")
def calibration(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    path = tmp_path_factory.mktemp("cal") / "calibration.json"
    return calibrate(FAST, out_path=path), path


def test_calibration_measures_every_stage_and_round_trips(calibration: tuple[dict, Path]) -> None:
    data, path = calibration
    assert load_calibration(path) == json.loads(path.read_text()) == data
    assert [s["index"] for s in data["stages"]] == [0, 1]
    for row in data["stages"]:
        assert row["fwd_s"] > 0 and row["bwd_s"] > 0 and row["opt_s"] > 0
        assert row["flops_per_token"] > 0
    assert data["tokens_per_microbatch"] == 2 * 64
    assert data["codec_bytes_per_token"] == 64 * 4  # dense fp32, d_model 64
    assert math.isfinite(data["effective_flops_per_s"]) and data["effective_flops_per_s"] > 0


def test_simulated_in_process_run_equals_the_calibrated_stage_times(calibration: tuple[dict, Path]) -> None:
    data, _ = calibration
    res = simulate(local_config(data, microbatches=3, steps=2, shared_cpus=None, in_process=True))
    per_step = 3 * sum(s["fwd_s"] + s["bwd_s"] for s in data["stages"]) + sum(s["opt_s"] for s in data["stages"])
    assert res.mean_step_s == pytest.approx(per_step)
    measured = measure_in_process(FAST, microbatches=3, steps=1)
    report = compare(measured, res.tokens_per_s)
    assert report["measured_tokens_per_s"] == measured > 0
    assert report["error"] == pytest.approx(abs(res.tokens_per_s - measured) / measured)
    assert isinstance(report["within_goal"], bool)


def test_compare_reports_relative_error() -> None:
    assert compare(100.0, 110.0)["error"] == pytest.approx(0.1)
    assert compare(100.0, 110.0)["within_goal"] is True
    assert compare(100.0, 80.0)["within_goal"] is False
    with pytest.raises(ValidationDataError, match="measured"):
        compare(0.0, 1.0)


def test_benchmark_json_comparison(calibration: tuple[dict, Path], tmp_path: Path) -> None:
    data, _ = calibration
    with pytest.raises(ValidationDataError, match="no benchmark result"):
        compare_with_benchmark_json(tmp_path / "missing.json", data)
    bad = tmp_path / "bad.json"
    bad.write_text("table\n" + json.dumps({"tokens_per_s": 5.0}) + "\n")
    with pytest.raises(ValidationDataError, match="microbatches"):
        compare_with_benchmark_json(bad, data)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"tokens_per_s": 1000.0, "microbatches": 4, "steps": 2}) + "\n")
    out = compare_with_benchmark_json(good, data)
    assert out["measured_tokens_per_s"] == 1000.0 and out["simulated_tokens_per_s"] > 0


def test_committed_calibration_file_loads() -> None:
    data = load_calibration(DEFAULT_PATH)
    assert len(data["stages"]) >= 2


def test_bad_calibration_files_raise(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="no calibration file"):
        load_calibration(tmp_path / "nope.json")
    p = tmp_path / "c.json"
    p.write_text("{not json")
    with pytest.raises(CalibrationError, match="not valid JSON"):
        load_calibration(p)
    good = load_calibration(DEFAULT_PATH)
    good["stages"][0]["fwd_s"] = -1.0
    p.write_text(json.dumps(good))
    with pytest.raises(CalibrationError, match=r"stages\[0\]\.fwd_s"):
        load_calibration(p)


def test_bad_calibration_config_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model"):
        calibrate(CalibrationConfig(model="nope"), out_path=tmp_path / "x.json")
    with pytest.raises(ValueError, match="repeats"):
        calibrate(CalibrationConfig(repeats=0), out_path=tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_stage_params_match_the_real_stage_modules() -> None:
    from sharding.config import PRESETS
    from sharding.partition import partition
    from sharding.stage import build_stage

    for name in ("tiny", "tiny-subspace"):
        config = PRESETS[name]
        for spec in partition(config, 2):
            stage = build_stage(config, spec)
            assert stage_params(config, spec) == sum(p.numel() for p in stage.parameters() if p.requires_grad)


def test_runtime_overhead_fit_recovers_known_overheads(calibration: tuple[dict, Path]) -> None:
    from dataclasses import replace

    from simulations.validation import fit_runtime_overheads

    data, _ = calibration
    truth = {}
    for m in (2, 8):
        cfg = replace(local_config(data, m, 3, shared_cpus=2), frame_overhead_s=0.004, step_overhead_s=0.05)
        truth[m] = simulate(cfg).mean_step_s
    frame, step = fit_runtime_overheads(data, truth, shared_cpus=2)
    assert frame == pytest.approx(0.004, rel=1e-3)
    assert step == pytest.approx(0.05, rel=1e-2)
    with pytest.raises(ValidationDataError, match="two microbatch counts"):
        fit_runtime_overheads(data, {2: 1.0}, shared_cpus=2)
