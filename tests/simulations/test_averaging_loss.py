"""Measured replica-averaging penalties per option and optimiser (`simulations.averaging_loss`), and the datacenter
comparison taking the one of its own averaging option."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from simulations.averaging_loss import main, merge_records, pick, records_from_outputs
from simulations.calibrate import DEFAULT_PATH, load_calibration
from simulations.datacenter import run_vs_datacenter


def _line(seed: int, ratio: float, bits: int = 4, optimizer: str = "adamw", steps: int = 150) -> dict[str, Any]:
    """A benchmarks/wan_averaging.py swarm JSON line (the keys the records read)."""
    return {"replica_compression": 118.9, "loss_ratio_compressed_avg": ratio, "rank": 6, "bits": bits,
            "lr": 1e-3 if optimizer == "adamw" else 1e-2, "optimizer": optimizer, "steps": steps,
            "dense_baseline": "dense-bf16", "iterations": 3, "seed": seed, "model": "wide"}


def test_records_group_seeds_by_setting_and_pick_prefers_the_async_recipes_optimiser() -> None:
    recs = records_from_outputs([_line(0, 1.01), _line(1, 1.03), _line(2, 0.90), _line(0, 1.05, optimizer="muon"),
                                 _line(0, 1.02, bits=8)])
    assert [(r["averaging"], r["optimizer"], sorted(r["ratios"])) for r in recs] == [
        ("powersgd:6:int4", "adamw", ["0", "1", "2"]), ("powersgd:6:int4", "muon", ["0"]), ("powersgd:6:int8", "adamw", ["0"])]
    adamw = pick(recs, "powersgd:6:int4", "adamw")
    assert adamw is not None and adamw.ratio == pytest.approx(1.01)  # the median: seed 2's outlier does not pull it
    assert "seeds 0 / 1 / 2: 1.0100 / 1.0300 / 0.9000, median used" in adamw.label and "async penalty" not in adamw.label
    muon = pick(recs, "powersgd:6:int4", "muon")
    assert muon is not None and muon.ratio == pytest.approx(1.05)
    other = pick(recs, "powersgd:6:int8", "muon")  # nothing measured with muon at int8: adamw's, labelled so
    assert other is not None and "measured with adamw, the async penalty with muon" in other.label
    assert pick(recs, "powersgd:4:int4", "adamw") is None and pick(None, "powersgd:6:int4", None) is None
    longer = records_from_outputs([_line(0, 1.01), _line(1, 1.03), _line(2, 0.90), _line(0, 1.004, steps=600)])
    best = pick(longer, "powersgd:6:int4", "adamw")  # the longer run, one seed, over three seeds of a shorter one
    assert best is not None and best.ratio == pytest.approx(1.004) and "600 steps" in best.label
    blocks = records_from_outputs([{**_line(0, 0.99, optimizer="muon"), "block_rank": 12},
                                   {**_line(1, 1.01, optimizer="muon"), "block_rank": 6}])  # 6: no rank of its own
    assert [r["averaging"] for r in blocks] == ["powersgd:6/12:int4", "powersgd:6:int4"]
    with pytest.raises(ValueError, match="wan_averaging"):
        records_from_outputs([{"utilisation": {}}])


def test_new_seeds_join_the_stored_record_of_their_setting_and_a_rerun_seed_replaces_its_own(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = records_from_outputs([_line(0, 1.2), _line(2, 1.05), _line(0, 1.04, bits=8)])
    new = records_from_outputs([_line(0, 1.01), _line(1, 1.03)])
    merged = merge_records(old, new)
    assert sorted((r["averaging"], tuple(sorted(r["ratios"].items()))) for r in merged) == [
        ("powersgd:6:int4", (("0", 1.01), ("1", 1.03), ("2", 1.05))), ("powersgd:6:int8", (("0", 1.04),))]
    assert sorted(next(r for r in merged if r["averaging"] == "powersgd:6:int4")["compression"]) == ["0", "1", "2"]
    cal = tmp_path / "calibration.json"
    cal.write_text(json.dumps({"kept": 1, "averaging_loss": old}))
    outs = []
    for seed, ratio in ((0, 1.01), (1, 1.03)):
        out = tmp_path / f"s{seed}.out"
        out.write_text("table\n" + json.dumps(_line(seed, ratio)) + "\n")
        outs.append(str(out))
    main([*outs, "--write", "--calibration", str(cal)])
    stored = json.loads(cal.read_text())
    assert stored["kept"] == 1 and sorted(r["averaging"] for r in stored["averaging_loss"]) == [
        "powersgd:6:int4", "powersgd:6:int8"]
    assert "0: 1.0100 (118.9x), 1: 1.0300 (118.9x)" in capsys.readouterr().out


def test_the_exchange_is_part_of_a_setting_and_pick_prefers_the_one_asked_for() -> None:
    """A run with one contribution per replica and step is its own record; lines and stored records from before the
    field count as the per-microbatch exchange (they merge with new ones); pick takes the exchange asked for and
    says so when only the other was measured."""
    old = [{k: v for k, v in r.items() if k != "exchange"} for r in records_from_outputs([_line(0, 1.02)])]
    recs = merge_records(old, records_from_outputs([_line(1, 1.04), {**_line(0, 1.001), "exchange": "step"}]))
    assert sorted((r.get("exchange") or "microbatch", sorted(r["ratios"])) for r in recs) == [
        ("microbatch", ["0", "1"]), ("step", ["0"])]
    step = pick(recs, "powersgd:6:int4", "adamw", "step")
    assert step is not None and step.ratio == pytest.approx(1.001) and "step exchange" in step.label
    per_mb = pick(recs, "powersgd:6:int4", "adamw")
    assert per_mb is not None and per_mb.ratio == pytest.approx(1.03) and "microbatch exchange" in per_mb.label
    only = pick(records_from_outputs([_line(0, 1.02)]), "powersgd:6:int4", "adamw", "step")
    assert only is not None and "measured with the microbatch exchange, the comparison runs the step one" in only.label


def test_the_datacenter_comparison_takes_the_penalty_of_its_own_averaging_option() -> None:
    cal = load_calibration(DEFAULT_PATH)
    cal = {**cal, "averaging_loss": records_from_outputs([_line(0, 1.04), _line(1, 1.06)]),
           "async_loss": {**cal["async_loss"], "optimizer": "adamw"}}
    int4 = run_vs_datacenter(cal, max_staleness=3, averaging="powersgd:6:int4", steps=2, overlap_averaging=True)
    assumed = int4["inputs"]["assumed"]
    assert assumed["averaging_loss_ratio"] == pytest.approx(1.05) and "powersgd:6:int4" in assumed["averaging_loss_source"]
    # int8 at the wan.py record's rank 6: that record; at rank 4 nothing was measured, and nothing is taken from rank 6
    bench = {**cal["wan_benchmark"], "loss_ratio_compressed_avg": 1.03,
             "averaging": {"steps": 150, "model": "wide", "rank": 6, "bits": 8}}
    six = run_vs_datacenter({**cal, "wan_benchmark": bench}, averaging="powersgd:6:int8", steps=2,
                            overlap_averaging=True)  # the node's exchange, as int4's (one contribution a microbatch)
    assert six["inputs"]["assumed"]["averaging_loss_ratio"] == 1.03
    four = run_vs_datacenter({**cal, "wan_benchmark": bench}, averaging="powersgd:4:int8", steps=2)
    assert four["inputs"]["assumed"]["averaging_loss_ratio"] == 1.0
    assert "no loss ratio of this averaging option" in four["inputs"]["assumed"]["averaging_loss_source"]
    # the int4 factors halve the replica bytes of the int8 ones, scales aside
    ratio = [a / b for a, b in zip(six["wan"]["replica_bytes_per_step"], int4["wan"]["replica_bytes_per_step"],
                                   strict=True)]
    assert all(1.9 < r < 2.0 for r in ratio)
