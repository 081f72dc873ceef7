"""Replicas of the head stage with real node processes on 127.0.0.1: a standby head applies every step, generates
nothing, ends with the leader's weights, and takes over the step authority when the leader is killed."""

from __future__ import annotations

import random
import signal

import pytest
import torch
from safetensors.torch import load_file

from node.observability.status import node_status
from node.replicas.heads import attempt_base
from node.testing.swarm import stop_nodes, wait_nodes
from node.training.checkpoint import latest_checkpoint
from sharding import PRESETS, OptimConfig, load_corpus, train_reference
from tests.node.replica_swarm import B, M, check_exactly_once, launch, records
from tests.waiting import wait_until

pytestmark = [pytest.mark.network]

KILL_SEED = 11  # seeds the step at which the leading head is killed
WAIT_S = 300  # bound on each awaited condition: node starts take minutes on a loaded machine


def _reference(steps: int) -> list[float]:
    torch.set_num_threads(1)
    return train_reference(PRESETS["tiny"], OptimConfig(), steps, M, B, load_corpus("synthetic"))


def _stop(nodes: list) -> list[int]:
    for n in nodes:
        if n.proc.poll() is None:
            n.proc.send_signal(signal.SIGTERM)
    return wait_nodes(nodes, WAIT_S)


@pytest.mark.timeout(900)
def test_a_standby_head_replica_generates_nothing_and_ends_with_the_leaders_weights(tmp_path) -> None:
    steps = 8
    nodes = launch(tmp_path, [0, 0, 1, 2], steps)
    lead, standby, mid, tail = nodes
    try:
        codes = wait_nodes(nodes, 2 * WAIT_S)
    finally:
        stop_nodes(nodes)
    assert codes == [0, 0, 0, 0]
    lr, sr = records(lead), records(standby)
    first = min(sr)  # on a loaded machine the standby may start late and fetch the head's state first
    assert sorted(lr) == list(range(steps)) and sorted(sr) == list(range(first, steps))
    if first:
        assert node_status(standby.data_dir)["synced_from"] == lead.ready["peer_id"]
    for s in range(steps):
        assert lr[s]["head_term"] == 0
        assert sorted(mb for mb, _ in lr[s]["mine"]) == list(range(M))  # the leader generated every microbatch
    for s in sr:
        assert sr[s]["head_term"] == -1 and sr[s]["computed"] == []  # the standby generated none
    check_exactly_once([lead, standby], range(steps))
    check_exactly_once([mid], range(steps))
    check_exactly_once([tail], range(steps))
    ckpts = [latest_checkpoint(n.data_dir, 0) for n in (lead, standby)]
    assert all(c is not None for c in ckpts)
    a, b = (load_file(str(c / "model.safetensors")) for c in ckpts if c is not None)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # identical head weights
    assert [records(tail)[s]["loss"] for s in range(steps)] == pytest.approx(_reference(steps), rel=1e-3)


@pytest.mark.timeout(900)
def test_head_kill_the_standby_takes_over_and_training_goes_on_exactly_once(tmp_path) -> None:
    nodes = launch(tmp_path, [0, 0, 1, 2], 1000)
    lead, standby, mid, tail = nodes
    try:
        wait_until(lambda: len(records(standby)) >= 3, WAIT_S, "three steps applied by the standby head")
        kill_after = len(records(tail)) + random.Random(KILL_SEED).randint(0, 5)
        wait_until(lambda: len(records(tail)) >= kill_after, WAIT_S, f"{kill_after} completed steps")
        lead.proc.kill()  # SIGKILL: no goodbye, no checkpoint
        lead.proc.wait()
        killed_step = max(records(lead)) + 1 if records(lead) else 0  # the step it was leading when it died
        wait_until(lambda: len(records(tail)) >= kill_after + 10, WAIT_S, "ten steps after the kill")
        codes = _stop([standby, mid, tail])
    finally:
        stop_nodes(nodes)
    assert codes == [128 + signal.SIGTERM] * 3
    steps = min(max(records(n)) for n in (standby, mid, tail)) + 1  # steps every live node recorded
    assert steps >= kill_after + 9
    for stage_nodes in ([lead, standby], [mid], [tail]):
        check_exactly_once(stage_nodes, range(steps))
    sr = records(standby)
    assert [s for s in sorted(sr) if s < steps] == list(range(min(sr), steps))  # from its first (maybe synced) step
    took = [s for s in sr if sr[s]["head_term"] == 1]
    assert took and min(took) in (killed_step, killed_step + 1)  # it led from the step the leader died in
    for s in range(min(sr), min(took)):
        assert sr[s]["head_term"] == -1 and sr[s]["computed"] == []  # a standby generates nothing
    for s in took:
        assert all(a >= attempt_base(1) for _, a in sr[s]["mine"])  # its attempts: its own term's ids
        if s > min(took):
            assert sorted(mb for mb, _ in sr[s]["mine"]) == list(range(M))
    events = node_status(standby.data_dir)["bans"]
    assert any(e["event"] == "takeover" and e["peer"] == lead.ready["peer_id"] and e["term"] == 1 for e in events)
    ref = _reference(steps)  # the new leader's weights carry on the same curve
    assert [records(tail)[s]["loss"] for s in range(steps)] == pytest.approx(ref, rel=1e-3)


