"""`/pmn/avg` requests on kept-open streams (`node.net.streampool`), over two real libp2p hosts (Noise, yamux).

A request on a kept stream skips the stream's multistream-select negotiation (two round trips); the serving side
holds a stream open for `AvgLimits.keepalive_s` between requests, checks bans before each, and a client whose kept
stream was closed meanwhile runs the request again on a new one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

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
STEP = 4  # the step every request names
GUARD = PeerGuardConfig(ban_score=-100.0, max_streams_per_peer=16)


@dataclass
class Pair:
    """An averaging server (stage 0 of spec "aa", its store) and a client host with a stream pool."""

    store: ContributionStore
    svc: AveragingService
    client: Any
    addr: str
    pool: StreamPool

    async def push(self, mb: int, value: float) -> None:
        """Push microbatch `mb` of STEP (a vector of `value`s) through the pool."""
        await push(self.client, self.addr, "aa", 0, STEP, mb, 0, torch.full((SIZE,), value), None, 5.0, pool=self.pool)

    def open_streams(self) -> int:
        """The client's `/pmn/avg` streams the server holds open now."""
        return int(self.svc.gate.open[self.client.get_id().pretty()])

    async def until_open(self, count: int) -> None:
        """Wait (bounded) until the server holds `count` of the client's streams."""
        with trio.fail_after(5):
            while self.open_streams() != count:
                await trio.sleep(0.01)


def _run(seed: int, body: Callable[[Pair], Awaitable[None]], keepalive_s: float = 30.0,
         pool: StreamPoolConfig | None = None) -> None:
    """`body` on a fresh pair of hosts (keys from seed and seed + 1); the pool is closed afterwards."""
    async def main() -> None:
        async with running_host(seed) as (server, _), running_host(seed + 1) as (client, _):
            store = ContributionStore(SIZE)
            svc = AveragingService(server, "aa", lambda s: store if s == 0 else None, 5.0,
                                   limits=AvgLimits(guard=GUARD, keepalive_s=keepalive_s), scores=PeerScores(GUARD))
            p = Pair(store, svc, client, full_addrs(server)[0], StreamPool(client, AVG_PROTOCOL, pool))
            try:
                await body(p)
            finally:
                await p.pool.close()

    trio.run(main)


def test_requests_to_a_peer_share_one_kept_stream() -> None:
    async def body(p: Pair) -> None:
        for mb in range(3):
            await p.push(mb, mb + 1.0)
        p.store.commit(STEP, {0: 0, 1: 0, 2: 0})
        commit, held = await pull(p.client, p.addr, "aa", 0, STEP, SIZE, 0.0, 5.0, pool=p.pool)
        assert commit == {0: 0, 1: 0, 2: 0} and [float(h.vec[0]) for h in held] == [1.0, 2.0, 3.0]
        assert (p.pool.opened, p.pool.reused, p.pool.retried) == (1, 3, 0)  # four requests, one stream
        assert p.open_streams() == 1  # still open on the serving side
        await p.pool.close()
        await p.until_open(0)  # the server saw the end and let the stream go

    _run(71, body)


def test_a_stream_the_server_closed_for_idleness_is_replaced_and_the_push_lands_once() -> None:
    async def body(p: Pair) -> None:
        await p.push(0, 1.0)
        await p.until_open(0)  # the server closed the idle stream
        await p.push(1, 2.0)
        assert (p.pool.opened, p.pool.retried) == (2, 1)
        assert sorted(p.store.vecs[STEP]) == [(0, 0), (1, 0)] and float(p.store.vecs[STEP][(1, 0)][0]) == 2.0

    _run(73, body, keepalive_s=0.2, pool=StreamPoolConfig(idle_s=60.0))  # the pool keeps it past the keep-alive


def test_a_peer_banned_while_holding_a_kept_stream_is_refused_on_it_and_the_store_keeps_its_state() -> None:
    async def body(p: Pair) -> None:
        await p.push(0, 1.0)
        me = p.client.get_id().pretty()
        for _ in range(100):  # refusals elsewhere (another protocol sharing the scores) ban it meanwhile
            if p.svc.gate.scores.penalize(me, "test"):
                break
        assert p.svc.gate.scores.is_banned(me)
        with pytest.raises((AveragingError, BaseLibp2pError)):  # the door resets the new stream (or its negotiation)
            await p.push(1, 2.0)
        assert list(p.store.vecs[STEP]) == [(0, 0)]  # nothing of the banned peer's request was kept
        assert p.pool.retried == 1  # the kept stream was reset, the new one refused at the door

    _run(75, body)


def test_a_refused_request_does_not_keep_its_stream() -> None:
    async def body(p: Pair) -> None:
        with pytest.raises(AveragingError, match="no contributions of stage 3"):
            await pull(p.client, p.addr, "aa", 3, STEP, SIZE, 0.0, 5.0, pool=p.pool)
        await p.push(0, 1.0)
        assert (p.pool.opened, p.pool.reused) == (2, 0)  # the refused request's stream was not reused
        assert list(p.store.vecs[STEP]) == [(0, 0)]
        assert sum(p.svc.gate.refused.values()) == 0  # an unknown stage is an answer, not a refusal

    _run(77, body)


def test_a_stream_idle_longer_than_the_pool_keeps_it_is_closed_not_reused() -> None:
    async def body(p: Pair) -> None:
        await p.push(0, 1.0)
        await trio.sleep(0.3)  # the kept stream outlives the pool's idle_s (the server would keep it 30 s)
        await p.push(1, 2.0)
        assert (p.pool.opened, p.pool.reused, p.pool.retried) == (2, 0, 0)  # a new stream, the old one closed
        await p.until_open(1)  # only the new stream stays open there
        assert sorted(p.store.vecs[STEP]) == [(0, 0), (1, 0)]

    _run(79, body, pool=StreamPoolConfig(idle_s=0.2))
