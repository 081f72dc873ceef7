"""A contribution may be committed only once a second live replica of the stage holds it (`ReplicaEngine._hold`).

Real libp2p hosts on 127.0.0.1: the pushing replica's engine and a stage peer serving `/pmn/avg/1.0.0`; the
link between them is slowed with the test hook `debug_push_delay_s`.
"""

from __future__ import annotations

import pytest
import torch
import trio

from node.replicas.averaging import AveragingService, ContributionStore, trainable
from tests.node.conftest import running_host
from tests.node.test_replica_probe import _announcement, _engine, _worker

pytestmark = [pytest.mark.network, pytest.mark.timeout(60)]


def test_a_push_slower_than_the_averaging_deadline_is_still_held_before_commit() -> None:
    async def main() -> None:
        async with running_host(141) as (h0, id0), running_host(142) as (h1, id1):
            worker = _worker()
            size = sum(p.numel() for p in trainable(worker.module))
            spec_hex = worker.config.spec_hash().hex()
            peer_store = ContributionStore(size)
            AveragingService(h1, spec_hex, lambda s: peer_store if s == 1 else None, 5.0)
            peer = _announcement(h1, id1, spec_hex, seq=1)
            eng = _engine(h0, id0, worker, peer)
            eng._peer_failures.clear()  # a usable peer
            eng.rc.avg_timeout_s, eng.rc.replica_timeout_s, eng.rc.debug_push_delay_s = 0.2, 5.0, 0.5
            vec = torch.arange(size, dtype=torch.float32)
            t0 = trio.current_time()
            assert await eng._contribute(2, 0, 0, vec, None)  # the first push missed avg_timeout_s; _hold did not
            assert trio.current_time() - t0 >= 0.5
            assert torch.equal(peer_store.vecs[2][(0, 0)], vec)  # held by the peer before the gradient may go up

    trio.run(main)


def test_a_peer_slower_than_the_replica_timeout_means_the_gradient_is_not_sent() -> None:
    async def main() -> None:
        async with running_host(143) as (h0, id0), running_host(144) as (h1, id1):
            worker = _worker()
            size = sum(p.numel() for p in trainable(worker.module))
            spec_hex = worker.config.spec_hash().hex()
            peer_store = ContributionStore(size)
            AveragingService(h1, spec_hex, lambda s: peer_store if s == 1 else None, 5.0)
            peer = _announcement(h1, id1, spec_hex, seq=1)
            eng = _engine(h0, id0, worker, peer)
            eng._peer_failures.clear()
            eng.rc.avg_timeout_s, eng.rc.replica_timeout_s, eng.rc.debug_push_delay_s = 0.2, 1.0, 3.0
            vec = torch.ones(size)
            with trio.fail_after(10):
                assert not await eng._contribute(2, 1, 0, vec, None)  # alive but too slow: not committable
            assert (1, 0) not in peer_store.vecs.get(2, {})
            assert peer.peer_id not in eng._unreachable  # slow is not gone
            assert (1, 0) in eng.store.vecs[2]  # our own copy is kept

    trio.run(main)
