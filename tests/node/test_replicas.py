"""Replicated stages with real node processes on 127.0.0.1: failover, stragglers, joining, rebalancing."""

from __future__ import annotations

import json
import random
import signal
import time

import pytest
import torch

from node.observability.status import node_status
from node.testing.swarm import stop_nodes, wait_nodes
from sharding import PRESETS, OptimConfig, load_corpus, train_reference
from tests.node.replica_swarm import B, M, check_exactly_once, join, launch, records
from tests.waiting import wait_until

pytestmark = [pytest.mark.network]

KILL_SEED = 7  # seeds the choice of the step at which a middle replica is killed
WAIT_S = 300  # bound on each awaited condition: steps take seconds, and node starts minutes, on a loaded machine


def _reference(steps: int) -> list[float]:
    torch.set_num_threads(1)  # several node processes share the cores; more threads only contend
    return train_reference(PRESETS["tiny"], OptimConfig(), steps, M, B, load_corpus("synthetic"))


def _stop(nodes: list) -> list[int]:
    for n in nodes:
        if n.proc.poll() is None:
            n.proc.send_signal(signal.SIGTERM)
    return wait_nodes(nodes, WAIT_S)


@pytest.mark.timeout(900)
def test_killed_middle_replica_fails_over_exactly_once(tmp_path) -> None:
    nodes = launch(tmp_path, [0, 1, 1, 2], 1000)
    head, mid_a, mid_b, tail = nodes
    try:
        # both replicas serve (a replica killed before its peer ever caught up takes the stage's state along)
        wait_until(lambda: all(any(r["mine"] for r in records(m).values()) for m in (mid_a, mid_b)), WAIT_S,
                 "work on both middle replicas")
        kill_after = len(records(tail)) + random.Random(KILL_SEED).randint(0, 5)  # a (seeded) random step of the run
        wait_until(lambda: len(records(tail)) >= kill_after, WAIT_S, f"{kill_after} completed steps")
        mid_a.proc.kill()  # SIGKILL: no goodbye, no checkpoint
        mid_a.proc.wait()
        killed_at = time.time()
        wait_until(lambda: len(records(tail)) >= kill_after + 10, WAIT_S, "ten steps after the kill")
        codes = _stop([head, mid_b, tail])
    finally:
        stop_nodes(nodes)
    assert codes == [128 + signal.SIGTERM] * 3
    tail_recs = records(tail)
    steps = min(max(records(n)) for n in (head, mid_b, tail)) + 1  # steps every live node recorded
    assert sorted(tail_recs)[:steps] == list(range(steps)) and steps >= kill_after + 9
    # training went on within (replica timeout + longest ban) of the kill
    after = sorted(r["end_time"] for r in tail_recs.values() if r["end_time"] > killed_at)
    assert after and after[0] - killed_at <= 3 + 4, f"first step after the kill ended {after[0] - killed_at:.1f} s later"
    for stage_nodes in ([head], [mid_a, mid_b], [tail]):
        check_exactly_once(stage_nodes, range(steps))
    ref = _reference(steps)
    losses = [tail_recs[s]["loss"] for s in range(steps)]
    assert losses[-1] == pytest.approx(ref[-1], rel=0.02)
    assert losses == pytest.approx(ref, rel=1e-3)  # exactly-once application keeps every step on the reference


