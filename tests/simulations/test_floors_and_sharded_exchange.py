"""`simulations.bounds`: floors on the step of the node's async schedule with replicated stages, and the simulator
never beating them; the sharded exchange of bundles (`sync_collective = "sharded"`, `--collective sharded`), a
what-if the node does not have."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from pmn.cli import build_parser
from pmn.cmd_simulate import cmd_wan
from pmn.errors import CLIError
from simulations.averaging import SHARDED_ROUNDS
from simulations.bounds import bundle_bytes, microbatches_per_replica, step_floors
from simulations.calibrate import DEFAULT_PATH, load_calibration
from simulations.datacenter import run_vs_datacenter
from simulations.params import LinkConfig, WanConfig
from simulations.pipeline import PipelineSim, simulate


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
    # the node's finish: the bundle to its first holder and back (40 kB at 50 Mb/s, two latencies), the COMMIT (one),
    # the other head replica's bundle (one bundle, one latency), the update
    bundle_s = 40_000 / (50e6 / 8)
    assert f.leader_finish_s == pytest.approx(bundle_s + 2 * 0.06 + 0.06 + bundle_s + 0.06 + 0.005)
    assert f.window_as_built_s == pytest.approx((4 * 0.06 + f.compute_s + f.leader_finish_s) / 2)
    assert f.step_as_built_s == max(f.compute_s, f.uplink_s, f.window_as_built_s) >= f.step_s
    assert json.loads(json.dumps(f.to_dict()))["binding"] == "window"
    # a deeper window leaves the compute floor binding; a thin link the uplink
    assert step_floors(_cfg(max_staleness=4)).binding == "compute"
    assert step_floors(_cfg(link=LinkConfig(bandwidth_mbps=1.0, latency_ms=60.0))).binding == "uplink"


def test_a_head_leader_that_hands_nothing_out_computes_every_microbatch_and_a_sharded_exchange_sends_less() -> None:
    assert microbatches_per_replica(_cfg(head_delegation=False, tasks_per_delegate=None), 0) == 8
    assert microbatches_per_replica(_cfg(), 0) == 4
    r16 = _cfg(replicas=16, microbatches=32)
    assert bundle_bytes(r16, 0) == 15 * 40_000  # direct: one bundle to each of 15 peers
    assert bundle_bytes(r16, 0, "sharded") == pytest.approx(2 * 15 / 16 * 40_000)  # reduce-scatter and all-gather
    assert step_floors(r16, "sharded").uplink_s < step_floors(r16).uplink_s


def test_other_schedules_have_no_window_floor() -> None:
    with pytest.raises(ValueError, match="replicated stages"):
        step_floors(_cfg(schedule="gpipe", max_staleness=None))


@pytest.mark.parametrize("kw", [
    {},
    {"max_staleness": 0},
    {"max_staleness": 3},
    {"link": LinkConfig(bandwidth_mbps=1.0, latency_ms=60.0)},
    {"link": LinkConfig(bandwidth_mbps=50.0, latency_ms=20.0), "replicas": 3, "microbatches": 12},
    {"sync_collective": "sharded", "replicas": 4, "microbatches": 16, "link": LinkConfig(1.0, latency_ms=20.0)},
    {"sync_collective": "sharded", "max_staleness": 0},
    {"sync_collective": "sharded", "head_delegation": False, "tasks_per_delegate": None},
], ids=["base", "no-staleness", "deep-window", "thin-link", "near-links", "sharded-thin-link", "sharded-no-staleness",
        "sharded-head-leader"])
def test_the_simulator_never_beats_the_floor(kw: dict[str, object]) -> None:
    """Over a run, not a few steps: work of up to max_staleness + 1 steps runs ahead of their updates, so a short
    stretch of steps may be quicker than the floor; N steps take at least N - max_staleness - 1 floors."""
    cfg = _cfg(**kw)
    res = simulate(cfg)
    floors = step_floors(cfg)
    floor = floors.step_s
    ahead = (cfg.max_staleness or 0) + 1
    assert res.sim_time_s >= (cfg.steps - ahead) * floors.step_as_built_s >= (cfg.steps - ahead) * floor, \
        (res.sim_time_s, floors)
    steady = float(np.mean(res.step_times_s[cfg.warmup_steps:]))
    assert steady < 10 * floor  # and the floor is of the right size


def test_the_datacenter_comparison_reports_the_floors_of_the_node_s_async() -> None:
    cal = load_calibration(DEFAULT_PATH)
    out = run_vs_datacenter(cal, schedule="async", averaging="powersgd:12:int4", overlap_averaging=True,
                            contributions="step", head="delegated", max_staleness=2, steps=8)
    floors = out["floors"]
    assert set(floors) == {"as_run", "sharded_exchange"} and out["slowdown_floor"]["as_run"] > 1.0
    assert out["slowdown_floor"]["as_run_node_finish"] >= out["slowdown_floor"]["as_run"]
    assert floors["as_run"]["slowdown_as_built"] <= out["slowdown_vs_datacenter"]
    # the simulated node is no faster than its floor; a sharded exchange lowers only the uplink's
    assert floors["as_run"]["step_s"] <= out["wan"]["step_s"]
    assert floors["as_run"]["slowdown"] <= out["slowdown_vs_datacenter"]
    assert floors["sharded_exchange"]["uplink_s"] < floors["as_run"]["uplink_s"]
    assert floors["sharded_exchange"]["compute_s"] == floors["as_run"]["compute_s"]
    gpipe = run_vs_datacenter(cal, schedule="gpipe", averaging="powersgd:12:int4", overlap_averaging=True,
                              contributions="step", head="delegated", steps=2)
    assert gpipe["floors"] == {} and gpipe["slowdown_floor"] == {}


def _thin(**kw: object) -> WanConfig:
    """Four replicas per stage behind 2 Mb/s uplinks: the bundles bound the step."""
    return _cfg(replicas=4, microbatches=16, link=LinkConfig(bandwidth_mbps=2.0, latency_ms=20.0), **kw)


def test_a_sharded_exchange_sends_a_fraction_of_the_bundles_and_every_update_waits_for_every_owner() -> None:
    direct, sharded = PipelineSim(_thin()), PipelineSim(_thin(sync_collective="sharded"))
    d, s = direct.run(), sharded.run()
    assert s.bytes_sent < d.bytes_sent and s.sim_time_s < d.sim_time_s  # uplink-bound: fewer bytes, sooner
    assert s.microbatches_completed == d.microbatches_completed == 16 * 10
    # each node's exchange of each step is recorded once, to its 3 peers
    counts: dict[tuple[int, int], int] = {}
    for p in sharded.bundle_pushes:
        if p.peers == 3:
            counts[(p.stage, p.step)] = counts.get((p.stage, p.step), 0) + 1
    assert set(counts.values()) == {4} and len(counts) == 3 * 10
    # the linear code's two rounds (P, then Q), each a reduce-scatter and an all-gather, one after another: a round's
    # all-gather starts only once every node of the stage scattered its parts, and the next round only once every
    # summed part of the last reached every node; so no node's exchange ends before four latencies after the last
    # node's exchange began
    assert SHARDED_ROUNDS == 2
    for stage in range(3):
        for step in range(10):
            pushes = [p for p in sharded.bundle_pushes if (p.stage, p.step) == (stage, step) and p.peers == 3]
            assert min(p.answered for p in pushes) >= max(p.start for p in pushes) + 4 * 0.02 - 1e-9
    # every node applied every step, in order
    assert all(n.applied == 10 for stage in sharded.nodes for n in stage)


def test_the_sharded_exchange_takes_the_linear_code_s_two_rounds_of_two_latencies() -> None:
    """On links where the bytes take no time, a node's exchange of a step lasts four latencies from the moment the
    stage's last node began it: P's reduce-scatter and all-gather, then Q's."""
    sim = PipelineSim(_cfg(replicas=4, microbatches=16, link=LinkConfig(bandwidth_mbps=1e6, latency_ms=20.0),
                           sync_collective="sharded"))
    sim.run()
    for stage in range(3):
        for step in range(10):
            pushes = [p for p in sim.bundle_pushes if (p.stage, p.step) == (stage, step) and p.peers == 3]
            last = max(p.start for p in pushes)
            assert min(p.answered for p in pushes) - last == pytest.approx(2 * SHARDED_ROUNDS * 0.02, abs=1e-3)


