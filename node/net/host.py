"""One py-libp2p host per node: TCP + Noise + yamux with the node's Ed25519 peer key."""

from __future__ import annotations

import dataclasses

import multiaddr
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr

from node.config import TransportConfig
from node.net.identity import NodeIdentity
from node.net.nat.dialing import new_nat_host
from node.net.transport.heap import keep_large_buffers_in_heap
from node.net.transport.options import is_tuned, new_tuned_host


def make_host(identity: NodeIdentity, yamux_frame_bytes: int | None = None, tcp_read_bytes: int | None = None,
              *, config: TransportConfig | None = None, relay_dialing: bool = False) -> IHost:
    """A host with the node's key over TCP + Noise + yamux, tuned as `config` says (default TransportConfig()).

    yamux_frame_bytes / tcp_read_bytes override the config's fields; tcp_read_bytes=0 gives a host
    on py-libp2p's stock Noise + yamux. The tuning belongs to this host only. relay_dialing: a
    `node.net.nat.dialing.NatHost`, whose connect also reaches peers through circuit relays.
    """
    cfg = dataclasses.replace(config or TransportConfig())
    if yamux_frame_bytes is not None:
        cfg.yamux_frame_bytes = yamux_frame_bytes
    if tcp_read_bytes is not None:
        cfg.tcp_read_bytes = tcp_read_bytes
    cfg.validate()
    if is_tuned(cfg) and cfg.tune_heap:
        keep_large_buffers_in_heap()
    if relay_dialing:
        return new_tuned_host(identity.key_pair, cfg, build=new_nat_host)
    return new_tuned_host(identity.key_pair, cfg)


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
