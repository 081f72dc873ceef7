"""The async penalty by staleness bound and training length: the record from `benchmarks/async_recipe.py`'s JSON
line, the pick nearest the target's steps, and the datacenter comparison taking it over benchmarks/wan.py's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from simulations.async_loss import main, merge_records, pick, record_from_recipe
from simulations.calibrate import DEFAULT_PATH, load_calibration
from simulations.datacenter import run_vs_datacenter
from simulations.presets import steps_multiplier

# the shape of async_recipe.py's last line with --staleness 1,2 --horizons 300,3000 (figures made up)
RECIPE_LINE: dict[str, Any] = {
    "loss_ratio_same_recipe": {"0.001:10": 1.01}, "loss_ratio_tuned": 1.01,
    "loss_ratio_by_steps": {"300": {"0.001:10": 1.15}, "3000": {"0.001:10": 1.01}},
    "loss_ratio_by_staleness": {"1": {"300": {"0.001:10": 1.15}, "3000": {"0.001:10": 1.01}},
                                "2": {"300": {"0.001:10": 1.30}, "3000": {"0.001:10": 1.04}}},
    "steps": 3000, "staleness": 1, "lookahead": 1.0, "grid": "1e-3:10",
    "model": {"d_model": 128, "n_layers": 6, "seq_len": 128},
}


def test_the_record_keeps_every_bound_and_length_and_the_pick_takes_the_nearest_length() -> None:
    record = record_from_recipe(RECIPE_LINE)
    assert record["ratios"] == {"1": {"300": 1.15, "3000": 1.01}, "2": {"300": 1.30, "3000": 1.04}}
    at_2 = pick(record, 2, 2925)
    assert at_2 is not None and (at_2.ratio, at_2.steps, at_2.staleness) == (1.04, 3000, 2)
    assert "staleness 2, 3000 steps" in at_2.label and "d_model 128" in at_2.label
    short = pick(record, 1, 400)  # log distance: 400 is nearer 300 than 3000
    assert short is not None and short.steps == 300 and short.ratio == 1.15
    assert pick(record, 4, 2925) is None and pick(None, 1, 2925) is None  # nothing at that bound


def test_a_single_bound_run_is_recorded_under_its_bound() -> None:
    line = {**RECIPE_LINE, "loss_ratio_by_staleness": {}, "staleness": 2,
            "loss_ratio_by_steps": {}, "steps": 300, "loss_ratio_same_recipe": {"0.001:10": 1.2}}
    assert record_from_recipe(line)["ratios"] == {"2": {"300": 1.2}}


def test_the_datacenter_comparison_takes_the_penalty_at_its_bound_and_length() -> None:
    cal = load_calibration(DEFAULT_PATH)
    cal = {**cal, "wan_benchmark": {**cal.get("wan_benchmark", {}), "loss_ratio_async": 1.16, "max_staleness": 1,
                                    "loss_steps": 300},
           "async_loss": record_from_recipe(RECIPE_LINE)}
    out = run_vs_datacenter(cal, max_staleness=2, averaging="diloco:100", steps=2)
    assumed = out["inputs"]["assumed"]
    assert assumed["async_loss_ratio"] == 1.04 and "staleness 2, 3000 steps" in assumed["async_loss_source"]
    assert out["steps_multipliers"]["async"] == pytest.approx(steps_multiplier(1.04))
    # no record at bound 3: benchmarks/wan.py's ratio, labelled with its bound and length
    other = run_vs_datacenter(cal, max_staleness=3, averaging="diloco:100", steps=2)["inputs"]["assumed"]
    assert other["async_loss_ratio"] == 1.16
    assert "wan.py loss_ratio_async (max_staleness 1, 300 steps)" in other["async_loss_source"]


def test_a_measured_gain_is_not_credited_to_the_wan_run() -> None:
    cal = load_calibration(DEFAULT_PATH)
    better = {**RECIPE_LINE, "loss_ratio_by_staleness": {"1": {"3000": {"0.001:10": 0.991}}}}
    out = run_vs_datacenter({**cal, "async_loss": record_from_recipe(better)}, max_staleness=1,
                            averaging="diloco:100", steps=2)
    assumed = out["inputs"]["assumed"]
    assert assumed["async_loss_ratio"] == 1.0 and out["steps_multipliers"]["async"] == 1.0
    assert "measured 0.9910, below 1: counted as 1 (no gain credited)" in assumed["async_loss_source"]
    given = run_vs_datacenter(cal, max_staleness=1, averaging="diloco:100", steps=2, averaging_loss_ratio=0.99)
    assert given["inputs"]["assumed"]["averaging_loss_ratio"] == 1.0


def test_the_cli_writes_the_record_into_the_calibration_file(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out_file, cal_file = tmp_path / "recipe.log", tmp_path / "calibration.json"
    out_file.write_text("table lines\n" + json.dumps(RECIPE_LINE) + "\n")
    cal_file.write_text(json.dumps({"version": 1}))
    main([str(out_file), "--write", "--calibration", str(cal_file)])
    stored = json.loads(cal_file.read_text())
    assert stored["version"] == 1 and stored["async_loss"]["ratios"]["2"]["3000"] == 1.04
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["recipe"] == "0.001:10"


def test_a_later_output_replaces_its_bounds_and_keeps_its_recipe(tmp_path: Path) -> None:
    clipped = {**RECIPE_LINE, "loss_ratio_by_staleness": {}, "staleness": 1, "grad_clip": 0.5,
               "loss_ratio_by_steps": {"3000": {"0.001:10": 1.005}}}
    merged = merge_records([record_from_recipe(RECIPE_LINE), record_from_recipe(clipped)])
    assert merged["ratios"] == {"1": {"3000": 1.005}, "2": {"300": 1.30, "3000": 1.04}}
    at_1, at_2 = pick(merged, 1, 2925), pick(merged, 2, 2925)
    assert at_1 is not None and at_1.ratio == 1.005 and "0.001:10, grad clip 0.5" in at_1.label
    assert at_2 is not None and at_2.ratio == 1.04 and "grad clip" not in at_2.label
    assert "lr " not in at_2.label  # the constant schedule goes unnamed
    cosine = record_from_recipe({**RECIPE_LINE, "schedule": "cosine"})
    assert cosine["recipes"] == {"1": "0.001:10, lr cosine, look-ahead 1", "2": "0.001:10, lr cosine, look-ahead 1"}
    muon = {**clipped, "grad_clip": 0.0, "optimizer": "muon", "lookahead": 2.0, "grid": "1e-2:10",
            "loss_ratio_by_steps": {"3000": {"0.01:10": 1.004}}}
    with_muon = merge_records([record_from_recipe(RECIPE_LINE), record_from_recipe(muon)])
    at_1 = pick(with_muon, 1, 2925)
    assert at_1 is not None and at_1.ratio == 1.004 and "0.01:10, muon, look-ahead 2" in at_1.label
    at_2 = pick(with_muon, 2, 2925)
    assert at_2 is not None and "0.001:10, look-ahead 1" in at_2.label and "muon" not in at_2.label
    other_model = {**clipped, "model": {"d_model": 64, "n_layers": 2, "seq_len": 64}}
    with pytest.raises(ValueError, match="disagree on model"):
        merge_records([record_from_recipe(RECIPE_LINE), record_from_recipe(other_model)])
    # the CLI takes both outputs in that order
    a, b, cal = tmp_path / "a.log", tmp_path / "b.log", tmp_path / "cal.json"
    a.write_text(json.dumps(RECIPE_LINE) + "\n")
    b.write_text(json.dumps(clipped) + "\n")
    cal.write_text("{}")
    main([str(a), str(b), "--write", "--calibration", str(cal)])
    assert json.loads(cal.read_text())["async_loss"]["ratios"]["1"] == {"3000": 1.005}
