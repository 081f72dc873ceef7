"""The node's lifecycle: identity, host, discovery, services, signals, status files, shutdown.

`NodeDaemon(cfg).run()` drives one runner chosen by the config (`node.pipeline.runner` by default,
`node.pipeline.asyncrun` with `runtime.schedule = "async"`, `node.replicas.runner` with `replicas.enabled`) between start and shutdown. On start it prints one JSON
line `{"event": "ready", "peer_id": ..., "addrs": [...], "stage": ...}` to stdout (launchers parse it),
then trains `cfg.runtime.steps` global steps and exits 0 (with `linger`, it keeps serving until signalled).
SIGINT/SIGTERM: the partial step is dropped, a checkpoint of the last completed step is saved, the
streams are closed, exit code 130/143.

The command line is `node.cli` (`python -m node` / `python -m node.daemon`).
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import trio
from libp2p.abc import IHost

from node.config import NodeConfig
from node.context import NodeContext, Runner
from node.errors import DataMismatchError, NodeError
from node.model import load_model_config, optim_config
from node.net.access import NodeAccess
from node.net.dht import ModelDht
from node.net.discovery import Announcement, Discovery
from node.net.host import full_addrs, make_host, parse_listen
from node.net.identity import NodeIdentity, bind, load_or_create_identity
from node.net.running import run_host
from node.observability.steps import NodeLog, StepReport
from node.pipeline.asyncrun import AsyncPipelineRunner
from node.pipeline.runner import PipelineRunner
from node.replicas.runner import ReplicatedRunner
from node.services.base import AccessProvider, NodeService
from node.services.nat import NatService
from node.services.spec_exchange import serve_own_spec
from node.services.status_page import StatusPageService
from node.wire.channel import ReceiptHook, peer_scores
from sharding import Corpus, ModelConfig, OptimConfig
from sharding.dataset import DataSpec, load_data_spec, load_prepared
from sharding.errors import DataError


@dataclass
class Signalled:
    """How `stop_on_signal`'s body ended: `code` is 128 + the signal number, or 0 when no signal came."""

    code: int = 0


@asynccontextmanager
async def stop_on_signal(nursery: trio.Nursery) -> AsyncIterator[Signalled]:
    """Run the body until it ends or SIGINT/SIGTERM arrives; a signal cancels the body and sets `.code`.

    The watcher runs in `nursery` and ends with the block (also when the body ends before it first ran).
    """
    result = Signalled()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        stop = trio.CancelScope()
        watching = trio.CancelScope()

        async def watch_signals() -> None:
            with watching:
                if watching.cancel_called:  # the receiver block already ended before this task ran
                    return
                async for signum in signals:
                    result.code = 128 + int(signum)
                    stop.cancel()
                    return

        nursery.start_soon(watch_signals)
        try:
            with stop:
                yield result
        finally:
            watching.cancel()


def load_node_data(cfg: NodeConfig, model: ModelConfig) -> tuple[DataSpec | None, Corpus | None]:
    """The spec's [data] section (`cfg.dataset`) and its prepared token files, every hash checked.

    DataMismatchError names the field, both hashes and the fix; (None, None) without `cfg.dataset`.
    """
    if cfg.dataset is None:
        return None, None
    try:
        spec = load_data_spec(cfg.dataset)
        return spec, load_prepared(spec, model.vocab_size)
    except DataError as exc:
        raise DataMismatchError(str(exc)) from None


def make_runner(cfg: NodeConfig) -> Runner:
    """The runner the config asks for: replicated with `replicas.enabled`, the asynchronous pipeline with
    `runtime.schedule = "async"`, else the synchronous pipeline (gpipe or 1f1b order)."""
    if cfg.replicas.enabled:
        return ReplicatedRunner()
    return AsyncPipelineRunner() if cfg.runtime.schedule == "async" else PipelineRunner()


