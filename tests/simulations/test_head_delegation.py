"""Simulator: delegated head work (`WanConfig.head_delegation`, the node's `replicas.head_delegation`) and the
datacenter comparison's `--head delegated`."""

from __future__ import annotations

from collections import Counter

import pytest

from pmn.cli import build_parser
from pmn.cmd_simulate import cmd_wan
from pmn.errors import CLIError
from simulations.calibrate import DEFAULT_PATH, load_calibration
from simulations.datacenter import HEADS, NODE_MAX_INFLIGHT, run_vs_datacenter
from simulations.params import ChurnConfig, LinkConfig, WanConfig
from simulations.pipeline import PipelineSim, simulate

HEAD_KW = {"leader": {"head_leader": True}, "delegated": {"head_leader": True, "head_delegation": True},
           "lanes": {}}


def _cfg(head: str = "delegated", **kw: object) -> WanConfig:
    base: dict[str, object] = dict(
        num_stages=3, fwd_s=(0.05,) * 3, bwd_s=(0.1,) * 3, replicas=4, microbatches=32, steps=3,
        microbatch_tokens=256, fwd_bytes_per_token=64.0, bwd_bytes_per_token=64.0,
        link=LinkConfig(bandwidth_mbps=50.0, latency_ms=20.0), schedule="gpipe", inflight_per_replica=2,
        sync_collective="direct",
    )
    base.update(HEAD_KW[head])
    base.update(kw)
    return WanConfig(**base)  # type: ignore[arg-type]


def _heavy_head(head: str, latency_ms: float) -> WanConfig:
    """Two stages, stage 0 ten times the other's compute: the head stage bounds the step."""
    return _cfg(head, num_stages=2, fwd_s=(0.2, 0.02), bwd_s=(0.4, 0.04),
                link=LinkConfig(bandwidth_mbps=50.0, latency_ms=latency_ms))


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("cap", [1, 2])
def test_every_head_replica_computes_and_a_delegate_holds_at_most_the_cap_of_tasks(schedule: str, cap: int) -> None:
    sim = PipelineSim(_cfg(schedule=schedule, inflight_per_replica=cap), trace=True)
    res = sim.run()
    assert res.microbatches_completed == res.microbatches_expected == 96 and res.failed_attempts == 0
    head = Counter(e.replica for e in res.trace if e.stage == 0 and e.kind == "fwd")
    assert set(head) == {0, 1, 2, 3}  # the leader (replica 0) and its three delegates all compute stage 0
    assert {e.replica for e in res.trace if e.stage == 0 and e.kind == "bwd"} == {0, 1, 2, 3}
    assert sum(head.values()) == sim.led + sim.delegated == 96 and sim.led == head[0]
    # tasks go to the delegates only, each holds the cap at its busiest and never more
    assert sim.task_peak == {1: cap, 2: cap, 3: cap}
    assert res.forward_passes == simulate(_cfg("leader", schedule=schedule, inflight_per_replica=cap)).forward_passes


def test_without_a_cap_the_leader_only_hands_out_tasks() -> None:
    """No in-flight cap: a delegate always has room, so the leader computes nothing itself."""
    sim = PipelineSim(_cfg(inflight_per_replica=None), trace=True)
    res = sim.run()
    assert sim.led == 0 and sim.delegated == 96
    assert {e.replica for e in res.trace if e.stage == 0} == {1, 2, 3}


def test_delegation_under_churn_loses_tasks_and_gives_their_slots_back() -> None:
    """Head replicas (the leader too) leave and come back: lost tasks are computed again, every microbatch
    completes, no delegate ever holds more than the cap and none is left holding a task."""
    cfg = _cfg(speed_sigma=0.3, churn=ChurnConfig(mean_uptime_s=5.0, mean_downtime_s=1.0), seed=1,
               link=LinkConfig(bandwidth_mbps=50.0, bandwidth_sigma=0.5, latency_ms=20.0, latency_sigma=0.5))
    sim = PipelineSim(cfg)
    res = sim.run()
    assert res.departures > 0 and res.failed_attempts > 0
    assert res.microbatches_completed == res.microbatches_expected
    assert 0 not in sim.task_peak and max(sim.task_peak.values()) == 2
    assert all(n.tasks == 0 for n in sim.nodes[0])


