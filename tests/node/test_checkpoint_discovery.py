"""Checkpoint round trip and tamper detection; stage choice; announcement gossip between hosts; bindings."""

from __future__ import annotations

import pytest
import torch
import trio

from node.config import DiscoveryConfig, NodeConfig
from node.errors import CheckpointError, DiscoveryError
from node.net.discovery import Announcement, Discovery, choose_stage
from node.net.host import full_addrs
from node.net.identity import NodeIdentity, bind, identity_from_secret
from node.training.checkpoint import checkpoint_at, latest_checkpoint, load_checkpoint, save_checkpoint
from node.training.worker import StageWorker
from sharding import PRESETS, OptimConfig, load_corpus, partition
from tests.node.conftest import running_host

CFG = PRESETS["tiny"]


def _worker(stage: int = 1, optim: OptimConfig | None = None) -> StageWorker:
    spec = partition(CFG, 2)[stage]
    return StageWorker(CFG, spec, codec="dense", optim=optim or OptimConfig(), num_microbatches=1, microbatch_size=2,
                       corpus=load_corpus("synthetic") if spec.is_first else None)


def _train_step(w: StageWorker, step: int) -> None:
    w.forward(step, 0, w.head_window(step, 0), None)
    w.backward(step, 0, torch.ones(2, CFG.seq_len, CFG.d_model))
    w.step(step)


