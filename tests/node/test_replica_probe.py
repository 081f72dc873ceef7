"""A stage peer in backoff still receives contributions: one background push at a time (`probe_loop`).

Real libp2p hosts on 127.0.0.1: the pushing replica's engine, and a stage peer serving
`/pmn/avg/1.0.0` whose earlier exchange failed (it is in backoff).
"""

from __future__ import annotations

import pytest
import torch
import trio

from node.replicas.averaging import trainable
from tests.node.conftest import running_host
from tests.node.replica_pair import announcement, engine, replica_pair, stage_worker
from tests.waiting import until

pytestmark = [pytest.mark.network, pytest.mark.timeout(60)]


def test_a_stage_peer_in_backoff_gets_the_contribution_in_the_background_and_leaves_backoff() -> None:
    async def main() -> None:
        async with running_host(131) as (h0, id0), running_host(132) as (h1, id1), trio.open_nursery() as nursery:
            pair = replica_pair(h0, id0, h1, id1)
            eng, peer, peer_store, size = pair.eng, pair.peer, pair.peer_store, pair.size
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
            worker = stage_worker()
            size = sum(p.numel() for p in trainable(worker.module))
            async with running_host(134) as (h1, id1):  # a peer that was announced and then went away
                dead = announcement(h1, id1, worker.config.spec_hash().hex(), seq=1)
            eng = engine(h0, id0, worker, dead)
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
