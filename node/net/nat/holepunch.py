"""Hole punching: DCUtR (`/libp2p/dcutr`) upgrades a relayed connection to a direct one where the NATs allow.

py-libp2p 0.8.1's `DCUtRProtocol` does the exchange (CONNECT with observed addresses predicted as
<router's address>:<our listen port>, SYNC, simultaneous TCP dials bound to the listen port, one
connection kept per simultaneous open) and closes the relayed leg after a grace period. Its own
auto-drive loop (every 2 s, at most 3 attempts, hard-coded) is replaced here: `NodeDCUtR` has none, and
`HolePuncher.upgrade` is called right after a relayed dial (`NatHost.upgrader`), bounded by
`holepunch_timeout_s`, then retried in the background `holepunch_retries` times with a doubling
`holepunch_backoff_s`. Each peer's outcome and the reason of the last failure go to the status.

Known bug: the timeout cancels `initiate_hole_punch`, and a cancel that lands inside a write on the relayed
stream leaves trio's socket stream to the relay in an unknown state (its `send_all` was cut), which can break
every circuit over it. A very short `holepunch_timeout_s` (the removed 50 ms fault test) made that likely. The
fix needs a hook py-libp2p 0.8.1 lacks: the DCUtR stream (to reset it instead of cancelling I/O) or a
per-attempt deadline inside `DCUtRProtocol`.
"""

from __future__ import annotations

from typing import Any

import trio
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol

from node.config import NatConfig
from node.net.nat.paths import DIRECT, PUNCHED, RELAYED, peer_path


class NodeDCUtR(DCUtRProtocol):
    """DCUtR without py-libp2p's fixed auto-drive loop: the node decides when to punch (HolePuncher)."""

    async def _auto_drive_loop(self) -> None:
        return


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

    async def attempt(self, peer: ID) -> bool:
        """One DCUtR attempt bounded by `holepunch_timeout_s`; True when a direct connection exists after it."""
        key = peer.pretty()
        self.attempts[key] = self.attempts.get(key, 0) + 1
        ok = False
        with trio.move_on_after(self.cfg.holepunch_timeout_s) as scope:
            try:
                ok = await self.dcutr.initiate_hole_punch(peer)
            except Exception as exc:  # the relayed connection went away mid-exchange
                self.results[key] = f"punch failed: {exc}"
                return False
        if scope.cancelled_caught:
            self.results[key] = f"punch timed out after holepunch_timeout_s={self.cfg.holepunch_timeout_s}"
            return False
        if ok and peer_path(self.host, peer) == DIRECT:
            self.results[key] = PUNCHED
            return True
        self.results[key] = "punch failed: no direct connection (NAT mapping not reachable)"
        return False

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