@pytest.mark.timeout(900)
def test_straggler_is_routed_around_and_banned(tmp_path) -> None:
    steps = 12
    timeout = ["--replica-timeout", "2"]  # the straggler needs 2 x 1.5 s per microbatch, the others ~0.05 s
    nodes = launch(tmp_path, [0, 1, 1, 2], steps, common=timeout, extra={2: ["--debug-delay-s", "1.5"]})
    head, fast, slow, tail = nodes
    try:
        codes = wait_nodes(nodes, 2 * WAIT_S)
    finally:
        stop_nodes(nodes)
    assert codes == [0, 0, 0, 0]
    bans = node_status(head.data_dir)["bans"]
    slow_id = slow.ready["peer_id"]
    timeouts = [b for b in bans if b["peer"] == slow_id and b["reason"] == "timeout"]
    assert timeouts, f"the straggler was never banned: {bans}"
    assert all(b["peer"] == slow_id for b in bans), bans  # the healthy replica never was
    durations = [b["duration_s"] for b in timeouts]
    assert durations == sorted(durations) and durations[0] == 1.0  # exponential: 1, 2, 4 (capped)
    if len(durations) > 1:
        assert durations[1] == 2.0
    # the fast replica did most of the committed work and every microbatch was applied exactly once
    fast_work = sum(len(r["mine"]) for r in records(fast).values())
    slow_work = sum(len(r["mine"]) for r in records(slow).values())
    assert fast_work > slow_work and fast_work + slow_work == steps * M
    assert sum(r["rerouted"] for r in records(head).values()) >= len(timeouts)
    check_exactly_once([fast, slow], range(steps))
    assert [records(tail)[s]["loss"] for s in range(steps)] == pytest.approx(_reference(steps), rel=1e-3)


@pytest.mark.timeout(900)
def test_new_replica_joins_fetches_state_and_receives_work(tmp_path) -> None:
    steps = 400
    nodes = launch(tmp_path, [0, 1, 2], steps, common=["--debug-delay-s", "0.01"])
    head, mid, tail = nodes
    try:
        wait_until(lambda: len(records(tail)) >= 3, WAIT_S, "three completed steps")
        joiner = join(tmp_path, "joiner", 1, steps, head, 3)
        nodes.append(joiner)
        wait_until(lambda: any(r["mine"] for r in records(joiner).values()), WAIT_S, "work on the new replica")
        wait_until(lambda: len(records(joiner)) >= 3, WAIT_S, "three steps on the new replica")
        codes = _stop(nodes)
    finally:
        stop_nodes(nodes)
    assert codes == [128 + signal.SIGTERM] * 4
    st = node_status(joiner.data_dir)
    assert st["synced_from"] == mid.ready["peer_id"] and st["synced_step"] >= 3
    jr = records(joiner)
    assert min(jr) == st["synced_step"]  # it served from the fetched step on
    done = sorted(set(jr) & set(records(mid)) & set(records(tail)))
    check_exactly_once([mid, joiner], done)
    ref = _reference(max(done) + 1)
    assert [records(tail)[s]["loss"] for s in done] == pytest.approx([ref[s] for s in done], rel=1e-3)


@pytest.mark.timeout(900)
def test_rebalancing_moves_a_tail_replica_to_the_starved_stage(tmp_path) -> None:
    steps = 400
    common = ["--rebalance-period", "1", "--rebalance-threshold", "1.5"]
    nodes = launch(tmp_path, [0, 1, 2, 2], steps, common=common, extra={1: ["--debug-delay-s", "0.05"]})
    head, slow_mid, tail_a, tail_b = nodes
    mover = min((tail_a, tail_b), key=lambda n: n.ready["peer_id"])
    try:
        wait_until(lambda: node_status(mover.data_dir).get("moved_to") == 1, WAIT_S, "a move to stage 1")
        wait_until(lambda: any(r["stage"] == 1 and r["mine"] for r in records(mover).values()), WAIT_S,
                 "stage-1 work on the moved node")
        codes = _stop(nodes)
    finally:
        stop_nodes(nodes)
    assert codes == [128 + signal.SIGTERM] * 4
    st = node_status(mover.data_dir)
    assert st["moved_from"] == 2 and json.loads(st["move"])["peer_id"] == mover.ready["peer_id"]
    other = tail_b if mover is tail_a else tail_a
    assert "moved_to" not in node_status(other.data_dir)  # one move: the lowest peer id of the donor stage
    # the stage-1 steps both replicas recorded (the slow one may later move on by the same rule)
    both = sorted(set(records(mover, 1)) & set(records(slow_mid, 1)))
    check_exactly_once([slow_mid, mover], both, stage=1)
