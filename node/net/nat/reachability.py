"""Whether this node is publicly dialable: AutoNAT v1 (`/libp2p/autonat/1.0.0`) dial-backs by its peers.

`DialBackAutoNAT` serves dial-back requests with a *new* TCP connection to each offered address (on the
IP the requester is observed at), closed at once. py-libp2p 0.8.1's `AutoNATService._try_dial` calls
`host.connect`, which returns at once when a connection to the peer exists, and the request itself
always arrives over one, so every requester is told it is public. Dialing back through the swarm
instead (`Swarm.dial_addr`, then closing that connection) adds and drops a second connection to a peer
we serve; in our namespace runs that broke the peer's other connections (relay reservation, relayed
activation streams) within seconds, so the dial-back stays outside the swarm: it proves that the port
opens from outside, which is what reachability means here. Upstream would need: a dial-back on a
separate, unregistered connection.

`Reachability` asks up to `autonat_peers` connected peers per check and decides once
`autonat_confirmations` verdicts agree: OK votes public; a failed or refused dial-back (the server
dials only addresses on the IP it observes us at, so a node behind NAT, whose addresses are private, is
refused) votes private. A peer that does not answer gives no verdict.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import trio
from libp2p.host.autonat.autonat import AutoNATService
from libp2p.host.autonat.pb.autonat_pb2 import Message
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from node.config import NatConfig
from node.net.nat.paths import is_circuit

UNKNOWN = "unknown"  # no verdict yet (no peer answered)
PUBLIC = "public"  # peers dialed us back
PRIVATE = "private"  # peers could not dial us back: behind NAT or a firewall


class DialBackAutoNAT(AutoNATService):
    """AutoNAT service that dials back on a fresh connection, bounded by `dial_timeout_s` per address."""

    def __init__(self, host: Any, dial_timeout_s: float, serve: bool = True) -> None:
        super().__init__(host, serve=serve, confirmations=1)
        self.dial_timeout_s = dial_timeout_s

    async def _try_dial(self, peer_id: ID, addrs: list[bytes]) -> bytes | None:
        for raw in addrs:
            target = _tcp_target(Multiaddr(raw))
            if target is None:
                continue
            try:
                with trio.fail_after(self.dial_timeout_s):
                    stream = await trio.open_tcp_stream(*target)
            except (OSError, trio.TooSlowError):  # not dialable at this address
                continue
            await stream.aclose()
            return bytes(raw)
        return None


def _tcp_target(addr: Multiaddr) -> tuple[str, int] | None:
    """(ip, port) of an /ip4|ip6/.../tcp/... address, None for anything else."""
    try:
        port = int(addr.value_for_protocol("tcp"))
    except Exception:  # no tcp component
        return None
    for proto in ("ip4", "ip6"):
        try:
            return str(addr.value_for_protocol(proto)), port
        except Exception:  # not this family
            continue
    return None


class Reachability:
    """This node's verdict (`state`: unknown / public / private), why (`reason`), and each peer's last vote."""

    def __init__(self, host: Any, cfg: NatConfig) -> None:
        self.host = host
        self.cfg = cfg
        self.autonat = DialBackAutoNAT(host, dial_timeout_s=cfg.autonat_timeout_s)
        self.state = UNKNOWN if cfg.reachability == "auto" else cfg.reachability
        self.reason = "not checked yet" if cfg.reachability == "auto" else "forced by nat.reachability"
        self.votes: dict[str, str] = {}  # peer id -> PUBLIC / PRIVATE (its last verdict about us)
        self.checks = 0  # checks run

    def _offer(self) -> list[bytes]:
        return [a.to_bytes() for a in self.host.get_addrs() if not is_circuit(a)]

    async def ask(self, peer: ID) -> str | None:
        """One peer's verdict (PUBLIC / PRIVATE), or None when it gave none (no answer, no AutoNAT)."""
        try:
            with trio.fail_after(self.cfg.autonat_timeout_s * 2):
                status, _addr = await self.autonat.query_server(peer, self._offer(), timeout=self.cfg.autonat_timeout_s)
        except Exception:  # no verdict from this peer
            return None
        if status == Message.OK:
            return PUBLIC
        if status in (Message.E_DIAL_ERROR, Message.E_DIAL_REFUSED):
            return PRIVATE
        return None

    async def check(self, peers: Sequence[ID]) -> str:
        """Ask up to `autonat_peers` of `peers`; update and return `state` (forced states never change)."""
        if self.cfg.reachability != "auto":
            return self.state
        self.checks += 1
        asked = [p for p in peers if p != self.host.get_id()][: self.cfg.autonat_peers]
        for peer in asked:
            vote = await self.ask(peer)
            if vote is not None:
                self.votes[peer.pretty()] = vote
        public = sum(v == PUBLIC for v in self.votes.values())
        private = sum(v == PRIVATE for v in self.votes.values())
        need = self.cfg.autonat_confirmations
        if public >= need and public >= private:
            self.state, self.reason = PUBLIC, f"{public} peer(s) dialed us back"
        elif private >= need:
            self.state, self.reason = PRIVATE, f"{private} peer(s) could not dial us back"
        elif not asked:
            self.reason = "no peer to ask"
        else:
            self.reason = f"{len(asked)} peer(s) asked, {public + private} verdict(s), {need} needed"
        return self.state
