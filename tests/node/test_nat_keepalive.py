"""Keepalive per connection (`node.net.nat.keepalive`) on real hosts: a connection whose path goes silent, as one
through a router that lost its NAT mapping does (no answer, no reset), is closed; a live connection to the same
peer is kept, and new streams take it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import multiaddr
import trio
from libp2p.host.ping import ID as PING_ID
from libp2p.peer.peerinfo import PeerInfo

from node.net.host import full_addrs
from node.net.nat.keepalive import Keepalive, ping_connection
from node.net.nat.paths import peer_conns
from tests.node.conftest import running_host

TIMEOUT_S = 3.0  # one ping round trip in these tests (loopback; generous for a loaded machine)


class FreezableProxy:
    """A TCP forwarder on 127.0.0.1 to `port`; `freeze()` stops moving bytes in both directions and keeps every
    socket open: the far end sees a connection that is established and silent."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.frozen = trio.Event()
        self.listen_port = 0

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream) -> None:
        while True:
            data = await src.receive_some(65536)
            if not data:
                return
            if self.frozen.is_set():
                await trio.sleep_forever()  # hold the bytes: nothing arrives, nothing is refused
            await dst.send_all(data)

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client, await trio.open_tcp_stream("127.0.0.1", self.port) as server:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, server)
                nursery.start_soon(self._pump, server, client)

    def freeze(self) -> None:
        self.frozen.set()

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)


@asynccontextmanager
async def two_hosts() -> AsyncIterator[tuple[Any, Any, trio.Nursery]]:
    async with running_host(201) as (h0, _), running_host(202) as (h1, _), trio.open_nursery() as nursery:
        yield h0, h1, nursery
        nursery.cancel_scope.cancel()


def _port(host: Any) -> int:
    return int(full_addrs(host)[0].split("/")[4])


async def _dial_through(h0: Any, h1: Any, nursery: trio.Nursery) -> FreezableProxy:
    """h0 connects to h1 through a fresh proxy; returns the proxy."""
    proxy = FreezableProxy(_port(h1))
    port = await nursery.start(proxy.run)
    addr = multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{port}")
    await h0.connect(PeerInfo(h1.get_id(), [addr]))
    return proxy


def test_a_silent_connection_is_closed_and_a_live_one_to_the_same_peer_kept() -> None:
    async def main() -> None:
        async with two_hosts() as (h0, h1, nursery):
            peer = h1.get_id()
            proxy = await _dial_through(h0, h1, nursery)
            [old] = peer_conns(h0, peer)
            await ping_connection(old, TIMEOUT_S)  # it works while the path moves bytes
            # h1 reaches h0 again over a new link (as a home does after its router forgot the old mapping)
            # (a second connection of its own: the swarm's dial_addr, as connect() reuses a live one)
            await h1.get_network().dial_addr(multiaddr.Multiaddr(full_addrs(h0)[0].rsplit("/p2p/", 1)[0]),
                                             h0.get_id())
            with trio.fail_after(10):
                while len(peer_conns(h0, peer)) < 2:
                    await trio.sleep(0.01)
            [new] = [c for c in peer_conns(h0, peer) if c is not old]
            proxy.freeze()
            keep = Keepalive(h0, TIMEOUT_S, failures=3)
            await keep.peer(peer)
            # the silent one missed a single ping while the new one answered: closed at once, the new one kept
            assert peer_conns(h0, peer) == [new], keep.closed
            assert len(keep.closed) == 1 and "while another connection answered" in keep.closed[0]
            stream = await h0.new_stream(peer, [PING_ID])
            assert stream.muxed_conn is new.muxed_conn
            await stream.close()

    trio.run(main)


def test_a_lone_silent_connection_is_closed_after_the_configured_misses() -> None:
    async def main() -> None:
        async with two_hosts() as (h0, h1, nursery):
            peer = h1.get_id()
            proxy = await _dial_through(h0, h1, nursery)
            [conn] = peer_conns(h0, peer)
            keep = Keepalive(h0, TIMEOUT_S, failures=2)
            await keep.round()
            assert keep.missed == {} and keep.closed == []  # healthy: nothing counted
            proxy.freeze()
            await keep.round()
            assert peer_conns(h0, peer) == [conn] and keep.missed == {id(conn): 1}
            await keep.round()
            assert peer_conns(h0, peer) == []
            assert len(keep.closed) == 1 and "2 pings missed" in keep.closed[0]
            assert keep.missed == {}

    trio.run(main)
