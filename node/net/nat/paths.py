"""Which path a connection takes: direct (TCP), or relayed through a circuit relay v2 hop."""

from __future__ import annotations

from typing import Any

import multiaddr
from libp2p.abc import IHost
from libp2p.connection_types import ConnectionType
from libp2p.peer.id import ID

DIRECT = "direct"  # a TCP connection of our own
RELAYED = "relayed"  # through a relay's circuit
PUNCHED = "direct (hole punched)"  # a direct connection DCUtR opened after a relayed one


def is_circuit(addr: multiaddr.Multiaddr | str) -> bool:
    """Whether a multiaddr goes through a relay (`/p2p-circuit`)."""
    return "/p2p-circuit" in str(addr)


def conn_is_relayed(conn: Any) -> bool:
    """Whether a swarm connection runs over a relay circuit (by its type, or its transport addresses)."""
    try:
        if conn.get_connection_type() == ConnectionType.RELAYED:
            return True
        return any(is_circuit(a) for a in conn.get_transport_addresses())
    except Exception:  # a connection being torn down
        return False


def peer_conns(host: IHost, peer: ID) -> list[Any]:
    """The swarm's live connections to `peer`."""
    conns = getattr(host.get_network(), "connections", {}).get(peer, [])
    conns = conns if isinstance(conns, list) else [conns]
    return [c for c in conns if not getattr(c, "is_closed", False)]


def peer_path(host: IHost, peer: ID) -> str | None:
    """DIRECT when a direct connection to `peer` exists, RELAYED when only relayed ones do, None when none."""
    conns = peer_conns(host, peer)
    if not conns:
        return None
    return RELAYED if all(conn_is_relayed(c) for c in conns) else DIRECT
