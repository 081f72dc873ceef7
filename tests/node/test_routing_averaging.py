"""Pure pieces of replicated mode: routing, bans, rebalance plans, gradient combination, state packing."""

from __future__ import annotations

import pytest
import torch

from node.config import NodeConfig, ReplicaConfig
from node.errors import AveragingError, StateSyncError
from node.replicas.averaging import ContributionStore, combine, set_grads, take_grads
from node.replicas.rebalance import plan_move, stage_throughputs
from node.replicas.routing import Router, ban_duration, ewma, fastest_first
from node.replicas.statesync import pack_state, unpack_state
from node.training.worker import StageWorker
from node.wire import frames
from sharding import PRESETS, OptimConfig, load_corpus, partition

pytestmark = pytest.mark.timeout(60)


def test_ewma_and_ban_durations_double_up_to_the_cap() -> None:
    assert ewma(None, 2.0, 0.3) == 2.0
    assert ewma(2.0, 1.0, 0.5) == 1.5
    assert [ban_duration(n, 1.0, 5.0) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    with pytest.raises(ValueError, match="ban count"):
        ban_duration(0, 1.0, 5.0)


def test_a_bundles_first_holder_is_the_peer_whose_pushes_were_answered_fastest() -> None:
    class Peer:
        def __init__(self, peer_id: str) -> None:
            self.peer_id = peer_id

    a, b, c, d = (Peer(x) for x in "abcd")
    assert [p.peer_id for p in fastest_first([a, b, c, d], {"c": 0.05, "a": 0.3})] == ["c", "a", "b", "d"]
    assert [p.peer_id for p in fastest_first([b, a], {})] == ["b", "a"]  # none measured: the order given


def test_router_prefers_low_latency_respects_inflight_and_bans() -> None:
    r = Router(ReplicaConfig(max_inflight=2, ewma_alpha=1.0, ban_base_s=1.0, ban_max_s=8.0))
    assert r.choose(["b", "a"], 0.0) == "a"  # nothing measured: lowest id
    r.sent("a")
    r.answered("a", 0.1)
    r.sent("b")
    r.answered("b", 1.0)
    assert r.choose(["a", "b"], 0.0) == "a"
    r.sent("a")
    r.sent("a")
    assert r.choose(["a", "b"], 0.0) == "b"  # a is at its in-flight limit
    r.sent("b")
    r.sent("b")
    assert r.choose(["a", "b"], 0.0) is None
    r.abandoned("a")
    ev = r.ban("a", "timeout", 10.0)
    assert (ev.count, ev.duration_s) == (1, 1.0)
    assert r.choose(["a"], 10.5) is None and r.choose(["a"], 11.5) == "a"
    assert r.ban("a", "lost", 12.0).duration_s == 2.0
    assert r.choose(["c"], 0.0) == "c"  # a new replica gets work at once


def test_plan_move_picks_lowest_peer_of_the_richest_stage() -> None:
    nodes = [("h", 0, 100.0), ("m", 1, 10.0), ("t2", 2, 60.0), ("t1", 2, 60.0)]
    assert stage_throughputs(nodes, 3) == [100.0, 10.0, 120.0]
    move = plan_move(nodes, 3, 1.5)
    assert move is not None and (move.peer_id, move.from_stage, move.to_stage) == ("t1", 2, 1)
    assert plan_move(nodes, 3, 20.0) is None  # below the threshold
    assert plan_move([("h", 0, 100.0), ("m", 1, 10.0), ("t", 2, 60.0)], 3, 1.5) is None  # no donor with 2 replicas
    assert plan_move([*nodes[:3], ("t1", 2, 0.0)], 3, 1.5) is None  # someone has not reported yet
    # a donor that would become the new bottleneck does not give a node away
    assert plan_move([("h", 0, 100.0), ("m", 1, 50.0), ("t1", 2, 40.0), ("t2", 2, 40.0)], 3, 1.5) is None


def test_combine_equals_the_sum_and_store_rejects_bad_sizes() -> None:
    g = torch.Generator().manual_seed(0)
    vs = [torch.randn(10, generator=g) / 4 for _ in range(4)]
    total = sum(vs)
    assert isinstance(total, torch.Tensor)
    assert torch.allclose(combine(vs, 4), total, atol=1e-6)
    robust = combine(vs, 4, "median")
    assert robust.shape == (10,)
    store = ContributionStore(10)
    store.add(0, 1, 0, vs[0])
    with pytest.raises(AveragingError, match="expected 10"):
        store.add(0, 2, 0, torch.zeros(9))
    assert list(store.vecs[0]) == [(1, 0)]  # the bad one changed nothing
    store.commit(0, {0: 0, 1: 0})
    store.commit(0, {0: 5, 1: 5})  # commits never change
    assert store.missing(0) == [0]
    assert [h.covers for h in store.committed(0)] == [((1, 0),)]
    store.add(0, 0, 3, vs[1])  # an uncommitted attempt is kept apart and not counted
    assert store.missing(0) == [0]
    store.prune(1)
    assert store.vecs == {} and store.commits == {}


def _worker(stage: int) -> StageWorker:
    cfg = PRESETS["tiny"]
    spec = partition(cfg, 3)[stage]
    return StageWorker(cfg, spec, codec="dense", optim=OptimConfig(), num_microbatches=2, microbatch_size=2,
                       corpus=load_corpus("synthetic") if spec.is_first else None)


def test_state_pack_round_trip_and_wrong_stage_refused() -> None:
    a, b = _worker(1), _worker(1)
    with torch.no_grad():
        for p in a.module.parameters():
            p.add_(0.5)
    flat = torch.ones(sum(p.numel() for p in a.module.parameters() if p.requires_grad))
    set_grads(a.module, flat)
    a.optimizer.step()
    a.next_step = 7
    header, blob = pack_state(a)
    assert unpack_state(b, header, blob) == 7
    for pa, pb in zip(a.module.parameters(), b.module.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert take_grads(a.module).numel() == flat.numel()
    with pytest.raises(StateSyncError, match="stage 1"):
        unpack_state(_worker(2), header, blob)
    with pytest.raises(StateSyncError, match="declares"):
        unpack_state(b, header, blob[:-1])


def test_attempt_rides_in_the_header_and_config_names_bad_fields() -> None:
    h = frames.FrameHeader(kind=frames.Kind.COMMIT, spec_hash=b"\x01" * 32, stage=0, step=3, microbatch=0, attempt=513)
    assert frames.decode_header(frames.encode_header(h), 1 << 20).attempt == 513
    cfg = NodeConfig()
    cfg.replicas.ban_max_s = 0
    with pytest.raises(ValueError, match="replicas.ban_max_s"):
        cfg.validate()
    cfg = NodeConfig()
    cfg.replicas.aggregation = "avg"
    with pytest.raises(ValueError, match="replicas.aggregation"):
        cfg.validate()
