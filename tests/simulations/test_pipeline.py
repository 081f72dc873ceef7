"""Invariants of the SimPy WAN pipeline model."""

from __future__ import annotations

import pytest

from simulations.errors import DeadlockError
from simulations.params import ChurnConfig, LinkConfig, WanConfig
from simulations.pipeline import simulate

NO_NET = LinkConfig(latency_ms=0.0)


def _cfg(**kw: object) -> WanConfig:
    base: dict[str, object] = dict(
        num_stages=4, fwd_s=(1.0,) * 4, bwd_s=(2.0,) * 4, microbatches=8, steps=3,
        fwd_bytes_per_token=0.0, bwd_bytes_per_token=0.0, link=NO_NET,
    )
    base.update(kw)
    return WanConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_flushed_schedules_match_the_analytic_bubble(schedule: str) -> None:
    s, m = 4, 8
    res = simulate(_cfg(schedule=schedule))
    assert res.mean_step_s == pytest.approx((m + s - 1) * 3.0)
    assert res.bubble_fraction == pytest.approx((s - 1) / (m + s - 1))
    assert res.tokens_per_s == pytest.approx(m * 1024 / ((m + s - 1) * 3.0))


def test_async_has_no_flush_bubble_in_steady_state() -> None:
    sync = simulate(_cfg(schedule="1f1b", steps=6))
    asyn = simulate(_cfg(schedule="async", steps=6))
    # async: one fill of (S-1)(f+b) for the whole run instead of one per step
    assert asyn.sim_time_s == pytest.approx(6 * 8 * 3.0 + 3 * 3.0)
    assert asyn.tokens_per_s > sync.tokens_per_s
    assert asyn.bubble_fraction < sync.bubble_fraction


def test_shared_cpu_serialises_all_stages() -> None:
    res = simulate(_cfg(shared_cpus=1, steps=2))
    assert res.mean_step_s == pytest.approx(8 * 4 * 3.0)


def test_bandwidth_bound_pipeline_runs_at_link_speed() -> None:
    # 1 MB per microbatch at 8 Mb/s = 1 s per hop; compute negligible; the uplink is the bottleneck
    cfg = _cfg(
        num_stages=2, fwd_s=(1e-6,) * 2, bwd_s=(1e-6,) * 2, microbatches=50, steps=1, schedule="async",
        microbatch_tokens=1000, fwd_bytes_per_token=1000.0, bwd_bytes_per_token=0.0,
        link=LinkConfig(bandwidth_mbps=8.0, latency_ms=0.0),
    )
    res = simulate(cfg)
    assert res.sim_time_s == pytest.approx(50.0, rel=1e-3)
    assert res.bytes_sent == pytest.approx(50 * 1e6)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "async"])
def test_microbatches_conserved_and_times_causal_under_churn(schedule: str) -> None:
    cfg = _cfg(
        num_stages=3, fwd_s=(0.2,) * 3, bwd_s=(0.4,) * 3, opt_s=(0.1,) * 3, replicas=3, microbatches=12,
        steps=4, schedule=schedule, fwd_bytes_per_token=100.0, bwd_bytes_per_token=100.0, speed_sigma=0.3,
        link=LinkConfig(bandwidth_mbps=50.0, bandwidth_sigma=0.5, latency_ms=20.0, latency_sigma=0.5),
        churn=ChurnConfig(mean_uptime_s=20.0, mean_downtime_s=2.0), seed=3,
    )
    res = simulate(cfg, trace=True)
    assert res.departures > 0 and res.failed_attempts > 0  # churn really happened
    assert res.microbatches_completed == res.microbatches_expected == 48
    assert all(p >= res.microbatches_completed for p in res.forward_passes)
    assert all(p >= res.microbatches_completed for p in res.backward_passes)
    assert len(res.step_times_s) == 4 and all(t > 0 for t in res.step_times_s)
    assert sum(res.step_times_s) == pytest.approx(res.sim_time_s)
    assert 0.0 <= res.utilisation <= 1.0 and 0.0 <= res.bubble_fraction <= 1.0
    by_attempt: dict[tuple[int, int], list] = {}
    for ev in res.trace:
        assert 0.0 <= ev.start <= ev.end <= res.sim_time_s
        if ev.kind != "opt":
            by_attempt.setdefault((ev.mb, ev.attempt), []).append(ev)
    completed = 0
    for events in by_attempt.values():
        fwd = {e.stage: e for e in events if e.kind == "fwd"}
        bwd = {e.stage: e for e in events if e.kind == "bwd"}
        for s in range(1, 3):
            if s in fwd:
                assert fwd[s].start >= fwd[s - 1].end  # forward flows downstream in order
        for s in bwd:
            assert bwd[s].start >= fwd[2].end  # backward only after the tail's forward
            if s < 2:
                assert bwd[s].start >= bwd[s + 1].end
        completed += 0 in bwd and not bwd[0].lost
    assert completed == 48  # exactly one successful backward at stage 0 per microbatch


