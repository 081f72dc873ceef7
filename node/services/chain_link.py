"""A node bound to a model on chain: receipts for every hop, paid inference, and spot-check data.

Before it trains, the node recomputes the model's spec hash from its own model config and training
settings and refuses to start when the chain registered another one.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from node.config import NodeConfig
from node.context import NodeContext
from node.errors import NodeError, ReceiptRejectedError
from node.model import load_model_config
from node.model import training_section as node_training_section
from node.net.identity import load_or_create_identity
from node.replicas.statesync import StateService, pack_state
from node.services.audit import AuditConfig, AuditService, install_audit
from node.services.base import NodeService
from node.services.chain_access import ChainAccessConfig, ChainAccessPolicy
from node.services.hop_receipts import EIP712Receipts
from node.services.inference import INFER_PROTOCOL, InferenceService
from node.wire import frames
from protocol.errors import ChainLookupError, ProtocolError
from protocol.modelspec import SpecMismatchError, TrainingSection, require_spec_hash
from protocol.payments import ChainLink, connect_chain
from protocol.receipts import Domain, KeyRegistry, SignedReceipt
from protocol.store import ReceiptStore, StoreConfig
from sharding import OptimConfig


class StoredReceipts(EIP712Receipts):
    """Receipts whose senders must be registered on chain, kept durably (sqlite) at both ends of every hop."""

    def __init__(self, account: Any, domain: Domain, model_id: int, tokens_per_microbatch: int, epoch_length: int,
                 store: ReceiptStore, registry: KeyRegistry) -> None:
        if epoch_length < 1:
            raise ValueError(f"epoch_length must be >= 1, got {epoch_length}")
        super().__init__(account, domain, model_id, tokens_per_microbatch,
                         epoch_of_step=lambda step: step // epoch_length, on_cosigned=self._keep)
        self.store = store
        self.registry = registry
        self.rejected = 0  # receipts refused (unregistered sender, bad signature, replay)

    def _keep(self, signed: SignedReceipt) -> None:
        try:
            self.store.add(signed, require_cosigned=True)
        except ProtocolError:  # refused, or a key the chain could not confirm (ChainLookupError: RPC down)
            self.rejected += 1  # no credit for this hop; training goes on
        self.cosigned.clear()
        self.received.clear()

    def countersign(self, header: frames.FrameHeader, signature: bytes, peer_address: str) -> bytes:
        try:
            registered = self.registry.is_registered(peer_address)
        except ChainLookupError as exc:  # a key never confirmed, and the chain does not answer
            self.rejected += 1
            raise ReceiptRejectedError(f"sender {peer_address} (stage {header.stage}) of step {header.step} microbatch "
                                       f"{header.microbatch}: registration unknown, {exc}") from exc
        if not registered:
            self.rejected += 1
            raise ReceiptRejectedError(f"sender {peer_address} of step {header.step} microbatch {header.microbatch} "
                                       "is not a registered node key")
        counter = super().countersign(header, signature, peer_address)
        self._keep(self.received[-1])
        return counter


def receipt_generation(ctx: NodeContext) -> tuple[int, int]:
    """The rollback generation the node trains in now, as receipts and audit records name it (`Receipt.generation`:
    (0, 0) before any rollback, else its number and the step it rewound to)."""
    me = ctx.discovery.me
    return (me.rollback_gen, me.rollback_step) if me.rollback_gen else (0, 0)


def training_section(cfg: NodeConfig, optim: OptimConfig) -> TrainingSection:
    """The proposal `training` section a node with this config actually runs (stages, codec, schedule, optimiser)."""
    section = node_training_section(cfg)
    if section.optim_config() != optim:
        raise NodeError("the node runs optimiser settings other than its config's recipe: build them with "
                        "node.model.optim_config")
    return section


class ChainLinkService:
    """On start: checks the on-chain spec hash, serves paid inference (`/pmn/infer/1.0.0`) and audits
    (`/pmn/audit/1.0.0`); `inference` and `audit` are the running services afterwards."""

    def __init__(self, link: ChainLink, model_id: int, audit: AuditConfig,
                 epoch_receipts: Callable[[int], list[SignedReceipt]], access: ChainAccessConfig | None = None,
                 state_timeout_s: float = 60.0) -> None:
        self.link = link
        # who may use which protocol: registered, staked nodes of the right stage; sampled hops for attesters
        self.access = ChainAccessPolicy(link, access)
        self.state_timeout_s = state_timeout_s  # bound on one /pmn/state exchange
        self.state: StateService | None = None
        self.model_id = model_id
        self.audit_cfg = audit
        self.epoch_receipts = epoch_receipts
        self.inference: InferenceService | None = None
        self.audit: AuditService | None = None

    def close(self) -> None:
        """Close the chain connection (its HTTP session)."""
        self.link.close()

    async def start(self, ctx: NodeContext) -> None:
        link = self.link
        try:
            require_spec_hash(link.spec_hash, ctx.model, training_section(ctx.cfg, ctx.optim), self.model_id,
                              None if ctx.data is None else ctx.data.hashed())
        except SpecMismatchError as exc:
            # the daemon reports service errors wrapped in the nursery's ExceptionGroup: say it plainly first
            print(json.dumps({"event": "error", "error": str(exc), "type": type(exc).__name__}), flush=True)
            print(f"error: {exc}", file=sys.stderr, flush=True)
            raise
        if isinstance(ctx.receipts, EIP712Receipts):
            ctx.receipts.generation = lambda: receipt_generation(ctx)  # hops are signed for the generation they run in
        if ctx.worker is not None:
            self._serve(ctx, ctx.worker)
        elif ctx.cfg.replicas.enabled:
            # the replicated runner builds its worker once it runs, and a new one on every move, re-sync and
            # rollback: inference and audits follow it; it serves /pmn/state itself, under this policy (ctx.access)
            ctx.worker_listeners.append(lambda w: self._serve(ctx, w, state=False))
        else:
            raise NodeError("chain services (--rpc-url) need a stage worker when the node starts")

    def _serve(self, ctx: NodeContext, worker: Any, state: bool = True) -> None:
        """Serve paid inference and audits for `worker` (replacing the handlers of an earlier one), and with `state`
        the stage's state to replicas of our stage once training is done."""
        spec, host, discovery = worker.spec, ctx.host, ctx.discovery
        next_hop = None
        if not spec.is_last:
            async def next_hop() -> Any:
                from node.net.host import parse_peer_addr

                entry = await discovery.wait_for_stage(spec.index + 1)
                info = parse_peer_addr(entry.addrs[0])
                await host.connect(info)
                return await host.new_stream(info.peer_id, [INFER_PROTOCOL])

        # hops only from node keys the chain has on the stage before ours
        self.inference = InferenceService(ctx.model, spec, worker.module, worker.codec, self.link.payments, next_hop,
                                          policy=self.access, scores=ctx.scores)
        host.set_stream_handler(INFER_PROTOCOL, self.inference.handle)
        self.audit = install_audit(host, worker, ctx.identity, ctx.data_dir, self.model_id, self.link.epoch_length,
                                   self.epoch_receipts, self.audit_cfg, policy=self.access, scores=ctx.scores,
                                   generation=lambda: receipt_generation(ctx))
        if not state:
            return
        log = ctx.log

        async def snapshot(stage: int) -> tuple[dict[str, Any], bytes] | None:
            # the pipeline has no step lock: the state is handed out only once training is done (lingering)
            if stage != spec.index or log.state != "serving":
                return None
            return await trio.to_thread.run_sync(pack_state, worker)

        # a replica of our stage (same stage on chain) may fetch the stage's state
        self.state = StateService(host, ctx.model.spec_hash().hex(), snapshot, self.state_timeout_s,
                                  policy=self.access, scores=ctx.scores)