@pytest.mark.timeout(60)
def test_checkpoint_roundtrip_and_tamper(tmp_path) -> None:
    w = _worker(0)
    window = w.head_window(0, 0)
    w.forward(0, 0, window, None)
    w.backward(0, 0, torch.ones(2, CFG.seq_len, CFG.d_model))
    w.step(0)
    path = save_checkpoint(w, tmp_path)
    assert latest_checkpoint(tmp_path, 0) == path and checkpoint_at(tmp_path, 0, 1) == path
    fresh = _worker(0)
    assert load_checkpoint(fresh, path) == 1
    for (k, a), b in zip(w.module.state_dict().items(), fresh.module.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    s1, s2 = w.optimizer.state_dict()["state"], fresh.optimizer.state_dict()["state"]
    assert all(torch.equal(s1[i]["exp_avg"], s2[i]["exp_avg"]) for i in s1)
    with pytest.raises(CheckpointError, match="stage=0"):
        load_checkpoint(_worker(1), path)
    raw = bytearray((path / "model.safetensors").read_bytes())
    raw[-1] ^= 1
    (path / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(_worker(0), path)


@pytest.mark.timeout(60)
def test_a_muon_checkpoint_resumes_bit_for_bit_and_does_not_load_into_adamw(tmp_path) -> None:
    muon = OptimConfig(optimizer="muon")
    w = _worker(0, muon)
    _train_step(w, 0)
    path = save_checkpoint(w, tmp_path)
    fresh = _worker(0, muon)
    assert load_checkpoint(fresh, path) == 1
    s1, s2 = w.optimizer.state_dict()["state"], fresh.optimizer.state_dict()["state"]
    assert set(s1) == set(s2) and any("momentum_buffer" in st for st in s1.values())
    assert all(torch.equal(s1[i][k], s2[i][k]) for i in s1 for k in s1[i])
    for worker in (w, fresh):
        _train_step(worker, 1)
    for (k, a), b in zip(w.module.state_dict().items(), fresh.module.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(_worker(0), path)  # an AdamW node: other optimiser state


def _ann(pid: str, stage: int, cap: int, spec: str = "aa") -> Announcement:
    return Announcement(peer_id=pid, addrs=(), spec_hash=spec, num_stages=3, stage=stage, capacity=cap)


def test_choose_stage_least_capacity() -> None:
    assert choose_stage([], "aa", 3) == 0
    assert choose_stage([_ann("a", 0, 5), _ann("b", 1, 1)], "aa", 3) == 2
    assert choose_stage([_ann("a", 0, 5), _ann("b", 1, 1), _ann("c", 2, 3)], "aa", 3) == 1
    assert choose_stage([_ann("a", 0, 5), _ann("x", 1, 9, spec="bb")], "aa", 3) == 1  # other model ignored


def test_node_config_validation() -> None:
    NodeConfig().validate()
    with pytest.raises(ValueError, match="stage 5 out of range"):
        NodeConfig(stage="5", num_stages=2).validate()
    with pytest.raises(ValueError, match="'auto' or an integer"):
        NodeConfig(stage="middle").validate()
    bad = NodeConfig()
    bad.transport.credits = 0
    with pytest.raises(ValueError, match="credits"):
        bad.validate()


@pytest.mark.network
@pytest.mark.timeout(60)
def test_gossip_spreads_announcements() -> None:
    cfg = DiscoveryConfig(announce_interval_s=0.05, discovery_timeout_s=10)

    async def main() -> None:
        async with running_host(31) as (h0, i0), running_host(32) as (h1, i1), running_host(33) as (h2, i2), \
                trio.open_nursery() as nursery:
            def me(h, ident: NodeIdentity, stage: int) -> Announcement:
                return Announcement(h.get_id().pretty(), tuple(full_addrs(h)), "aa", 3, stage, 1,
                                    address=ident.address, binding=bind(ident).hex())

            boot = full_addrs(h0)
            d0 = Discovery(h0, me(h0, i0, 0), cfg, [], identity=i0)
            d1 = Discovery(h1, me(h1, i1, 1), cfg, boot, identity=i1)
            d2 = Discovery(h2, me(h2, i2, 2), cfg, boot, identity=i2)
            for d in (d1, d2):
                nursery.start_soon(d.run)
            # node 2 learns about node 1 only through the bootstrap node; the relayed binding still verifies
            found = await d2.wait_for_stage(1)
            assert found.peer_id == h1.get_id().pretty() and found.address == i1.address
            assert (await d1.wait_for_stage(2)).peer_id == h2.get_id().pretty()
            assert {e.stage for e in d0.entries()} == {1, 2}
            with pytest.raises(DiscoveryError, match="no peer serving stage 7"):
                await d2.wait_for_stage(7, timeout_s=0.2)
            nursery.cancel_scope.cancel()

    trio.run(main)


class _StubHost:
    def set_stream_handler(self, protocol: object, handler: object) -> None:
        return None


def test_announcements_unsigned_forged_or_altered_are_dropped() -> None:
    me, a, b = (identity_from_secret((s).to_bytes(32, "big")) for s in (41, 42, 43))

    def ann(ident: NodeIdentity, stage: int, **kw: object) -> Announcement:
        return Announcement(ident.peer_id.pretty(), ("/ip4/127.0.0.1/tcp/1/p2p/" + ident.peer_id.pretty(),), "aa", 3,
                            stage, 1, **kw)  # type: ignore[arg-type]

    async def main() -> None:
        d = Discovery(_StubHost(), Announcement(me.peer_id.pretty(), (), "aa", 3, 0, 1), DiscoveryConfig(), [],
                      identity=me)
        good = ann(a, 1).sign(a)
        replayed = {**good.to_json(), "peer_id": b.peer_id.pretty()}  # a's signature on b's peer id
        altered = {**ann(b, 2).sign(b).to_json(), "capacity": 1000}  # a relay raises the capacity
        moved = {**ann(b, 2).sign(b).to_json(), "stage": 1}  # or the stage
        bad = d._merge([
            good.to_json(),  # signed: kept
            replayed, altered, moved,
            ann(b, 2, address=b.address, binding="0x" + bind(b).hex()).to_json(),  # bound but unsigned
            ann(b, 2).to_json(),  # no address, no signature
            {**ann(b, 2).sign(b).to_json(), "signature": "zz"},  # not hex
        ], sender=a.peer_id.pretty())
        assert [(e.peer_id, e.address) for e in d.entries()] == [(a.peer_id.pretty(), a.address)]
        assert bad == 6 and d.unbound == 6
        assert d.me.address == me.address and d.me.signature  # our own announcement is signed too
        d.me.verify()

    trio.run(main)