def test_deterministic_for_a_seed_and_seed_sensitive() -> None:
    cfg = _cfg(
        replicas=2, speed_sigma=0.5, fwd_bytes_per_token=10.0, bwd_bytes_per_token=10.0,
        link=LinkConfig(bandwidth_mbps=10.0, bandwidth_sigma=0.5, latency_ms=30.0, latency_sigma=0.5),
        churn=ChurnConfig(mean_uptime_s=50.0, mean_downtime_s=5.0), seed=7,
    )
    a, b = simulate(cfg).to_dict(), simulate(cfg).to_dict()
    assert a == b
    from dataclasses import replace

    assert simulate(replace(cfg, seed=8)).to_dict() != a


def test_stage_with_no_live_replica_waits_for_a_joiner() -> None:
    cfg = _cfg(num_stages=2, fwd_s=(1.0,) * 2, bwd_s=(1.0,) * 2, microbatches=4, steps=2,
               churn=ChurnConfig(mean_uptime_s=3.0, mean_downtime_s=5.0, join_sync_bytes=10**6), seed=1)
    res = simulate(cfg)
    assert res.microbatches_completed == 8
    assert res.departures > 0


def test_run_bound_raises_deadlock_error() -> None:
    with pytest.raises(DeadlockError, match="max_sim_s"):
        simulate(_cfg(max_sim_s=5.0))


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"num_stages": 0}, "num_stages"),
        ({"fwd_s": (1.0,) * 3}, "fwd_s"),
        ({"bwd_s": (1.0, 1.0, -1.0, 1.0)}, "bwd_s"),
        ({"schedule": "zigzag"}, "schedule"),
        ({"link": LinkConfig(bandwidth_mbps=0.0)}, "bandwidth_mbps"),
        ({"churn": ChurnConfig(mean_uptime_s=-1.0)}, "mean_uptime_s"),
        ({"seed": -1}, "seed"),
        ({"sync_collective": "tree"}, "sync_collective"),
    ],
)
def test_bad_config_names_the_field(kw: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        simulate(_cfg(**kw))


def _replicated(**kw: object) -> WanConfig:
    """2 stages x 2 replicas, async (unless kw says otherwise), 1 MB/s uplinks, no latency: 4 microbatches of
    3 s per node and step."""
    base: dict[str, object] = {"schedule": "async", "max_staleness": 1}
    return _cfg(num_stages=2, fwd_s=(1.0,) * 2, bwd_s=(2.0,) * 2, replicas=2, microbatches=8, steps=6,
                link=LinkConfig(bandwidth_mbps=8.0, latency_ms=0.0), **{**base, **kw})


def test_overlapped_averaging_leaves_compute_alone_while_the_uplink_keeps_up() -> None:
    """1 MB per stage and step: held on the compute slot it costs 1 s a step (2 (r-1)/r x 1 MB at 1 MB/s);
    sent on the uplinks in the background it costs nothing while it fits in the step's 12 s, and its bytes
    are on the wire either way."""
    none = simulate(_replicated())
    held = simulate(_replicated(grad_sync_bytes=(1_000_000,) * 2))
    overlapped = simulate(_replicated(grad_sync_bytes=(1_000_000,) * 2, overlap_sync=True))
    assert held.sim_time_s > none.sim_time_s + 4.0  # about 1 s a step
    assert overlapped.sim_time_s == pytest.approx(none.sim_time_s)
    # 4 nodes x 1 MB a step on the wire (the last step's sends are cut when the run ends)
    assert 4 * 5 * 1_000_000 <= overlapped.bytes_sent - none.bytes_sent <= 4 * 6 * 1_000_000


def test_overlapped_averaging_waits_when_a_round_would_arrive_two_late() -> None:
    """30 MB per step (30 s of uplink against 12 s of compute) cannot go out in the background: a node waits
    once its sends fall a round behind, so the run is bounded by the uplink, not by compute."""
    none = simulate(_replicated())
    overlapped = simulate(_replicated(grad_sync_bytes=(30_000_000,) * 2, overlap_sync=True))
    assert overlapped.sim_time_s > none.sim_time_s + 4 * 15.0


def test_sync_chunk_bytes_is_validated() -> None:
    with pytest.raises(ValueError, match="sync_chunk_bytes"):
        _replicated(sync_chunk_bytes=0).validate()


def _fanned(collective: str, sync_bytes: int) -> WanConfig:
    """1 stage x 8 replicas, 1F1B, 1 MB/s uplinks, 100 ms one-way: only the averaging differs between runs."""
    return _cfg(num_stages=1, fwd_s=(1.0,), bwd_s=(2.0,), replicas=8, microbatches=8, steps=4,
                link=LinkConfig(bandwidth_mbps=8.0, latency_ms=100.0), grad_sync_bytes=(sync_bytes,),
                sync_collective=collective)


def test_direct_pushes_trade_bytes_for_latency_and_fastest_takes_the_better() -> None:
    """8 replicas: a ring sends 2 x 7/8 of the bytes over 14 latencies, direct pushes send 7 x the bytes over
    one. 10 kB (compressed factors): direct wins by the latencies; 10 MB (dense): the ring wins by the bytes."""
    for sync_bytes, winner in ((10_000, "direct"), (10_000_000, "ring")):
        t = {c: simulate(_fanned(c, sync_bytes)).sim_time_s for c in ("ring", "direct", "fastest")}
        loser = "ring" if winner == "direct" else "direct"
        assert t[winner] < t[loser]
        assert t["fastest"] == pytest.approx(t[winner])
    # 4 steps of 10 kB direct: 7 x 10 kB at 1 MB/s (0.07 s) plus 0.1 s a step; the ring: 0.0175 s plus 1.4 s
    none = simulate(_fanned("ring", 0)).sim_time_s
    assert simulate(_fanned("direct", 10_000)).sim_time_s - none == pytest.approx(4 * 0.17, rel=0.05)
    assert simulate(_fanned("ring", 10_000)).sim_time_s - none == pytest.approx(4 * 1.4175, rel=0.05)


def test_pushed_contributions_hide_behind_compute_and_the_update_waits_for_them() -> None:
    """sync_push, 2 replicas, 1 MB per step: each of a node's 4 backwards pushes 250 kB to the other replica
    behind its frames, so while the uplink keeps up the step costs what it costs without averaging; 30 MB a
    step (30 s of uplink against 12 s of compute) cannot hide, and the updates wait for the pushes."""
    none = simulate(_replicated())
    held = simulate(_replicated(grad_sync_bytes=(1_000_000,) * 2, sync_collective="direct"))
    pushed = simulate(_replicated(grad_sync_bytes=(1_000_000,) * 2, sync_collective="direct", sync_push=True))
    assert held.sim_time_s > none.sim_time_s + 4.0
    assert pushed.sim_time_s == pytest.approx(none.sim_time_s, rel=0.02)
    assert 4 * 5 * 1_000_000 <= pushed.bytes_sent - none.bytes_sent <= 4 * 6 * 1_000_000
    slow = simulate(_replicated(grad_sync_bytes=(30_000_000,) * 2, sync_collective="direct", sync_push=True))
    assert slow.sim_time_s > none.sim_time_s + 4 * 15.0
    for sync in ("gpipe", "1f1b"):  # the flushed schedules: the stage's update after every replica's pushes
        cfg = {"schedule": sync, "max_staleness": None, "sync_collective": "direct"}
        base = simulate(_replicated(**cfg))
        pushed_sync = simulate(_replicated(grad_sync_bytes=(30_000_000,) * 2, sync_push=True, **cfg))
        assert pushed_sync.sim_time_s > base.sim_time_s + 5 * 20.0  # 30 s of uplink a step against 12 s of compute
    for bad in ({"sync_collective": "ring"}, {"overlap_sync": True, "sync_collective": "direct"},
                {"sync_every": 2, "sync_collective": "direct"}):
        with pytest.raises(ValueError, match="sync_push"):
            _replicated(sync_push=True, **bad).validate()


def test_a_step_pushed_at_once_goes_out_after_the_last_backward() -> None:
    """1F1B, 2 replicas, 4 MB a step on 1 MB/s uplinks: pushed a share after each of a node's 4 backwards, all but
    the last share hide behind compute; pushed at once after the step (push_per_step), all 4 s wait in
    every step. The same bytes leave either way; push_per_step without sync_push is refused."""
    cfg = {"schedule": "1f1b", "max_staleness": None, "sync_collective": "direct", "sync_push": True,
           "grad_sync_bytes": (4_000_000,) * 2}
    spread = simulate(_replicated(**cfg))
    once = simulate(_replicated(push_per_step=True, **cfg))
    assert once.sim_time_s > spread.sim_time_s + 6 * 2.0
    assert once.bytes_sent == pytest.approx(spread.bytes_sent, rel=0.01)
    # a flushed schedule sends the bundle once the step's commit is known (every microbatch done, as the node's
    # replica_exchange = step): each step is the step without averaging plus the whole 4 s on the uplink
    bare = simulate(_replicated(schedule="1f1b", max_staleness=None))
    assert once.step_times_s == pytest.approx([t + 4.0 for t in bare.step_times_s], rel=1e-6)
    with pytest.raises(ValueError, match="push_per_step needs sync_push"):
        _replicated(push_per_step=True).validate()


def test_a_head_leader_computes_every_stage_0_microbatch_and_its_standbys_none() -> None:
    """head_leader (the node's replicated head stage): stage 0's forwards and backwards all run on replica 0 while
    replica 1 stands by, so stage 0 does twice the compute of a data-parallel stage 0 per node and the run is
    slower; the other stage keeps both replicas busy. With per-microbatch pushes the leader sends every
    microbatch's share (8 of them a step), where each data-parallel replica sends its 4."""
    shared = simulate(_replicated(), trace=True)
    led = simulate(_replicated(head_leader=True), trace=True)
    assert {e.replica for e in shared.trace if e.stage == 0 and e.kind in ("fwd", "bwd")} == {0, 1}
    assert {e.replica for e in led.trace if e.stage == 0 and e.kind in ("fwd", "bwd")} == {0}
    assert {e.replica for e in led.trace if e.stage == 1 and e.kind == "bwd"} == {0, 1}
    assert led.sim_time_s > shared.sim_time_s * 1.5
    assert led.forward_passes == shared.forward_passes  # every microbatch still passes stage 0 once
    pushed = {flag: simulate(_replicated(grad_sync_bytes=(800_000, 0), sync_collective="direct", sync_push=True,
                                         head_leader=flag)) for flag in (False, True)}
    # a step: data parallel, each replica sends 800 kB to the other; led, the leader 8 pushes of 100 kB to its one
    # standby, which sends nothing
    extra = {flag: pushed[flag].bytes_sent - simulate(_replicated(head_leader=flag)).bytes_sent for flag in pushed}
    assert extra[True] == pytest.approx(extra[False] / 2, rel=0.2)
