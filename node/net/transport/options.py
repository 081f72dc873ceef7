"""TransportConfig -> the security and muxer options of one py-libp2p host (`new_host(sec_opt=, muxer_opt=)`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from libp2p import new_host
from libp2p.abc import IHost, IMuxedConn, ISecureConn
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TMuxerOptions, TProtocol, TSecurityOptions
from libp2p.network.config import RetryConfig
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.stream_muxer.muxer_multistream import MuxerMultistream
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID

from node.config import TransportConfig
from node.net.transport.noise import BatchedNoiseTransport
from node.net.transport.yamux import TunedYamux


@dataclass(frozen=True)
class HostOptions:
    """What new_host needs for a tuned transport (both None: py-libp2p's stock transport)."""

    sec_opt: TSecurityOptions | None  # Noise only, with batched sessions
    muxer_opt: TMuxerOptions | None  # yamux only, TunedYamux with the config's frame size


def is_tuned(cfg: TransportConfig) -> bool:
    """Whether this config asks for the tuned transport (tcp_read_bytes = 0 means py-libp2p's stock one)."""
    return cfg.tcp_read_bytes > 0


def host_options(key_pair: KeyPair, cfg: TransportConfig) -> HostOptions:
    """The tuned Noise + yamux for a host with this key, or stock options when the config says so.

    The tuned host offers only Noise and yamux (py-libp2p's first choices, what every node uses);
    their wire format is the standard one, so stock peers connect as before.
    """
    if not is_tuned(cfg):
        return HostOptions(sec_opt=None, muxer_opt=None)
    noise = BatchedNoiseTransport(key_pair, new_x25519_key_pair().private_key, cfg.tcp_read_bytes,
                                  cfg.write_stall_s)
    muxer = TunedYamux.configured(cfg.yamux_frame_bytes, cfg.yamux_window_wait_s)
    return HostOptions(sec_opt={NOISE_PROTOCOL_ID: noise}, muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): muxer})


class MuxerByOption(MuxerMultistream):
    """A MuxerMultistream that builds the muxer class registered for the negotiated protocol.

    py-libp2p 0.8.1's MuxerMultistream.new_conn builds its own `Yamux` whenever `/yamux/1.0.0` is
    negotiated, whatever class muxer_opt registered for it; this one honours muxer_opt.
    Upstream fix: call the registered class there (`transport_class(conn, peer_id,
    is_initiator=conn.is_initiator)`) instead of `Yamux(...)`.
    """

    async def new_conn(self, conn: ISecureConn, peer_id: ID) -> IMuxedConn:
        protocol, muxer_class = await self._selector.select(conn, conn.is_initiator, self.negotiate_timeout)
        if isinstance(muxer_class, type) and issubclass(muxer_class, TunedYamux):
            muxed: IMuxedConn = muxer_class(conn, peer_id, is_initiator=conn.is_initiator)
        else:
            muxed = muxer_class(conn, peer_id)
        return self._annotate_connection(muxed, conn, protocol)


def new_tuned_host(key_pair: KeyPair, cfg: TransportConfig, build: Callable[..., IHost] = new_host) -> IHost:
    """new_host(key_pair=...) with this config's transport options (stock ones if the config says so).

    The host's own upgrader gets a MuxerByOption (a setting of this host's object: nothing
    outside this host changes); see MuxerByOption for the upstream fix that would make it unneeded.
    `build` makes the host from those options (default new_host; `node.net.nat.dialing.new_nat_host`).
    """
    opts = host_options(key_pair, cfg)
    host = build(key_pair=key_pair, sec_opt=opts.sec_opt, muxer_opt=opts.muxer_opt)
    network = host.get_network()
    if not isinstance(network, Swarm):
        raise TypeError(f"expected py-libp2p's Swarm, got {type(network).__name__}")
    # this host's dial retries (new_host takes no RetryConfig; the Swarm's attribute is per host object)
    network.retry_config = RetryConfig(max_retries=cfg.dial_retries, initial_delay=cfg.dial_retry_delay_s)
    if opts.muxer_opt is not None:
        upgrader = network.upgrader
        upgrader.muxer_multistream = MuxerByOption(opts.muxer_opt, upgrader.muxer_multistream.negotiate_timeout)
    return host
