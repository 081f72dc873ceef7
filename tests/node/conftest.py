"""Shared fixtures for node tests: in-process libp2p hosts on 127.0.0.1."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import multiaddr
import numpy as np

from node.config import TransportConfig
from node.errors import NonFiniteError
from node.net.host import make_host
from node.net.identity import NodeIdentity, identity_from_secret
from node.net.running import run_host
from node.wire import frames

SPEC_HASH = b"\x11" * 32
FSPEC = frames.FrameSpec(spec_hash=SPEC_HASH, codec=frames.CodecId.DENSE, microbatch_size=2, seq_len=8, d_model=16,
                    bytes_per_token=64, id_bytes=2, max_frame_bytes=64 * 1024)
LISTEN = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]


def np_decoder(fr: frames.Frame) -> np.ndarray:
    """Test decoder: fp32 payload, NaN/Inf rejected."""
    arr = np.frombuffer(fr.payload, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise NonFiniteError("payload holds NaN or Inf")
    return arr


def tcfg(**kw: object) -> TransportConfig:
    cfg = TransportConfig(max_frame_bytes=FSPEC.max_frame_bytes, handshake_timeout_s=5, ack_timeout_s=5,
                          dial_timeout_s=5)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@contextlib.asynccontextmanager
async def running_host(seed: int, config: TransportConfig | None = None) -> AsyncIterator[tuple[Any, NodeIdentity]]:
    """A host with a deterministic key listening on a free loopback port (transport as `config` says)."""
    ident = identity_from_secret(seed.to_bytes(32, "big"))
    host = make_host(ident, config=config)
    async with run_host(host, LISTEN):
        yield host, ident


class FixedDirectory:
    """A discovery table holding fixed signed announcements, and our own (what `StagePeersPolicy` reads); `learned`
    lists the peers it was asked to look up."""

    def __init__(self, me: Any, entries: list[Any]) -> None:
        self.me = me  # our own announcement
        self._entries = entries  # the others' verified announcements
        self.learned: list[str] = []

    def entries(self, max_age_s: float | None = None) -> list[Any]:
        return list(self._entries)

    async def learn(self, peer_id: Any) -> None:
        self.learned.append(peer_id.pretty())
