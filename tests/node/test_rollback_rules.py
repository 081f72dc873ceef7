"""The rollback rule (`node.replicas.rollback`), its announcement fields and the checkpoints a rollback drops."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import trio
import trio.testing

from node.config import DiscoveryConfig, NodeConfig
from node.context import NodeContext
from node.errors import RollbackError
from node.net.discovery import Announcement, Discovery
from node.net.identity import identity_from_secret
from node.observability.status import node_status
from node.observability.steps import NodeLog
from node.replicas import rollback
from node.replicas.runner import ReplicatedRunner
from node.training.checkpoint import (
    MANIFEST,
    abandon_checkpoints_after,
    abandoned_folders,
    checkpoint_at,
    checkpoint_steps,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    stage_dir,
)
from node.training.worker import StageWorker
from sharding import PRESETS, OptimConfig, partition

CFG = PRESETS["tiny"]


def _ann(pid: str, stage: int, next_step: int, ckpts: tuple[int, ...] = (), gen: int = 0, step: int = -1,
         spec: str = "aa", lost: int = 1) -> Announcement:
    return Announcement(peer_id=pid, addrs=(), spec_hash=spec, num_stages=3, stage=stage, capacity=1,
                        next_step=next_step, ckpt_steps=ckpts, rollback_gen=gen, rollback_step=step,
                        rollback_stage=lost if gen > 0 else -1)


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
    no_stage = _ann("y", 0, 5, gen=3, step=1, lost=-1)  # a rollback that names no lost stage: malformed, skipped
    assert rollback.invalid(no_stage) == "generation 3 without its lost stage"
    assert rollback.candidates([no_stage, a, b], ME) == [b, a]
    assert rollback.next_gen([a, c], ME) == 3 and rollback.next_gen([], ME) == 1


def test_two_rollbacks_started_at_once_to_different_steps_meet_in_the_lower_one() -> None:
    """Two replicas that find a state lost at once both announce the next number; one chose step 3, the other
    step 4. They are different generations (strangers), and the one at step 4 follows the one at step 3, never the
    reverse, so the swarm meets in one generation instead of stalling split across two steps."""
    low, high = _ann("b", 2, 3, (2, 3), gen=1, step=3, lost=2), _ann("a", 1, 4, (3, 4), gen=1, step=4, lost=1)
    assert low.generation() != high.generation() and low.generation() == replace(high, rollback_step=3).generation()
    assert rollback.candidates([low, high], high) == [low]  # the later step follows the earlier one
    assert rollback.candidates([low, high], low) == []  # ... and not the reverse
    assert rollback.candidates([low, high], ME) == [low, high]  # a generation-0 node follows the lower step first
    assert rollback.label(high) == "1 (step 4)" and rollback.label(ME) == "0"
    # the stage-1 replica at step 4 can restart from 3 and no fresh stage-2 replica of its generation is past 3
    assert rollback.unjustified(low, [low, high], high, [3, 4], 1.0) == ""
    # its own generation's peers are the only holders it counts: a stage-2 replica in (1, step 4) past step 3
    # keeps the state of stage 2, so it does not follow
    keeper = _ann("k", 2, 5, gen=1, step=4, lost=1)
    assert "peer k of stage 2 announced step 5" in rollback.unjustified(low, [low, high, keeper], high, [3, 4], 1.0)
    # and the rollback step is chosen from its own generation's announcements only
    assert rollback.choose_step([_ann("h", 0, 4, (3, 4), gen=1, step=3), low], high, 1, [3, 4], [], 4)[0] is None


class _StubHost:
    def set_stream_handler(self, protocol: object, handler: object) -> None:
        return None


def test_rollback_fields_are_signed_and_bounded_and_split_generations() -> None:
    me, a, b = (identity_from_secret(s.to_bytes(32, "big")) for s in (51, 52, 53))

    def ann(ident, stage: int, **kw) -> Announcement:
        pid = ident.peer_id.pretty()
        return Announcement(pid, (f"/ip4/127.0.0.1/tcp/1/p2p/{pid}",), "aa", 3, stage, 1, **kw).sign(ident)

    async def main() -> None:
        d = Discovery(_StubHost(), Announcement(me.peer_id.pretty(), (), "aa", 3, 1, 1), DiscoveryConfig(), [],
                      identity=me)
        good = ann(a, 1, ckpt_steps=(2, 3), rollback_gen=1, rollback_step=2, rollback_stage=1)
        assert Announcement.from_json(good.to_json()) == good
        altered = {**good.to_json(), "rollback_step": 0}  # a relay changes the rollback step
        moved = {**good.to_json(), "rollback_stage": 0}  # ... or the lost stage
        too_many = ann(b, 1, ckpt_steps=tuple(range(300))).to_json()
        not_steps = {**ann(b, 1).to_json(), "ckpt_steps": [1, "2"]}
        no_step = ann(b, 1, rollback_gen=2, rollback_stage=1).to_json()  # a generation without its step: malformed
        no_stage = ann(b, 1, rollback_gen=2, rollback_step=1).to_json()  # ... or without its lost stage
        past_end = ann(b, 1, rollback_gen=2, rollback_step=1, rollback_stage=3).to_json()  # a stage of no model
        assert d._merge([good.to_json(), altered, moved, too_many, not_steps, no_step, no_stage, past_end],
                        sender=b.peer_id.pretty()) == 7
        assert d.rejected["malformed"] == 5 and d.rejected["unsigned"] == 2  # counted against the sender
        assert [e.peer_id for e in d.entries()] == [a.peer_id.pretty()]
        assert d.stage_peers(1) == []  # generation 1: not a stage peer of this generation-0 node
        d.update_me(rollback_gen=1, rollback_step=2, rollback_stage=1)
        assert [e.peer_id for e in d.stage_peers(1)] == [a.peer_id.pretty()]
        d.update_me(rollback_step=3)  # the same number, another step: another generation (two rollbacks at once)
        assert d.stage_peers(1) == []

    trio.run(main)
    with pytest.raises(ValueError, match="field 'ckpt_steps' must be a list of at most 256 steps"):
        Announcement.from_json({**_ann("x", 0, 1).to_json(), "ckpt_steps": list(range(300))})


def _worker() -> StageWorker:
    spec = partition(CFG, 2)[1]
    return StageWorker(CFG, spec, codec="dense", optim=OptimConfig(), num_microbatches=1, microbatch_size=2)


def test_a_rollback_is_followed_only_when_justified_from_the_nodes_own_view() -> None:
    rb = _ann("a", -1, 2, (2,), gen=1, step=2)  # stage 1's state after step 2 is lost, says peer a
    me = _ann("me", 0, 6, (2, 3, 4, 5), gen=0)  # a head at step 6 that can restart from 2
    mine = {2, 3, 4, 5, 6}
    assert rollback.unjustified(rb, [_ann("t", 2, 6)], me, mine, 2.0) == ""
    # a fresh stage-1 replica of our generation is past the step: the state is not lost
    assert rollback.unjustified(rb, [_ann("b", 1, 6)], me, mine, 2.0) == (
        "rollback generation 1 to step 2: peer b of stage 1 announced step 6 within 2 s, the stage's newer state is "
        "not lost")
    # ... the announcer itself, a replica of another generation or one at the step do not count
    assert rollback.unjustified(rb, [replace(rb, stage=1, next_step=6), _ann("c", 1, 6, gen=1, step=2),
                                     _ann("d", 1, 2)], me, mine, 2.0) == ""
    # this node serving the lost stage past the step
    assert "this node serves stage 1 at step 6" in rollback.unjustified(rb, [], replace(me, stage=1), mine, 2.0)
    # a step it cannot restart from
    assert rollback.unjustified(rb, [], me, {4, 5, 6}, 2.0) == (
        "rollback generation 1 to step 2: this node cannot restart from that step (it holds [4, 5, 6])")
    assert rollback.unjustified(replace(rb, rollback_stage=5), [], me, mine, 2.0) == (
        "rollback generation 1 to step 2 names no lost stage")


class _Scene:
    """A stage-0 node's runner and context (real Discovery and status file) with checkpoints at `steps`."""

    def __init__(self, tmp_path, steps: tuple[int, ...]) -> None:
        self.ids = {name: identity_from_secret(s.to_bytes(32, "big")) for name, s in
                    (("me", 61), ("a", 62), ("b", 63), ("c", 64))}
        self.pid = {name: i.peer_id.pretty() for name, i in self.ids.items()}
        me = Announcement(self.pid["me"], (), "aa", 3, 0, 1, next_step=6)
        self.discovery = Discovery(_StubHost(), me, DiscoveryConfig(), [], identity=self.ids["me"])
        for s in steps:  # complete checkpoints as far as `checkpoint_steps` is concerned
            (stage_dir(tmp_path, 0) / f"step{s:08d}").mkdir(parents=True)
            (stage_dir(tmp_path, 0) / f"step{s:08d}" / MANIFEST).write_text("{}")
        self.ctx = NodeContext(NodeConfig(num_stages=3), CFG, OptimConfig(), self.ids["me"], b"", tmp_path,
                               _StubHost(), self.discovery, None, NodeLog(tmp_path))  # type: ignore[arg-type]
        self.runner = ReplicatedRunner()
        self.worker = _worker()
        self.worker.next_step = 6

    def signed(self, name: str, stage: int, next_step: int, **kw) -> Announcement:
        pid = self.pid[name]
        ann = Announcement(pid, (f"/ip4/127.0.0.1/tcp/1/p2p/{pid}",), "aa", 3, stage, 1, next_step=next_step, **kw)
        return ann.sign(self.ids[name])

    def hear(self, name: str, stage: int, next_step: int, **kw) -> None:
        entry = self.signed(name, stage, next_step, **kw).to_json()
        assert self.discovery._merge([entry], sender=self.pid[name]) == 0  # from the peer itself

    def follow(self) -> RollbackError | None:
        return self.runner._follow(self.ctx, 0, self.worker)