def test_the_sharded_exchange_is_refused_outside_the_node_s_async_with_replicated_stages() -> None:
    with pytest.raises(ValueError, match="sharded.*async with replicated stages"):
        _cfg(schedule="gpipe", max_staleness=None, sync_collective="sharded").validate()
    cal = load_calibration(DEFAULT_PATH)
    with pytest.raises(ValueError, match="collective='sharded'.*schedule='async'"):
        run_vs_datacenter(cal, schedule="gpipe", averaging="powersgd:12:int4", overlap_averaging=True,
                          contributions="step", head="delegated", steps=2, collective="sharded")
    with pytest.raises(ValueError, match="collective='ring'"):
        run_vs_datacenter(cal, steps=2, collective="ring")


def test_the_comparison_runs_the_sharded_what_if_labelled_and_from_the_cli() -> None:
    kw: dict[str, Any] = dict(schedule="async", averaging="powersgd:12:int4", overlap_averaging=True,
                              contributions="step", head="delegated", max_staleness=3)  # SIMULATED_STEPS: steady state
    cal = load_calibration(DEFAULT_PATH)
    direct, sharded = run_vs_datacenter(cal, **kw), run_vs_datacenter(cal, collective="sharded", **kw)
    assert direct["node_as_built"] and direct["wan"]["averaging_collective"] == "direct"
    assert not sharded["node_as_built"] and any("sharded exchange" in x for x in sharded["not_built"])
    assert sharded["wan"]["averaging_collective"] == "sharded"
    assert sharded["wan"]["inflight_per_replica"] == direct["wan"]["inflight_per_replica"]  # the node's caps
    assert sharded["wan"]["step_s"] < direct["wan"]["step_s"]
    assert sharded["floors"]["as_run"]["uplink_s"] == direct["floors"]["sharded_exchange"]["uplink_s"]
    args = build_parser().parse_args(["simulate", "wan", "--vs", "datacenter", "--collective", "sharded",
                                      "--contributions", "microbatch"])
    assert args.collective == "sharded" and build_parser().parse_args(["simulate", "wan"]).collective == "direct"
    with pytest.raises(CLIError, match="collective='sharded'"):
        cmd_wan(args)  # per-microbatch contributions have no bundles to shard


