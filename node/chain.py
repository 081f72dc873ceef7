"""A node bound to a model on chain: receipts for every hop and paid inference, both checked against the chain."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from node import frames as F
from node.errors import ReceiptRejectedError
from node.inference import INFER_PROTOCOL, InferenceService
from node.receipts import EIP712Receipts
from protocol.errors import ProtocolError
from protocol.payments import ChainLink, connect_chain
from protocol.receipts import Domain, KeyRegistry, SignedReceipt
from protocol.store import ReceiptStore, StoreConfig

ServiceHook = Callable[[Any, Any, Any, Any], Awaitable[None]]


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
        except ProtocolError:
            self.rejected += 1  # no credit for this hop; training goes on
        self.cosigned.clear()
        self.received.clear()

    def countersign(self, header: F.FrameHeader, signature: bytes, peer_address: str) -> bytes:
        if not self.registry.is_registered(peer_address):
            self.rejected += 1
            raise ReceiptRejectedError(f"sender {peer_address} of step {header.step} microbatch {header.microbatch} "
                                       "is not a registered node key")
        counter = super().countersign(header, signature, peer_address)
        self._keep(self.received[-1])
        return counter


def chain_services(data_dir: str | Path, account: Any, microbatch_size: int, seq_len: int, rpc_url: str,
                   deployment: str, model_id: int) -> tuple[ChainLink, StoredReceipts, ServiceHook]:
    """The receipt hook and an on-ready hook that serves `/pmn/infer/1.0.0` with chain-checked payments."""
    link = connect_chain(rpc_url, deployment, model_id)
    domain = Domain(link.chain_id, link.ledger)
    store = ReceiptStore(StoreConfig(data_dir=Path(data_dir).expanduser()), domain, link.keys)
    receipts = StoredReceipts(account, domain, model_id, microbatch_size * seq_len, link.epoch_length, store,
                              link.keys)

    async def serve_inference(daemon: Any, host: Any, discovery: Any, nursery: Any) -> None:
        worker = daemon.worker
        spec = worker.spec
        next_hop = None
        if not spec.is_tail:
            async def next_hop() -> Any:
                from node.host import parse_peer_addr

                entry = await discovery.wait_for_stage(spec.index + 1)
                info = parse_peer_addr(entry.addrs[0])
                await host.connect(info)
                return await host.new_stream(info.peer_id, [INFER_PROTOCOL])

        service = InferenceService(daemon.model, spec, worker.module, worker.codec, link.payments, next_hop)
        host.set_stream_handler(INFER_PROTOCOL, service.handle)
        daemon.inference = service

    return link, receipts, serve_inference