def test_an_unjustified_rollback_is_ignored_logged_once_and_counted_against_its_sender(tmp_path, capsys) -> None:
    scene = _Scene(tmp_path, (2, 3, 4, 5))
    d, pid = scene.discovery, scene.pid
    clock = trio.testing.MockClock()

    async def main() -> None:
        d._merge([scene.signed("b", 1, 6).to_json()], sender=pid["c"])  # b's entry relayed by c: no sign of life
        assert pid["b"] in {e.peer_id for e in d.entries()} and d.recent(2.0) == []
        scene.hear("b", 1, 6)  # stage 1's replica b, alive at step 6
        assert [e.peer_id for e in d.recent(2.0)] == [pid["b"]]
        scene.hear("a", -1, 2, rollback_gen=1, rollback_step=2, rollback_stage=1)  # a: "stage 1 is lost, go to 2"
        scene.hear("c", -1, 1, rollback_gen=1, rollback_step=1, rollback_stage=1)  # c: "... go to 1"
        for _ in range(3):  # ignored each time it is checked, logged and counted once per announcement
            assert scene.follow() is None
        assert d.rejected["rollback_unjustified"] == 2
        assert d.gate.scores.score(pid["a"]) < 0 and d.gate.scores.score(pid["c"]) < 0
        assert d.gate.scores.score(pid["b"]) == 0
        events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [(e["event"], e["by"], e["step"]) for e in events] == [("rollback_ignored", pid["c"], 1),
                                                                      ("rollback_ignored", pid["a"], 2)]
        assert events[1]["why"] == (f"rollback generation 1 to step 2: peer {pid['b']} of stage 1 announced step 6 "
                                    f"within 2 s, the stage's newer state is not lost")
        assert node_status(tmp_path)["ignored_rollback"] == f"ignored the rollback announced by peer {pid['a']}: " \
                                                           f"{events[1]['why']}"
        assert d.me.rollback_gen == 0  # nothing followed
        # b falls silent (its entry is still relayed, unchanged, by others): stage 1's state after 2 is lost now;
        # c's step 1 stays unfollowable (no checkpoint at 1), a's step 2 is followed
        clock.jump(5)
        d._merge([d.table[pid["b"]][0].to_json()], sender=pid["a"])
        assert pid["b"] in {e.peer_id for e in d.entries()} and pid["b"] not in {e.peer_id for e in d.recent(2.0)}
        scene.hear("c", -1, 1, rollback_gen=1, rollback_step=1, rollback_stage=1)
        scene.hear("a", -1, 2, rollback_gen=1, rollback_step=2, rollback_stage=1)
        rb = scene.follow()
        assert rb is not None and (rb.gen, rb.step, rb.stage, rb.by) == (1, 2, 1, pid["a"])
        events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert events == []  # c's announcement was logged already
        assert d.rejected["rollback_unjustified"] == 2

    trio.run(main, clock=clock)