class NodeDaemon:
    """One node's lifetime inside a trio run.

    cfg: the node's configuration (validated here). receipts: optional hook signing every data frame.
    services: started once the stage is chosen, before the ready line (see `node.services.base`).
    """

    def __init__(self, cfg: NodeConfig, receipts: ReceiptHook | None = None,
                 services: Sequence[NodeService] = ()) -> None:
        cfg.validate()
        self.cfg = cfg
        self.receipts = receipts
        self.services = list(services)
        # nodes behind home routers: reachability, circuit relay v2, hole punching (started first)
        self.nat: NatService | None = NatService(cfg.nat, cfg.bootstrap) if cfg.nat.enabled else None
        if self.nat is not None:
            self.services.insert(0, self.nat)
        # on-chain mode: the access policy a service provides (the chain link); None: off-chain defaults
        self.access: NodeAccess | None = next((s.access for s in self.services if isinstance(s, AccessProvider)),
                                              None)
        self.data_dir = Path(cfg.data_dir).expanduser()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.identity: NodeIdentity = load_or_create_identity(self.data_dir)
        self.binding = bind(self.identity)  # node key's signature over the peer id (handshake, announcements)
        self.model = load_model_config(cfg.model)
        # the spec's dataset, checked before any weight is allocated
        self.data, self.corpus = load_node_data(cfg, self.model)
        self.optim: OptimConfig = optim_config(cfg, self.model)  # the spec's recipe (schedule, clip, AdamW)
        self.runner = make_runner(cfg)
        self.discovery: Discovery | None = None  # set when the host runs
        self.context: NodeContext | None = None  # set when the host runs
        self.log = NodeLog(self.data_dir, self._dht_status)

    @property
    def results(self) -> list[StepReport]:
        """Every step this node completed in this process, in order."""
        return self.log.reports

    def _dht_status(self) -> dict[str, Any]:
        dht = self.discovery.dht if self.discovery is not None else None
        if dht is None or self.discovery is None:
            return {}
        return {"dht": {"routing_table": dht.routing_table_size(), "provides": dht.provides, "lookups": dht.lookups,
                        "errors": dict(dht.errors), "learned": len(self.discovery.dht_learned)}}

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> int:
        """Start, train, shut down; returns the exit code (0, or 128 + signal). NodeError when training failed."""
        cfg = self.cfg
        if cfg.runtime.torch_threads > 0:
            torch.set_num_threads(cfg.runtime.torch_threads)
        host = make_host(self.identity, config=cfg.transport, relay_dialing=cfg.nat.enabled)
        try:
            return await self._run(host, task_status)
        finally:
            for service in reversed(self.services):
                service.close()

    async def _run(self, host: IHost, task_status: Any) -> int:
        cfg, log, runner = self.cfg, self.log, self.runner
        spec_hex = self.model.spec_hash().hex()
        async with run_host(host, parse_listen(cfg.listen)), trio.open_nursery() as nursery:
            addrs = full_addrs(host)
            me = Announcement(peer_id=host.get_id().pretty(), addrs=tuple(addrs), spec_hash=spec_hex,
                              num_stages=cfg.num_stages, stage=-1, capacity=cfg.capacity,
                              address=self.identity.address, binding="0x" + self.binding.hex())
            d = cfg.discovery
            dht = ModelDht(host, spec_hex, d.dht) if d.dht.enabled else None
            access = self.access
            scores = peer_scores(cfg.transport)  # one table for every protocol this node serves
            discovery = self.discovery = Discovery(host, me, d, cfg.bootstrap, dht, identity=self.identity,
                                                   policy=access, admit=None if access is None else access.admit,
                                                   scores=scores)
            if access is not None:
                access.attach(discovery)
            ctx = self.context = NodeContext(cfg, self.model, self.optim, self.identity, self.binding, self.data_dir,
                                             host, discovery, nursery, log, self.receipts, access=access,
                                             data=self.data, corpus=self.corpus, scores=scores)
            stage = await runner.prepare(ctx)
            nursery.start_soon(discovery.run)
            for service in self.services:
                await service.start(ctx)
            if cfg.metrics_port:
                log.serve_metrics(stage, cfg.metrics_port)
            serve_own_spec(ctx)  # /pmn/spec/1.0.0: newcomers fetch this model's spec by its on-chain hash
            page = StatusPageService(cfg.web, self.services) if cfg.web.port else None
            if page is not None:
                await page.start(ctx)
            log.state = "running"
            addrs = list(discovery.me.addrs)  # what the node announces (a private node: its relayed addresses first)
            nat = {} if self.nat is None or self.nat.reach is None else {"reachability": self.nat.reach.state}
            ready = {"event": "ready", "peer_id": me.peer_id, "addrs": addrs, "stage": stage, **nat,
                     "address": self.identity.address, **runner.ready_fields(), "metrics_port": cfg.metrics_port,
                     "status_url": page.url if page is not None else None}
            if self.data is not None:  # the spec's dataset every stage reads its windows from (hash-checked at start)
                ready["data_hash"] = self.data.data_hash()
                ready["local_windows"] = ctx.local_windows
            log.status(**ready)
            print(json.dumps(ready), flush=True)
            print(f"node {me.peer_id} (address {self.identity.address}) serving stage {stage}/{cfg.num_stages}"
                  f"{runner.label} of model 0x{spec_hex[:16]}..., listening on {' '.join(addrs)}",
                  file=sys.stderr, flush=True)
            task_status.started(ready)
            failure: NodeError | None = None
            async with stop_on_signal(nursery) as signalled:
                try:
                    await runner.run(ctx)
                except NodeError as exc:  # re-raised outside the nursery, unwrapped
                    failure = exc
                    log.state = "failed"
                    log.status(error=str(exc))
                if cfg.linger and failure is None:
                    log.state = "serving"
                    next_step = runner.checkpoint(ctx)
                    log.status(next_step=next_step)
                    print(json.dumps({"event": "trained", "next_step": next_step}), flush=True)
                    await trio.sleep_forever()
            code = signalled.code
            # interrupted or finished: drop a partial step, keep the last completed one
            next_step = runner.checkpoint(ctx)
            log.state = "failed" if failure else "stopped" if code else "finished"
            log.status(next_step=next_step)
            if self.nat is not None:
                # the last paths, dials and punches, before the connections close (a signalled stop waits on none)
                await self.nat.flush_status(settle=not code)
            await runner.close(ctx)
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return code


def run_node(cfg: NodeConfig, receipts: ReceiptHook | None = None, services: Sequence[NodeService] = ()) -> int:
    """Run a node until it has trained `cfg.runtime.steps` steps or is signalled; returns the exit code.

    cfg: the node's configuration (see NodeConfig; `stage="auto"` picks the least-served stage).
    receipts: optional ReceiptHook that signs/countersigns every data frame.
    services: started before the ready line (chain link, audit, inference, ...).
    Errors (a neighbour lost after `step_retries` retries, bad config) raise NodeError / ValueError.
    """
    daemon = NodeDaemon(cfg, receipts=receipts, services=services)
    return trio.run(daemon.run)


if __name__ == "__main__":  # `python -m node.daemon ...` is `python -m node ...` (the flags live in node.cli)
    import runpy

    runpy.run_module("node", run_name="__main__", alter_sys=True)
