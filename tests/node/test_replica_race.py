"""The lost-contribution race, made deterministic with two test hooks of `ReplicaConfig`.

A middle replica computes a microbatch's parameter gradient (its contribution), gives it to its stage
peer, and sends the activation gradient upstream, where the head commits the microbatch. If the
contribution has not reached the stage peer when the replica dies, the committed microbatch is lost to
the stage: the survivor can only drop it from the step. The hooks put the replica exactly there:
`debug_push_delay_s` slows its pushes to the stage peer (a loaded link, longer than the averaging
deadline) and `debug_exit_after_forwards` SIGKILLs it right after it sent its first gradient upstream.
The survivor's commit poller is slowed so it cannot pull the contribution by chance in between.
"""

from __future__ import annotations

import signal

import pytest
import torch

from node.testing.swarm import stop_nodes, wait_nodes
from sharding import PRESETS, OptimConfig, load_corpus, train_reference
from tests.node.replica_swarm import B, M, check_exactly_once, launch, records

pytestmark = [pytest.mark.network]


@pytest.mark.timeout(600)  # node starts take minutes on a loaded shared machine
def test_replica_killed_right_after_forwarding_a_slowly_pushed_contribution_loses_nothing(tmp_path) -> None:
    steps = 10
    # one microbatch in flight per replica: the racer gets one of step 0's first two microbatches whatever the timing
    common = ["--avg-timeout", "2", "--replica-timeout", "20", "--commit-poll", "30", "--max-inflight", "1"]
    racer = ["--replicas-debug-push-delay-s", "3", "--replicas-debug-exit-after-forwards", "1"]
    nodes = launch(tmp_path, [0, 1, 1, 2], steps, common=common, extra={1: racer})
    head, mid_a, mid_b, tail = nodes
    try:
        codes = wait_nodes(nodes, 400)
    finally:
        stop_nodes(nodes)
    assert codes == [0, -signal.SIGKILL, 0, 0], codes  # the racer died at the hook, the others finished
    check_exactly_once([head], range(steps))
    check_exactly_once([mid_a, mid_b], range(steps))
    check_exactly_once([tail], range(steps))
    torch.set_num_threads(1)
    ref = train_reference(PRESETS["tiny"], OptimConfig(), steps, M, B, load_corpus("synthetic"))
    assert [records(tail)[s]["loss"] for s in range(steps)] == pytest.approx(ref, rel=1e-3)
