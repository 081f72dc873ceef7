"""Two real libp2p hosts as replicas of stage 1: the engine under test, and a stage peer serving `/pmn/avg/1.0.0`
into a store the test reads (for the push / hold / probe tests of `ReplicaEngine`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from node.config import NodeConfig
from node.net.discovery import Announcement, Discovery
from node.net.host import full_addrs
from node.net.identity import bind
from node.replicas.averaging import AveragingService, ContributionStore, trainable
from node.replicas.engine import ReplicaEngine
from node.training.worker import StageWorker
from node.wire.channel import ActEndpoint, LocalInfo
from sharding import PRESETS, OptimConfig, partition


def stage_worker() -> StageWorker:
    """A stage-1 worker of the tiny model in a 3-stage split."""
    cfg = PRESETS["tiny"]
    return StageWorker(cfg, partition(cfg, 3)[1], codec="dense", optim=OptimConfig(), num_microbatches=2,
                       microbatch_size=2, corpus=None)


def announcement(host: Any, ident: Any, spec_hex: str, seq: int = 0) -> Announcement:
    """A stage-1 announcement of `host` signed by its node key."""
    return Announcement(peer_id=host.get_id().pretty(), addrs=tuple(full_addrs(host)), spec_hash=spec_hex,
                        num_stages=3, stage=1, capacity=1, address=ident.address, binding="0x" + bind(ident).hex(),
                        seq=seq).sign(ident)


def engine(host: Any, ident: Any, worker: StageWorker, peer: Announcement | None,
           bootstrap: list[str] | None = None) -> ReplicaEngine:
    """A stage-1 replica engine on `host` whose discovery knows `peer`, which is in backoff (with `peer` None:
    knows no peer, only the `bootstrap` addresses)."""
    cfg = NodeConfig(num_stages=3, stage="1")
    spec_hex = worker.config.spec_hash().hex()
    discovery = Discovery(host, announcement(host, ident, spec_hex), cfg.discovery, bootstrap or [], identity=ident)
    if peer is not None:
        discovery._merge([peer.to_json()])
    endpoint = ActEndpoint(host, local=LocalInfo(worker.config.spec_hash(), 1, 3, ident.address, bind(ident)),
                           frame_spec=worker.frame_spec(cfg.transport.max_frame_bytes), cfg=cfg.transport)
    size = sum(p.numel() for p in trainable(worker.module))
    eng = ReplicaEngine(cfg, worker, endpoint, discovery, host, ContributionStore(size))
    if peer is not None:
        eng._peer_failed(peer.peer_id)  # its last exchange failed
    return eng


@dataclass
class ReplicaPair:
    """The engine under test (on host 0) and its live stage peer (host 1)."""

    eng: ReplicaEngine  # the pushing replica's engine; the peer starts in backoff
    peer: Announcement  # the stage peer's signed announcement
    peer_store: ContributionStore  # what the peer's averaging server holds
    size: int  # values of one contribution


def replica_pair(h0: Any, id0: Any, h1: Any, id1: Any) -> ReplicaPair:
    """An engine on `h0` and a stage peer on `h1` serving its store (avg timeout 5 s)."""
    worker = stage_worker()
    size = sum(p.numel() for p in trainable(worker.module))
    spec_hex = worker.config.spec_hash().hex()
    peer_store = ContributionStore(size)
    AveragingService(h1, spec_hex, lambda s: peer_store if s == 1 else None, 5.0)
    peer = announcement(h1, id1, spec_hex, seq=1)
    return ReplicaPair(engine(h0, id0, worker, peer), peer, peer_store, size)