def chain_services(data_dir: str | Path, account: Any, microbatch_size: int, seq_len: int, rpc_url: str,
                   deployment: str, model_id: int, audit: AuditConfig | None = None,
                   ) -> tuple[ChainLink, StoredReceipts, ChainLinkService]:
    """The chain link, the receipt hook and the service that checks the spec hash and serves inference and audits.

    The service raises `protocol.modelspec.SpecMismatchError` (the node exits before training) when the
    on-chain spec hash differs from the node's own. It serves `/pmn/infer/1.0.0` with chain-checked
    payments and `/pmn/audit/1.0.0` with what spot checks fetch, kept for at least the model's
    challenge window (`audit.retain_s` is raised to it).
    """
    link = connect_chain(rpc_url, deployment, model_id)
    domain = Domain(link.chain_id, link.ledger)
    data_path = Path(data_dir).expanduser()
    store = ReceiptStore(StoreConfig(data_dir=data_path), domain, link.keys)
    receipts = StoredReceipts(account, domain, model_id, microbatch_size * seq_len, link.epoch_length, store,
                              link.keys)
    window_s = float(link.client.get_model(model_id).terms.challenge_window)
    audit_cfg = audit or AuditConfig()
    audit_cfg = AuditConfig(**{**audit_cfg.__dict__, "retain_s": max(audit_cfg.retain_s, window_s)}).validate()

    def epoch_receipts(epoch: int) -> list[SignedReceipt]:
        with ReceiptStore(StoreConfig(data_dir=data_path), domain, link.keys) as reader:
            return reader.epoch_receipts(model_id, epoch)

    return link, receipts, ChainLinkService(link, model_id, audit_cfg, epoch_receipts)


def services_for(cfg: NodeConfig) -> tuple[StoredReceipts | None, list[NodeService]]:
    """(receipt hook, services) of a node configured with `cfg.chain`; (None, []) off chain (empty rpc_url)."""
    c = cfg.chain
    if not c.rpc_url:
        return None, []
    c.validate()
    model = load_model_config(cfg.model)
    ident = load_or_create_identity(Path(cfg.data_dir).expanduser())
    _, receipts, service = chain_services(cfg.data_dir, ident.account, cfg.runtime.microbatch_size, model.seq_len,
                                          c.rpc_url, c.deployment, c.model_id)
    return receipts, [service]
