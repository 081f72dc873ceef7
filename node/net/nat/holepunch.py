"""Hole punching: DCUtR (`/libp2p/dcutr`) upgrades a relayed connection to a direct one where the NATs allow.

py-libp2p 0.8.1's `DCUtRProtocol` does the exchange (CONNECT with observed addresses predicted as
<router's address>:<our listen port>, SYNC, simultaneous TCP dials bound to the listen port, one
connection kept per simultaneous open) and closes the relayed leg after a grace period. Its own
auto-drive loop (every 2 s, at most 3 attempts, hard-coded) is replaced here: `NodeDCUtR` has none, and
`HolePuncher.upgrade` is called right after a relayed dial (`NatHost.upgrader`), then retried in the
background `holepunch_retries` times with a doubling `holepunch_backoff_s`. Each peer's outcome and the reason
of the last failure go to the status.

An attempt is never cancelled from outside. Cancelling `initiate_hole_punch` could land inside a write on the
relayed stream (trio's `send_all` cut mid-frame leaves the Noise/yamux connection to the relay corrupt, which
breaks every circuit over it). Instead each attempt runs as its own task in the NAT service's nursery, bounded
by the library's own per-operation timeouts (`holepunch_io_timeout_s`, `holepunch_dial_timeout_s`); the dial
that asked for it waits at most `holepunch_timeout_s` and goes on relayed ("punch timed out"), and an attempt
that succeeds later still upgrades the link. (Upstream hook that would allow a hard deadline: a way to reach the
DCUtR stream, or a per-attempt deadline in `DCUtRProtocol` that resets the stream instead of cancelling I/O.)
"""

from __future__ import annotations

from typing import Any

import trio
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol

from node.config import NatConfig
from node.net.nat.errors import HolePunchError
from node.net.nat.paths import DIRECT, PUNCHED, RELAYED, peer_path


class NodeDCUtR(DCUtRProtocol):
    """DCUtR without py-libp2p's fixed auto-drive loop (the node decides when to punch: HolePuncher) and without
    its unilateral direct dial before the exchange: `NatHost.connect` has just tried the peer's direct addresses
    (`direct_dial_timeout_s`) before going through the relay, and a second try, to an address a home router
    silently drops, used up the whole `holepunch_dial_timeout_s` before the punch even began (the dial's wait,
    `holepunch_timeout_s`, then ran out first)."""

    async def _auto_drive_loop(self) -> None:
        return

    async def _try_unilateral_upgrade(self, peer_id: ID) -> bool:
        return False


class HolePuncher:
    """Upgrades relayed peers to direct connections; `results` maps peer id -> outcome / last failure."""

    def __init__(self, host: Any, cfg: NatConfig, dcutr: DCUtRProtocol) -> None:
        self.host = host
        self.cfg = cfg
        self.dcutr = dcutr
        self.results: dict[str, str] = {}  # peer id -> PUNCHED, or why it is still relayed
        self.attempts: dict[str, int] = {}  # peer id -> attempts made
        self.nursery: trio.Nursery | None = None  # where background retries run (set by the NAT service)
        self._retrying: set[str] = set()
        self._inflight: dict[str, trio.Event] = {}  # peer id -> set when its running attempt ends
        self._waiting = 0  # dials waiting on an attempt right now
        self._none_waiting = trio.Event()  # set while no dial waits (see `settle`)
        self._none_waiting.set()

    def outcomes(self) -> dict[str, str]:
        """Each attempted peer's outcome as of now: PUNCHED once a direct connection to it exists (an attempt the
        dial stopped waiting for may have upgraded the link since), else its last result."""
        return {key: PUNCHED if peer_path(self.host, ID.from_base58(key)) == DIRECT else why
                for key, why in self.results.items()}

    async def attempt(self, peer: ID) -> bool:
        """One DCUtR attempt, waited for at most `holepunch_timeout_s`; True when a direct connection exists.

        The attempt runs in its own task (see the module doc) and is never cancelled; while one is in flight for
        `peer`, a new call waits on it instead of starting another."""
        key = peer.pretty()
        done = self._inflight.get(key)
        if done is None:
            if self.nursery is None:
                raise HolePunchError("HolePuncher.nursery is not set: the NAT service sets it before any dial")
            self.attempts[key] = self.attempts.get(key, 0) + 1
            done = self._inflight[key] = trio.Event()
            self.nursery.start_soon(self._run_attempt, peer, done)
        if self._waiting == 0:
            self._none_waiting = trio.Event()
        self._waiting += 1
        try:
            with trio.move_on_after(self.cfg.holepunch_timeout_s):
                await done.wait()
        finally:  # also when the dial itself is cancelled: it goes on (or gives up) without the punch
            if not done.is_set():
                self.results[key] = (f"punch timed out after holepunch_timeout_s={self.cfg.holepunch_timeout_s} "
                                     f"(still relayed)")
            self._waiting -= 1
            if self._waiting == 0:
                self._none_waiting.set()
        return done.is_set() and self.results.get(key) == PUNCHED

    async def settle(self) -> None:
        """Wait until no dial waits on an attempt, so that a status written next says how each punch a dial asked
        for ended. A short run can finish training over the relayed connection while the dial that opened it still
        waits on its punch (the neighbour opened its streams on the connection meanwhile): without this, the last
        status would name no outcome at all. Each dial waits at most `holepunch_timeout_s` and records its outcome
        when it stops; the cap of twice that only matters if new dials keep starting."""
        with trio.move_on_after(2 * self.cfg.holepunch_timeout_s):
            await self._none_waiting.wait()

    async def _run_attempt(self, peer: ID, done: trio.Event) -> None:
        key = peer.pretty()
        try:
            try:
                ok = await self.dcutr.initiate_hole_punch(peer)
                why = ("no direct connection (NAT mapping not reachable)" if ok is False
                       else "DCUtR reported success but no direct connection exists")
            except Exception as exc:  # the relayed connection went away mid-exchange
                why = str(exc) or type(exc).__name__
            # direct either way: our dial, or the peer's simultaneous one that won the open (DCUtR then reports
            # failure on our side although the link was upgraded)
            if peer_path(self.host, peer) == DIRECT:
                self.results[key] = PUNCHED
            else:
                self._failed(key, why)
        finally:
            self._inflight.pop(key, None)
            done.set()

    def _failed(self, key: str, why: str) -> None:
        """Record a failed attempt; one whose dial already gave up keeps saying so first ("punch timed out ...")."""
        before = self.results.get(key, "")
        if before.startswith("punch timed out"):
            self.results[key] = f"{before.split(';', 1)[0]}; then failed: {why}"
        else:
            self.results[key] = f"punch failed: {why}"

    async def upgrade(self, peer: ID) -> None:
        """After a relayed dial: one attempt now; on failure, retries in the background with backoff."""
        if not self.cfg.holepunch or peer_path(self.host, peer) == DIRECT and self.results.get(peer.pretty()):
            return
        if await self.attempt(peer):
            return
        key = peer.pretty()
        if self.nursery is not None and key not in self._retrying and self.cfg.holepunch_retries > 0:
            self._retrying.add(key)
            self.nursery.start_soon(self._retry, peer)

    async def _retry(self, peer: ID) -> None:
        key = peer.pretty()
        backoff = self.cfg.holepunch_backoff_s
        try:
            for _ in range(self.cfg.holepunch_retries):
                await trio.sleep(backoff)
                backoff *= 2
                if peer_path(self.host, peer) != RELAYED:  # disconnected, or direct by now
                    return
                if await self.attempt(peer):
                    return
        finally:
            self._retrying.discard(key)
