"""A stage peer in backoff still receives contributions: one background push at a time (`probe_loop`).

Real libp2p hosts on 127.0.0.1: the pushing replica's engine, and a stage peer serving
`/pmn/avg/1.0.0` whose earlier exchange failed (it is in backoff).
"""

from __future__ import annotations

import pytest
import torch
import trio

from node.config import NodeConfig
from node.net.discovery import Announcement, Discovery
from node.net.host import full_addrs
from node.net.identity import bind
from node.replicas.averaging import AveragingService, ContributionStore, trainable
from node.replicas.engine import ReplicaEngine
from node.training.worker import StageWorker
from node.wire.channel import ActEndpoint, LocalInfo
from sharding import PRESETS, OptimConfig, partition
from tests.node.conftest import running_host
from tests.waiting import until

pytestmark = [pytest.mark.network, pytest.mark.timeout(60)]


def _worker() -> StageWorker:
    cfg = PRESETS["tiny"]
    return StageWorker(cfg, partition(cfg, 3)[1], codec="dense", optim=OptimConfig(), num_microbatches=2,
                       microbatch_size=2, corpus=None)


def _announcement(host, ident, spec_hex: str, seq: int = 0) -> Announcement:
    """A stage-1 announcement of `host` signed by its node key."""
    return Announcement(peer_id=host.get_id().pretty(), addrs=tuple(full_addrs(host)), spec_hash=spec_hex,
                        num_stages=3, stage=1, capacity=1, address=ident.address, binding="0x" + bind(ident).hex(),
                        seq=seq).sign(ident)


def _engine(host, ident, worker: StageWorker, peer: Announcement) -> ReplicaEngine:
    """A stage-1 replica engine on `host` whose discovery knows `peer`, which is in backoff."""
    cfg = NodeConfig(num_stages=3, stage="1")
    discovery = Discovery(host, _announcement(host, ident, peer.spec_hash), cfg.discovery, [], identity=ident)
    discovery._merge([peer.to_json()])
    endpoint = ActEndpoint(host, local=LocalInfo(worker.config.spec_hash(), 1, 3, ident.address, bind(ident)),
                           frame_spec=worker.frame_spec(cfg.transport.max_frame_bytes), cfg=cfg.transport)
    size = sum(p.numel() for p in trainable(worker.module))
    eng = ReplicaEngine(cfg, worker, endpoint, discovery, host, ContributionStore(size))
    eng._peer_failed(peer.peer_id)  # its last exchange failed
    return eng


def test_a_stage_peer_in_backoff_gets_the_contribution_in_the_background_and_leaves_backoff() -> None:
    async def main() -> None:
        async with running_host(131) as (h0, id0), running_host(132) as (h1, id1), trio.open_nursery() as nursery:
            worker = _worker()
            size = sum(p.numel() for p in trainable(worker.module))
            spec_hex = worker.config.spec_hash().hex()
            peer_store = ContributionStore(size)
            AveragingService(h1, spec_hex, lambda s: peer_store if s == 1 else None, 5.0)
            peer = _announcement(h1, id1, spec_hex, seq=1)
            eng = _engine(h0, id0, worker, peer)
            assert eng._stage_peers() == []  # so pushes do not wait for it
            nursery.start_soon(eng.probe_loop)
            vec = torch.arange(size, dtype=torch.float32)
            with trio.fail_after(10):
                assert await eng._contribute(3, 0, 0, vec, None)  # not waited for, but held by it before commit
            await until(lambda: (0, 0) in peer_store.vecs.get(3, {}), 10, "the background push to reach the peer")
            await until(lambda: peer.peer_id not in eng._probing, 10, "the probe to finish")
            assert torch.equal(peer_store.vecs[3][(0, 0)], vec)
            assert peer.peer_id not in eng._peer_failures  # it answered: out of backoff
            assert [e.peer_id for e in eng._stage_peers()] == [peer.peer_id]
            with trio.fail_after(10):
                await eng._contribute(3, 1, 0, vec + 1, None)  # pushed and waited for as usual now
            assert torch.equal(peer_store.vecs[3][(1, 0)], vec + 1)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_dead_stage_peer_in_backoff_stays_there_and_is_probed_once_at_a_time() -> None:
    async def main() -> None:
        async with running_host(133) as (h0, id0), trio.open_nursery() as nursery:
            worker = _worker()
            size = sum(p.numel() for p in trainable(worker.module))
            async with running_host(134) as (h1, id1):  # a peer that was announced and then went away
                dead = _announcement(h1, id1, worker.config.spec_hash().hex(), seq=1)
            eng = _engine(h0, id0, worker, dead)
            vec = torch.zeros(size)
            assert await eng._contribute(4, 0, 0, vec, None)  # nobody else alive holds it: committable alone
            assert dead.peer_id in eng._unreachable  # the hold's push could not reach it
            assert await eng._contribute(4, 1, 0, vec, None)  # not dialled again; a probe is already queued
            assert eng._probing == {dead.peer_id}
            nursery.start_soon(eng.probe_loop)
            await until(lambda: not eng._probing, 30, "the probe of the dead peer to finish",
                        detail=lambda: eng._probing)
            assert eng._peer_failures[dead.peer_id][0] == 3  # the hold's push and the probe failed: longer backoff
            assert eng.store.vecs[4].keys() == {(0, 0), (1, 0)}  # our own contributions are kept regardless
            nursery.cancel_scope.cancel()

    trio.run(main)
