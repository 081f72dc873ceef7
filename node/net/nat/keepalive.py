"""Keepalive per connection: ping each connection to a peer on its own, close only the dead ones.

A router that loses its NAT mapping (it reconnected, or a symmetric NAT re-mapped the home's next
packet to a new port) leaves the home's old connections looking established at the far end: the far
end's packets to the old mapping are dropped, nothing is answered and no reset comes back. The home,
meanwhile, reconnects over a new mapping, so its peers hold two connections to it: the dead one and
a live one. py-libp2p opens new streams on the connection with the most streams (`Swarm._best_connection`,
go-libp2p's `isBetterConn`), which is the dead one, whose stuck streams are never released; and closing
every connection of a peer that misses pings also closes the live one (and with it, at a relay, the
peer's reservation: relay v2 honours a reservation only while its peer is connected).

So `Keepalive.round` pings every connection of every connected peer separately (a ping stream opened on
that connection, `SwarmConn.new_stream`, protocol negotiated with py-libp2p's multiselect client) and
closes a connection that missed `failures` pings in a row, or, at its first miss, when another
connection to the same peer answered in the same round (the peer evidently reached us again over a
new link). A busy connection is not mistaken for a dead one: yamux's per-stream windows bound what is queued
ahead of a ping (a few hundred KiB per stream), far below what `keepalive_timeout_s` carries on a home link.
Upstream would need: a swarm that retires a connection whose streams stall, or a
stream-opening hook that picks among live connections.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import trio
from libp2p.host.ping import ID as PING_ID
from libp2p.host.ping import PING_LENGTH
from libp2p.peer.id import ID
from libp2p.protocol_muxer.multiselect_client import MultiselectClient
from libp2p.protocol_muxer.multiselect_communicator import MultiselectCommunicator

from node.net.gate import close_quietly
from node.net.nat.paths import peer_conns

MAX_CLOSED = 8  # "closed a connection" events kept for the status


async def ping_connection(conn: Any, timeout_s: float) -> None:
    """One ping round trip on this very connection (raises on failure or after `timeout_s`)."""
    with trio.fail_after(timeout_s):
        stream = await conn.new_stream()
        try:
            await MultiselectClient().select_one_of([PING_ID], MultiselectCommunicator(stream), max(1, int(timeout_s)))
            payload = secrets.token_bytes(PING_LENGTH)
            await stream.write(payload)
            got = b""
            while len(got) < PING_LENGTH:
                chunk = await stream.read(PING_LENGTH - len(got))
                if not chunk:
                    raise ConnectionError("ping stream closed")
                got += chunk
            if got != payload:
                raise ConnectionError("ping answered with other bytes")
        finally:
            with trio.move_on_after(timeout_s) as scope:
                scope.shield = True
                await close_quietly(stream)


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class Keepalive:
    """Missed pings per connection, and the connections closed for them (see the module doc)."""

    def __init__(self, host: Any, timeout_s: float, failures: int) -> None:
        self.host = host
        self.timeout_s = timeout_s  # one ping round trip
        self.failures = failures  # misses in a row before a connection is closed (1 when superseded)
        self.missed: dict[int, int] = {}  # id(connection) -> pings missed in a row
        self.closed: list[str] = []  # the latest "closed a connection of <peer>: <why>" events

    async def _check(self, conn: Any, answered: list[Any], misses: list[tuple[Any, str]]) -> None:
        try:
            await ping_connection(conn, self.timeout_s)
            answered.append(conn)
        except Exception as exc:  # timeout, reset, refused stream: a missed ping
            misses.append((conn, _why(exc)))

    async def _close(self, peer: ID, conn: Any, why: str) -> None:
        self.missed.pop(id(conn), None)
        self.closed = (self.closed + [f"{time.strftime('%H:%M:%S')} closed a connection of {peer.pretty()}: "
                                      f"{why}"])[-MAX_CLOSED:]
        with trio.move_on_after(self.timeout_s):
            try:
                await conn.close()
            except Exception:  # already half gone
                pass

    async def peer(self, peer: ID) -> None:
        """Ping each connection to `peer` at once; close those that are dead (module doc)."""
        conns = peer_conns(self.host, peer)
        answered: list[Any] = []
        misses: list[tuple[Any, str]] = []
        async with trio.open_nursery() as nursery:
            for conn in conns:
                nursery.start_soon(self._check, conn, answered, misses)
        for conn in answered:
            self.missed.pop(id(conn), None)
        for conn, why in misses:
            n = self.missed[id(conn)] = self.missed.get(id(conn), 0) + 1
            if answered:
                await self._close(peer, conn, f"missed a ping ({why}) while another connection answered")
            elif n >= self.failures:
                await self._close(peer, conn, f"{n} pings missed ({why})")

    async def round(self) -> None:
        """Check every connected peer once, all at the same time; forget the misses of vanished connections."""
        async with trio.open_nursery() as nursery:
            for peer in self.host.get_connected_peers():
                nursery.start_soon(self.peer, peer)
        live = {id(c) for p in self.host.get_connected_peers() for c in peer_conns(self.host, p)}
        for key in [k for k in self.missed if k not in live]:
            del self.missed[key]
