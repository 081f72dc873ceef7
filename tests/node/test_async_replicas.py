"""The async schedule with replicated stages (`runtime.schedule = "async"`, `replica_exchange = "step"`), with real node
processes on 127.0.0.1.

Each replica works on the steps a .. a + S (a: its oldest unapplied step, S: `runtime.max_staleness`) on stashed
weights while step a's commit and bundles travel, and applies the updates in step order. Step k's forward and
backward use the weights after update k - S - 1 on every replica, so with dense averaging the run equals the
single-process delayed-gradient reference (`sharding.delayed.train_delayed`) whatever the timing, also across a
takeover of the head's step authority. A replica lost with its step's bundle still costs a rollback, after which
training goes on exactly once per generation.
"""

from __future__ import annotations

import math
import signal

import pytest
import torch

from node.config import NodeConfig
from node.errors import StateSyncError
from node.observability.status import node_status
from node.pipeline.asyncworker import AsyncStageWorker
from node.replicas.averaging import trainable
from node.replicas.heads import attempt_base
from node.replicas.statesync import pack_state, state_bound, unpack_state
from node.training.worker import StageWorker
from sharding import PRESETS, OptimConfig, load_corpus, partition
from sharding.delayed import train_delayed
from tests.node.replica_swarm import (
    STEP_ROLLBACK,
    B,
    M,
    check_exactly_once,
    check_identical_weights,
    check_one_takeover,
    check_rollback,
    records,
    run_to_end,
)

S = 2  # runtime.max_staleness of these runs
ASYNC = ["--replica-exchange", "step", "--schedule", "async", "--max-staleness", str(S)]


def _reference(steps: int) -> list[float]:
    torch.set_num_threads(1)
    return train_delayed(PRESETS["tiny"], OptimConfig(), steps, M, B, load_corpus("synthetic"), S)


def _worker(stage: int) -> AsyncStageWorker:
    cfg = PRESETS["tiny"]
    spec = partition(cfg, 3)[stage]
    corpus = load_corpus("synthetic") if spec.is_first else None
    base = StageWorker(cfg, spec, codec="dense", optim=OptimConfig(), num_microbatches=M, microbatch_size=B,
                       corpus=corpus)
    return AsyncStageWorker.wrap(base, S)


def test_async_with_replicas_needs_the_step_exchange() -> None:
    cfg = NodeConfig()
    cfg.runtime.schedule, cfg.runtime.max_staleness, cfg.replicas.enabled = "async", S, True
    cfg.runtime.replica_exchange = "microbatch"
    with pytest.raises(ValueError, match="replica_exchange = step"):
        cfg.validate()
    cfg.runtime.replica_exchange = "step"
    cfg.validate()


def test_a_state_sync_carries_the_stashed_copies_and_refuses_ones_that_do_not_fit() -> None:
    """A joining replica gets the copies its peers compute the steps in flight with (not the live weights), so it
    computes the same gradients they would; copies of other steps or another staleness are refused, the joiner's
    state untouched."""
    torch.manual_seed(0)
    src, dst = _worker(1), _worker(1)
    for _ in range(S + 2):  # updates that make the copies differ from each other and from the live weights
        k = src.next_step
        for p in src.weights_for(k).parameters():
            p.grad = torch.randn_like(p)
        src.step(k)
    header, blob = pack_state(src)
    assert len(blob) <= state_bound(dst)
    assert unpack_state(dst, header, blob) == src.next_step
    for k in range(src.next_step, src.next_step + S + 1):
        a, b = src.weights_for(k).state_dict(), dst.weights_for(k).state_dict()
        assert all(torch.equal(a[n], b[n]) for n in a)
    live = {n: t.clone() for n, t in dst.module.state_dict().items()}
    assert not all(torch.equal(live[n], dst.weights_for(dst.next_step).state_dict()[n]) for n in live)
    other = AsyncStageWorker.wrap(_worker(1), S + 1)  # stashes one step more: the copies sent do not fit
    before = {n: t.clone() for n, t in other.module.state_dict().items()}
    with pytest.raises(StateSyncError, match="stashed copies of steps"):
        unpack_state(other, *pack_state(dst))
    assert other.next_step == 0 and all(torch.equal(before[n], t) for n, t in other.module.state_dict().items())


