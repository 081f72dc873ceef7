"""The rollback rule (`node.replicas.rollback`), its announcement fields and the checkpoints a rollback drops."""

from __future__ import annotations

import pytest
import trio

from node.config import DiscoveryConfig
from node.net.discovery import Announcement, Discovery
from node.net.identity import identity_from_secret
from node.replicas import rollback
from node.training.checkpoint import (
    checkpoint_steps,
    drop_checkpoints_after,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from node.training.worker import StageWorker
from sharding import PRESETS, OptimConfig, partition

CFG = PRESETS["tiny"]


def _ann(pid: str, stage: int, next_step: int, ckpts: tuple[int, ...] = (), gen: int = 0, step: int = -1,
         spec: str = "aa") -> Announcement:
    return Announcement(peer_id=pid, addrs=(), spec_hash=spec, num_stages=3, stage=stage, capacity=1,
                        next_step=next_step, ckpt_steps=ckpts, rollback_gen=gen, rollback_step=step)


ME = _ann("me", -1, 2)  # a stage-1 replica re-syncing at step 2


def test_rollback_step_is_the_newest_every_stage_holds_without_the_lost_peers() -> None:
    head, tail = _ann("h", 0, 7, (3, 4, 5, 6, 7)), _ann("t", 2, 6, (2, 3, 4, 5, 6))
    lost = _ann("b", 1, 7, (5, 6, 7))  # the dead holder of stage 1's newer state
    # this replica holds stage 1 at step 2 and 3 (checkpoints) and runs at 3
    assert rollback.choose_step([head, tail, lost], ME, 1, [2, 3], ["b"], 3) == (3, "")
    # never after its own step, even when every stage (the lost peer counted) holds a later one
    assert rollback.choose_step([head, tail, lost], ME, 1, [2, 3, 5], ["b"], 3) == (3, "")
    # a stage that no longer holds the step (checkpoint_keep too small) rules it out
    assert rollback.choose_step([_ann("h", 0, 7, (4, 5, 6)), tail], ME, 1, [2, 3], ["b"], 3)[0] is None
    # another model's or another generation's announcements do not count
    other = [_ann("x", 0, 3, (2, 3), spec="bb"), _ann("y", 0, 3, (2, 3), gen=1, step=2)]
    step, why = rollback.choose_step([*other, tail], ME, 1, [2, 3], ["b"], 3)
    assert step is None and why == "no live replica of stage 0 announces a checkpoint"
    # the live state of a replica (its next step) counts as a checkpoint at that step
    assert rollback.choose_step([_ann("h", 0, 2), tail], ME, 1, [2], [], 2) == (2, "")


def test_no_common_step_names_what_each_stage_holds() -> None:
    step, why = rollback.choose_step([_ann("h", 0, 9, (8, 9)), _ann("t", 2, 9, (8, 9))], ME, 1, [2], ["b"], 2)
    assert step is None
    assert why == ("no step <= 2 is held by every stage (stage 0: [8, 9], stage 1: [2], stage 2: [8, 9]; "
                   "runtime.checkpoint_keep bounds how far back a stage can go)")


def test_pending_rollback_highest_generation_then_lowest_step() -> None:
    assert rollback.pending([_ann("a", 0, 5)], ME) is None
    a, b, c = _ann("a", 0, 5, gen=1, step=4), _ann("b", 1, 5, gen=1, step=3), _ann("c", 2, 5, gen=2, step=6)
    assert rollback.pending([a, b], ME) is b  # two rollbacks started at once: the lower step wins
    assert rollback.pending([a, b, c], ME) is c  # a later generation wins
    assert rollback.pending([a], _ann("me", 1, 4, gen=1, step=4)) is None  # already in it
    assert rollback.pending([_ann("a", 0, 5, gen=1, step=2, spec="bb")], ME) is None  # another model
    bad = _ann("z", 0, 5, gen=3)  # a generation without a step: malformed, skipped
    assert rollback.invalid(bad) == "generation 3 without a rollback step"
    assert rollback.pending([bad, a], ME) is a
    assert rollback.next_gen([a, c], ME) == 3 and rollback.next_gen([], ME) == 1


class _StubHost:
    def set_stream_handler(self, protocol: object, handler: object) -> None:
        return None


def test_rollback_fields_are_signed_and_bounded_and_split_generations() -> None:
    me, a, b = (identity_from_secret(s.to_bytes(32, "big")) for s in (51, 52, 53))

    def ann(ident, stage: int, **kw) -> Announcement:  # type: ignore[no-untyped-def]
        pid = ident.peer_id.pretty()
        return Announcement(pid, (f"/ip4/127.0.0.1/tcp/1/p2p/{pid}",), "aa", 3, stage, 1, **kw).sign(ident)

    async def main() -> None:
        d = Discovery(_StubHost(), Announcement(me.peer_id.pretty(), (), "aa", 3, 1, 1), DiscoveryConfig(), [],
                      identity=me)
        good = ann(a, 1, ckpt_steps=(2, 3), rollback_gen=1, rollback_step=2)
        assert Announcement.from_json(good.to_json()) == good
        altered = {**good.to_json(), "rollback_step": 0}  # a relay changes the rollback step
        too_many = ann(b, 1, ckpt_steps=tuple(range(300))).to_json()
        not_steps = {**ann(b, 1).to_json(), "ckpt_steps": [1, "2"]}
        no_step = ann(b, 1, rollback_gen=2).to_json()  # a generation without its step: malformed
        assert d._merge([good.to_json(), altered, too_many, not_steps, no_step], sender=b.peer_id.pretty()) == 4
        assert d.rejected["malformed"] == 3 and d.rejected["unsigned"] == 1  # counted against the sender
        assert [e.peer_id for e in d.entries()] == [a.peer_id.pretty()]
        assert d.stage_peers(1) == []  # generation 1: not a stage peer of this generation-0 node
        d.update_me(rollback_gen=1, rollback_step=2)
        assert [e.peer_id for e in d.stage_peers(1)] == [a.peer_id.pretty()]

    trio.run(main)
    with pytest.raises(ValueError, match="field 'ckpt_steps' must be a list of at most 256 steps"):
        Announcement.from_json({**_ann("x", 0, 1).to_json(), "ckpt_steps": list(range(300))})


def _worker() -> StageWorker:
    spec = partition(CFG, 2)[1]
    return StageWorker(CFG, spec, codec="dense", optim=OptimConfig(), num_microbatches=1, microbatch_size=2)


@pytest.mark.timeout(60)
def test_a_rollback_drops_the_checkpoints_after_its_step(tmp_path) -> None:
    w = _worker()
    for step in range(1, 6):  # checkpoints at next steps 1..5, all kept (retention 0)
        w.next_step = step
        save_checkpoint(w, tmp_path, keep=0)
    assert checkpoint_steps(tmp_path, 1) == [1, 2, 3, 4, 5]
    assert drop_checkpoints_after(tmp_path, 1, 2) == [3, 4, 5]
    assert checkpoint_steps(tmp_path, 1) == [1, 2]
    latest = latest_checkpoint(tmp_path, 1)
    assert latest is not None and load_checkpoint(_worker(), latest) == 2
    assert drop_checkpoints_after(tmp_path, 1, 0) == [1, 2] and latest_checkpoint(tmp_path, 1) is None
    assert checkpoint_steps(tmp_path, 3) == [] and drop_checkpoints_after(tmp_path, 3, 0) == []
    save_checkpoint(w, tmp_path, keep=2)  # retention: keep 2 of them
    w.next_step += 1
    save_checkpoint(w, tmp_path, keep=2)
    w.next_step += 1
    save_checkpoint(w, tmp_path, keep=2)
    assert checkpoint_steps(tmp_path, 1) == [6, 7]
