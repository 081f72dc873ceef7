"""A host whose `connect` also reaches peers that announce only relayed (`/p2p-circuit`) addresses.

py-libp2p 0.8.1's swarm drops every `/p2p-circuit` address before dialing (`Swarm.dial_peer`: "this node
has no relay transport"), even when a `CircuitV2Transport` exists, and `BasicHost.connect` has no hook
for another dialer. `NatHost` is a `BasicHost` subclass (built by `new_nat_host` exactly as `new_host`
builds its BasicHost) whose `connect` tries a peer's direct addresses for `direct_timeout_s`, then each
relayed address through the circuit transport, and once relayed, asks its `upgrader` (DCUtR) for a
direct connection before returning, so the streams opened next take the direct path when the NATs allow.
Upstream would need: relay dialing inside `Swarm.dial_peer` when a circuit transport is registered.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import multiaddr
import trio
from libp2p.connection_types import ConnectionType
from libp2p.crypto.keys import KeyPair
from libp2p.host.basic_host import BasicHost
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from node.net.nat.errors import CircuitDialError
from node.net.nat.paths import is_circuit, peer_conns

DIRECT_TIMEOUT_S = 3.0  # default direct attempt before relayed addresses (NatConfig.direct_dial_timeout_s)


class NatHost(BasicHost):
    """BasicHost + relayed dialing. `circuit` (a CircuitV2Transport) and `upgrader` are set by the NAT
    service; without them `connect` is BasicHost's."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.circuit: Any = None  # libp2p CircuitV2Transport dialing /p2p-circuit addresses (None: no relay dialing)
        self.upgrader: Callable[[ID], Awaitable[None]] | None = None  # after a relayed dial: try a direct path
        self.direct_timeout_s = DIRECT_TIMEOUT_S  # direct attempt before the relayed addresses
        self.relayed_dials = 0  # connections this host opened through a relay
        self.last_dial_error = ""  # why the last relayed dial failed ("" = none failed)

    async def connect(self, peer_info: PeerInfo) -> None:
        # a PeerInfo parsed from ".../p2p-circuit/p2p/<peer>" keeps the address without its last /p2p part
        circuit = [a if str(a).endswith(f"/p2p/{peer_info.peer_id}")
                   else multiaddr.Multiaddr(f"{a}/p2p/{peer_info.peer_id}")
                   for a in peer_info.addrs if is_circuit(a)]
        if self.circuit is None or not circuit or peer_conns(self, peer_info.peer_id):
            await super().connect(peer_info)
            return
        errors: list[str] = []
        direct = [a for a in peer_info.addrs if not is_circuit(a)]
        if direct:
            with trio.move_on_after(self.direct_timeout_s):
                try:
                    await super().connect(PeerInfo(peer_info.peer_id, direct))
                    return
                except Exception as exc:  # unreachable (behind NAT): go through a relay
                    errors.append(f"direct: {exc}")
            if not errors:
                errors.append(f"direct: no answer within {self.direct_timeout_s} s")
        self.peerstore.add_addrs(peer_info.peer_id, circuit, 120)
        for addr in circuit:
            try:
                conn = await self.circuit.dial(addr)
                started = getattr(conn, "event_started", None)
                if started is not None:
                    await started.wait()
                tag = getattr(conn, "set_transport_info", None)
                if tag is not None:  # as the relay's side does: the swarm cannot tell a circuit from its upgrade
                    tag([addr], ConnectionType.RELAYED)
            except Exception as exc:  # this relay is gone or refused: the next one
                errors.append(f"{addr}: {exc}")
                continue
            self.relayed_dials += 1
            if self.upgrader is not None:
                await self.upgrader(peer_info.peer_id)
            return
        self.last_dial_error = "; ".join(errors)
        raise CircuitDialError(f"peer {peer_info.peer_id} unreachable directly and through its relays: "
                               f"{self.last_dial_error}")


def new_nat_host(key_pair: KeyPair, sec_opt: Any = None, muxer_opt: Any = None) -> NatHost:
    """What `libp2p.new_host(key_pair=..., sec_opt=..., muxer_opt=...)` builds, as a NatHost."""
    from libp2p import new_swarm

    try:
        from libp2p.rcmgr import new_resource_manager

        rm: Any = new_resource_manager()
    except Exception:  # as new_host: no resource manager when it cannot be built
        rm = None
    swarm = new_swarm(key_pair=key_pair, sec_opt=sec_opt, muxer_opt=muxer_opt, resource_manager=rm)
    return NatHost(network=swarm, resource_manager=rm)