@pytest.mark.timeout(60)
def test_a_rollback_moves_the_checkpoints_after_its_step_aside(tmp_path) -> None:
    w = _worker()
    for step in range(1, 6):  # checkpoints at next steps 1..5, all kept (retention 0)
        w.next_step = step
        save_checkpoint(w, tmp_path, keep=0)
    assert checkpoint_steps(tmp_path, 1) == [1, 2, 3, 4, 5]
    assert abandon_checkpoints_after(tmp_path, 1, 2, gen=0) == [3, 4, 5]
    assert checkpoint_steps(tmp_path, 1) == [1, 2]
    latest = latest_checkpoint(tmp_path, 1)
    assert latest is not None and load_checkpoint(_worker(), latest) == 2
    at = checkpoint_at(tmp_path, 1, 2)
    assert at == latest and load_checkpoint(_worker(), at) == 2  # the explicit restore
    # nothing was deleted: the abandoned checkpoints are intact beside the others
    [gen0] = abandoned_folders(tmp_path, 1)
    assert gen0 == stage_dir(tmp_path, 1) / "abandoned" / "gen0"
    assert sorted(p.name for p in gen0.iterdir()) == ["step00000003", "step00000004", "step00000005"]
    assert load_checkpoint(_worker(), gen0 / "step00000005") == 5
    # the same generation abandoned again (a restarted node): a second folder, the first one untouched
    assert abandon_checkpoints_after(tmp_path, 1, 0, gen=0) == [1, 2] and latest_checkpoint(tmp_path, 1) is None
    assert [p.name for p in abandoned_folders(tmp_path, 1)] == ["gen0", "gen0.2"]
    assert checkpoint_steps(tmp_path, 3) == [] and abandon_checkpoints_after(tmp_path, 3, 0, gen=0) == []
    # retention: checkpoints as before (the abandoned folder is not a checkpoint), abandoned generations bounded
    save_checkpoint(w, tmp_path, keep=2)
    w.next_step += 1
    save_checkpoint(w, tmp_path, keep=2)
    w.next_step += 1
    save_checkpoint(w, tmp_path, keep=2)
    assert checkpoint_steps(tmp_path, 1) == [6, 7]
    assert abandon_checkpoints_after(tmp_path, 1, 6, gen=1, keep_gens=2) == [7]
    assert [p.name for p in abandoned_folders(tmp_path, 1)] == ["gen0.2", "gen1"]  # the oldest one went
    latest = latest_checkpoint(tmp_path, 1)
    assert checkpoint_steps(tmp_path, 1) == [6] and latest is not None and load_checkpoint(_worker(), latest) == 6