@pytest.mark.network
@pytest.mark.timeout(600)
def test_an_async_swarm_overlaps_steps_and_equals_the_delayed_reference(tmp_path) -> None:
    """A leading and a delegate head, two middle replicas and a tail, S = 2: every replica ran forwards of later
    steps while a step was unapplied, every step applies each microbatch exactly once per stage, the replicas of
    each stage end bit-identical, and the tail's losses are the delayed-gradient reference's."""
    steps = 8
    nodes, codes = run_to_end(tmp_path, [0, 0, 1, 1, 2], steps, common=[*ASYNC, "--no-replica-timeout", "120",
                              "--debug-delay-s", "0.02", "--replicas-debug-push-delay-s", "0.5"], timeout_s=420)
    assert codes == [0] * 5
    head_a, head_b, mid_a, mid_b, tail = nodes
    for stage_nodes in ([head_a, head_b], [mid_a, mid_b], [tail]):
        check_exactly_once(stage_nodes, range(steps))
    dense_bytes = {s: 4 * sum(p.numel() for p in trainable(_worker(s).module)) for s in range(3)}  # fp32 contributions
    for n in nodes:
        recs = records(n).values()
        assert sum(r["ahead"] for r in recs) > 0, n.stage  # the window overlapped steps
        assert all(r["update_s"] > 0 for r in recs), n.stage  # every step's update was timed
        assert all(0 < r["update_cpu_s"] <= r["update_s"] + 1e-3 for r in recs), n.stage  # and its CPU time
        # its compute thread's CPU time: less than the compute's wall time, which holds the debug delay's sleep too
        timed = [r for r in recs if r["compute_s"] > 0]
        assert timed and all(0 < r["compute_cpu_s"] < r["compute_s"] for r in timed), n.stage
        assert all(r["compute_cpu_s"] == 0 for r in recs if r["compute_s"] == 0), n.stage
        assert all(r["phases"]["contributions_s"] >= 0 and r["phases"]["bundle_s"] >= 0 for r in recs), n.stage
        assert {r["contribution_bytes"] for r in recs} == {dense_bytes[n.stage]}, n.stage
        assert sum(r["bytes_out"] for r in recs) > 0 and sum(r["bytes_in"] for r in recs) > 0, n.stage  # its frames
    assert sum(r["delegated"] for r in records(head_a).values()) > 0  # the delegate head worked too
    # pipelined finishes: on every replica some step's finish started while an earlier step still finished
    # pipelined finishes: a slow link between replicas (each bundle push 0.5 s late) holds each step's finish long
    # enough for later steps' commits to be known; the leader and the middle replicas then started some step's finish
    # while an earlier step still finished, the delegate head never (a standby: it may take over)
    early = [sorted(s for s, r in records(n).items() if r["finished_early"]) for n in nodes]
    assert early[0] and early[2] and early[3] and not early[1], early
    check_identical_weights([[head_a, head_b], [mid_a, mid_b]])
    losses = [records(tail)[s]["loss"] for s in range(steps)]
    assert losses == pytest.approx(_reference(steps), rel=1e-4)