def test_pipelined_finishes_beat_the_one_at_a_time_chain_and_keep_the_updates_in_order() -> None:
    """Behind 100 ms links, with room in flight and S = 3, the leader's finish (its bundle's first holder, the COMMIT,
    the head's exchange, the update) is longer than the work of a step: finished one at a time, a step takes at least
    that chain; finished side by side (`pipelined_finish`, the node since session 32) it takes less, still no less
    than the node's floor, and every node applies every update, in step order."""
    kw: dict[str, object] = dict(max_staleness=3, steps=24, warmup_steps=8, inflight_per_replica=8,
                                 link=LinkConfig(bandwidth_mbps=50.0, latency_ms=100.0))
    floors = step_floors(_cfg(**kw))
    steady = {}
    for pipelined in (False, True):
        sim = PipelineSim(_cfg(pipelined_finish=pipelined, **kw))
        res = sim.run()
        steady[pipelined] = float(np.mean(res.step_times_s[8:]))
        assert all(n.applied == 24 for stage in sim.nodes for n in stage)
        applies = [sim.last_apply[k] for k in range(24)]
        assert applies == sorted(applies)
        overlap = any(b[0] < a[1] for n in sim.nodes[1] for a, b in zip(n.finishes[:-1], n.finishes[1:], strict=True))
        assert overlap == pipelined  # a finish started before the one before it ended only side by side
    assert steady[False] >= 0.98 * floors.leader_finish_s > floors.step_as_built_s
    assert steady[True] < 0.9 * steady[False] and steady[True] < floors.leader_finish_s
    assert steady[True] >= floors.step_as_built_s
