"""The node daemon: host + discovery + activation protocol + pipeline runtime + checkpoints.

`run_node(cfg)` is what `pmn node start` calls; `python -m node.daemon --help` runs it directly.
On start it prints one JSON line `{"event": "ready", "peer_id": ..., "addrs": [...], "stage": ...}` to
stdout (launchers parse it), then trains `cfg.runtime.steps` global steps and exits 0.
SIGINT/SIGTERM: the partial step is dropped, a checkpoint of the last completed step is saved, the
streams are closed, exit code 130/143.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import trio

from node.config import NodeConfig, ReplicaConfig
from node.errors import CheckpointError, NodeError, PeerLostError, ResyncNeededError
from node.net.dht import ModelDht
from node.net.discovery import Announcement, Discovery, choose_stage
from node.net.host import full_addrs, make_host, parse_listen
from node.net.identity import NodeIdentity, bind, load_or_create_identity
from node.observability.metrics import NodeMetrics
from node.observability.status import append_progress, write_status
from node.pipeline.runtime import PipelineRuntime, StepResult
from node.replicas.averaging import AveragingService, ContributionStore, trainable
from node.replicas.engine import ReplicaEngine, StepOutcome
from node.replicas.rebalance import Move
from node.replicas.statesync import StateService, fetch_state, pack_state
from node.services.hooks import chain_hooks, report_error
from node.training.checkpoint import checkpoint_at, latest_checkpoint, load_checkpoint, save_checkpoint
from node.training.worker import StageWorker
from node.wire.channel import ActChannel, ActEndpoint, LocalInfo, ReceiptHook
from sharding import PRESETS, ModelConfig, OptimConfig, load_corpus, partition

RETRYABLE = (NodeError,)


def load_model_config(model: str) -> ModelConfig:
    """A preset name or a path to a JSON ModelConfig (ValueError names the choices)."""
    if model in PRESETS:
        return PRESETS[model]
    path = Path(model).expanduser()
    if path.exists():
        return ModelConfig.from_dict(json.loads(path.read_text())).validate()
    raise ValueError(f"model {model!r} is neither a preset ({sorted(PRESETS)}) nor a JSON file")


@dataclass
class _Links:
    up: ActChannel | None = None
    down: ActChannel | None = None


def choose_replica_stage(entries: list[Announcement], spec_hash: str, num_stages: int) -> int:
    """Replicated mode: stage 0 while nobody serves it (it is the step authority and stays single),
    otherwise the other stage with the least announced capacity (lowest index on ties)."""
    load = [0] * num_stages
    for e in entries:
        if e.spec_hash == spec_hash and e.num_stages == num_stages and 0 <= e.stage < num_stages:
            load[e.stage] += e.capacity
    if load[0] == 0 or num_stages == 1:
        return 0
    return min(range(1, num_stages), key=lambda s: (load[s], s))


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


class NodeDaemon:
    """One node's lifetime inside a trio run."""

    def __init__(self, cfg: NodeConfig, corpus_source: str | None = None, receipts: ReceiptHook | None = None,
                 services: list[Any] | None = None, linger: bool = False) -> None:
        cfg.validate()
        self.cfg = cfg
        self.services = list(services or [])  # async hooks (daemon, host, discovery, nursery) run once at start
        self.linger = linger  # keep serving (inference, announcements) after the last step until signalled
        self.inference: Any = None  # the InferenceService, when a service hook installs one
        self.corpus_source = corpus_source
        self.receipts = receipts
        self.data_dir = Path(cfg.data_dir).expanduser()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.identity: NodeIdentity = load_or_create_identity(self.data_dir)
        self.binding = bind(self.identity)  # node key's signature over the peer id (handshake, announcements)
        self.model = load_model_config(cfg.model)
        optim = OptimConfig() if cfg.optim_lr is None else OptimConfig(lr=cfg.optim_lr)
        self.optim = optim.validate()
        self.worker: StageWorker | None = None
        self.links = _Links()
        self.state = "starting"
        self.results: list[StepResult] = []
        self.metrics: NodeMetrics | None = None
        self.engine: ReplicaEngine | None = None  # replicated mode: the engine of the stage served now
        self._serving = False  # replicated mode: state may be handed to joining peers
        self._stores: dict[int, ContributionStore] = {}  # replicated mode: newest contribution store per stage
        self._status: dict[str, Any] = {}
        self.discovery: Discovery | None = None  # set when the host runs

    # -- helpers -----------------------------------------------------------------------------------

    def _discovery(self, host: Any, me: Announcement) -> Discovery:
        """Gossip discovery, with the Kademlia DHT unless `discovery.dht.enabled` is False."""
        d = self.cfg.discovery
        dht = ModelDht(host, me.spec_hash, d.dht) if d.dht.enabled else None
        self.discovery = Discovery(host, me, d, self.cfg.bootstrap, dht)
        return self.discovery

    def _write_status(self, **changes: Any) -> None:
        dht = self.discovery.dht if self.discovery is not None else None
        if dht is not None:
            changes["dht"] = {"routing_table": dht.routing_table_size(), "provides": dht.provides,
                              "lookups": dht.lookups, "errors": dict(dht.errors),
                              "learned": len(self.discovery.dht_learned) if self.discovery else 0}
        self._status.update(changes, state=self.state, time=time.time())
        write_status(self.data_dir, self._status)

    def _build_worker(self, stage: int) -> StageWorker:
        specs = partition(self.model, self.cfg.num_stages)
        spec = specs[stage]
        corpus = load_corpus(self.corpus_source) if spec.is_first else None
        r = self.cfg.runtime
        worker = StageWorker(self.model, spec, codec=r.codec, optim=self.optim, num_microbatches=r.num_microbatches,
                             microbatch_size=r.microbatch_size, corpus=corpus)
        ckpt = latest_checkpoint(self.data_dir, stage)
        if ckpt is not None:
            load_checkpoint(worker, ckpt)
        return worker

    async def _reset_links(self) -> None:
        for ch in (self.links.up, self.links.down):
            if ch is not None:
                try:
                    await ch.stream.reset()
                except Exception:  # already gone
                    pass
        self.links = _Links()

    async def _align_step(self, ch: ActChannel) -> None:
        """If the neighbour is behind us (it stopped before applying a step we applied), roll back to its step."""
        assert self.worker is not None and ch.remote is not None
        theirs, ours = ch.remote.next_step, self.worker.next_step
        if theirs < 0 or theirs >= ours:
            return
        ckpt = checkpoint_at(self.data_dir, self.worker.spec.index, theirs)
        if ckpt is None:
            raise CheckpointError(f"stage {self.worker.spec.index} is at step {ours} but neighbour {ch.peer} "
                                  f"(stage {ch.remote_stage}) is at step {theirs} and no checkpoint of step "
                                  f"{theirs} is kept here")
        await trio.to_thread.run_sync(load_checkpoint, self.worker, ckpt)
        self._write_status(next_step=theirs, rolled_back_from=ours)

    async def _ensure_links(self, endpoint: ActEndpoint, discovery: Discovery, nursery: trio.Nursery,
                            first: bool = False) -> None:
        """Dial the next stage and accept the previous one (named timeouts; PeerLostError names the stage).

        The first time the wait is `discovery.discovery_timeout_s` (neighbours may still be starting),
        afterwards `runtime.redial_timeout_s`.
        """
        assert self.worker is not None
        spec = self.worker.spec
        r = self.cfg.runtime
        limit = self.cfg.discovery.discovery_timeout_s if first else r.redial_timeout_s
        limit_name = "discovery_timeout_s" if first else "redial_timeout_s"
        if not spec.is_first and (self.links.up is None or self.links.up.failure is not None):
            want = spec.index - 1
            with trio.move_on_after(limit):
                while self.links.up is None:
                    ch = await endpoint.incoming.receive()
                    if ch.failure is None and ch.remote_stage == want:
                        await self._align_step(ch)
                        self.links.up = ch
                    else:
                        await ch.send_error(f"stage {spec.index} accepts activations only from stage {want}")
                        await ch.linger_and_reset()
            if self.links.up is None:
                raise PeerLostError(f"stage {spec.index}: no peer for stage {want} connected within "
                                    f"{limit_name}={limit}", "", want)
        if not spec.is_last and (self.links.down is None or self.links.down.failure is not None):
            want = spec.index + 1
            backoff = r.retry_backoff_s
            deadline = trio.current_time() + limit
            last: Exception | None = None
            while self.links.down is None:
                left = deadline - trio.current_time()
                if left <= 0:
                    raise PeerLostError(f"stage {spec.index}: could not reach a peer for stage {want} within "
                                        f"{limit_name}={limit}: {last}", "", want)
                try:
                    ann = await discovery.wait_for_stage(want, timeout_s=left)
                    ch = await endpoint.open(ann.addrs[0])
                    nursery.start_soon(ch.run_reader)
                    self.links.down = ch
                except Exception as exc:  # dial errors come as many libp2p / OS types
                    last = exc
                    await trio.sleep(min(backoff, max(0.0, deadline - trio.current_time())))
                    backoff *= 2
            await self._align_step(self.links.down)

    # -- main --------------------------------------------------------------------------------------

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> int:
        cfg = self.cfg
        if cfg.runtime.torch_threads > 0:
            torch.set_num_threads(cfg.runtime.torch_threads)
        if cfg.replicas.enabled:
            return await self._run_replicated(task_status)
        host = make_host(self.identity, cfg.transport.yamux_frame_bytes, cfg.transport.tcp_read_bytes)
        listen = parse_listen(cfg.listen)
        spec_hash = self.model.spec_hash()
        async with host.run(listen_addrs=listen), trio.open_nursery() as nursery:
            addrs = full_addrs(host)
            stage = -1 if cfg.stage == "auto" else int(cfg.stage)
            me = Announcement(peer_id=host.get_id().pretty(), addrs=tuple(addrs), spec_hash=spec_hash.hex(),
                              num_stages=cfg.num_stages, stage=stage, capacity=cfg.capacity,
                              address=self.identity.address, binding="0x" + self.binding.hex())
            discovery = self._discovery(host, me)
            if stage < 0:
                await discovery.first_round()
                stage = choose_stage(discovery.entries(), spec_hash.hex(), cfg.num_stages)
                discovery.update_me(stage=stage)
            nursery.start_soon(discovery.run)
            self.worker = self._build_worker(stage)
            worker = self.worker
            endpoint = ActEndpoint(
                host, local=LocalInfo(spec_hash, stage, cfg.num_stages, self.identity.address, self.binding),
                frame_spec=worker.frame_spec(cfg.transport.max_frame_bytes), cfg=cfg.transport,
                receipts=self.receipts, decoder=worker.decode, step_fn=lambda: worker.next_step)
            for hook in self.services:
                await hook(self, host, discovery, nursery)
            if cfg.metrics_port:
                self.metrics = NodeMetrics(stage)
                self.metrics.serve(cfg.metrics_port)
            self.state = "running"
            ready = {"event": "ready", "peer_id": me.peer_id, "addrs": addrs, "stage": stage,
                     "address": self.identity.address, "next_step": worker.next_step,
                     "metrics_port": cfg.metrics_port}
            self._write_status(**ready)
            print(json.dumps(ready), flush=True)
            print(f"node {me.peer_id} (address {self.identity.address}) serving stage {stage}/{cfg.num_stages} "
                  f"of model 0x{spec_hash.hex()[:16]}..., listening on {' '.join(addrs)}", file=sys.stderr, flush=True)
            task_status.started(ready)
            failure: NodeError | None = None
            async with stop_on_signal(nursery) as signalled:
                try:
                    await self._train(endpoint, discovery, nursery)
                except NodeError as exc:  # re-raised outside the nursery, unwrapped
                    failure = exc
                if self.linger:
                    self.state = "serving"
                    save_checkpoint(worker, self.data_dir)
                    self._write_status(next_step=worker.next_step)
                    print(json.dumps({"event": "trained", "next_step": worker.next_step}), flush=True)
                    await trio.sleep_forever()
            code = signalled.code
            # interrupted or finished: drop a partial step, keep the last completed one
            worker.abort_step()
            save_checkpoint(worker, self.data_dir)
            self.state = "failed" if failure else "stopped" if code else "finished"
            self._write_status(next_step=worker.next_step)
            for ch in (self.links.down, self.links.up):
                if ch is not None:
                    await ch.close()
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return code

    async def _train(self, endpoint: ActEndpoint, discovery: Discovery, nursery: trio.Nursery) -> None:
        assert self.worker is not None
        worker, cfg, r = self.worker, self.cfg, self.cfg.runtime
        progress = _Progress(r.steps, worker.next_step, worker.spec.index) if cfg.progress else None
        attempts = 0
        first_error: NodeError | None = None
        linked_once = False
        try:
            while worker.next_step < r.steps:
                step = worker.next_step
                try:
                    await self._ensure_links(endpoint, discovery, nursery, first=not linked_once)
                    linked_once = True
                    runtime = PipelineRuntime(worker, r, self.links.up, self.links.down)
                    try:
                        res = await runtime.run_step(step)
                    finally:
                        runtime.detach()
                except RETRYABLE as exc:
                    attempts += 1
                    first_error = first_error or exc
                    worker.abort_step()
                    await self._reset_links()
                    if attempts > r.step_retries or not linked_once:
                        self.state = "failed"
                        if first_error is not exc:
                            peer = getattr(first_error, "peer", "")
                            stage = getattr(first_error, "stage", -1)
                            exc = PeerLostError(f"{first_error}; step {step} failed {attempts} time(s), "
                                                f"last: {exc}", peer, stage)
                        self._write_status(error=str(exc))
                        raise exc
                    self._write_status(last_retry=str(exc))
                    await trio.sleep(r.retry_backoff_s * 2 ** (attempts - 1))
                    continue
                attempts = 0
                first_error = None
                self._after_step(res, len(endpoint.host.get_connected_peers()))
                if progress:
                    progress.update(res)
                if r.checkpoint_every and worker.next_step % r.checkpoint_every == 0:
                    await trio.to_thread.run_sync(save_checkpoint, worker, self.data_dir)
        finally:
            if progress:
                progress.close()

    # -- replicated mode ---------------------------------------------------------------------------

    async def _run_replicated(self, task_status: Any) -> int:
        """Replicated mode: several nodes per stage, routing, failover, averaging, joining, rebalancing."""
        cfg = self.cfg
        host = make_host(self.identity, cfg.transport.yamux_frame_bytes, cfg.transport.tcp_read_bytes)
        spec_hex = self.model.spec_hash().hex()
        async with host.run(listen_addrs=parse_listen(cfg.listen)), trio.open_nursery() as nursery:
            addrs = full_addrs(host)
            me = Announcement(peer_id=host.get_id().pretty(), addrs=tuple(addrs), spec_hash=spec_hex,
                              num_stages=cfg.num_stages, stage=-1, capacity=cfg.capacity,
                              address=self.identity.address, binding="0x" + self.binding.hex())
            discovery = self._discovery(host, me)
            await discovery.first_round()
            stage = choose_replica_stage(discovery.entries(), spec_hex, cfg.num_stages) if cfg.stage == "auto" \
                else int(cfg.stage)
            nursery.start_soon(discovery.run)
            rc = cfg.replicas
            AveragingService(host, spec_hex, self._avg_target, rc.avg_timeout_s)
            StateService(host, spec_hex, self._snapshot, rc.state_timeout_s, max_concurrent=rc.state_max_concurrent,
                         burst=rc.state_burst, refill_s=rc.state_refill_s)
            if cfg.metrics_port:
                self.metrics = NodeMetrics(stage)
                self.metrics.serve(cfg.metrics_port)
            self.state = "running"
            ready = {"event": "ready", "peer_id": me.peer_id, "addrs": addrs, "stage": stage,
                     "address": self.identity.address, "metrics_port": cfg.metrics_port, "replicated": True}
            self._write_status(**ready)
            print(json.dumps(ready), flush=True)
            print(f"node {me.peer_id} serving stage {stage}/{cfg.num_stages} (replicated) of model "
                  f"0x{spec_hex[:16]}..., listening on {' '.join(addrs)}", file=sys.stderr, flush=True)
            task_status.started(ready)
            failure: NodeError | None = None
            async with stop_on_signal(nursery) as signalled:
                try:
                    await self._replicated_loop(host, discovery, stage)
                except NodeError as exc:
                    failure = exc
                    self._write_status(error=str(exc))
                if self.linger and failure is None:
                    self.state = "serving"
                    print(json.dumps({"event": "trained", "next_step": self.worker.next_step if self.worker
                                      else 0}), flush=True)
                    await trio.sleep_forever()
            code = signalled.code
            if self.worker is not None:
                self.worker.abort_step()
                save_checkpoint(self.worker, self.data_dir)
            self.state = "failed" if failure else "stopped" if code else "finished"
            self._write_status(next_step=self.worker.next_step if self.worker else 0)
            if self.engine is not None:
                with trio.move_on_after(2):
                    await self.engine.close()
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return code

    def _avg_target(self, stage: int) -> ContributionStore | None:
        """The newest contribution store of `stage` (a node that moved still answers for its old stage)."""
        return self._stores.get(stage)

    async def _snapshot(self, stage: int) -> tuple[dict[str, Any], bytes] | None:
        eng = self.engine
        if eng is None or eng.stage != stage or not self._serving:
            return None
        async with eng.lock:
            return await trio.to_thread.run_sync(pack_state, eng.worker)

    async def _sync_state(self, eng: ReplicaEngine, discovery: Discovery) -> int | None:
        """Joining: fetch the stage's state from the most advanced live peer ahead of us, if any.

        Returns None when synced or when no peer is ahead, else the newest step announced by the
        peers ahead of us, none of which could give us their state."""
        ahead = [e for e in discovery.stage_peers(eng.stage) if e.next_step > eng.worker.next_step and e.addrs]
        for e in sorted(ahead, key=lambda e: (-e.next_step, e.peer_id)):
            try:
                got = await fetch_state(discovery.host, e.addrs[0], eng.worker, self.cfg.replicas.state_timeout_s)
            except NodeError as exc:
                self._write_status(last_sync_error=str(exc))
                continue
            eng.current_step = got
            self._write_status(synced_from=e.peer_id, synced_step=got)
            return None
        return max((e.next_step for e in ahead), default=None)

    async def _replicated_loop(self, host: Any, discovery: Discovery, stage: int) -> None:
        cfg, r = self.cfg, self.cfg.runtime
        moved_from: int | None = None
        unsynced_since: float | None = None  # when re-syncing first failed with every peer ahead of us
        while True:
            worker = await trio.to_thread.run_sync(self._build_worker, stage)
            self.worker = worker
            store = ContributionStore(sum(p.numel() for p in trainable(worker.module)))
            endpoint = ActEndpoint(
                host, local=LocalInfo(self.model.spec_hash(), stage, cfg.num_stages, self.identity.address,
                                                 self.binding),
                frame_spec=worker.frame_spec(cfg.transport.max_frame_bytes), cfg=cfg.transport,
                receipts=self.receipts, step_fn=lambda w=worker: w.next_step)  # type: ignore[misc]
            eng = ReplicaEngine(cfg, worker, endpoint, discovery, host, store)
            endpoint.decoder = eng.decode
            self._stores[stage] = store
            self.engine = eng
            self._serving = False
            newest = await self._sync_state(eng, discovery)
            if newest is None:
                unsynced_since = None
            else:
                # Every peer ahead of us is unreachable. If they announced the run's last step, the run
                # finished without us (we fell behind at its very end): stop cleanly. Otherwise retry
                # until replicas.no_replica_timeout_s, then fail with the reason instead of hanging.
                now = trio.current_time()
                unsynced_since = now if unsynced_since is None else unsynced_since
                if newest >= r.steps - 1:
                    self._write_status(ended_behind=f"the other replicas of stage {stage} reached step {newest} of "
                                                    f"{r.steps} and left while this one was at step "
                                                    f"{worker.next_step}: the run finished without it")
                    return
                if now - unsynced_since > cfg.replicas.no_replica_timeout_s:
                    raise NodeError(f"stage {stage} replica is at step {worker.next_step}, its stage peers announced "
                                    f"step {newest} and none could give its state within "
                                    f"replicas.no_replica_timeout_s={cfg.replicas.no_replica_timeout_s}")
                await trio.sleep(r.retry_backoff_s)
            self._serving = True
            discovery.update_me(stage=stage, next_step=worker.next_step)
            self._write_status(stage=stage, next_step=worker.next_step, moved_from=moved_from)
            move: Move | None = None
            outcome: NodeError | None = None  # raised outside the nursery (no exception groups)
            progress = _Progress(r.steps, worker.next_step, stage) if cfg.progress else None
            try:
                async with trio.open_nursery() as en:
                    en.start_soon(eng.accept_loop)
                    en.start_soon(eng.dial_loop, en)
                    en.start_soon(eng.commit_poller)
                    en.start_soon(eng.probe_loop)
                    try:
                        move = await self._serve_stage(eng, discovery, worker, progress)
                    except NodeError as exc:
                        outcome = exc
                    if move is not None or isinstance(outcome, ResyncNeededError):
                        discovery.update_me(stage=-1)
                        self._serving = False
                        await trio.to_thread.run_sync(save_checkpoint, worker, self.data_dir)
                        with trio.move_on_after(2):
                            await eng.close()
                    en.cancel_scope.cancel()
            finally:
                if progress:
                    progress.close()
            if isinstance(outcome, ResyncNeededError):
                self._write_status(last_resync=str(outcome))
                continue
            if outcome is not None:
                raise outcome
            if move is None:
                return
            moved_from = stage
            stage = move.to_stage
            self._write_status(moved_to=stage, move=json.dumps(move.__dict__))
            print(json.dumps({"event": "move", "from_stage": move.from_stage, "to_stage": move.to_stage,
                              "step": worker.next_step}), flush=True)

    async def _serve_stage(self, eng: ReplicaEngine, discovery: Discovery, worker: StageWorker,
                           progress: _Progress | None) -> Move | None:
        """Steps until the run is done (None) or a rebalancing move is due (the move)."""
        r, rc = self.cfg.runtime, self.cfg.replicas
        last_plan = trio.current_time()
        while worker.next_step < r.steps:
            out = await eng.run_step(worker.next_step)
            self._after_replica_step(out, eng)
            discovery.update_me(next_step=worker.next_step, throughput=eng.throughput)
            if progress:
                progress.update(StepResult(out.step, eng.stage, out.loss, out.tokens, out.seconds, 0.0))
            if r.checkpoint_every and worker.next_step % r.checkpoint_every == 0:
                await trio.to_thread.run_sync(save_checkpoint, worker, self.data_dir)
            now = trio.current_time()
            if rc.rebalance_period_s and now - last_plan >= rc.rebalance_period_s:
                last_plan = now
                move = eng.plan(discovery.me.peer_id)
                if move is not None and worker.next_step < r.steps:
                    return move
        await self._finish_grace(eng, discovery)
        return None

    async def _finish_grace(self, eng: ReplicaEngine, discovery: Discovery) -> None:
        """Last one out: keep serving state, commits and contributions for up to `replicas.finish_grace_s`
        while a peer of this stage (or one re-syncing, announced as stage -1) is still behind, so a replica
        that fell behind near the end of the run can catch up instead of finding nobody to sync from."""
        steps, rc = self.cfg.runtime.steps, self.cfg.replicas
        deadline = trio.current_time() + rc.finish_grace_s

        def someone_behind() -> bool:
            fresh = 4 * self.cfg.discovery.announce_interval_s  # a peer that stopped answering is not waited for
            return any(e.next_step < steps for e in discovery.entries(max_age_s=fresh)
                       if e.stage in (eng.stage, -1) and e.spec_hash == discovery.me.spec_hash
                       and e.num_stages == discovery.me.num_stages)

        while trio.current_time() < deadline and someone_behind():
            await trio.sleep(min(rc.commit_poll_s, max(0.0, deadline - trio.current_time())))

    def _after_replica_step(self, out: StepOutcome, eng: ReplicaEngine) -> None:
        tok_s = out.tokens / out.seconds if out.seconds > 0 else 0.0
        record = {"step": out.step, "stage": eng.stage, "loss": out.loss, "tokens": out.tokens,
                  "seconds": out.seconds, "tokens_per_s": tok_s, "comm_wait_s": max(0.0, out.seconds - out.compute_s),
                  "bytes_in": 0, "bytes_out": 0, "end_time": time.time(), "applied": out.applied, "mine": out.mine,
                  "computed": out.computed, "dropped": out.dropped, "rerouted": out.rerouted,
                  "compute_s": out.compute_s, "throughput": eng.throughput}
        append_progress(self.data_dir, record)
        self._write_status(step=out.step, next_step=out.step + 1, loss=out.loss, tokens_per_s=tok_s,
                           bans=eng.events[-20:], stage=eng.stage)
        if self.metrics:
            self.metrics.tokens_per_s.set(tok_s)
            self.metrics.step.set(out.step)
            if out.loss is not None:
                self.metrics.loss.set(out.loss)

    def _after_step(self, res: StepResult, peers: int) -> None:
        self.results.append(res)
        tok_s = res.tokens / res.seconds if res.seconds > 0 else 0.0
        record = {"step": res.step, "stage": res.stage, "loss": res.loss, "tokens": res.tokens,
                  "seconds": res.seconds, "tokens_per_s": tok_s, "comm_wait_s": res.comm_wait_s,
                  "bytes_in": res.bytes_in, "bytes_out": res.bytes_out, "end_time": time.time()}
        append_progress(self.data_dir, record)
        self._write_status(step=res.step, next_step=res.step + 1, loss=res.loss, tokens_per_s=tok_s, peers=peers)
        if self.metrics:
            m = self.metrics
            m.tokens_per_s.set(tok_s)
            m.step.set(res.step)
            if res.loss is not None:
                m.loss.set(res.loss)
            m.bytes_in.inc(res.bytes_in)
            m.bytes_out.inc(res.bytes_out)
            m.peers.set(peers)
            m.comm_fraction.set(res.comm_wait_s / res.seconds if res.seconds > 0 else 0.0)


