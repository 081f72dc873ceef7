"""Calibrating the simulator on a `benchmarks/wan.py --replicas R` record (`simulations.wan_bench.replicated_config`)."""

from __future__ import annotations

import json
from dataclasses import replace

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


def _on_a_shared_host(bench: dict, cpu_s: float = 0.05, cores: int = 2) -> dict:
    """`bench` with the nodes' compute and update CPU seconds and the host's cores, as wan.py records them since
    session 32 (every node computed `cpu_s` CPU seconds per step)."""
    rep = {**bench["replicated"]["async"], "compute_cpu_s_per_step": {k: cpu_s for k in NODES},
           "update_cpu_s_per_step": {k: 0.01 for k in NODES}}
    return {**bench, "replicated": {**bench["replicated"], "async": rep},
            "host_cpu": {"async": {"cores": cores, "cpu_per_wall": {"shaper": 0.05}}}}


def test_a_record_with_cpu_seconds_is_simulated_on_its_shared_host() -> None:
    from simulations.wan_bench import on_shared_host, shared_host

    bench = _on_a_shared_host(_record())
    assert shared_host(bench, "async") and not shared_host(bench, "gpipe")  # gpipe's run carries no CPU seconds
    assert not shared_host(_record(), "async")  # records before session 32
    shared = on_shared_host(bench)
    cpu = shared["busy_s_per_step"]["async"]
    assert cpu == {k: 0.05 for k in NODES} and bench["busy_s_per_step"]["async"] == {k: 0.08 for k in NODES}
    assert shared["busy_s_per_step"]["gpipe"] == {k: 0.08 for k in NODES}  # a run without CPU seconds is kept
    cfg = replicated_config(shared, "async", cpu, 0.004)
    assert cfg.host_cores == 2.0 and cfg.background_load == pytest.approx(0.05)
    assert cfg.fwd_s == pytest.approx((0.10 / 8 / 3,) * 3)  # a stage's two replicas' CPU seconds per microbatch
    assert cfg.opt_s == pytest.approx((0.01,) * 3)  # the updates' CPU seconds, not their wall seconds
    alone = replicated_config(bench, "async", cpu, 0.004)
    assert alone.host_cores is None and alone.opt_s == pytest.approx((0.02,) * 3)
    # six busy nodes on two cores: the same CPU seconds take longer than with a core each
    busy = _on_a_shared_host(_record(), cpu_s=0.4)
    busy = on_shared_host(busy)
    heavy = replicated_config(busy, "async", busy["busy_s_per_step"]["async"], 0.004)
    assert _tokens_per_s(heavy) < 0.8 * _tokens_per_s(replace(heavy, host_cores=None, background_load=0.0))


def test_on_a_shared_host_the_overhead_is_recovered_and_another_cap_predicted() -> None:
    """Records whose tokens/s are the shared-host simulation's own at a known per-frame overhead: the fit finds the
    overhead on one and predicts a run at another in-flight cap; by default each node has a core of its own."""
    from simulations.wan_bench import on_shared_host

    def measured(cap: int) -> dict:
        bench = {**_on_a_shared_host(_record()), "max_inflight": cap}
        cpu = {k: 0.05 for k in NODES}
        bench["tokens_per_s"] = {"async": _tokens_per_s(replicated_config(on_shared_host(bench), "async", cpu, 0.004))}
        return bench

    out = validate(measured(2), calibrate_on="async", held_out=[measured(4)], host=True)
    assert out["shared_host"] and out["frame_overhead_s"] == pytest.approx(0.004, abs=5e-4)
    assert out["max_held_out_error"] < 0.03 and out["goal_met"]
    assert out["held_out_runs"][0]["max_inflight"] == 4 and out["held_out_runs"][0]["schedules"]["async"]["shared_host"]
    json.dumps(out)
    assert not validate(measured(2), calibrate_on="async", held_out=[measured(4)])["shared_host"]  # the default
