"""A contribution may be committed only once a second live replica of the stage holds it (`ReplicaEngine._hold`).

Real libp2p hosts on 127.0.0.1: the pushing replica's engine and a stage peer serving `/pmn/avg/1.0.0`; the
link between them is slowed with the test hook `debug_push_delay_s`.
"""

from __future__ import annotations

import pytest
import torch
import trio

from node.config import NodeConfig
from node.net.discovery import Discovery
from node.net.host import full_addrs
from node.replicas.averaging import AveragingService, ContributionStore, trainable
from tests.node.conftest import running_host
from tests.node.replica_pair import announcement, engine, replica_pair, stage_worker

pytestmark = [pytest.mark.network, pytest.mark.timeout(60)]


def test_a_push_slower_than_the_averaging_deadline_is_still_held_before_commit() -> None:
    async def main() -> None:
        async with running_host(141) as (h0, id0), running_host(142) as (h1, id1):
            pair = replica_pair(h0, id0, h1, id1)
            eng, peer_store, size = pair.eng, pair.peer_store, pair.size
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
            pair = replica_pair(h0, id0, h1, id1)
            eng, peer, peer_store, size = pair.eng, pair.peer, pair.peer_store, pair.size
            eng._peer_failures.clear()
            eng.rc.avg_timeout_s, eng.rc.replica_timeout_s, eng.rc.debug_push_delay_s = 0.2, 1.0, 3.0
            vec = torch.ones(size)
            with trio.fail_after(10):
                assert not await eng._contribute(2, 1, 0, vec, None)  # alive but too slow: not committable
            assert (1, 0) not in peer_store.vecs.get(2, {})
            assert peer.peer_id not in eng._unreachable  # slow is not gone
            assert (1, 0) in eng.store.vecs[2]  # our own copy is kept

    trio.run(main)


def test_a_replica_that_knows_no_stage_peer_asks_the_swarm_before_holding_a_contribution_alone() -> None:
    # a replica that started with its stage peer may not have it in its table yet: holding a contribution alone
    # (and sending the gradient upstream) would lose the committed microbatch if it died (tests/node/test_replica_race.py)
    async def main() -> None:
        async with running_host(145) as (h0, id0), running_host(146) as (h1, id1):
            worker = stage_worker()
            size = sum(p.numel() for p in trainable(worker.module))
            spec_hex = worker.config.spec_hash().hex()
            peer_store = ContributionStore(size)
            AveragingService(h1, spec_hex, lambda s: peer_store if s == 1 else None, 5.0)
            Discovery(h1, announcement(h1, id1, spec_hex, seq=1), NodeConfig().discovery, [], identity=id1)
            eng = engine(h0, id0, worker, None, bootstrap=[full_addrs(h1)[0]])  # knows the peer's address only
            assert eng.discovery.stage_peers(1) == []
            vec = torch.arange(size, dtype=torch.float32)
            with trio.fail_after(20):
                assert await eng._contribute(2, 0, 0, vec, None)
            assert [e.peer_id for e in eng.discovery.stage_peers(1)] == [h1.get_id().pretty()]
            assert torch.equal(peer_store.vecs[2][(0, 0)], vec)  # held by the peer it learned of

    trio.run(main)
