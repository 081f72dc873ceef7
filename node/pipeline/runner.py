"""The synchronous pipeline runner: one peer per stage, a link to each neighbour, step after step.

It dials the next stage and accepts the previous one, runs `PipelineRuntime` steps, and on a lost
neighbour drops the partial step, re-dials and retries (`runtime.step_retries`, backoff doubling from
`runtime.retry_backoff_s`). A neighbour that is behind makes this stage roll back to the neighbour's
step from a kept checkpoint.

Every `runtime.eval_every` steps, after the update, the stages evaluate the fixed validation
microbatches (`PipelineRuntime.run_eval`) and the tail records their mean loss as `val_loss` in the
progress record of that step. A failed evaluation does not fail the run: the step is recorded without
it (`last_eval_error` in the status file), the links are re-made and training goes on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import trio

from node.context import NodeContext
from node.errors import CheckpointError, NodeError, PeerLostError
from node.net.discovery import choose_stage
from node.observability.steps import StepReport
from node.pipeline.runtime import PipelineRuntime, StepResult
from node.training.checkpoint import checkpoint_at, load_checkpoint, save_checkpoint
from node.training.worker import StageWorker
from node.wire.channel import ActChannel, ActEndpoint

RETRYABLE = (NodeError,)


@dataclass
class _Links:
    up: ActChannel | None = None
    down: ActChannel | None = None


def step_report(res: StepResult, peers: int) -> StepReport:
    """The node-level report of one pipeline step."""
    return StepReport(res.step, res.stage, res.loss, res.tokens, res.seconds, res.comm_wait_s, res.bytes_in,
                      res.bytes_out, peers=peers, record={"busy_s": res.busy_s, **res.extra})


class PipelineRunner:
    """The one-peer-per-stage schedule (see the module doc)."""

    label = ""

    def __init__(self) -> None:
        self.links = _Links()
        self._worker: StageWorker | None = None
        self._endpoint: ActEndpoint | None = None

    async def prepare(self, ctx: NodeContext) -> int:
        cfg, discovery = ctx.cfg, ctx.discovery
        if cfg.stage == "auto":
            await discovery.first_round()
            stage = choose_stage(discovery.entries(), discovery.me.spec_hash, cfg.num_stages)
        else:
            stage = int(cfg.stage)
        discovery.update_me(stage=stage)
        worker = ctx.worker = self._worker = self.make_worker(ctx, stage)
        plan = self.eval_plan(ctx)
        worker.eval_batches, worker.eval_seed = plan[1], cfg.runtime.eval_seed
        self._endpoint = ActEndpoint(
            ctx.host, local=ctx.local_info(stage, plan), frame_spec=worker.frame_spec(cfg.transport.max_frame_bytes),
            cfg=cfg.transport, receipts=ctx.receipts, decoder=worker.decode, step_fn=lambda: worker.next_step,
            policy=ctx.access, window_source=worker.local_window if worker.local_windows else None, scores=ctx.scores)
        return stage

    def make_worker(self, ctx: NodeContext, stage: int) -> StageWorker:
        """The stage worker this schedule runs (the async runner stashes weights)."""
        return ctx.build_worker(stage)

    def eval_plan(self, ctx: NodeContext) -> tuple[int, int]:
        """(eval_every, eval_batches) this runner evaluates with, (0, 0) for none (told to neighbours at the handshake)."""
        r = ctx.cfg.runtime
        return (r.eval_every, r.eval_batches) if r.eval_every > 0 else (0, 0)

    def ready_fields(self) -> dict[str, Any]:
        assert self._worker is not None
        return {"next_step": self._worker.next_step}

    def checkpoint(self, ctx: NodeContext) -> int:
        assert self._worker is not None
        self._worker.abort_step()
        save_checkpoint(self._worker, ctx.data_dir)
        return self._worker.next_step

    async def close(self, ctx: NodeContext) -> None:
        for ch in (self.links.down, self.links.up):
            if ch is not None:
                await ch.close()

    async def run(self, ctx: NodeContext) -> None:
        assert self._worker is not None and self._endpoint is not None
        worker, endpoint, r = self._worker, self._endpoint, ctx.cfg.runtime
        attempts = 0
        first_error: NodeError | None = None
        linked_once = False
        with ctx.log.progress_line(ctx.cfg.progress, r.steps, worker.next_step, worker.spec.index):
            while worker.next_step < r.steps:
                step = worker.next_step
                try:
                    await self._ensure_links(ctx, endpoint, first=not linked_once)
                    linked_once = True
                    runtime = PipelineRuntime(worker, r, self.links.up, self.links.down, ctx.cfg.num_stages)
                    eval_error: NodeError | None = None
                    try:
                        res = await runtime.run_step(step)
                        if worker.eval_batches and (step + 1) % r.eval_every == 0:
                            try:
                                val_loss = await runtime.run_eval(step)
                            except RETRYABLE as exc:  # the update is applied: record the step without it
                                eval_error = exc
                            else:
                                if val_loss is not None:
                                    res.extra["val_loss"] = val_loss
                    finally:
                        runtime.detach()
                except RETRYABLE as exc:
                    attempts += 1
                    first_error = first_error or exc
                    worker.abort_step()
                    await self._reset_links()
                    if attempts > r.step_retries or not linked_once:
                        if first_error is not exc:
                            peer = getattr(first_error, "peer", "")
                            stage = getattr(first_error, "stage", -1)
                            exc = PeerLostError(f"{first_error}; step {step} failed {attempts} time(s), "
                                                f"last: {exc}", peer, stage)
                        raise exc
                    ctx.log.status(last_retry=str(exc))
                    await trio.sleep(r.retry_backoff_s * 2 ** (attempts - 1))
                    continue
                attempts = 0
                first_error = None
                ctx.log.step(step_report(res, len(ctx.host.get_connected_peers())))
                if eval_error is not None:
                    ctx.log.status(last_eval_error=f"evaluation after step {step}: {eval_error}")
                    await self._reset_links()  # the failed evaluation may have left frames in flight
                if r.checkpoint_every and worker.next_step % r.checkpoint_every == 0:
                    await trio.to_thread.run_sync(save_checkpoint, worker, ctx.data_dir)

    # -- links -------------------------------------------------------------------------------------

    async def _reset_links(self) -> None:
        for ch in (self.links.up, self.links.down):
            if ch is not None:
                try:
                    await ch.stream.reset()
                except Exception:  # already gone
                    pass
        self.links = _Links()

    async def _align_step(self, ctx: NodeContext, ch: ActChannel) -> None:
        """If the neighbour is behind us (it stopped before applying a step we applied), roll back to its step."""
        assert self._worker is not None and ch.remote is not None
        worker = self._worker
        theirs, ours = ch.remote.next_step, worker.next_step
        if theirs < 0 or theirs >= ours:
            return
        ckpt = checkpoint_at(ctx.data_dir, worker.spec.index, theirs)
        if ckpt is None:
            raise CheckpointError(f"stage {worker.spec.index} is at step {ours} but neighbour {ch.peer} "
                                  f"(stage {ch.remote_stage}) is at step {theirs} and no checkpoint of step "
                                  f"{theirs} is kept here")
        await trio.to_thread.run_sync(load_checkpoint, worker, ckpt)
        ctx.log.status(next_step=theirs, rolled_back_from=ours)

    async def _ensure_links(self, ctx: NodeContext, endpoint: ActEndpoint, first: bool = False) -> None:
        """Dial the next stage and accept the previous one (named timeouts; PeerLostError names the stage).

        The first time the wait is `discovery.discovery_timeout_s` (neighbours may still be starting),
        afterwards `runtime.redial_timeout_s`.
        """
        assert self._worker is not None
        spec = self._worker.spec
        r = ctx.cfg.runtime
        limit = ctx.cfg.discovery.discovery_timeout_s if first else r.redial_timeout_s
        limit_name = "discovery_timeout_s" if first else "redial_timeout_s"
        if not spec.is_first and (self.links.up is None or self.links.up.failure is not None):
            want = spec.index - 1
            with trio.move_on_after(limit):
                while self.links.up is None:
                    ch = await endpoint.incoming.receive()
                    if ch.failure is None and ch.remote_stage == want:
                        await self._align_step(ctx, ch)
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
                    ann = await ctx.discovery.wait_for_stage(want, timeout_s=left)
                    ch = await endpoint.open(ann.addrs[0])
                    ctx.nursery.start_soon(ch.run_reader)
                    self.links.down = ch
                except Exception as exc:  # dial errors come as many libp2p / OS types
                    last = exc
                    await trio.sleep(min(backoff, max(0.0, deadline - trio.current_time())))
                    backoff *= 2
            await self._align_step(ctx, self.links.down)
