"""One py-libp2p host per node: TCP + Noise + yamux with the node's Ed25519 peer key."""

from __future__ import annotations

import multiaddr
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr

from node.net.identity import NodeIdentity
from node.net.tuning import apply_transport_tuning


def make_host(identity: NodeIdentity, yamux_frame_bytes: int = 256 * 1024, tcp_read_bytes: int = 1 << 20) -> IHost:
    """A host with the node's key (Noise + yamux are py-libp2p's defaults), transport tuning applied."""
    apply_transport_tuning(yamux_frame_bytes, tcp_read_bytes)
    return new_host(key_pair=identity.key_pair)


def parse_listen(addrs: list[str]) -> list[multiaddr.Multiaddr]:
    """Parse listen multiaddrs (ValueError names the bad one)."""
    out = []
    for a in addrs:
        try:
            out.append(multiaddr.Multiaddr(a))
        except Exception as exc:  # multiaddr raises several types
            raise ValueError(f"bad listen multiaddr {a!r}: {exc}") from exc
    return out


def parse_peer_addr(addr: str) -> PeerInfo:
    """Parse a full multiaddr ending in /p2p/<peer id> (ValueError names it)."""
    try:
        return info_from_p2p_addr(multiaddr.Multiaddr(addr))
    except Exception as exc:
        raise ValueError(f"bad peer multiaddr {addr!r} (expected .../p2p/<peer id>): {exc}") from exc


def full_addrs(host: IHost) -> list[str]:
    """The host's listen addresses with /p2p/<peer id> appended."""
    pid = host.get_id().pretty()
    out = []
    for a in host.get_addrs():
        s = str(a)
        out.append(s if "/p2p/" in s else f"{s}/p2p/{pid}")
    return out


def peer_str(pid: ID) -> str:
    """Printable peer id."""
    return pid.pretty()
