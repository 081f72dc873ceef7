"""Head-stage replicas: the pure rules (`node.replicas.heads`), the announced term, and a standby's takeover.

The takeover tests use real libp2p hosts on 127.0.0.1: a leading head replica serving `/pmn/avg/1.0.0`
and a standby head replica's engine whose discovery knows the leader's signed announcement.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
import trio

from node.config import NodeConfig
from node.errors import NodeError
from node.net.discovery import Announcement, Discovery
from node.net.host import full_addrs
from node.net.identity import bind, identity_from_secret
from node.replicas import heads
from node.replicas.averaging import AveragingService, ContributionStore, trainable
from node.replicas.engine import ReplicaEngine
from node.training.worker import StageWorker
from node.wire.channel import ActEndpoint, LocalInfo
from sharding import PRESETS, OptimConfig, load_corpus, partition
from tests.node.conftest import running_host


def _ann(peer: str, term: int) -> SimpleNamespace:
    return SimpleNamespace(peer_id=peer, head_term=term)


def _id(entry: Any | None) -> str | None:
    return None if entry is None else str(entry.peer_id)


def test_attempt_ids_are_partitioned_by_term_and_fit_the_header() -> None:
    assert [heads.attempt_base(t) for t in (0, 1, 2)] == [0, 1024, 2048]
    assert heads.term_of(heads.attempt_base(5) + 3) == 5
    assert heads.attempt_base(heads.MAX_TERM) + heads.ATTEMPT_STRIDE - 1 <= 0xFFFF
    with pytest.raises(ValueError, match="head term 64 out of range"):
        heads.attempt_base(heads.MAX_TERM + 1)


def test_held_contributions_prove_the_commit_of_each_microbatch_held_once() -> None:
    assert heads.held_commits([(0, 0), (2, 1), (1, 1024)]) == {0: 0, 2: 1, 1: 1024}
    assert heads.held_commits([(0, 0), (0, 1), (1, 0)]) == {1: 0}  # ambiguous: not adopted
    assert heads.held_commits([]) == {}


def test_the_leader_is_the_highest_term_then_the_lowest_peer_id() -> None:
    assert _id(heads.leader([_ann("b", -1), _ann("c", 0)])) == "c"
    assert _id(heads.leader([_ann("c", 0), _ann("d", 1), _ann("a", -1)])) == "d"
    assert _id(heads.leader([_ann("c", 1), _ann("b", 1)])) == "b"
    assert heads.leader([_ann("a", -1)]) is None


def test_a_leader_is_outranked_only_by_a_higher_term_or_a_lower_peer_id_in_its_term() -> None:
    assert heads.rival("m", 1, [_ann("a", 0), _ann("z", -1)]) is None  # an old (dead) leader's entry
    assert _id(heads.rival("m", 1, [_ann("z", 2)])) == "z"
    assert _id(heads.rival("m", 1, [_ann("a", 1)])) == "a"
    assert heads.rival("m", 1, [_ann("z", 1)]) is None
    assert heads.rival("m", 1, [_ann("m", 3)]) is None  # itself


def test_the_successor_is_the_lowest_reachable_standby_and_takes_the_next_term() -> None:
    assert heads.successor("b", ["c", "d"]) and heads.successor("b", [])
    assert not heads.successor("c", ["b"])
    assert heads.next_term([0], [0, 1, 2]) == 1
    assert heads.next_term([0, 2], []) == 3
    assert heads.next_term([], [1024 + 3]) == 2  # a term seen only in held attempt ids
    assert heads.next_term([], []) == 0


def test_the_head_term_is_signed_and_parsed_with_the_announcement() -> None:
    ident = identity_from_secret((151).to_bytes(32, "big"))
    pid = ident.peer_id.pretty()
    ann = Announcement(pid, (f"/ip4/127.0.0.1/tcp/1/p2p/{pid}",), "aa", 3, 0, 1, head_term=2).sign(ident)
    back = Announcement.from_json(ann.to_json())
    back.verify()
    assert back.head_term == 2
    assert Announcement.from_json({k: v for k, v in ann.to_json().items() if k != "head_term"}).head_term == -1
    forged = Announcement.from_json({**ann.to_json(), "head_term": 3})  # a relay raising the term is caught
    with pytest.raises(NodeError, match="was not signed by"):
        forged.verify()
    with pytest.raises(ValueError, match="head_term"):
        Announcement.from_json({**ann.to_json(), "head_term": -2})


# -- a standby's takeover over real hosts ----------------------------------------------------------------

M = 2


def _worker() -> StageWorker:
    cfg = PRESETS["tiny"]
    return StageWorker(cfg, partition(cfg, 3)[0], codec="dense", optim=OptimConfig(), num_microbatches=M,
                       microbatch_size=2, corpus=load_corpus("synthetic"))


def _head_ann(host, ident, spec_hex: str, term: int) -> Announcement:
    return Announcement(peer_id=host.get_id().pretty(), addrs=tuple(full_addrs(host)), spec_hash=spec_hex,
                        num_stages=3, stage=0, capacity=1, address=ident.address, binding="0x" + bind(ident).hex(),
                        head_term=term, seq=1).sign(ident)


def _standby(host, ident, worker: StageWorker, leader: Announcement, takeover_s: float) -> ReplicaEngine:
    cfg = NodeConfig(num_stages=3, stage="0")
    cfg.replicas.head_takeover_s = takeover_s
    cfg.replicas.commit_poll_s = 0.05
    discovery = Discovery(host, _head_ann(host, ident, leader.spec_hash, -1), cfg.discovery, [], identity=ident)
    discovery._merge([leader.to_json()])
    endpoint = ActEndpoint(host, local=LocalInfo(worker.config.spec_hash(), 0, 3, ident.address, bind(ident)),
                           frame_spec=worker.frame_spec(cfg.transport.max_frame_bytes), cfg=cfg.transport)
    size = sum(p.numel() for p in trainable(worker.module))
    eng = ReplicaEngine(cfg, worker, endpoint, discovery, host, ContributionStore(size))
    eng.head_term = -1
    return eng


async def _lost_within(eng: ReplicaEngine, step: int, limit_s: float) -> float:
    """Ask `_leader_lost` (as the step loop does) until it says so; seconds it took."""
    t0 = trio.current_time()
    with trio.fail_after(limit_s):
        while not await eng._leader_lost(step):
            await trio.sleep(0.02)
    return trio.current_time() - t0


@pytest.mark.network
@pytest.mark.timeout(120)
def test_a_standby_head_learns_commits_from_the_live_leader_and_takes_over_only_once_it_is_gone() -> None:
    async def main() -> None:
        async with running_host(152) as (h0, id0):
            worker = _worker()
            size = sum(p.numel() for p in trainable(worker.module))
            spec_hex = worker.config.spec_hash().hex()
            async with running_host(153) as (h1, id1):
                lead_store = ContributionStore(size)
                AveragingService(h1, spec_hex, lambda s: lead_store if s == 0 else None, 5.0)
                leader = _head_ann(h1, id1, spec_hex, 0)
                eng = _standby(h0, id0, worker, leader, takeover_s=0.5)
                lead_store.add(7, 0, 0, torch.ones(size))  # the leader committed mb 0 of step 7 (attempt 0) ...
                eng.store.add(7, 0, 0, torch.ones(size))  # ... once the standby held it (its push)
                with trio.move_on_after(2.0):  # while the leader answers its pings, the standby never takes over
                    await _lost_within(eng, 7, 10)
                    raise AssertionError("a standby took over from a live leader")
                assert eng._leader_down_since is None and eng.leads is False
                assert lead_store.wire_bytes < 4 * size  # the pings moved no contribution
            # the leader's host is gone (its announcement is still in discovery): the standby takes over
            took = await _lost_within(eng, 7, 30)
            assert took >= 0.5  # not before head_takeover_s of failed dials
            eng._take_over(7)
            assert eng.leads and eng.head_term == 1 and eng.discovery.me.head_term == 1
            assert heads.attempt_base(eng.head_term) == 1024  # its attempts never collide with the old leader's
            assert eng.events[-1]["event"] == "takeover" and eng.events[-1]["peer"] == leader.peer_id
            assert eng.events[-1]["adopted"] == 1  # mb 0's commit is kept, only mb 1 is generated again
            eng._check_rival(7)  # the dead leader's older term does not outrank it

    trio.run(main)


@pytest.mark.network
@pytest.mark.timeout(60)
def test_a_leader_outranked_by_a_newer_term_stops_naming_the_peer_stage_and_step() -> None:
    async def main() -> None:
        async with running_host(154) as (h0, id0), running_host(155) as (h1, id1):
            worker = _worker()
            newer = _head_ann(h1, id1, worker.config.spec_hash().hex(), 1)
            eng = _standby(h0, id0, worker, newer, takeover_s=1.0)
            eng.head_term = 0  # it believes it leads in term 0
            with pytest.raises(NodeError, match=rf"stage 0 head replica at step 4: peer {newer.peer_id} leads in term 1"):
                eng._check_rival(4)

    trio.run(main)


@pytest.mark.network
@pytest.mark.timeout(60)
def test_a_leader_hands_every_committed_contribution_a_standby_missed_before_the_commit_goes_on() -> None:
    async def main() -> None:
        async with running_host(156) as (h0, id0), running_host(157) as (h1, id1):
            worker = _worker()
            size = sum(p.numel() for p in trainable(worker.module))
            spec_hex = worker.config.spec_hash().hex()
            standby_store = ContributionStore(size)
            AveragingService(h1, spec_hex, lambda s: standby_store if s == 0 else None, 5.0)
            eng = _standby(h0, id0, worker, _head_ann(h1, id1, spec_hex, -1), takeover_s=1.0)
            eng.head_term = 0  # this engine leads; the announced peer stands by
            for mb in range(M):
                eng.store.add(3, mb, 0, torch.full((size,), float(mb)))
            eng._commits[3] = {0: 0, 1: 0}
            eng._holders[(3, 0, 0)] = {h1.get_id().pretty()}  # mb 0 reached it by push; mb 1 was committed before
            with trio.fail_after(20):
                await eng._hand_to_standbys(3)
            assert set(standby_store.vecs[3]) == {(1, 0)}  # only what it missed, nothing twice
            assert torch.equal(standby_store.vecs[3][(1, 0)], torch.ones(size))
            assert h1.get_id().pretty() in eng._holders[(3, 1, 0)]

    trio.run(main)


@pytest.mark.network
@pytest.mark.timeout(60)
def test_a_standby_missing_a_step_the_pipeline_applied_stops_naming_the_peer_stage_and_step() -> None:
    async def main() -> None:
        async with running_host(158) as (h0, id0), running_host(159) as (h1, id1):
            worker = _worker()
            spec_hex = worker.config.spec_hash().hex()
            leader = _head_ann(h1, id1, spec_hex, 0)
            eng = _standby(h0, id0, worker, leader, takeover_s=1.0)
            ident = identity_from_secret((160).to_bytes(32, "big"))
            pid = ident.peer_id.pretty()
            mid = Announcement(pid, (f"/ip4/127.0.0.1/tcp/1/p2p/{pid}",), spec_hex, 3, 1, 1, next_step=8,
                               address=ident.address, binding="0x" + bind(ident).hex(), seq=1).sign(ident)
            eng.discovery._merge([mid.to_json()])
            with pytest.raises(NodeError, match=rf"stage 0 head replica at step 7: cannot take over from peer "
                                                rf"{leader.peer_id}: stage 1 peer {pid} already applied step 7"):
                eng._take_over(7)
            assert not eng.leads  # it did not claim the step authority

    trio.run(main)
