"""Rollback with real node processes on 127.0.0.1: every holder of a stage's newer state dies, the swarm rewinds
to the newest step every stage holds and the loss curve continues from there (`node.replicas.rollback`)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from node.observability.status import node_status
from node.testing.swarm import stop_nodes, wait_nodes
from node.training.checkpoint import abandoned_folders, checkpoint_at, stage_dir
from sharding import PRESETS, OptimConfig, load_corpus, train_reference
from tests.node.replica_swarm import B, M, check_exactly_once, join, launch, records
from tests.waiting import wait_until

pytestmark = [pytest.mark.network]

WAIT_S = 300  # bound on each awaited condition: node starts take minutes on a loaded machine
STEPS = 12
BACKUP_STEP = 2  # the step of the stage-1 checkpoint kept aside: the swarm rolls back to it
BACKUP_NAME = f"step{BACKUP_STEP:08d}"  # its directory name (`node.training.checkpoint.save_checkpoint`)
# a checkpoint every step, all of them kept (so every stage still holds BACKUP_STEP when the state is lost);
# slow steps (the debug delay) so the kill lands mid-run; the head and the tail wait for a stage-1 replica
# for as long as the replacement takes to start and give up its sync
COMMON = ["--checkpoint-every", "1", "--checkpoint-keep", "0", "--debug-delay-s", "0.05",
          "--no-replica-timeout", "600"]
REPLACEMENT = ["--no-replica-timeout", "8"]  # the replacement declares the newer state lost after 8 s


def _reference(steps: int) -> list[float]:
    torch.set_num_threads(1)
    return train_reference(PRESETS["tiny"], OptimConfig(), steps, M, B, load_corpus("synthetic"))


@pytest.mark.timeout(900)
def test_rollback_when_every_holder_of_a_stage_state_died(tmp_path) -> None:
    nodes = launch(tmp_path, [0, 1, 2], STEPS, common=COMMON)
    head, mid, tail = nodes
    backup = tmp_path / "backup"
    try:
        wait_until(lambda: checkpoint_at(mid.data_dir, 1, BACKUP_STEP), WAIT_S, f"stage 1's checkpoint at step "
                   f"{BACKUP_STEP}")
        shutil.copytree(checkpoint_at(mid.data_dir, 1, BACKUP_STEP), backup)  # type: ignore[arg-type]
        wait_until(lambda: len(records(tail)) >= 5, WAIT_S, "five completed steps")
        mid.proc.kill()  # SIGKILL: every holder of stage 1's state after BACKUP_STEP is gone
        mid.proc.wait()
        killed_at = max(records(mid))  # the last step the dead replica applied
        ckpts = stage_dir(tmp_path / "replacement", 1)
        ckpts.mkdir(parents=True)
        shutil.copytree(backup, ckpts / BACKUP_NAME)
        (ckpts / "LATEST").write_text(BACKUP_NAME)
        repl = join(tmp_path, "replacement", 1, STEPS, head, 3, extra=COMMON + REPLACEMENT)
        nodes.append(repl)
        codes = wait_nodes([head, repl, tail], 2 * WAIT_S)
    finally:
        stop_nodes(nodes)
    assert codes == [0, 0, 0]
    lost = mid.ready["peer_id"]
    started = json.loads(node_status(repl.data_dir)["last_rollback"])
    assert started["from_step"] == BACKUP_STEP and started["to_step"] == BACKUP_STEP
    assert started["generation"] == 1 and started["by"] == repl.ready["peer_id"] and lost in started["lost"]
    for n, stage in ((head, 0), (tail, 2)):
        status = node_status(n.data_dir)
        seen = json.loads(status["last_rollback"])
        assert seen["to_step"] == BACKUP_STEP and seen["generation"] == 1
        # every node of the new generation announces it: the one followed is the replacement or, when it saw both,
        # the other follower (same generation and step, the lower peer id wins: `rollback.candidates`)
        assert seen["by"] in {repl.ready["peer_id"], head.ready["peer_id"], tail.ready["peer_id"]} - {n.ready["peer_id"]}
        # they had gone past the lost state, and came back (the dead replica's own record of the step the tail
        # finished last may not have been written when it was killed: killed_at is BACKUP_STEP + 1 or later)
        assert seen["from_step"] >= killed_at > BACKUP_STEP
        assert seen["lost_stage"] == 1 and "ignored_rollback" not in status  # justified from their own view
        # the checkpoints of the abandoned steps were moved aside, not deleted
        [gen0] = abandoned_folders(n.data_dir, stage)
        assert gen0.name == "gen0" and seen["abandoned_checkpoints"] == list(range(BACKUP_STEP + 1, seen["from_step"] + 1))
        assert sorted(p.name for p in gen0.iterdir()) == [f"step{s:08d}" for s in seen["abandoned_checkpoints"]]
    # generation 0: the steps every stage applied before the loss; generation 1: BACKUP_STEP to the end
    before = sorted(set(records(head, gen=0)) & set(records(mid, gen=0)) & set(records(tail, gen=0)))
    assert before == list(range(len(before))) and len(before) > BACKUP_STEP
    after = list(range(BACKUP_STEP, STEPS))
    for stage_nodes in ([head], [mid], [tail]):
        check_exactly_once(stage_nodes, before, gen=0)
    for stage_nodes in ([head], [repl], [tail]):
        check_exactly_once(stage_nodes, after, gen=1)
    assert sorted(records(repl)) == after  # the replacement served from the rollback step on
    ref = _reference(STEPS)
    old = records(tail, gen=0)
    new = records(tail, gen=1)
    assert [old[s]["loss"] for s in before] == pytest.approx([ref[s] for s in before], rel=1e-4)
    # the loss curve continues from the rollback step as if the steps after it had never run
    assert [new[s]["loss"] for s in after] == pytest.approx([ref[s] for s in after], rel=1e-4)
    assert [new[s]["loss"] for s in before[BACKUP_STEP:]] == pytest.approx(
        [old[s]["loss"] for s in before[BACKUP_STEP:]], rel=1e-6)
