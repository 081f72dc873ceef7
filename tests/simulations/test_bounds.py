"""`simulations.bounds`: floors on the step of the node's async schedule with replicated stages, and the simulator
never beating them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from simulations.bounds import bundle_bytes, microbatches_per_replica, step_floors
from simulations.calibrate import DEFAULT_PATH, load_calibration
from simulations.datacenter import run_vs_datacenter
from simulations.params import LinkConfig, WanConfig
from simulations.pipeline import simulate


def _cfg(**kw: object) -> WanConfig:
    """Three stages x 2 replicas, 8 microbatches a step, the node's delegated head work and one bundle per replica
    and step, behind 60 ms / 50 Mb/s links."""
    base: dict[str, object] = dict(
        num_stages=3, fwd_s=(0.01, 0.01, 0.02), bwd_s=(0.02, 0.02, 0.04), opt_s=(0.005, 0.005, 0.01), replicas=2,
        microbatches=8, steps=10, microbatch_tokens=256, fwd_bytes_per_token=8.0, bwd_bytes_per_token=4.0,
        link=LinkConfig(bandwidth_mbps=50.0, latency_ms=60.0), schedule="async", max_staleness=1,
        inflight_per_replica=2, head_leader=True, head_delegation=True, tasks_per_delegate=16,
        sync_collective="direct", sync_push=True, push_per_step=True, grad_sync_bytes=(40_000, 10_000, 60_000),
        warmup_steps=5)
    base.update(kw)
    return WanConfig(**base)  # type: ignore[arg-type]


def test_the_floors_are_the_busiest_compute_the_widest_uplink_and_the_window_rule() -> None:
    cfg = _cfg()
    f = step_floors(cfg)
    # 4 microbatches per replica; the last stage's compute is the most: 4 x 0.06 + 0.01
    assert f.busiest_stage == 2 and f.compute_s == pytest.approx(4 * 0.06 + 0.01)
    # stage 2 sends 4 x 256 tokens of gradient frames (4 B) and one 60 kB bundle to its one peer, at 50 Mb/s
    assert f.uplink_stage == 2 and f.uplink_s == pytest.approx((4 * 256 * 4.0 + 60_000) / (50e6 / 8))
    # (2 x 3 stages x 60 ms + the busiest compute) over max_staleness + 1 = 2 steps
    assert f.window_s == pytest.approx((6 * 0.06 + f.compute_s) / 2)
    assert f.step_s == max(f.compute_s, f.uplink_s, f.window_s) and f.binding == "window"
    assert json.loads(json.dumps(f.to_dict()))["binding"] == "window"
    # a deeper window leaves the compute floor binding; a thin link the uplink
    assert step_floors(_cfg(max_staleness=4)).binding == "compute"
    assert step_floors(_cfg(link=LinkConfig(bandwidth_mbps=1.0, latency_ms=60.0))).binding == "uplink"


def test_a_head_leader_that_hands_nothing_out_computes_every_microbatch_and_a_sharded_exchange_sends_less() -> None:
    assert microbatches_per_replica(_cfg(head_delegation=False, tasks_per_delegate=None), 0) == 8
    assert microbatches_per_replica(_cfg(), 0) == 4
    r16 = _cfg(replicas=16, microbatches=32)
    assert bundle_bytes(r16, 0) == 15 * 40_000  # direct: one bundle to each of 15 peers
    assert bundle_bytes(r16, 0, "ring") == pytest.approx(2 * 15 / 16 * 40_000)  # reduce-scatter and all-gather
    assert step_floors(r16, "ring").uplink_s < step_floors(r16).uplink_s


def test_other_schedules_have_no_window_floor() -> None:
    with pytest.raises(ValueError, match="replicated stages"):
        step_floors(_cfg(schedule="gpipe", max_staleness=None))


@pytest.mark.parametrize("kw", [
    {},
    {"max_staleness": 0},
    {"max_staleness": 3},
    {"link": LinkConfig(bandwidth_mbps=1.0, latency_ms=60.0)},
    {"link": LinkConfig(bandwidth_mbps=50.0, latency_ms=20.0), "replicas": 3, "microbatches": 12},
], ids=["base", "no-staleness", "deep-window", "thin-link", "near-links"])
def test_the_simulator_never_beats_the_floor(kw: dict[str, object]) -> None:
    """Over a run, not a few steps: work of up to max_staleness + 1 steps runs ahead of their updates, so a short
    stretch of steps may be quicker than the floor; N steps take at least N - max_staleness - 1 floors."""
    cfg = _cfg(**kw)
    res = simulate(cfg)
    floor = step_floors(cfg).step_s
    ahead = (cfg.max_staleness or 0) + 1
    assert res.sim_time_s >= (cfg.steps - ahead) * floor, (res.sim_time_s, floor)
    steady = float(np.mean(res.step_times_s[cfg.warmup_steps:]))
    assert steady < 10 * floor  # and the floor is of the right size


def test_the_datacenter_comparison_reports_the_floors_of_the_node_s_async() -> None:
    cal = load_calibration(DEFAULT_PATH)
    out = run_vs_datacenter(cal, schedule="async", averaging="powersgd:12:int4", overlap_averaging=True,
                            contributions="step", head="delegated", max_staleness=2, steps=2)
    floors = out["floors"]
    assert set(floors) == {"as_built", "sharded_exchange"} and out["slowdown_floor"]["as_built"] > 1.0
    # the simulated node is no faster than its floor; a sharded exchange lowers only the uplink's
    assert floors["as_built"]["step_s"] <= out["wan"]["step_s"]
    assert floors["as_built"]["slowdown"] <= out["slowdown_vs_datacenter"]
    assert floors["sharded_exchange"]["uplink_s"] < floors["as_built"]["uplink_s"]
    assert floors["sharded_exchange"]["compute_s"] == floors["as_built"]["compute_s"]
    gpipe = run_vs_datacenter(cal, schedule="gpipe", averaging="powersgd:12:int4", overlap_averaging=True,
                              contributions="step", head="delegated", steps=2)
    assert gpipe["floors"] == {} and gpipe["slowdown_floor"] == {}
