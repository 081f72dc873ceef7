"""The replicated runner: several nodes per stage, routing, failover, averaging, joining, rebalancing.

Stage 0 is the step authority: the first node to serve it leads (announces `head_term` 0); a node started
with `--stage 0` while a head is announced becomes a standby head replica that applies every step and takes
over when the leader dies (`node.replicas.heads`). A joining node fetches its stage's state from the most
advanced live peer, serves the stage with a `ReplicaEngine` until the run ends or a rebalancing move is
due, then re-joins at the new stage. When every holder of a stage's newer state is gone the swarm rolls back to
the newest step every stage holds (`node.replicas.rollback`). Every `runtime.eval_every` steps the leading head
evaluates the validation microbatches through one replica per stage (`node.pipeline.evaluation`) and records
`val_loss`.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import trio

from node.context import NodeContext
from node.errors import NodeError, ResyncNeededError, RollbackError, StateLostError
from node.net.access import ACT, EVAL, StagePeersPolicy
from node.net.discovery import Announcement, Discovery
from node.observability.steps import StepReport
from node.pipeline.asyncworker import AsyncStageWorker
from node.pipeline.evaluation import EvalService, Evaluation
from node.replicas import rollback
from node.replicas.averaging import AveragingService, ContributionCodec, ContributionStore
from node.replicas.delegation import DelegateLink, DelegationService
from node.replicas.engine import ReplicaEngine, StepOutcome
from node.replicas.rebalance import Move
from node.replicas.statesync import StateService, fetch_state, pack_state
from node.training.checkpoint import (
    abandon_checkpoints_after,
    checkpoint_at,
    checkpoint_steps,
    save_checkpoint,
)
from node.training.worker import StageWorker
from node.wire.channel import ActEndpoint


def choose_replica_stage(entries: list[Announcement], spec_hash: str, num_stages: int,
                         head_works: bool = False) -> int:
    """Replicated mode: stage 0 while nobody serves it (it is the step authority), otherwise the stage with the
    least announced capacity (lowest index on ties): among all stages when more head replicas add throughput
    (`head_works`: delegated head work, `node.replicas.delegation`), else among the others (a standby head
    replica computes nothing; it is added only on request, `--stage 0`)."""
    load = [0] * num_stages
    for e in entries:
        if e.spec_hash == spec_hash and e.num_stages == num_stages and 0 <= e.stage < num_stages:
            load[e.stage] += e.capacity
    if load[0] == 0 or num_stages == 1:
        return 0
    return min(range(0 if head_works else 1, num_stages), key=lambda s: (load[s], s))


def step_report(out: StepOutcome, eng: ReplicaEngine) -> StepReport:
    """The node-level report of one replicated step."""
    record = {"applied": out.applied, "mine": out.mine, "computed": out.computed, "dropped": out.dropped,
              "rerouted": out.rerouted, "compute_s": out.compute_s, "throughput": eng.throughput,
              "avg_wire_bytes": eng.store.wire_bytes,  # cumulative /pmn/avg bytes served for this stage
              "avg_pushes_in": eng.store.pushes_in,  # cumulative contributions pushed to us for this stage
              "avg_push_bytes": eng.store.push_wire_bytes}  # the part of avg_wire_bytes those pushes moved
    record["rollback_gen"] = eng.discovery.me.rollback_gen  # exactly-once holds per rollback generation
    record["ahead"] = out.extra.get("ahead", 0)  # forwards of later steps run during this step (async schedule)
    record["update_s"] = out.extra.get("update_s", 0.0)  # seconds of the step's update (combine, optimizer step)
    record["finished_early"] = out.extra.get("finished_early", False)  # its finish started while an earlier step
    # finished (replicas.pipelined_finish)
    record["compute_cpu_s"] = out.compute_cpu_s  # CPU seconds of compute_s (on a shared host: what its cores gave)
    record["update_cpu_s"] = out.update_cpu_s  # CPU seconds of update_s
    record["contribution_bytes"] = 4 * eng.store.codec.words  # bytes of one contribution (a bundle) on /pmn/avg
    record["phases"] = out.extra.get("phases", {})  # seconds of the step's finish by phase (ReplicaEngine._phase):
    # loop_s (gpipe: work until the commit is known), verdicts_s, encode_s, bundle_s, contributions_s
    if eng.stage == 0:
        record["head_term"] = eng.head_term  # the term it led the step in (-1: a standby head replica)
        record["delegated"] = out.extra.get("delegated", 0)  # its microbatches computed by other head replicas
    return StepReport(out.step, eng.stage, out.loss, out.tokens, out.seconds, max(0.0, out.seconds - out.compute_s),
                      bytes_in=out.extra.get("bytes_in", 0), bytes_out=out.extra.get("bytes_out", 0),
                      record=record, status={"bans": eng.events[-20:], "stage": eng.stage})


class ReplicatedRunner:
    """The replicated schedule (see the module doc)."""

    label = " (replicated)"

    def __init__(self) -> None:
        self.engine: ReplicaEngine | None = None  # the engine of the stage served now
        self.evaluation: Evaluation | None = None  # the evaluation of the worker served now (weight copies, results)
        self._eval: EvalService | None = None  # /pmn/eval/1.0.0 (set up in prepare)
        self._stage = -1
        self._serving = False  # state may be handed to joining peers
        self._stores: dict[int, ContributionStore] = {}  # newest contribution store per stage
        self._unsynced: list[str] = []  # stage peers ahead of us none of which gave its state at the last sync
        self._rollbacks = 0  # rollbacks this node went through
        self._restore: tuple[int, int] | None = None  # (stage, step) of the checkpoint a rollback restores next
        self._ignored: dict[tuple[str, int, int, int], None] = {}  # rollback announcements ignored (logged once)

    async def prepare(self, ctx: NodeContext) -> int:
        cfg, discovery = ctx.cfg, ctx.discovery
        await discovery.first_round()
        spec_hex = discovery.me.spec_hash
        head_works = cfg.runtime.replica_exchange == "step" and cfg.replicas.head_delegation
        self._stage = choose_replica_stage(discovery.entries(), spec_hex, cfg.num_stages, head_works) \
            if cfg.stage == "auto" else int(cfg.stage)
        if self._stage == 0 and not any(e.stage == 0 or e.head_term >= 0 for e in discovery.entries()
                                        if e.spec_hash == spec_hex and e.num_stages == cfg.num_stages):
            discovery.update_me(head_term=0)  # the first head leads; announced before the ready line
        if rollback.candidates(discovery.entries(), discovery.me):
            await discovery.gossip_round()  # a sign of life from every live peer before judging the rollback
        seen = self._adoptable(ctx, self._stage)
        if seen is not None:  # the swarm rolled back before we came: its generation, none of our newer checkpoints
            moved = abandon_checkpoints_after(ctx.data_dir, self._stage, seen.rollback_step,
                                              discovery.me.rollback_gen, cfg.runtime.abandoned_keep)
            discovery.update_me(rollback_gen=seen.rollback_gen, rollback_step=seen.rollback_step,
                                rollback_stage=seen.rollback_stage)
            ctx.log.status(adopted_rollback=json.dumps({"generation": seen.rollback_gen, "step": seen.rollback_step,
                                                        "by": seen.peer_id, "abandoned_checkpoints": moved}))
        self._announce_checkpoints(ctx, self._stage)
        rc = cfg.replicas
        # state and contributions only for peers allowed by the chain (on-chain mode) or, off chain, known to
        # discovery (verified announcements) as serving the stage; the node's one score table (every protocol)
        policy = ctx.access if ctx.access is not None else StagePeersPolicy(discovery)
        scores = ctx.scores
        AveragingService(ctx.host, spec_hex, self._avg_target, rc.avg_timeout_s, policy=policy, scores=scores)
        StateService(ctx.host, spec_hex, self._snapshot, rc.state_timeout_s, max_concurrent=rc.state_max_concurrent,
                     burst=rc.state_burst, refill_s=rc.state_refill_s, policy=policy, scores=scores)
        DelegationService(ctx.host, spec_hex, self._take_link, lambda: self.engine.m if self.engine else 1,
                          policy=policy, scores=scores)
        # evaluations only from a peer of the stage before ours (the chain's rule, or discovery's off chain)
        self._eval = EvalService(ctx.host, lambda: self.evaluation, discovery.stage_peers, cfg.runtime.eval_timeout_s,
                                 cfg.transport.max_frame_bytes,
                                 policy=ctx.access if ctx.access is not None else StagePeersPolicy(
                                     discovery, protocols=(EVAL,)), scores=scores,
                                 idle_timeout_s=cfg.runtime.eval_idle_timeout_s)
        return self._stage

    def ready_fields(self) -> dict[str, Any]:
        return {"replicated": True}

    def checkpoint(self, ctx: NodeContext) -> int:
        if ctx.worker is None:
            return 0
        ctx.worker.abort_step()
        save_checkpoint(ctx.worker, ctx.data_dir, ctx.cfg.runtime.checkpoint_keep)
        return ctx.worker.next_step

    def _announce_checkpoints(self, ctx: NodeContext, stage: int) -> None:
        """Announce the steps of the checkpoints held of `stage` (the newest that fit an announcement)."""
        steps = checkpoint_steps(ctx.data_dir, stage)[-ctx.discovery.limits.max_ckpt_steps:]
        ctx.discovery.update_me(ckpt_steps=tuple(steps))

    async def _save(self, ctx: NodeContext, worker: StageWorker) -> None:
        await trio.to_thread.run_sync(save_checkpoint, worker, ctx.data_dir, ctx.cfg.runtime.checkpoint_keep)
        self._announce_checkpoints(ctx, worker.spec.index)

    async def close(self, ctx: NodeContext) -> None:
        if self.engine is not None:
            with trio.move_on_after(2):
                await self.engine.close()

    # -- protocol handlers -------------------------------------------------------------------------

    def _take_link(self, link: DelegateLink) -> str:
        """A leading head replica's delegation link: the engine of the stage served now takes it, or says why not."""
        if self.engine is None or not self._serving:
            return "this node serves no stage yet"
        return self.engine.accept_leader(link)

    def _avg_target(self, stage: int) -> ContributionStore | None:
        """The newest contribution store of `stage` (a node that moved still answers for its old stage)."""
        return self._stores.get(stage)

    async def _snapshot(self, stage: int) -> tuple[dict[str, Any], bytes] | None:
        eng = self.engine
        if eng is None or eng.stage != stage or not self._serving:
            return None
        async with eng.lock:
            return await trio.to_thread.run_sync(pack_state, eng.worker)

    # -- joining and serving -----------------------------------------------------------------------

    async def _sync_state(self, ctx: NodeContext, eng: ReplicaEngine) -> int | None:
        """Joining: fetch the stage's state from the most advanced live peer ahead of us, if any.

        Returns None when synced or when no peer is ahead, else the newest step announced by the
        peers ahead of us, none of which could give us their state."""
        discovery = ctx.discovery
        ahead = [e for e in discovery.stage_peers(eng.stage) if e.next_step > eng.worker.next_step and e.addrs]
        self._unsynced = []
        for e in sorted(ahead, key=lambda e: (-e.next_step, e.peer_id)):
            try:
                got = await fetch_state(discovery.host, e.addrs[0], eng.worker, ctx.cfg.replicas.state_timeout_s)
            except NodeError as exc:
                ctx.log.status(last_sync_error=str(exc))
                continue
            eng.current_step = got
            ctx.log.status(synced_from=e.peer_id, synced_step=got)
            return None
        self._unsynced = [e.peer_id for e in ahead]
        return max((e.next_step for e in ahead), default=None)

    # -- rollback (node.replicas.rollback) ---------------------------------------------------------------

    def _ignore(self, ctx: NodeContext, e: Announcement, why: str) -> None:
        """An unjustified or unfollowable rollback announcement: logged once, counted against its sender."""
        key = (e.peer_id, e.rollback_gen, e.rollback_step, e.rollback_stage)
        if key in self._ignored:
            return
        self._ignored[key] = None
        while len(self._ignored) > ctx.discovery.limits.max_table_entries:
            del self._ignored[next(iter(self._ignored))]
        ctx.discovery.rejected["rollback_unjustified"] += 1
        ctx.discovery.gate.refuse(e.peer_id, "rollback_unjustified")
        line = f"ignored the rollback announced by peer {e.peer_id}: {why}"
        ctx.log.status(ignored_rollback=line)
        print(json.dumps({"event": "rollback_ignored", "by": e.peer_id, "generation": e.rollback_gen,
                          "step": e.rollback_step, "stage": e.rollback_stage, "why": why}), flush=True)

    def _follow(self, ctx: NodeContext, stage: int, worker: StageWorker) -> RollbackError | None:
        """The announced rollback this replica (serving `stage` at `worker.next_step`) follows: the first of
        `rollback.candidates` justified from its own view (`rollback.unjustified`; the others are ignored)."""
        discovery = ctx.discovery
        me = replace(discovery.me, stage=stage, next_step=worker.next_step)
        mine = {*checkpoint_steps(ctx.data_dir, stage), worker.next_step}
        fresh_s = ctx.cfg.discovery.liveness_s()
        for e in rollback.candidates(discovery.entries(), discovery.me):
            why = rollback.unjustified(e, discovery.recent(fresh_s), me, mine, fresh_s)
            if not why:
                return RollbackError(f"peer {e.peer_id} announced rollback generation {e.rollback_gen} to step "
                                     f"{e.rollback_step} (stage {e.rollback_stage} lost): stage {stage} rewinds "
                                     f"from step {worker.next_step}", e.rollback_gen, e.rollback_step, e.peer_id,
                                     (), e.rollback_stage)
            self._ignore(ctx, e, why)
        return None

    def _adoptable(self, ctx: NodeContext, stage: int) -> Announcement | None:
        """A starting node: the announced rollback it adopts (justified as for `_follow`; it can restart from the
        rollback step when it holds a checkpoint there or a fresh peer of its stage trains in the new generation)."""
        discovery = ctx.discovery
        fresh_s = ctx.cfg.discovery.liveness_s()
        fresh = discovery.recent(fresh_s)
        held = set(checkpoint_steps(ctx.data_dir, stage))
        for e in rollback.candidates(discovery.entries(), discovery.me):
            mine = held | ({e.rollback_step} if any(
                p.stage == stage and p.generation() == e.generation() and p.spec_hash == e.spec_hash
                and p.num_stages == e.num_stages for p in fresh) else set())
            why = rollback.unjustified(e, fresh, replace(discovery.me, stage=-1), mine, fresh_s)
            if not why:
                return e
            self._ignore(ctx, e, why)
        return None

    def _start_rollback(self, ctx: NodeContext, stage: int, lost: StateLostError) -> RollbackError | None:
        """This replica found its stage's newer state lost: the rollback it announces, None while a peer of its
        stage ahead of the rollback step still shows signs of life (the state is not lost: keep re-syncing), or a
        NodeError naming the lost peer, the stage and the step when no step is held by every stage."""
        discovery = ctx.discovery
        entries = discovery.entries()
        mine = [*checkpoint_steps(ctx.data_dir, stage), lost.step]
        step, why = rollback.choose_step(entries, discovery.me, stage, mine, lost.lost, lost.step)
        if step is None:
            raise NodeError(f"{lost}; no rollback possible: {why}")
        alive = rollback.holders(discovery.recent(ctx.cfg.discovery.liveness_s()), discovery.me, stage, step)
        if alive:
            ctx.log.status(rollback_waiting=f"stage {stage} at step {lost.step}: peer {alive[0].peer_id} announced "
                                            f"step {alive[0].next_step} recently; re-syncing instead of rolling back")
            return None
        gen = rollback.next_gen(entries, discovery.me)
        return RollbackError(f"stage {stage} replica at step {lost.step}: the stage's newer state is lost (last held "
                             f"by peer {', '.join(lost.lost) or 'unknown'}): rolling back to step {step}, generation "
                             f"{gen}", gen, step, "", lost.lost, stage)

    async def _rewind(self, ctx: NodeContext, stage: int, worker: StageWorker, rb: RollbackError) -> None:
        """Enter the rollback's generation at its step: the engine is closed; the live state is saved if it is at
        the step, the checkpoints after it are moved aside (`abandon_checkpoints_after`), and the next worker
        restores the one at the step explicitly (or, holding none, syncs from a peer of the new generation)."""
        discovery = ctx.discovery
        from_step = worker.next_step
        worker.abort_step()
        if from_step == rb.step and rb.step not in checkpoint_steps(ctx.data_dir, stage):
            await self._save(ctx, worker)
        moved = await trio.to_thread.run_sync(abandon_checkpoints_after, ctx.data_dir, stage, rb.step,
                                              discovery.me.rollback_gen, ctx.cfg.runtime.abandoned_keep)
        self._restore = (stage, rb.step)
        # announced only now, with the old engine closed: no peer of the new generation ever meets it
        discovery.update_me(stage=-1, rollback_gen=rb.gen, rollback_step=rb.step, rollback_stage=rb.stage)
        self._announce_checkpoints(ctx, stage)
        self._rollbacks += 1
        event = {"event": "rollback", "stage": stage, "from_step": from_step, "to_step": rb.step,
                 "generation": rb.gen, "by": rb.by or discovery.me.peer_id, "lost": list(rb.lost),
                 "lost_stage": rb.stage, "abandoned_checkpoints": moved}
        ctx.log.status(last_rollback=json.dumps(event), rollbacks=self._rollbacks)
        print(json.dumps(event), flush=True)

    async def run(self, ctx: NodeContext) -> None:
        cfg, r, discovery = ctx.cfg, ctx.cfg.runtime, ctx.discovery
        stage = self._stage
        moved_from: int | None = None
        unsynced_since: float | None = None  # when re-syncing first failed with every peer ahead of us
        while True:
            restore = checkpoint_at(ctx.data_dir, stage, self._restore[1]) \
                if self._restore is not None and self._restore[0] == stage else None
            self._restore = None
            worker = await trio.to_thread.run_sync(ctx.build_worker, stage, restore)
            if r.schedule == "async":  # later steps' work runs on stashed weights while a step is exchanged
                worker = AsyncStageWorker.wrap(worker, r.max_staleness, r.async_lookahead)
            if r.eval_every:  # the validation microbatches (/pmn/eval; never on /pmn/act, whose frame spec refuses them)
                worker.eval_batches, worker.eval_seed = r.eval_batches, r.eval_seed
            self.evaluation = Evaluation(worker, cfg.num_stages, r.eval_every, r.eval_keep)
            ctx.set_worker(worker)
            codec = ContributionCodec.for_module(worker.module, r.replica_averaging, r.powersgd_rank, seed=stage,
                                                 bits=r.powersgd_bits, iterations=r.powersgd_iterations,
                                                 block_rank=r.powersgd_block_rank)
            # contributions in the spec's replica_averaging encoding, one per microbatch or per replica and step
            store = ContributionStore(codec.words, codec, exchange=r.replica_exchange)
            # activations only from replicas of the stages next to this one that discovery knows
            neighbours = ctx.access if ctx.access is not None else StagePeersPolicy(discovery, protocols=(ACT,),
                                                                                    act_stage=stage)
            endpoint = ActEndpoint(
                ctx.host, local=ctx.local_info(stage),
                frame_spec=replace(worker.frame_spec(cfg.transport.max_frame_bytes), eval_batches=0),
                cfg=cfg.transport, receipts=ctx.receipts, step_fn=lambda w=worker: w.next_step,  # type: ignore[misc]
                window_source=worker.local_window if worker.local_windows else None, scores=ctx.scores,
                policy=neighbours)
            eng = ReplicaEngine(cfg, worker, endpoint, discovery, ctx.host, store)
            eng.head_term = discovery.me.head_term if stage == 0 else -1  # kept across re-syncs (and takeovers)
            eng.follow_rollback = lambda s=stage, w=worker: self._follow(ctx, s, w)  # type: ignore[misc]
            endpoint.decoder = eng.decode
            self._stores[stage] = store
            self.engine = eng
            self._serving = False
            newest = await self._sync_state(ctx, eng)
            if newest is None:
                unsynced_since = None
            else:
                # Every peer ahead of us is unreachable. If they announced the run's last step, the run
                # finished without us (we fell behind at its very end): stop cleanly. Otherwise retry
                # until replicas.no_replica_timeout_s, then roll the swarm back (or fail with the reason).
                now = trio.current_time()
                unsynced_since = now if unsynced_since is None else unsynced_since
                if newest >= r.steps - 1:
                    ctx.log.status(ended_behind=f"the other replicas of stage {stage} reached step {newest} of "
                                                f"{r.steps} and left while this one was at step "
                                                f"{worker.next_step}: the run finished without it")
                    return
                rb: RollbackError | None = None
                if now - unsynced_since > cfg.replicas.no_replica_timeout_s:
                    rb = self._start_rollback(ctx, stage, StateLostError(
                        f"stage {stage} replica is at step {worker.next_step}, its stage peers announced step "
                        f"{newest} and none could give its state within replicas.no_replica_timeout_s="
                        f"{cfg.replicas.no_replica_timeout_s} (last held by peer {', '.join(self._unsynced)})",
                        worker.next_step, tuple(self._unsynced)))
                if rb is None:
                    try:
                        eng.check_rollback()
                    except RollbackError as exc:
                        rb = exc
                if rb is not None:
                    await self._rewind(ctx, stage, worker, rb)
                    unsynced_since = None
                    continue
                await trio.sleep(r.retry_backoff_s)
            self._serving = True
            discovery.update_me(stage=stage, next_step=worker.next_step)
            ctx.log.status(stage=stage, next_step=worker.next_step, moved_from=moved_from)
            move: Move | None = None
            outcome: NodeError | None = None  # raised outside the nursery (no exception groups)
            with ctx.log.progress_line(cfg.progress, r.steps, worker.next_step, stage):
                async with trio.open_nursery() as en:
                    en.start_soon(eng.accept_loop)
                    en.start_soon(eng.dial_loop, en)
                    en.start_soon(eng.commit_poller)
                    en.start_soon(eng.probe_loop)
                    eng.finishing = en  # later steps' finishes start beside the current one's (pipelined_finish)
                    try:
                        move = await self._serve_stage(ctx, eng, worker, en)
                    except NodeError as exc:
                        outcome = exc
                    if isinstance(outcome, StateLostError):  # every holder of the newer state is gone: rewind
                        try:
                            outcome = self._start_rollback(ctx, stage, outcome) or ResyncNeededError(
                                f"{outcome}; a peer of the stage still shows signs of life: re-syncing")
                        except NodeError as exc:
                            outcome = exc
                    if move is not None or isinstance(outcome, ResyncNeededError | RollbackError):
                        discovery.update_me(stage=-1)
                        self._serving = False
                        if not isinstance(outcome, RollbackError):  # a rollback abandons the steps since
                            await self._save(ctx, worker)
                        with trio.move_on_after(2):
                            await eng.close()
                    en.cancel_scope.cancel()
            if isinstance(outcome, ResyncNeededError):
                ctx.log.status(last_resync=str(outcome))
                continue
            if isinstance(outcome, RollbackError):
                await self._rewind(ctx, stage, worker, outcome)
                unsynced_since = None
                continue
            if outcome is not None:
                raise outcome
            if move is None:
                return
            moved_from = stage
            stage = move.to_stage
            ctx.log.status(moved_to=stage, move=json.dumps(move.__dict__))
            print(json.dumps({"event": "move", "from_stage": move.from_stage, "to_stage": move.to_stage,
                              "step": worker.next_step}), flush=True)

    async def _serve_stage(self, ctx: NodeContext, eng: ReplicaEngine, worker: StageWorker,
                           nursery: trio.Nursery) -> Move | None:
        """Steps until the run is done (None) or a rebalancing move is due (the move); the leading head's
        evaluations run in `nursery` (the engine's)."""
        r, rc, discovery = ctx.cfg.runtime, ctx.cfg.replicas, ctx.discovery
        last_plan = trio.current_time()
        if eng.leads and worker.next_step == 0 and rc.start_quorum:
            await self._await_quorum(ctx, rc.start_quorum)
        while worker.next_step < r.steps:
            out = await eng.run_step(worker.next_step)
            report = step_report(out, eng)
            report.record.update(await self._evaluate(ctx, eng, out.step, nursery))
            ctx.log.step(report)
            discovery.update_me(next_step=worker.next_step, throughput=eng.throughput)
            if r.checkpoint_every and worker.next_step % r.checkpoint_every == 0:
                await self._save(ctx, worker)
            now = trio.current_time()
            if rc.rebalance_period_s and now - last_plan >= rc.rebalance_period_s:
                last_plan = now
                move = eng.plan(discovery.me.peer_id)
                if move is not None and worker.next_step < r.steps:
                    return move
        await self._finish_grace(ctx, eng, discovery)
        return None

    async def _evaluate(self, ctx: NodeContext, eng: ReplicaEngine, step: int, nursery: trio.Nursery) -> dict[str, Any]:
        """After the update of `step`: keep the weights when an evaluation follows it; the leading head starts it
        (and, after the run's last step, waits for it). Returns the progress-record fields of the newest
        evaluation finished since the last record ({} when none)."""
        ev = self.evaluation
        if ev is None or self._eval is None:
            return {}
        await ev.keep_weights(step)
        if ev.due(step) and eng.stage == 0 and eng.leads:
            ev.launch(nursery, self._eval, step)
        if step == ctx.cfg.runtime.steps - 1 and ev.pending:  # the run's last record waits for every evaluation
            await ev.settle(ctx.cfg.runtime.eval_timeout_s * ctx.cfg.num_stages)
        error = ev.take_error()
        if error is not None:
            ctx.log.status(last_eval_error=error)
        return ev.take()

    async def _await_quorum(self, ctx: NodeContext, quorum: int) -> None:
        """Before the run's first step: wait until `quorum` other nodes (standby head replicas included) are
        announced serving, at most `discovery.discovery_timeout_s` (then start with those there are, and say so)."""
        discovery, d = ctx.discovery, ctx.cfg.discovery

        def serving() -> int:
            return sum(len(discovery.stage_peers(s)) for s in range(ctx.cfg.num_stages))

        with trio.move_on_after(d.discovery_timeout_s):
            while serving() < quorum:
                with trio.move_on_after(d.announce_interval_s):
                    await discovery.changed.wait()
            return
        ctx.log.status(start_quorum=f"{serving()} of replicas.start_quorum={quorum} other nodes "
                                    f"were announced within discovery.discovery_timeout_s={d.discovery_timeout_s}: "
                                    "started with those")

    async def _finish_grace(self, ctx: NodeContext, eng: ReplicaEngine, discovery: Discovery) -> None:
        """Last one out: keep serving state, commits and contributions for up to `replicas.finish_grace_s`
        while a peer of this stage (or one re-syncing, announced as stage -1) is still behind, so a replica
        that fell behind near the end of the run can catch up instead of finding nobody to sync from."""
        steps, rc = ctx.cfg.runtime.steps, ctx.cfg.replicas
        deadline = trio.current_time() + rc.finish_grace_s

        # evaluations run: the leading head records the run's end only once every one came back (they pass through us)
        last_eval = self.evaluation is not None and self.evaluation.eval_every > 0 and eng.stage > 0

        def someone_behind() -> bool:
            fresh = ctx.cfg.discovery.liveness_s()  # a peer that stopped answering is not waited for
            return any(e.next_step < steps for e in discovery.entries(max_age_s=fresh)
                       if (e.stage in (eng.stage, -1) or (last_eval and e.stage == 0))
                       and e.generation() == discovery.me.generation()
                       and e.spec_hash == discovery.me.spec_hash
                       and e.num_stages == discovery.me.num_stages)

        while trio.current_time() < deadline and someone_behind():
            await trio.sleep(min(rc.commit_poll_s, max(0.0, deadline - trio.current_time())))
