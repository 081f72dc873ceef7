"""The contract between the node's lifecycle (`node.daemon`) and what it drives.

The lifecycle owns identity, host, discovery, status files, signals and shutdown. It gives a
`NodeContext` to one `Runner` (how the node trains: `node.pipeline.runner`, `node.pipeline.asyncrun`,
`node.replicas.runner`) and to the services that plug into it
(`node.services.base.NodeService`: chain link, audit, paid inference).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import trio
from libp2p.abc import IHost

from node.config import NodeConfig
from node.net.access import NodeAccess
from node.net.discovery import Discovery
from node.net.identity import NodeIdentity
from node.net.peerscore import PeerScores
from node.observability.steps import NodeLog
from node.training.checkpoint import latest_checkpoint, load_checkpoint
from node.training.worker import StageWorker
from node.wire.channel import LocalInfo, ReceiptHook
from sharding import Corpus, ModelConfig, OptimConfig, load_corpus, partition
from sharding.dataset import DataSpec


@dataclass
class NodeContext:
    """One running node, as its runner and services see it (built once the host listens)."""

    cfg: NodeConfig  # the node's configuration (validated)
    model: ModelConfig  # the architecture it trains
    optim: OptimConfig  # the optimiser settings it runs (part of the on-chain spec hash)
    identity: NodeIdentity  # node key + peer key
    binding: bytes  # the node key's signature over the peer id (handshakes, announcements)
    data_dir: Path  # keys, checkpoints, status and progress files, receipts
    host: IHost  # the running libp2p host
    discovery: Discovery  # this node's announcement and the peers it knows
    nursery: trio.Nursery  # lives as long as the host: background tasks of runners and services
    log: NodeLog  # status file, progress file, metrics, progress line
    receipts: ReceiptHook | None = None  # signs/countersigns every data frame (on-chain mode)
    worker: StageWorker | None = None  # the stage worker serving now (set by the runner; replaced on a move)
    access: NodeAccess | None = None  # on-chain mode: who may use which protocol (None: off-chain defaults)
    data: DataSpec | None = None  # the spec's [data] section (None: byte-level `cfg.corpus`, not in the spec hash)
    corpus: Corpus | None = None  # its prepared, hash-checked token files (every stage reads its windows)
    # refusal scores and bans of every protocol the node serves (`node.wire.channel.peer_scores`): a peer banned by one
    # is banned by all, and its open streams on the others are cut (`node.net.gate`)
    scores: PeerScores = field(default_factory=PeerScores)
    # called with each worker a runner starts serving after the services started (`set_worker`): a replicated runner
    # builds its worker only once it runs, and a new one on every move, re-sync and rollback
    worker_listeners: list[Callable[[StageWorker], None]] = field(default_factory=list)

    def set_worker(self, worker: StageWorker) -> None:
        """Serve `worker` from now on, and tell the listeners (the chain services' audit and inference)."""
        self.worker = worker
        for listener in self.worker_listeners:
            listener(worker)

    @property
    def local_windows(self) -> bool:
        """Whether every stage reads its training windows from the spec's dataset (activation frames carry none):
        true when the node holds the spec's prepared, hash-checked data."""
        return self.corpus is not None

    def build_worker(self, stage: int, checkpoint: Path | None = None) -> StageWorker:
        """A worker for `stage`, resumed from `checkpoint` when given (an explicit restore), else from the newest
        checkpoint of that stage in `data_dir`."""
        spec = partition(self.model, self.cfg.num_stages)[stage]
        # with the spec's dataset (prepared and hash-checked on every node) each stage reads the training windows
        # itself and activation frames carry none; the byte-level corpus (not in the spec) stays with the head
        local = self.local_windows
        corpus = self.corpus if local else load_corpus(self.cfg.corpus) if spec.is_first else None
        r = self.cfg.runtime
        worker = StageWorker(self.model, spec, codec=r.codec, optim=self.optim, num_microbatches=r.num_microbatches,
                             microbatch_size=r.microbatch_size, corpus=corpus,
                             policy=self.cfg.execution.policy(self.cfg.device), local_windows=local)
        ckpt = checkpoint if checkpoint is not None else latest_checkpoint(self.data_dir, stage)
        if ckpt is not None:
            load_checkpoint(worker, ckpt)
        return worker

    def local_info(self, stage: int, eval_plan: tuple[int, int] = (0, 0)) -> LocalInfo:
        """What this node tells a neighbour at the activation-protocol handshake when serving `stage`
        (eval_plan: the runner's (eval_every, eval_batches), (0, 0) when it does not evaluate)."""
        return LocalInfo(self.model.spec_hash(), stage, self.cfg.num_stages, self.identity.address, self.binding,
                         eval_plan)


class Runner(Protocol):
    """How a node trains, between the lifecycle's start (host, discovery) and its shutdown.

    Call order: `prepare` (before the ready line and before the services start), `run`, then
    `checkpoint` and `close` once, whether `run` finished, failed or was cancelled by a signal.
    """

    label: str  # shown in the start-up line after the stage ("" or " (replicated)")

    async def prepare(self, ctx: NodeContext) -> int:
        """Choose the stage, register the runner's protocols, set `ctx.worker` when it has one; return the stage."""
        ...

    def ready_fields(self) -> dict[str, Any]:
        """Runner-specific fields of the ready line."""
        ...

    async def run(self, ctx: NodeContext) -> None:
        """Train until `cfg.runtime.steps` steps are done; NodeError when the node cannot go on."""
        ...

    def checkpoint(self, ctx: NodeContext) -> int:
        """Drop a partial step, checkpoint the last completed one; return the next step (0 without a worker)."""
        ...

    async def close(self, ctx: NodeContext) -> None:
        """Close the runner's streams (bounded in time)."""
        ...