def test_zero_latency_delegation_matches_lanes_and_latency_only_slows_it() -> None:
    """A head-bound pipeline: at zero latency the delegates and the leader keep every head replica busy as the
    uncoordinated lanes do (the same step); each TASK, DONE and COMMIT latency can only add to it, never make it
    faster than lanes, and it stays far faster than the leader computing all of stage 0."""
    steps = {(head, lat): simulate(_heavy_head(head, lat)).mean_step_s
             for head in HEAD_KW for lat in (0.0, 20.0, 50.0)}
    assert steps[("delegated", 0.0)] == pytest.approx(steps[("lanes", 0.0)], rel=1e-9)
    assert steps[("lanes", 0.0)] == pytest.approx(32 / 4 * 0.6, rel=1e-9)  # stage 0's compute, shared by 4
    for lat in (20.0, 50.0):
        assert steps[("lanes", lat)] < steps[("delegated", lat)] < steps[("leader", lat)] / 3
    assert steps[("delegated", 0.0)] < steps[("delegated", 20.0)] < steps[("delegated", 50.0)]


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_delegation_is_between_lanes_and_the_leader_on_a_balanced_pipeline(schedule: str) -> None:
    step = {head: simulate(_cfg(head, schedule=schedule)).mean_step_s for head in HEAD_KW}
    assert step["lanes"] < step["delegated"] < step["leader"]


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_delegates_push_their_bundle_one_commit_latency_after_the_step(schedule: str) -> None:
    """One bundle a step from every head replica that computed (the leader's and its delegates'): a 500 kB
    contribution to 3 others on 50 Mb/s uplinks is 0.24 s, plus the push's latency; a delegate starts it when the
    leader's COMMIT reaches it, one 20 ms latency after the step, where lanes push at once."""
    bundle = dict(grad_sync_bytes=(500_000, 0, 0), sync_push=True, push_per_step=True, schedule=schedule)
    push_s = 3 * 500_000 / (50e6 / 8)
    for head, commit in (("lanes", 0.0), ("leader", 0.0), ("delegated", 0.02)):
        bare, pushed = simulate(_cfg(head, schedule=schedule)), simulate(_cfg(head, **bundle))
        extra = [p - b for p, b in zip(pushed.step_times_s, bare.step_times_s, strict=True)]
        assert extra == pytest.approx([push_s + 0.02 + commit] * 3, abs=1e-9)
        pushers = 1 if head == "leader" else 4
        assert pushed.bytes_sent - bare.bytes_sent == pytest.approx(3 * pushers * 3 * 500_000)


def test_bad_delegation_configs_are_refused() -> None:
    with pytest.raises(ValueError, match=r"head_delegation needs head_leader=True"):
        _cfg("lanes", head_delegation=True).validate()
    with pytest.raises(ValueError, match=r"head_delegation needs a flushed schedule \(gpipe or 1f1b\)"):
        _cfg(schedule="async").validate()
    with pytest.raises(ValueError, match=r"head_delegation=1: must be True or False"):
        _cfg(head_delegation=1).validate()
    _cfg(replicas=1).validate()  # a lone head replica has no delegate: it computes everything
    assert simulate(_cfg(replicas=1)).mean_step_s == pytest.approx(simulate(_cfg("leader", replicas=1)).mean_step_s)


def test_the_comparison_labels_delegated_head_work() -> None:
    from node.config import ReplicaConfig

    assert ReplicaConfig().head_delegation  # the node delegates by default (with the step exchange)
    cal = load_calibration(DEFAULT_PATH)
    kw: dict[str, object] = dict(schedule="gpipe", averaging="powersgd:12:int4", overlap_averaging=True, steps=2)
    built = run_vs_datacenter(cal, head="delegated", contributions="step", **kw)  # type: ignore[arg-type]
    assert built["node_as_built"] and built["not_built"] == []
    assert built["wan"]["inflight_per_replica"] == NODE_MAX_INFLIGHT and "head delegate" in built["inflight_cap"]
    assert built["wan"]["head"] == HEADS["delegated"] and "replicas.head_delegation" in built["wan"]["head"]
    what_if = run_vs_datacenter(cal, head="delegated", contributions="microbatch", **kw)  # type: ignore[arg-type]
    assert not what_if["node_as_built"] and what_if["wan"]["inflight_per_replica"] is None
    assert what_if["not_built"] == [x for x in what_if["not_built"] if "delegated head work" in x] != []
    assert "only with replica_exchange = step" in what_if["not_built"][0]
    lanes = run_vs_datacenter(cal, head="lanes", contributions="step", **kw)  # type: ignore[arg-type]
    assert "upper bound of delegated head work" in lanes["wan"]["head"] and not lanes["node_as_built"]
    leader = run_vs_datacenter(cal, head="leader", contributions="step", **kw)  # type: ignore[arg-type]
    assert leader["node_as_built"] and "(the node)" in leader["wan"]["head"]
    # the node's delegation beats its leader alone; the uncoordinated lanes stay the bound
    assert lanes["wan"]["step_s"] < built["wan"]["step_s"] < leader["wan"]["step_s"]
    assert built["datacenter"] == leader["datacenter"]
    with pytest.raises(ValueError, match=r"head='delegated' needs a flushed schedule"):
        run_vs_datacenter(cal, head="delegated", schedule="async", steps=2)


def test_cli_takes_head_delegated_and_refuses_it_under_async_in_one_line() -> None:
    parser = build_parser()
    assert parser.parse_args(["simulate", "wan"]).head == "leader"  # the default stays the leader
    args = parser.parse_args(["simulate", "wan", "--vs", "datacenter", "--head", "delegated"])
    assert args.head == "delegated"
    with pytest.raises(CLIError, match="flushed schedule"):
        cmd_wan(args)  # the comparison's default schedule is async
    with pytest.raises(SystemExit):
        parser.parse_args(["simulate", "wan", "--head", "delegates"])
