"""Simulator: the node's async schedule with replicated stages (`WanConfig.replicated_async`: runtime.schedule =
async with replica_exchange = step) and the datacenter comparison's `--schedule async --head delegated`."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from simulations.calibrate import DEFAULT_PATH, load_calibration
from simulations.datacenter import NODE_MAX_INFLIGHT, NODE_MAX_TASKS, run_vs_datacenter
from simulations.params import ChurnConfig, LinkConfig, WanConfig
from simulations.pipeline import BundlePush, PipelineSim, WanResult, simulate

BUNDLE_PEERS, UPLINK_BPS = 2, 100e6 / 8  # a replica's stage peers in `_cfg`, and its uplink in bytes per second


def _cfg(**kw: object) -> WanConfig:
    """Four stages x 3 replicas, 12 microbatches a step of 10 ms forwards and 20 ms backwards behind 100 ms links:
    the links, not compute, bound the step. The node's caps (2 in flight per sender and replica, 16 tasks per head
    delegate), delegated head work and one 10 kB bundle per replica and step."""
    base: dict[str, object] = dict(
        num_stages=4, fwd_s=(0.01,) * 4, bwd_s=(0.02,) * 4, replicas=BUNDLE_PEERS + 1, microbatches=12, steps=8,
        microbatch_tokens=128, fwd_bytes_per_token=16.0, bwd_bytes_per_token=16.0,
        link=LinkConfig(bandwidth_mbps=100.0, latency_ms=100.0), schedule="async", max_staleness=2,
        inflight_per_replica=2, head_leader=True, head_delegation=True, tasks_per_delegate=16,
        sync_collective="direct", sync_push=True, push_per_step=True, grad_sync_bytes=(10_000,) * 4, warmup_steps=4)
    base.update(kw)
    return WanConfig(**base)  # type: ignore[arg-type]


def _steady_step(res: WanResult, cfg: WanConfig) -> float:
    """Mean seconds of the steps after the warm-up."""
    return float(np.mean(res.step_times_s[cfg.warmup_steps:]))


def test_the_node_s_async_with_delegated_head_work_is_the_node_as_built() -> None:
    """`--schedule async --head delegated --contributions step` with the node's caps is what the node runs: no
    what-if named, the node's in-flight and task caps, the async loss penalty applied, and the JSON holds the
    slowdown; head lanes stays a what-if, and so does the blocking finish (finish_blocks, the node before session 25),
    run with the node's caps and refused outside the node's async with replicated stages."""
    cal = load_calibration(DEFAULT_PATH)
    kw: dict[str, object] = dict(schedule="async", averaging="powersgd:12:int4", overlap_averaging=True,
                                 contributions="step", max_staleness=1, steps=2)
    built = run_vs_datacenter(cal, head="delegated", **kw)  # type: ignore[arg-type]
    out = json.loads(json.dumps(built))
    assert out["node_as_built"] is True and out["not_built"] == []
    assert out["slowdown_vs_datacenter"] > 1.0 and out["wan"]["step_s"] > 0
    assert out["wan"]["schedule"] == "async" and out["wan"]["max_staleness"] == 1
    assert out["wan"]["inflight_per_replica"] == NODE_MAX_INFLIGHT and "replicas.max_inflight" in out["inflight_cap"]
    assert out["wan"]["tasks_per_delegate"] == 2 * NODE_MAX_TASKS and "replicas.max_tasks" in out["task_cap"]
    assert "staleness 1" in out["inputs"]["assumed"]["async_loss_source"]
    assert "finishes the step" in out["wan"]["contributions"]
    leader = run_vs_datacenter(cal, head="leader", **kw)  # type: ignore[arg-type]
    assert leader["node_as_built"] and leader["wan"]["tasks_per_delegate"] is None
    blocking = run_vs_datacenter(cal, head="delegated", finish_blocks=True, **kw)  # type: ignore[arg-type]
    assert not blocking["node_as_built"] and any("blocking finish" in x for x in blocking["not_built"])
    assert blocking["wan"]["inflight_per_replica"] == NODE_MAX_INFLIGHT  # the node's caps, the old finish
    assert blocking["wan"]["tasks_per_delegate"] == 2 * NODE_MAX_TASKS  # max_tasks for each of the window's 2 steps
    with pytest.raises(ValueError, match="finish_blocks.*schedule='async'"):
        run_vs_datacenter(cal, head="delegated", finish_blocks=True,
                          **{**kw, "schedule": "gpipe"})  # type: ignore[arg-type]
    lanes = run_vs_datacenter(cal, head="lanes", **kw)  # type: ignore[arg-type]
    assert not lanes["node_as_built"] and any("async schedule with no commit" in x for x in lanes["not_built"])
    assert lanes["wan"]["inflight_per_replica"] is None


def test_the_window_overlaps_the_per_step_flush_on_slow_links() -> None:
    """100 ms links against 30 ms of compute a microbatch: gpipe waits for every step's commit and bundles before
    the next step starts; with max_staleness S >= 1 the leader runs up to S steps ahead, so the step is shorter with
    the same head, caps and bundles. S = 0 is the flush again (the node's gpipe is its window of 0)."""
    gpipe_cfg = _cfg(schedule="gpipe", max_staleness=None)
    gpipe = _steady_step(simulate(gpipe_cfg), gpipe_cfg)
    for bound in (1, 2):
        cfg = _cfg(max_staleness=bound)
        assert _steady_step(simulate(cfg), cfg) < 0.8 * gpipe
    flushed = _cfg(max_staleness=0)
    assert _steady_step(simulate(flushed), flushed) > 0.9 * gpipe


def _check_windows_and_order(sim: PipelineSim, res: WanResult, cfg: WanConfig) -> None:
    """Every node applies every update, in order (a step's finish starts once the step before is applied), and its
    forwards of step j start once it applied update j - S - 1."""
    assert res.microbatches_completed == cfg.steps * cfg.microbatches
    assert cfg.max_staleness is not None
    for stage in sim.nodes:
        for node in stage:
            assert len(node.finishes) == cfg.steps and node.applied == cfg.steps
            assert all(a[1] <= b[0] for a, b in zip(node.finishes[:-1], node.finishes[1:], strict=True))
            for (start, end), (blocked, applied) in zip(node.finishes, node.blocks, strict=True):
                assert start <= blocked <= end == applied  # its loop blocked from within the finish to the update
    for e in res.trace:
        node = sim.nodes[e.stage][e.replica]
        gate = e.mb // cfg.microbatches - cfg.max_staleness - 1  # the update step j's forward waits for
        if e.kind == "fwd" and gate >= 0:
            assert e.start >= node.finishes[gate][1]


def test_the_blocking_finish_runs_only_its_window_and_computes_nothing_while_it_finishes() -> None:
    """finish_blocks (the node before session 25): every node's forwards of step j start once it applied update
    j - S - 1, and no forward or backward runs on a node between the start of its finish of a step and the update;
    every node applies every update, in order."""
    cfg = _cfg(max_staleness=1, finish_blocks=True)
    sim = PipelineSim(cfg, trace=True)
    res = sim.run()
    _check_windows_and_order(sim, res, cfg)
    for stage in sim.nodes:
        for node in stage:
            assert node.blocks == node.finishes  # its loop blocked throughout each finish
    for e in res.trace:
        if e.kind == "opt":
            continue
        node = sim.nodes[e.stage][e.replica]
        assert not any(e.start < end and e.end > start for start, end in node.finishes)


def test_a_node_computes_while_it_finishes_and_blocks_only_for_the_update() -> None:
    """The node as built (finish_blocks False): a step's finish runs beside the node's work, so forwards and
    backwards of later steps start on the nodes between a finish's start and its update (S = 2: on the head leader
    too, forwards it computes and dispatches while its own finish runs; S = 1 leaves it none in this link-bound
    layout, the next step all handed out before the finish starts); only the update blocks a node (no forward or
    backward starts from the end of the finish until the update is applied); windows and order hold as before; and
    on the same configuration the step is no longer than with the blocking finish."""
    for bound in (1, 2):
        cfg = _cfg(max_staleness=bound)
        sim = PipelineSim(cfg, trace=True)
        res = sim.run()
        _check_windows_and_order(sim, res, cfg)
        overlapped: Counter[tuple[int, int, str]] = Counter()  # (stage, replica, kind): started during a finish
        for e in res.trace:
            if e.kind == "opt":
                continue
            node = sim.nodes[e.stage][e.replica]
            step = e.mb // cfg.microbatches
            overlapped[(e.stage, e.replica, e.kind)] += any(start < e.start < end and step > k
                                                            for k, (start, end) in enumerate(node.finishes))
            assert not any(blocked < e.start < end for blocked, end in node.blocks)
        assert sum(overlapped.values()) > cfg.microbatches
        if bound == 2:
            assert overlapped[(0, 0, "fwd")] > 0
        assert all(end - blocked < end - start for (start, end), (blocked, _) in
                   zip(sim.nodes[0][0].finishes, sim.nodes[0][0].blocks, strict=True))
        blocking_cfg = _cfg(max_staleness=bound, finish_blocks=True)
        assert _steady_step(res, cfg) <= _steady_step(simulate(blocking_cfg), blocking_cfg)


def test_a_slow_bundle_exchange_lengthens_the_finish_and_the_step() -> None:
    """A 6.25 MB bundle to each of 2 stage peers is 1 s of uplink a push (half of it a peer). A node's finish waits
    until its peers' pushes are in and its next finish starts only once this update is applied, so the step holds the
    head's finish chain: the leader's bundle before its COMMIT, its answer and the COMMIT's latency, then a delegate's
    whole push. In the node before session 25 (the blocking finish, or leader_bundle_first with the concurrent one) the
    leader pushes to both peers before its COMMIT: the step grows by at least 1.5 pushes over the 10 kB bundle's (a
    push the uplink could overlap with the next one would cost at most one). The node as built pushes to one peer
    before its COMMIT and to the other beside the delegates' pushes: it still grows by at least a push, and its slow
    step is shorter than the old order's by about the half push it no longer waits for."""
    push_s = BUNDLE_PEERS * 6_250_000 / UPLINK_BPS
    slow_s: dict[str, float] = {}
    for name, kw in (("built", {}), ("bundle_first", {"leader_bundle_first": True}), ("blocks", {"finish_blocks": True})):
        fast_cfg, slow_cfg = _cfg(**kw), _cfg(grad_sync_bytes=(6_250_000,) * 4, **kw)
        fast, slow = _steady_step(simulate(fast_cfg), fast_cfg), _steady_step(simulate(slow_cfg), slow_cfg)
        assert slow - fast >= (1.0 if name == "built" else 1.5) * push_s
        slow_s[name] = slow
    assert slow_s["built"] <= slow_s["bundle_first"] - 0.45 * push_s


def _head_pushes(sim: PipelineSim, step: int) -> tuple[list[BundlePush], list[BundlePush]]:
    """The head leader's bundle pushes of `step` and its delegates', each in the order they began."""
    pushes = sorted((p for p in sim.bundle_pushes if p.step == step and p.stage == 0), key=lambda p: p.start)
    return [p for p in pushes if p.replica == 0], [p for p in pushes if p.replica != 0]


def test_the_delegating_leader_commits_after_one_push_and_the_head_chains_overlap() -> None:
    """The node as built (async, delegated head work, max_staleness >= 1, the concurrent finish: its `_early_commit`):
    once a step is complete the leader pushes its bundle to one head peer, sends its COMMIT once that push is answered
    and then pushes to the other head peers, so the delegates' first push of the step (once the COMMIT reached them,
    one latency later) starts before the leader's last push of the step has left its uplink; with leader_bundle_first
    (the node before session 25) the leader's one push goes to every peer before its COMMIT and the delegates' pushes
    start only after its answer and the COMMIT's latency. With 6.25 MB bundles (0.5 s a peer) and with 10 kB ones, at
    S = 1 and 2, the step is no longer than with the old order."""
    latency = 0.1  # `_cfg`'s links: a COMMIT reaches a delegate one latency after it leaves
    for nbytes in (6_250_000, 10_000):
        for bound in (1, 2):
            cfg = _cfg(grad_sync_bytes=(nbytes,) * 4, max_staleness=bound)
            old_cfg = _cfg(grad_sync_bytes=(nbytes,) * 4, max_staleness=bound, leader_bundle_first=True)
            assert cfg.leader_commits_early and not old_cfg.leader_commits_early
            sim, old = PipelineSim(cfg), PipelineSim(old_cfg)
            res, old_res = sim.run(), old.run()
            checked = 0
            for step in range(cfg.steps):
                lead, delegates = _head_pushes(sim, step)
                if not sim.nodes[0][0].owned[step] or not old.nodes[0][0].owned[step]:
                    continue  # the leader handed every microbatch of the step out: no bundle of its own
                checked += 1
                assert [p.peers for p in lead] == [1, BUNDLE_PEERS - 1]  # the first holder, then the others
                first, rest = lead
                assert rest.start == pytest.approx(first.answered)  # the COMMIT went on between the two
                assert delegates and all(p.peers == BUNDLE_PEERS for p in delegates)
                assert min(p.start for p in delegates) >= first.answered + latency - 1e-9
                assert min(p.start for p in delegates) < (rest.sent if nbytes > 10_000 else rest.answered)
                old_lead, old_delegates = _head_pushes(old, step)
                assert [p.peers for p in old_lead] == [BUNDLE_PEERS]
                assert min(p.start for p in old_delegates) >= old_lead[0].answered + latency - 1e-9
            assert checked >= cfg.steps // 2
            assert _steady_step(res, cfg) <= _steady_step(old_res, old_cfg) + 1e-9
            if nbytes > 10_000:  # the leader's half push to its second peer runs beside the delegates' pushes
                assert _steady_step(res, cfg) < _steady_step(old_res, old_cfg) - 0.4


def test_the_leader_keeps_the_old_order_where_the_node_does_and_leader_bundle_first_is_refused_there() -> None:
    """The leader pushes its bundle to every head peer before its COMMIT without delegates (head leader), at
    max_staleness 0 and with the blocking finish (the node before session 25): one push a step, to every peer.
    leader_bundle_first (the old order kept for comparison) is refused there, outside the node's async with replicated
    stages, and when not a bool."""
    for kw in ({"head_delegation": False, "tasks_per_delegate": None}, {"max_staleness": 0},
               {"finish_blocks": True}):
        cfg = _cfg(**kw)
        assert not cfg.leader_commits_early
        sim = PipelineSim(cfg)
        sim.run()
        for step in range(cfg.steps):
            lead, _ = _head_pushes(sim, step)
            assert [p.peers for p in lead] == ([BUNDLE_PEERS] if sim.nodes[0][0].owned[step] else [])
        with pytest.raises(ValueError, match="leader_bundle_first keeps the old order.*leave it False"):
            _cfg(leader_bundle_first=True, **kw).validate()
    with pytest.raises(ValueError, match="leader_bundle_first keeps the old order"):
        _cfg(leader_bundle_first=True, schedule="gpipe", max_staleness=None).validate()
    with pytest.raises(ValueError, match="leader_bundle_first=1: must be True or False"):
        _cfg(leader_bundle_first=1).validate()


def test_async_without_the_step_exchange_is_refused_or_labelled_naming_replica_exchange() -> None:
    """The node runs async with replicas only with runtime.replica_exchange = step: delegated head work under async
    without it is refused (the simulator has no such model), in the comparison and in WanConfig; the head leader's
    per-microbatch pushes under async stay the earlier model's what-if, labelled with the node's rule."""
    cal = load_calibration(DEFAULT_PATH)
    with pytest.raises(ValueError, match=r"schedule='async' needs contributions='step'.*replica_exchange = step"):
        run_vs_datacenter(cal, schedule="async", head="delegated", contributions="microbatch",
                          averaging="powersgd:12:int4", overlap_averaging=True, steps=2)
    with pytest.raises(ValueError, match=r"needs push_per_step.*replica_exchange = step"):
        _cfg(push_per_step=False).validate()
    with pytest.raises(ValueError, match=r"churn.*modelled without churn"):
        _cfg(churn=ChurnConfig(mean_uptime_s=100.0)).validate()
    what_if = run_vs_datacenter(cal, schedule="async", head="leader", contributions="microbatch",
                                averaging="powersgd:6:int4", overlap_averaging=True, steps=2)
    assert not what_if["node_as_built"]
    assert any("replica_exchange = step" in x for x in what_if["not_built"])