class _Progress:
    """Live progress line on stderr (rich)."""

    def __init__(self, total: int, done: int, stage: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn

        self.progress = Progress(TextColumn(f"stage {stage}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                 TextColumn("{task.description}"), console=Console(stderr=True))
        self.task = self.progress.add_task("", total=total, completed=done)
        self.progress.start()

    def update(self, res: StepResult) -> None:
        tok_s = res.tokens / res.seconds if res.seconds else 0.0
        loss = f"loss {res.loss:.4f} " if res.loss is not None else ""
        self.progress.update(self.task, completed=res.step + 1, description=f"{loss}{tok_s:,.0f} tok/s")

    def close(self) -> None:
        self.progress.stop()


def run_node(cfg: NodeConfig, corpus: str | None = None, receipts: ReceiptHook | None = None,
             services: list[Any] | None = None, linger: bool = False) -> int:
    """Run a node until it has trained `cfg.runtime.steps` steps or is signalled; returns the exit code.

    cfg: the node's configuration (see NodeConfig; `stage="auto"` picks the least-served stage).
    corpus: sharding.load_corpus source for the head stage (None = the stdlib corpus).
    receipts: optional ReceiptHook that signs/countersigns every data frame.
    Errors (a neighbour lost after `step_retries` retries, bad config) raise NodeError / ValueError.
    """
    daemon = NodeDaemon(cfg, corpus_source=corpus, receipts=receipts, services=services, linger=linger)
    return trio.run(daemon.run)


def build_parser() -> argparse.ArgumentParser:
    """Arguments of `python -m node.daemon` (the same names `pmn node start` uses)."""
    p = argparse.ArgumentParser(prog="python -m node.daemon", description="Run one pipeline-stage node.")
    p.add_argument("--model", default="tiny", help="preset name or JSON ModelConfig path")
    p.add_argument("--stages", type=int, default=2, help="pipeline depth")
    p.add_argument("--stage", default="auto", help="'auto' or a stage index")
    p.add_argument("--bootstrap", action="append", default=[], help="multiaddr with /p2p/<id> (repeatable)")
    p.add_argument("--listen", action="append", default=None, help="listen multiaddr (repeatable)")
    p.add_argument("--data-dir", default="~/.pmn/node")
    p.add_argument("--metrics-port", type=int, default=0)
    p.add_argument("--capacity", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--microbatch-size", type=int, default=4)
    p.add_argument("--codec", default="dense")
    p.add_argument("--corpus", default=None, help="sharding.load_corpus source (default: stdlib)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--checkpoint-every", type=int, default=1)
    p.add_argument("--frame-timeout", type=float, default=120.0)
    p.add_argument("--redial-timeout", type=float, default=30.0)
    p.add_argument("--step-retries", type=int, default=2)
    p.add_argument("--credits", type=int, default=4)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--rpc-url", default=None, help="chain JSON-RPC URL: sign receipts and serve paid inference")
    p.add_argument("--deployment", default=None, help="deployment file of the contracts (with --rpc-url)")
    p.add_argument("--model-id", type=int, default=0, help="on-chain model id (with --rpc-url)")
    p.add_argument("--linger", action="store_true", help="after the last step keep serving until signalled")
    p.add_argument("--replicated", action="store_true", help="replicated mode: several nodes may serve one stage")
    p.add_argument("--max-inflight", type=int, default=2, help="microbatches one downstream replica may hold")
    p.add_argument("--replica-timeout", type=float, default=10.0, help="round trip before re-route + ban (s)")
    p.add_argument("--ban-base", type=float, default=1.0, help="first ban (s); doubles per ban")
    p.add_argument("--ban-max", type=float, default=60.0, help="longest ban (s)")
    p.add_argument("--no-replica-timeout", type=float, default=30.0, help="wait for any usable replica (s)")
    p.add_argument("--avg-timeout", type=float, default=10.0, help="averaging deadline inside a stage (s)")
    p.add_argument("--commit-poll", type=float, default=1.0, help="idle time before asking stage peers (s)")
    p.add_argument("--keep-steps", type=int, default=ReplicaConfig.keep_steps,
                   help="steps of contributions kept for stage peers that fall behind")
    p.add_argument("--aggregation", default="mean", help="mean, median or centered_clip")
    p.add_argument("--rebalance-period", type=float, default=0.0, help="seconds between rebalance checks (0 = off)")
    p.add_argument("--rebalance-threshold", type=float, default=1.5, help="throughput ratio that triggers a move")
    p.add_argument("--no-dht", action="store_true", help="discovery by bootstrap peers + gossip only (no Kademlia DHT)")
    p.add_argument("--debug-delay-s", type=float, default=0.0, help="TEST ONLY: extra compute seconds per microbatch")
    return p


def config_from_args(a: argparse.Namespace) -> NodeConfig:
    """NodeConfig from parsed arguments."""
    cfg = NodeConfig(data_dir=a.data_dir, model=a.model, num_stages=a.stages, stage=str(a.stage),
                     bootstrap=list(a.bootstrap), capacity=a.capacity, metrics_port=a.metrics_port,
                     progress=not a.no_progress, optim_lr=a.lr)
    if a.listen:
        cfg.listen = list(a.listen)
    r = cfg.runtime
    r.steps, r.num_microbatches, r.microbatch_size, r.codec = a.steps, a.microbatches, a.microbatch_size, a.codec
    r.torch_threads, r.checkpoint_every = a.threads, a.checkpoint_every
    r.frame_timeout_s, r.redial_timeout_s, r.step_retries = a.frame_timeout, a.redial_timeout, a.step_retries
    cfg.transport.credits = a.credits
    cfg.discovery.dht.enabled = not a.no_dht
    rc = cfg.replicas
    rc.enabled, rc.max_inflight, rc.replica_timeout_s = a.replicated, a.max_inflight, a.replica_timeout
    rc.ban_base_s, rc.ban_max_s, rc.no_replica_timeout_s = a.ban_base, a.ban_max, a.no_replica_timeout
    rc.avg_timeout_s, rc.commit_poll_s, rc.aggregation = a.avg_timeout, a.commit_poll, a.aggregation
    rc.keep_steps = a.keep_steps
    rc.rebalance_period_s, rc.rebalance_threshold, rc.debug_delay_s = (a.rebalance_period, a.rebalance_threshold,
                                                                       a.debug_delay_s)
    return cfg


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: exit code 0 on success, 1 with a one-line error otherwise."""
    a = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(a)
        receipts, services = chain_hooks(a, cfg)
        return run_node(cfg, corpus=a.corpus, receipts=receipts, services=services, linger=a.linger)
    except Exception as caught:  # NodeError, ValueError, chain and protocol errors: one line, no traceback
        return report_error(caught)


def exit_now(code: int) -> None:
    """Flush and leave without interpreter finalization (several seconds with torch + py-libp2p loaded;
    every file and stream is already closed when main returns)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
