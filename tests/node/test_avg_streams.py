"""`/pmn/avg` requests on kept-open streams (`node.net.streampool`), over two real libp2p hosts (Noise, yamux).

A request on a kept stream skips the stream's multistream-select negotiation (two round trips); the serving side
holds a stream open for `AvgLimits.keepalive_s` between requests, checks bans before each, and a client whose kept
stream was closed meanwhile runs the request again on a new one.
"""

from __future__ import annotations

import pytest
import torch
import trio
from libp2p.exceptions import BaseLibp2pError

from node.errors import AveragingError
from node.net.host import full_addrs
from node.net.peerscore import PeerGuardConfig, PeerScores
from node.net.streampool import StreamPool, StreamPoolConfig
from node.replicas.averaging import AVG_PROTOCOL, AveragingService, AvgLimits, ContributionStore, pull, push
from tests.node.conftest import running_host

SIZE = 6  # words of a contribution
GUARD = PeerGuardConfig(ban_score=-100.0, max_streams_per_peer=16)


def _serve(host, store: ContributionStore, keepalive_s: float = 30.0) -> AveragingService:
    return AveragingService(host, "aa", lambda s: store if s == 0 else None, 5.0,
                            limits=AvgLimits(guard=GUARD, keepalive_s=keepalive_s), scores=PeerScores(GUARD))


def _vec(value: float) -> torch.Tensor:
    return torch.full((SIZE,), value)


def test_requests_to_a_peer_share_one_kept_stream() -> None:
    store = ContributionStore(SIZE)

    async def main() -> None:
        async with running_host(71) as (server, _), running_host(72) as (client, _):
            svc = _serve(server, store)
            addr = full_addrs(server)[0]
            pool = StreamPool(client, AVG_PROTOCOL)
            for mb in range(3):
                await push(client, addr, "aa", 0, 4, mb, 0, _vec(mb + 1.0), None, 5.0, pool=pool)
            store.commit(4, {0: 0, 1: 0, 2: 0})
            commit, held = await pull(client, addr, "aa", 0, 4, SIZE, 0.0, 5.0, pool=pool)
            assert commit == {0: 0, 1: 0, 2: 0} and [float(h.vec[0]) for h in held] == [1.0, 2.0, 3.0]
            assert (pool.opened, pool.reused, pool.retried) == (1, 3, 0)  # four requests, one stream
            assert svc.gate.open[client.get_id().pretty()] == 1  # still open on the serving side
            await pool.close()
            with trio.fail_after(5):
                while svc.gate.open[client.get_id().pretty()]:  # the server saw the end and let the stream go
                    await trio.sleep(0.01)

    trio.run(main)


def test_a_stream_the_server_closed_for_idleness_is_replaced_and_the_push_lands_once() -> None:
    store = ContributionStore(SIZE)

    async def main() -> None:
        async with running_host(73) as (server, _), running_host(74) as (client, _):
            svc = _serve(server, store, keepalive_s=0.2)
            addr = full_addrs(server)[0]
            pool = StreamPool(client, AVG_PROTOCOL, StreamPoolConfig(idle_s=60.0))  # keeps it past the keep-alive
            await push(client, addr, "aa", 0, 4, 0, 0, _vec(1.0), None, 5.0, pool=pool)
            with trio.fail_after(5):
                while svc.gate.open[client.get_id().pretty()]:  # the server closed the idle stream
                    await trio.sleep(0.01)
            await push(client, addr, "aa", 0, 4, 1, 0, _vec(2.0), None, 5.0, pool=pool)
            assert (pool.opened, pool.retried) == (2, 1)
            assert sorted(store.vecs[4]) == [(0, 0), (1, 0)] and float(store.vecs[4][(1, 0)][0]) == 2.0
            await pool.close()

    trio.run(main)


def test_a_peer_banned_while_holding_a_kept_stream_is_refused_on_it_and_the_store_keeps_its_state() -> None:
    store = ContributionStore(SIZE)

    async def main() -> None:
        async with running_host(75) as (server, _), running_host(76) as (client, _):
            svc = _serve(server, store)
            addr = full_addrs(server)[0]
            pool = StreamPool(client, AVG_PROTOCOL)
            await push(client, addr, "aa", 0, 4, 0, 0, _vec(1.0), None, 5.0, pool=pool)
            me = client.get_id().pretty()
            for _ in range(100):  # refusals elsewhere (another protocol sharing the scores) ban it meanwhile
                if svc.gate.scores.penalize(me, "test"):
                    break
            assert svc.gate.scores.is_banned(me)
            with pytest.raises((AveragingError, BaseLibp2pError)):  # the door resets the new stream (or its negotiation)
                await push(client, addr, "aa", 0, 4, 1, 0, _vec(2.0), None, 5.0, pool=pool)
            assert list(store.vecs[4]) == [(0, 0)]  # nothing of the banned peer's request was kept
            assert pool.retried == 1  # the kept stream was reset, the new one refused at the door
            await pool.close()

    trio.run(main)


def test_a_refused_request_does_not_keep_its_stream() -> None:
    store = ContributionStore(SIZE)

    async def main() -> None:
        async with running_host(77) as (server, _), running_host(78) as (client, _):
            svc = _serve(server, store)
            addr = full_addrs(server)[0]
            pool = StreamPool(client, AVG_PROTOCOL)
            with pytest.raises(AveragingError, match="no contributions of stage 3"):
                await pull(client, addr, "aa", 3, 4, SIZE, 0.0, 5.0, pool=pool)
            await push(client, addr, "aa", 0, 4, 0, 0, _vec(1.0), None, 5.0, pool=pool)
            assert (pool.opened, pool.reused) == (2, 0)  # the refused request's stream was not reused
            assert list(store.vecs[4]) == [(0, 0)]
            assert sum(svc.gate.refused.values()) == 0  # an unknown stage is an answer, not a refusal
            await pool.close()

    trio.run(main)


def test_a_stream_idle_longer_than_the_pool_keeps_it_is_closed_not_reused() -> None:
    store = ContributionStore(SIZE)

    async def main() -> None:
        async with running_host(79) as (server, _), running_host(80) as (client, _):
            svc = _serve(server, store)
            addr = full_addrs(server)[0]
            pool = StreamPool(client, AVG_PROTOCOL, StreamPoolConfig(idle_s=0.2))
            await push(client, addr, "aa", 0, 4, 0, 0, _vec(1.0), None, 5.0, pool=pool)
            await trio.sleep(0.3)  # the kept stream outlives the pool's idle_s (the server would keep it 30 s)
            await push(client, addr, "aa", 0, 4, 1, 0, _vec(2.0), None, 5.0, pool=pool)
            assert (pool.opened, pool.reused, pool.retried) == (2, 0, 0)  # a new stream, the old one closed
            with trio.fail_after(5):
                while svc.gate.open[client.get_id().pretty()] != 1:  # only the new stream stays open there
                    await trio.sleep(0.01)
            assert sorted(store.vecs[4]) == [(0, 0), (1, 0)]
            await pool.close()

    trio.run(main)
