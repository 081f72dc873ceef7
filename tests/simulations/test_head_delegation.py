"""Simulator: delegated head work (`WanConfig.head_delegation`, the node's `replicas.head_delegation`) and the
datacenter comparison's `--head delegated`."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pmn.cli import build_parser
from pmn.cmd_simulate import cmd_wan
from pmn.errors import CLIError
from simulations.calibrate import DEFAULT_PATH, load_calibration
from simulations.datacenter import HEADS, NODE_MAX_INFLIGHT, NODE_MAX_TASKS, run_vs_datacenter
from simulations.params import ChurnConfig, LinkConfig, WanConfig
from simulations.pipeline import PipelineSim, WanResult, simulate

HEAD_KW = {"leader": {"head_leader": True}, "delegated": {"head_leader": True, "head_delegation": True},
           "lanes": {}}


def _cfg(head: str = "delegated", **kw: object) -> WanConfig:
    """Three stages x 4 replicas, 32 microbatches a step: with head delegation an even share is 8 a head replica."""
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


def _head_forwards(res: WanResult, microbatches: int = 32) -> dict[int, Counter[int]]:
    """Stage-0 forwards of each step, by replica (replica 0 leads)."""
    out: dict[int, Counter[int]] = {}
    for e in res.trace:
        if e.stage == 0 and e.kind == "fwd" and not e.lost:
            out.setdefault(e.mb // microbatches, Counter())[e.replica] += 1
    return out


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("tasks", [1, 2, 3])
@pytest.mark.parametrize("inflight", [1, 2, None])
def test_every_head_replica_computes_and_a_delegate_holds_at_most_the_task_cap(schedule: str, tasks: int,
                                                                              inflight: int | None) -> None:
    """The task cap (not the in-flight cap) bounds a delegate's tasks, whatever the in-flight cap."""
    sim = PipelineSim(_cfg(schedule=schedule, inflight_per_replica=inflight, tasks_per_delegate=tasks), trace=True)
    res = sim.run()
    assert res.microbatches_completed == res.microbatches_expected == 96 and res.failed_attempts == 0
    head = Counter(e.replica for e in res.trace if e.stage == 0 and e.kind == "fwd")
    assert set(head) == {0, 1, 2, 3}  # the leader (replica 0) and its three delegates all compute stage 0
    assert {e.replica for e in res.trace if e.stage == 0 and e.kind == "bwd"} == {0, 1, 2, 3}
    assert sum(head.values()) == sim.led + sim.delegated == 96 and sim.led == head[0]
    # tasks go to the delegates only, each holds the task cap at its busiest and never more
    assert sim.task_peak == {1: tasks, 2: tasks, 3: tasks}
    assert res.forward_passes == simulate(_cfg("leader", schedule=schedule,
                                               inflight_per_replica=inflight)).forward_passes


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize(("microbatches", "replicas"), [(32, 4), (30, 4), (24, 3), (20, 6), (9, 2)])
def test_while_the_leader_has_room_a_delegate_gets_at_most_an_even_share(schedule: str, microbatches: int,
                                                                        replicas: int) -> None:
    """No cap on tasks and none on the leader's sends (it can always send one itself): with M microbatches and D
    delegates each delegate is handed at most ceil(M / (D + 1)) of a step's, and the leader computes the rest, about
    its own share (exactly what the delegates' shares leave)."""
    share = -(-microbatches // replicas)
    sim = PipelineSim(_cfg(schedule=schedule, microbatches=microbatches, replicas=replicas, inflight_per_replica=None),
                      trace=True)
    res = sim.run()
    assert res.microbatches_completed == res.microbatches_expected and sim.past_share == 0
    by_step = _head_forwards(res, microbatches)
    assert sorted(by_step) == [0, 1, 2]
    for count in by_step.values():
        assert sum(count.values()) == microbatches
        assert all(count[r] <= share for r in range(1, replicas))
        assert count[0] == microbatches - sum(count[r] for r in range(1, replicas))
        assert max(0, microbatches - (replicas - 1) * share) <= count[0] <= share
    assert max(sim.assigned.values()) <= share  # per step and delegate, as the node's _assigned counts them


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_with_the_node_s_in_flight_cap_the_share_still_holds(schedule: str) -> None:
    """The node's caps on this pipeline (2 per sender and downstream replica, 8 tasks): stage 1's 4 replicas x 2
    leave the leader room, so every head replica computes its even share, 8 of the 32, every step."""
    sim = PipelineSim(_cfg(schedule=schedule, tasks_per_delegate=8), trace=True)
    res = sim.run()
    assert sim.past_share == 0 and sim.task_peak == {1: 8, 2: 8, 3: 8}
    assert all(count == {0: 8, 1: 8, 2: 8, 3: 8} for count in _head_forwards(res).values())


def test_when_the_leader_has_no_room_delegates_take_microbatches_past_their_share() -> None:
    """gpipe, one microbatch per sender and stage-1 replica: the leader's own sends fill stage 1 and it hands the
    rest to any delegate with room, share or not, and computes fewer than its share itself. The task cap still
    holds."""
    sim = PipelineSim(_cfg(inflight_per_replica=1), trace=True)
    res = sim.run()
    assert sim.past_share > 0
    for count in _head_forwards(res).values():
        assert max(count[r] for r in (1, 2, 3)) > 8 > count[0]
    capped = PipelineSim(_cfg(inflight_per_replica=1, tasks_per_delegate=3))
    capped.run()
    assert max(capped.task_peak.values()) == 3


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_a_larger_task_cap_speeds_the_step_up_to_the_even_share(schedule: str) -> None:
    """The node's 8 tasks against the old cap of 2: a task is out for a whole pipeline round trip, so a cap of 2
    leaves the leader computing most of stage 0 (14 of 32 under gpipe) and the step slower; past the even share
    (8 here) a larger cap changes nothing."""
    step = {tasks: simulate(_cfg(schedule=schedule, tasks_per_delegate=tasks)).mean_step_s
            for tasks in (1, 2, 4, 8, 16, None)}
    assert step[1] > step[2] > step[4] >= step[8]
    assert step[8] == step[16] == step[None]


def test_delegation_under_churn_loses_tasks_and_gives_their_slots_back() -> None:
    """Head replicas (the leader too) leave and come back: lost tasks are computed again, every microbatch
    completes, no delegate ever holds more than the task cap and none is left holding a task."""
    cfg = _cfg(speed_sigma=0.3, churn=ChurnConfig(mean_uptime_s=5.0, mean_downtime_s=1.0), seed=1, tasks_per_delegate=3,
               link=LinkConfig(bandwidth_mbps=50.0, bandwidth_sigma=0.5, latency_ms=20.0, latency_sigma=0.5))
    sim = PipelineSim(cfg)
    res = sim.run()
    assert res.departures > 0 and res.failed_attempts > 0
    assert res.microbatches_completed == res.microbatches_expected
    assert 0 not in sim.task_peak and max(sim.task_peak.values()) == 3
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
        bare, pushed = PipelineSim(_cfg(head, schedule=schedule)), PipelineSim(_cfg(head, **bundle))
        bare_res, pushed_res = bare.run(), pushed.run()
        # each step's tail: from its last microbatch done (the step_done the bundles wait for) to the step's end
        # (the microbatches' own timing can differ by simultaneous-event tie-breaks once pushes are in the queue)
        for sim, res, tail in ((bare, bare_res, 0.0), (pushed, pushed_res, push_s + 0.02 + commit)):
            ends = np.cumsum(res.step_times_s)
            last_done = [sim.completion_times[(k + 1) * 32 - 1] for k in range(3)]
            assert list(ends - last_done) == pytest.approx([tail] * 3, abs=1e-9)
        pushers = 1 if head == "leader" else 4
        assert pushed_res.bytes_sent - bare_res.bytes_sent == pytest.approx(3 * pushers * 3 * 500_000)


def test_bad_delegation_configs_are_refused() -> None:
    with pytest.raises(ValueError, match=r"head_delegation needs head_leader=True"):
        _cfg("lanes", head_delegation=True).validate()
    with pytest.raises(ValueError, match=r"head_delegation under the async schedule needs push_per_step.*"
                                         r"replica_exchange = step"):
        _cfg(schedule="async").validate()  # the node's async with replicas runs only with the step exchange
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
    assert built["wan"]["inflight_per_replica"] == NODE_MAX_INFLIGHT and "replicas.max_inflight" in built["inflight_cap"]
    assert built["wan"]["tasks_per_delegate"] == NODE_MAX_TASKS and "replicas.max_tasks" in built["task_cap"]
    assert built["wan"]["head"] == HEADS["delegated"] and "replicas.head_delegation" in built["wan"]["head"]
    what_if = run_vs_datacenter(cal, head="delegated", contributions="microbatch", **kw)  # type: ignore[arg-type]
    assert not what_if["node_as_built"] and what_if["wan"]["inflight_per_replica"] is None
    assert what_if["wan"]["tasks_per_delegate"] is None and what_if["task_cap"].startswith("none")
    assert what_if["not_built"] == [x for x in what_if["not_built"] if "delegated head work" in x] != []
    assert "only with replica_exchange = step" in what_if["not_built"][0]
    lanes = run_vs_datacenter(cal, head="lanes", contributions="step", **kw)  # type: ignore[arg-type]
    assert "upper bound of delegated head work" in lanes["wan"]["head"] and not lanes["node_as_built"]
    leader = run_vs_datacenter(cal, head="leader", contributions="step", **kw)  # type: ignore[arg-type]
    assert leader["node_as_built"] and "(the node)" in leader["wan"]["head"]
    assert leader["wan"]["tasks_per_delegate"] is None and "no tasks" in leader["task_cap"]
    # the node's delegation beats its leader alone; the uncoordinated lanes stay the bound
    assert lanes["wan"]["step_s"] < built["wan"]["step_s"] < leader["wan"]["step_s"]
    assert built["datacenter"] == leader["datacenter"]
    with pytest.raises(ValueError, match=r"head='delegated' with schedule='async' needs contributions='step'.*"
                                         r"replica_exchange = step"):
        run_vs_datacenter(cal, head="delegated", schedule="async", steps=2)


def test_cli_takes_head_delegated_and_refuses_it_under_async_without_the_step_exchange() -> None:
    parser = build_parser()
    assert parser.parse_args(["simulate", "wan"]).head is None  # resolved per schedule and contributions
    args = parser.parse_args(["simulate", "wan", "--vs", "datacenter", "--head", "delegated", "--contributions",
                              "microbatch"])
    assert args.head == "delegated"
    with pytest.raises(CLIError, match="replica_exchange = step"):
        cmd_wan(args)  # the comparison's default schedule is async
    with pytest.raises(SystemExit):
        parser.parse_args(["simulate", "wan", "--head", "delegates"])


def test_the_task_cap_follows_the_node_and_the_comparison_takes_another() -> None:
    from node.config import ReplicaConfig

    assert NODE_MAX_TASKS == ReplicaConfig().max_tasks  # the literal follows the node's default
    cal = load_calibration(DEFAULT_PATH)
    kw: dict[str, object] = dict(schedule="gpipe", averaging="powersgd:12:int4", overlap_averaging=True, steps=2,
                                 head="delegated", contributions="step")
    given = run_vs_datacenter(cal, tasks_per_delegate=2, **kw)  # type: ignore[arg-type]
    assert given["node_as_built"] and given["wan"]["tasks_per_delegate"] == 2
    assert "given by the caller (--tasks-per-delegate)" in given["task_cap"]
    uncapped = run_vs_datacenter(cal, tasks_per_delegate=0, **kw)  # type: ignore[arg-type]
    assert uncapped["wan"]["tasks_per_delegate"] is None and uncapped["task_cap"].startswith("none")
    assert uncapped["wan"]["step_s"] < given["wan"]["step_s"]  # 2 tasks leave the leader most of stage 0
    with pytest.raises(ValueError, match=r"tasks_per_delegate=-1: must be an integer >= 1"):
        run_vs_datacenter(cal, tasks_per_delegate=-1, **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"needs head='delegated' \(got head='leader'\)"):
        run_vs_datacenter(cal, head="leader", schedule="gpipe", tasks_per_delegate=4)


def test_bad_task_caps_are_refused() -> None:
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match=r"WanConfig.tasks_per_delegate=.*: must be None \(no cap\)"):
            _cfg(tasks_per_delegate=bad).validate()
    with pytest.raises(ValueError, match=r"tasks_per_delegate caps the tasks of delegated head work"):
        _cfg("leader", tasks_per_delegate=2).validate()


def test_cli_takes_tasks_per_delegate() -> None:
    parser = build_parser()
    assert parser.parse_args(["simulate", "wan"]).tasks_per_delegate is None  # the node's 16 for the node as built
    args = parser.parse_args(["simulate", "wan", "--vs", "datacenter", "--schedule", "gpipe", "--head", "delegated",
                              "--tasks-per-delegate", "4"])
    assert args.tasks_per_delegate == 4
    args = parser.parse_args(["simulate", "wan", "--vs", "datacenter", "--schedule", "gpipe",
                              "--tasks-per-delegate", "4"])
    with pytest.raises(CLIError, match="needs head='delegated'"):
        cmd_wan(args)  # the default head is the leader: it hands out no tasks
