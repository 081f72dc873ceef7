"""A node bound to a model on chain: receipts for every hop and paid inference, both checked against the chain."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from node.inference import INFER_PROTOCOL, InferenceService
from node.receipts import ChainReceipts, ReceiptContext
from protocol.payments import ChainLink, connect_chain
from protocol.receipts import Domain
from protocol.store import ReceiptStore, StoreConfig

ServiceHook = Callable[[Any, Any, Any, Any], Awaitable[None]]


def chain_services(data_dir: str | Path, account: Any, microbatch_size: int, seq_len: int, rpc_url: str,
                   deployment: str, model_id: int) -> tuple[ChainLink, ChainReceipts, ServiceHook]:
    """The receipt hook and an on-ready hook that serves `/pmn/infer/1.0.0` with chain-checked payments."""
    link = connect_chain(rpc_url, deployment, model_id)
    domain = Domain(link.chain_id, link.ledger)
    store = ReceiptStore(StoreConfig(data_dir=Path(data_dir).expanduser()), domain, link.keys)
    ctx = ReceiptContext(model_id=model_id, epoch_length=link.epoch_length,
                         tokens_per_microbatch=microbatch_size * seq_len, domain=domain)
    receipts = ChainReceipts(ctx, account, store, link.keys)

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
