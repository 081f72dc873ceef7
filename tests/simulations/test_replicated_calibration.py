"""Calibrating the simulator on a `benchmarks/wan.py --replicas R` record (`simulations.wan_bench.replicated_config`)."""

from __future__ import annotations

import json

import pytest

from simulations.wan_bench import _tokens_per_s, replicated_config, validate

NODES = {"0": 0, "1": 0, "2": 1, "3": 1, "4": 2, "5": 2}  # 3 stages x 2 nodes, as wan.py numbers them


def _record(rtt_ms: float = 100.0, staleness: int = 2) -> dict:
    """A replicated record whose 'measurements' are the simulator's own at a known per-frame overhead."""
    rep = {"update_s_per_step": {k: 0.02 for k in NODES}, "contribution_bytes": {k: 14000 for k in NODES},
           "stage_of_node": NODES}
    bench = {"microbatches": 8, "stages": 3, "replicas": 2, "steps": 8, "max_staleness": staleness,
             "microbatch_size": 4, "model": {"seq_len": 128}, "link_check": {"bulk_mbit_s": 200.0, "rtt_ms": rtt_ms},
             "busy_s_per_step": {s: {k: 0.08 for k in NODES} for s in ("gpipe", "async")},
             "bytes_out_per_step": {s: {k: 8 * 4 * 128 * 256 for k in NODES} for s in ("gpipe", "async")},
             "replicated": {"gpipe": rep, "async": rep}}
    busy = {k: 0.08 for k in NODES}
    bench["tokens_per_s"] = {s: _tokens_per_s(replicated_config(bench, s, busy, 0.004)) for s in ("gpipe", "async")}
    return bench


def test_a_replicated_record_is_simulated_as_the_node_runs_it() -> None:
    bench = _record()
    cfg = replicated_config(bench, "async", {k: 0.08 for k in NODES}, 0.0)
    assert (cfg.num_stages, cfg.replicas, cfg.max_staleness) == (3, 2, 2)
    assert cfg.replicated_async and cfg.head_delegation and cfg.tasks_per_delegate == 16 * 3  # the window's caps
    assert cfg.fwd_s == pytest.approx((0.16 / 8 / 3,) * 3)  # a stage's compute is its two replicas' together
    assert cfg.opt_s == pytest.approx((0.02,) * 3) and cfg.grad_sync_bytes == (14000,) * 3
    assert not replicated_config(bench, "gpipe", {k: 0.08 for k in NODES}, 0.0).replicated_async


def test_calibration_on_replicated_gpipe_recovers_the_overhead_and_predicts_async() -> None:
    out = validate(_record())
    assert out["frame_overhead_s"] == pytest.approx(0.004, abs=3e-4)
    assert out["schedules"]["async"]["held_out"] and out["max_held_out_error"] < 0.02 and out["goal_met"]
    json.dumps(out)


def test_another_run_is_predicted_with_the_overhead_fitted_on_the_first() -> None:
    out = validate(_record(), held_out=[_record(rtt_ms=50.0, staleness=1)])
    (run,) = out["held_out_runs"]
    assert set(run["schedules"]) == {"gpipe", "async"} and all(r["held_out"] for r in run["schedules"].values())
    assert max(r["error"] for r in run["schedules"].values()) < 0.02 and out["goal_met"]
    wrong = validate(_record(), held_out=[{**_record(rtt_ms=50.0), "tokens_per_s": {"gpipe": 100.0}}])
    assert wrong["max_held_out_error"] > 1 and not wrong["goal_met"]  # a run the model misses fails the goal


def test_a_record_whose_nodes_do_not_fill_the_stages_is_refused() -> None:
    bench = _record()
    bench["replicated"]["gpipe"] = {**bench["replicated"]["gpipe"], "stage_of_node": {**NODES, "5": 1}}
    with pytest.raises(ValueError, match="are not 3 x 2"):
        validate(bench)


def test_a_record_is_simulated_at_the_in_flight_cap_it_ran_with() -> None:
    busy = {k: 0.08 for k in NODES}
    older = _record()  # records before session 28 name no cap: they ran at the node's default then, 2
    assert "max_inflight" not in older and replicated_config(older, "async", busy, 0.0).inflight_per_replica == 2
    newer = {**older, "max_inflight": 4}
    assert replicated_config(newer, "async", busy, 0.0).inflight_per_replica == 4
    # on the bench's links the cap binds: 4 at each of 2 replicas per 0.2 s round trip is more than 2
    assert _tokens_per_s(replicated_config(newer, "async", busy, 0.004)) > \
        1.2 * _tokens_per_s(replicated_config(older, "async", busy, 0.004))
