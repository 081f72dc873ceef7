"""The node's status page as a service: the page of `node.observability.web`, fed from this node's data
directory, its discovery table and (on chain) the figures of its address, served on the node's trio loop."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import trio

from node.config import WebConfig
from node.context import NodeContext
from node.observability.web.app import make_app
from node.observability.web.server import serve_page
from node.observability.web.snapshot import SnapshotLimits, node_part, page
from node.services.base import NodeService
from protocol.accounting import compute_units
from sharding import param_count

if TYPE_CHECKING:  # at run time only through a chain link already built: an off-chain node never loads web3
    from protocol.payments import ChainLink


class ChainFigures:
    """On-chain figures of one model and one node address, re-read at most every `refresh_s` seconds (in a
    worker thread: web3 calls block). A chain error keeps the last figures and is shown as `chain_error`."""

    def __init__(self, link: ChainLink, address: str, refresh_s: float) -> None:
        self.link = link
        self.address = address
        self.refresh_s = refresh_s
        self._at = -float("inf")
        self._model: dict[str, Any] = {}
        self._node: dict[str, Any] = {}

    def _read(self) -> None:
        client, mid = self.link.client, self.link.model_id
        info = client.get_model(mid)
        t = info.terms
        holder = self.address
        try:
            holder = client.node_info(self.address).operator or self.address  # shares are minted to the operator
        except Exception:  # an unregistered key: show the node key's own balance
            holder = self.address
        supply = client.total_supply(mid)
        shares = client.balance_of(mid, holder)
        self._model = {"model_id": mid, "terms": {
            "epoch_length": t.epoch_length, "audit_rate": t.audit_rate_bps / 10_000,
            "challenge_window_s": t.challenge_window, "inference_fee_wei": t.inference_fee_wei,
            "status": info.status, "metadata_uri": t.metadata_uri, "total_shares": supply,
            "revenue_deposited_wei": int(client.token(mid).functions.totalDeposited().call())}}
        self._node = {"holder": holder, "shares": shares, "fraction": shares / supply if supply else 0.0,
                      "claimable_wei": client.claimable(mid, holder)}

    async def get(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(model facts, node figures), refreshed when older than `refresh_s`."""
        if time.monotonic() - self._at >= self.refresh_s:
            self._at = time.monotonic()
            try:
                await trio.to_thread.run_sync(self._read)
                self._node.pop("chain_error", None)
            except Exception as exc:  # the page stays up while the chain is unreachable
                self._node = {**self._node, "chain_error": f"{type(exc).__name__}: {exc}"[:200]}
        return self._model, self._node


class StatusPageService:
    """Serves the page on `cfg.host:cfg.port` in the node's nursery; `url` once started (also written to the
    status file as `status_url`). `services`: the node's other services (a chain link adds on-chain figures)."""

    def __init__(self, cfg: WebConfig, services: Sequence[NodeService] = ()) -> None:
        self.cfg = cfg
        links = [getattr(s, "link", None) for s in services]
        # a ChainLink exists only once protocol.payments was imported (by the chain link service that holds it)
        payments = sys.modules.get("protocol.payments")
        self.link: ChainLink | None = None if payments is None else next(
            (x for x in links if isinstance(x, payments.ChainLink)), None)
        self.url = ""

    async def start(self, ctx: NodeContext) -> None:
        cfg, limits = self.cfg, SnapshotLimits(history=self.cfg.history)
        figures = None if self.link is None else ChainFigures(self.link, ctx.identity.address, cfg.chain_refresh_s)
        model = {"name": ctx.cfg.model, "spec_hash": "0x" + ctx.model.spec_hash().hex(), "stages": ctx.cfg.num_stages,
                 "params": param_count(ctx.model)}

        def units_per_cosigned() -> float | None:
            worker = ctx.worker
            if worker is None:
                return None
            spec, s = worker.spec, worker.spec.index
            hops = 2 * ((s > 0) + (s < ctx.cfg.num_stages - 1))  # co-signed receipts stored per microbatch
            tokens = ctx.cfg.runtime.microbatch_size * ctx.model.seq_len
            return compute_units(ctx.model, spec, tokens) / hops if hops else None

        async def source() -> dict[str, Any]:
            chain_model, chain_node = await figures.get() if figures is not None else ({}, {})
            announced = [(e.stage, e.peer_id, e.throughput) for e in ctx.discovery.entries()]
            chain = {**chain_node, "units_per_cosigned": units_per_cosigned()}
            part = await trio.to_thread.run_sync(node_part, ctx.data_dir, limits, chain)
            part[0]["steps_total"] = ctx.cfg.runtime.steps
            title = f"node {ctx.identity.address[:10]}… · stage {part[0].get('stage')}"
            return page(title, {**model, **chain_model}, [part], announced)

        self.url = await ctx.nursery.start(serve_page, make_app(source, cfg.poll_s), cfg.host, cfg.port,
                                           cfg.graceful_s)
        ctx.log.status(status_url=self.url)
        print(f"status page at {self.url}", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Nothing to release: the server ends with the node's nursery."""