@pytest.mark.timeout(900)
def test_head_kill_right_after_a_held_commit_the_standby_adopts_it_and_generates_only_the_rest(tmp_path) -> None:
    steps = 10
    # the leader is SIGKILLed right after its second commit made while the standby is announced: mid-step, with
    # committed microbatches whose COMMIT never went downstream
    racer = ["--replicas-debug-exit-after-forwards", "2"]
    nodes = launch(tmp_path, [0, 0, 1, 2], steps, extra={0: racer})
    lead, standby, mid, tail = nodes
    try:
        codes = wait_nodes(nodes, 2 * WAIT_S)
    finally:
        stop_nodes(nodes)
    assert codes == [-signal.SIGKILL, 0, 0, 0], codes
    sr = records(standby)
    assert sorted(sr) == list(range(min(sr), steps))
    takeover = [e for e in node_status(standby.data_dir)["bans"] if e["event"] == "takeover"]
    assert len(takeover) == 1 and takeover[0]["peer"] == lead.ready["peer_id"] and takeover[0]["term"] == 1
    s, adopted = takeover[0]["step"], takeover[0]["adopted"]
    assert 1 <= adopted < M  # the commits it held survived the leader; it did not generate them again
    old = [[mb, a] for mb, a in sr[s]["applied"] if a < attempt_base(1)]
    assert len(old) == adopted and not [x for x in old if x in sr[s]["mine"]]
    assert sorted(sr[s]["mine"] + old) == sr[s]["applied"]  # the rest it generated itself, in its term
    assert all(a >= attempt_base(1) for _, a in sr[s]["mine"])
    assert s not in records(lead)  # the leader never finished that step
    for stage_nodes in ([lead, standby], [mid], [tail]):
        check_exactly_once(stage_nodes, range(steps))
    assert [records(tail)[s]["loss"] for s in range(steps)] == pytest.approx(_reference(steps), rel=1e-3)


@pytest.mark.timeout(900)
def test_head_kill_of_the_standby_leaves_the_leader_training_exactly_once(tmp_path) -> None:
    nodes = launch(tmp_path, [0, 0, 1, 2], 1000)
    lead, standby, mid, tail = nodes
    try:
        wait_until(lambda: len(records(standby)) >= 3, WAIT_S, "three steps applied by the standby head")
        standby.proc.kill()
        standby.proc.wait()
        after = len(records(tail))
        wait_until(lambda: len(records(tail)) >= after + 10, WAIT_S, "ten steps after the kill")
        codes = _stop([lead, mid, tail])
    finally:
        stop_nodes(nodes)
    assert codes == [128 + signal.SIGTERM] * 3
    steps = min(max(records(n)) for n in (lead, mid, tail)) + 1
    lr = records(lead)
    assert all(lr[s]["head_term"] == 0 for s in range(steps))  # it kept the step authority throughout
    for stage_nodes in ([lead, standby], [mid], [tail]):
        check_exactly_once(stage_nodes, range(steps))
    assert [records(tail)[s]["loss"] for s in range(steps)] == pytest.approx(_reference(steps), rel=1e-3)