@pytest.mark.network
@pytest.mark.timeout(600)
def test_an_async_leader_killed_mid_window_is_taken_over_and_the_run_stays_the_reference(tmp_path) -> None:
    """The leader is SIGKILLed right after its 6th commit, with later steps of the window in flight. The delegate
    takes over in term 1, generates the uncommitted microbatches of every open step again in its own attempts,
    and the run goes on exactly once per stage with the same losses as the delayed-gradient reference (its
    stashed copies are the dead leader's)."""
    steps = 8
    nodes, codes = run_to_end(tmp_path, [0, 0, 1, 2], steps, common=[*ASYNC, "--no-replica-timeout", "120"],
                              extra={0: ["--replicas-debug-exit-after-forwards", "6"]}, timeout_s=420)
    lead, standby, mid, tail = nodes
    assert codes == [-signal.SIGKILL, 0, 0, 0], codes
    sr = records(standby)
    s = check_one_takeover(lead, standby, window=S)
    for t in range(s, steps):
        assert sr[t]["head_term"] == 1 and all(a >= attempt_base(1) for _, a in sr[t]["applied"])
    for stage_nodes in ([lead, standby], [mid], [tail]):
        check_exactly_once(stage_nodes, range(steps))
    losses = [records(tail)[t]["loss"] for t in range(steps)]
    assert losses == pytest.approx(_reference(steps), rel=1e-4)


@pytest.mark.network
@pytest.mark.timeout(900)
def test_an_async_replica_lost_before_its_bundle_costs_a_rollback_then_training_goes_on(tmp_path) -> None:
    """A middle replica dies after its 7th gradient upstream, with its bundle of an open step never sent: its stage
    peer never applies that step without it, the swarm rolls back to a step every stage holds (fresh stashes from
    the checkpoint) and trains to the end with the survivors, every microbatch applied once per stage in each
    generation."""
    steps = 8
    nodes, codes = run_to_end(tmp_path, [0, 1, 1, 2], steps, common=[*STEP_ROLLBACK, *ASYNC],
                              extra={1: ["--replicas-debug-exit-after-forwards", "7"], 2: ["--no-replica-timeout", "8"]},
                              timeout_s=600)
    head, mid_a, mid_b, tail = nodes
    assert codes[0] == 0 and codes[2:] == [0, 0] and codes[1] != 0  # mid_a was killed by its test hook
    lost_step = max(records(mid_a)) + 1 if records(mid_a) else 0  # the oldest step mid_a had not applied
    gen1, rolled_to = check_rollback([head, mid_b, tail], lost_step, steps)
    check_exactly_once([mid_a, mid_b], list(range(rolled_to)), gen=0)
    assert lost_step not in records(mid_b, gen=0)
    losses = [gen1[2][t]["loss"] for t in range(rolled_to, steps)]
    assert all(math.isfinite(x) for x in losses)


@pytest.mark.network
@pytest.mark.timeout(600)
def test_an_async_leader_lost_right_after_its_early_commit_costs_no_rollback(tmp_path) -> None:
    """The leader sends a step's COMMIT once one head replica holds its bundle, then pushes it to the others; here
    it is SIGKILLed right after its 3rd COMMIT, before those pushes. The head replica that lacks its bundle pulls it
    from the one that holds it, every stage applies the step, a delegate takes over in term 1 for the steps after,
    no rollback happens, and the losses stay the delayed-gradient reference's."""
    steps = 8
    nodes, codes = run_to_end(tmp_path, [0, 0, 0, 1, 2], steps, common=[*ASYNC, "--no-replica-timeout", "120"],
                              extra={0: ["--replicas-debug-exit-after-commits", "3"]}, timeout_s=420)
    lead, head_b, head_c, mid, tail = nodes
    assert codes == [-signal.SIGKILL, 0, 0, 0, 0], codes
    assert all(r["rollback_gen"] == 0 for n in nodes[1:] for r in records(n).values())  # no rollback
    for stage_nodes in ([lead, head_b, head_c], [mid], [tail]):
        check_exactly_once(stage_nodes, range(steps))
    committed = 2  # the 3rd COMMIT was step 2's: every survivor applied it with the dead leader's attempts
    for n in (head_b, head_c, mid, tail):
        assert all(a < attempt_base(1) for _, a in records(n)[committed]["applied"])
    takeovers = [e for n in (head_b, head_c) for e in node_status(n.data_dir)["bans"] if e["event"] == "takeover"]
    assert len(takeovers) == 1 and takeovers[0]["term"] == 1 and takeovers[0]["step"] > committed
    losses = [records(tail)[t]["loss"] for t in range(steps)]
    assert losses == pytest.approx(_reference(steps), rel=1e-4)
