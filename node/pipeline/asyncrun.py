"""The asynchronous schedule: no flush between steps, bounded staleness, weight stashing.

Every stage runs one event loop over the whole run. A ready gradient goes first (backward, then the
gradient upstream); otherwise the next activation is forwarded if its step's weights are stashed
(`AsyncStageWorker.ready`: update step - S - 1 applied here), and the head reads the next data
window under the same rule. A stage applies update k as soon as every microbatch of step k came back
through it, in step order, and reports the step then. So the head keeps forwarding steps k+1..k+S
while the gradients of step k are still travelling, which hides the round trip of WAN links once S
steps of compute cover it.

Global-norm clipping (`recipe.grad_clip`) without a flush: when stage j has run every backward of step k
and holds the running sum of step k's squared gradient norm over stages j+1..last (a NORM_UP frame from
downstream; 0 at the last stage), it adds its own share and sends the sum upstream; stage 0 then holds the
whole model's, clips and applies update k, and the total travels down (NORM_DOWN), each stage clipping and
applying update k with it and passing it on. A stage needs update k only before step k+S+1's forward, which
stage 0 sends after the same update, so the exchange adds no wait to a stage whose work is ahead; the NORM
frames go through the channels' send queues, behind the data frames queued before them (it is
the synchronous schedules' exchange, `PipelineRuntime._exchange_sq_norm`, run backwards). Stage norms are
added last stage first, so the total may differ from the single process's stage-0-first sum in the last bit.

A gradient that is staler than the bound (its step is already applied here, or its backward already
ran) is rejected without failing the link: counted against the sender in the channel's peer scores
(`transport.reject_penalty`) and in `stale_rejected`, and the run goes on. Frames are signed,
countersigned and acknowledged by the channel as in the synchronous schedules, so hop receipts cover
every microbatch; the audit recorder gets, for each step, the stashed weights that step's hops used.

Evaluation (`runtime.eval_every`): there is no flush to evaluate at on `/pmn/act`, so the stages keep a copy of
their weights after each evaluated update and the head sends the validation microbatches through those copies on
`/pmn/eval/1.0.0` (`node.pipeline.evaluation`, as the replicated runner does); the head records `val_loss`, the run's
last record once the last evaluation is back, and the stages after it stay up until it passed through them.

Failures are not retried inside a run (steps of several ages are in flight): the node fails with the
error, keeps its last checkpoint, and a restart resumes from the last applied step with fresh stashes
(so a resumed run is not bit-identical to an uninterrupted one).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from node.config import RuntimeConfig
from node.context import NodeContext
from node.errors import NodeError, PeerLostError, UnexpectedFrameError
from node.observability.steps import StepReport
from node.pipeline.asyncworker import STALE, AsyncStageWorker
from node.pipeline.evaluation import EvalService, Evaluation
from node.pipeline.runner import PipelineRunner, step_report
from node.pipeline.runtime import ChannelLoop, StepResult, _Sender
from node.training.checkpoint import save_checkpoint
from node.training.worker import StageWorker, window_to_bytes
from node.wire import frames
from node.wire.channel import ActChannel, Received


class AsyncPipelineRuntime(ChannelLoop):
    """Runs steps [first, last) of one stage without a flush between steps (see the module doc)."""

    worker: AsyncStageWorker

    def __init__(self, worker: AsyncStageWorker, cfg: RuntimeConfig, upstream: ActChannel | None,
                 downstream: ActChannel | None) -> None:
        super().__init__(worker, cfg, upstream, downstream)
        self.stale_rejected = 0  # gradients dropped as staler than the bound (or duplicates)
        self._inbox: deque[Received] = deque()  # activations received, waiting for their step's weights
        self._norm_sums: dict[int, float] = {}  # step -> squared norm over stages >= this one, once sent upstream

    async def run(self, last: int, on_step: Callable[[StepResult], Awaitable[None]]) -> None:
        """Train until update `last - 1` is applied; `await on_step(StepResult)` after every update (the loop computes
        nothing meanwhile, so the weights are those after that update)."""
        await self._with_senders(lambda up_tx, down_tx: self._loop(last, up_tx, down_tx, on_step))

    async def _loop(self, last: int, up_tx: _Sender | None, down_tx: _Sender | None,
                    on_step: Callable[[StepResult], Awaitable[None]]) -> None:
        w = self.worker
        m = w.num_microbatches
        tokens = m * w.microbatch_size * w.config.seq_len
        head_next = (w.next_step, 0)  # head: the next (step, microbatch) to read from the data
        clip = w.optim.grad_clip > 0  # updates wait for their step's global gradient norm (module doc)
        done: dict[int, int] = {}  # step -> microbatches whose backward ran here
        busy = waited = 0.0
        t_last = time.perf_counter()
        b_last = self._stats()

        async def compute(fn: Any, *args: Any) -> Any:
            nonlocal busy
            t = time.perf_counter()
            try:
                return await trio.to_thread.run_sync(fn, *args)
            finally:
                busy += time.perf_counter() - t

        async def backward(step: int, mb: int, grad: Any) -> None:
            out = await compute(w.backward, step, mb, grad)
            if up_tx is not None and out is not None:
                up_tx.put(frames.Kind.GRADIENT, step, mb, out)
            done[step] = done.get(step, 0) + 1

        while w.next_step < last:
            self._wake = trio.Event()
            for tx in (up_tx, down_tx):
                if tx is not None and tx.error is not None:
                    raise tx.error
            # apply every complete step, in order
            k = w.next_step
            total = await self._step_norm(k, compute, up_tx) if clip and done.get(k, 0) >= m else None
            if done.get(k, 0) >= m and (total is not None or not clip):
                loss = await compute(w.step, k, total)
                if total is not None and down_tx is not None:
                    down_tx.put_norm(k, frames.NORM_DOWN, total)  # ahead of step k+S+1's activations
                done.pop(k)
                now, b_now = time.perf_counter(), self._stats()
                await on_step(StepResult(step=k, stage=self.stage, loss=loss, tokens=tokens, seconds=now - t_last,
                                         comm_wait_s=waited, bytes_in=b_now[0] - b_last[0],
                                         bytes_out=b_now[1] - b_last[1], busy_s=busy,
                                         extra={"stale_rejected": self.stale_rejected,
                                                "max_staleness": w.max_staleness}))
                t_last, b_last, busy, waited = now, b_now, 0.0, 0.0
                continue
            r = await self.downstream.try_recv() if self.downstream is not None else None
            if r is not None:
                h = r.frame.header
                if r.value is STALE or (h.step, h.microbatch) not in w._stash:
                    self._reject(self.downstream, h)
                    continue
                await backward(int(h.step), int(h.microbatch), r.value)
                continue
            if self.upstream is not None:
                r = await self.upstream.try_recv()
                if r is not None:
                    self._inbox.append(r)
                    continue
                if self._inbox and w.ready(int(self._inbox[0].frame.header.step)):
                    r = self._inbox.popleft()
                    h = r.frame.header
                    if h.microbatch >= m or h.step >= last:
                        raise UnexpectedFrameError(f"stage {self.stage} got activation step {h.step} microbatch "
                                                   f"{h.microbatch}; the run has {last} steps of {m} microbatches")
                    window, h_in = r.value
                    await self._forward(compute, backward, down_tx, int(h.step), int(h.microbatch), window, h_in)
                    continue
            elif head_next[0] < last and w.ready(head_next[0]):
                step, mb = head_next
                head_next = (step, mb + 1) if mb + 1 < m else (step + 1, 0)
                window = await compute(w.head_window, step, mb)
                await self._forward(compute, backward, down_tx, step, mb, window, None)
                continue
            for ch in (self.upstream, self.downstream):
                if ch is not None and ch.failure is not None:
                    raise ch.failure
            tw = time.perf_counter()
            with trio.move_on_after(self.cfg.frame_timeout_s) as scope:
                await self._wake.wait()
            waited += time.perf_counter() - tw
            if scope.cancelled_caught:
                ch = self.downstream or self.upstream
                assert ch is not None
                raise PeerLostError(f"stage {self.stage}: no frame from peer {ch.peer} (stage {ch.remote_stage}) "
                                    f"within frame_timeout_s={self.cfg.frame_timeout_s} at step {w.next_step}",
                                    ch.peer, ch.remote_stage)
        for tx in (up_tx, down_tx):
            if tx is not None:
                await tx.drain()
        for ch in (self.upstream, self.downstream):
            if ch is not None:
                await ch.wait_acked()

    async def _step_norm(self, k: int, compute: Any, up_tx: _Sender | None) -> float | None:
        """Step `k`'s squared gradient norm over the whole model once it is known here, else None (the loop waits
        for a NORM frame). Called once every backward of step k ran here: sends this stage's running sum upstream
        once the stages below sent theirs (module doc)."""
        if k not in self._norm_sums:
            below = 0.0
            if self.downstream is not None:
                got = self.downstream.take_norm(k, frames.NORM_UP)
                if got is None:
                    return None
                below = got
            self._norm_sums[k] = await compute(self.worker.step_sq_norm, k, below)
            if up_tx is not None:
                up_tx.put_norm(k, frames.NORM_UP, self._norm_sums[k])  # behind step k's last gradient frames
        total = self._norm_sums[k] if self.upstream is None else self.upstream.take_norm(k, frames.NORM_DOWN)
        if total is not None:
            del self._norm_sums[k]
        return total

    async def _forward(self, compute: Any, backward: Any, down_tx: _Sender | None, step: int, mb: int,
                       window: Any, h_in: Any) -> None:
        w = self.worker
        out = await compute(w.forward, step, mb, window, h_in)
        if w.spec.is_last:
            await backward(step, mb, None)
        else:
            assert down_tx is not None and isinstance(out, bytes)
            down_tx.put(frames.Kind.ACTIVATION, step, mb, out, window_to_bytes(window, w.id_bytes))

    def _reject(self, ch: ActChannel | None, h: frames.FrameHeader) -> None:
        """A gradient staler than the bound: counted against its sender, dropped, the run goes on."""
        assert ch is not None
        self.stale_rejected += 1
        ch.scores.penalize(ch.peer, "stale-gradient")
        if ch.scores.is_banned(ch.peer):
            raise UnexpectedFrameError(f"stage {self.stage}: peer {ch.peer} (stage {ch.remote_stage}) sent "
                                       f"{self.stale_rejected} gradient(s) staler than max_staleness="
                                       f"{self.worker.max_staleness} (last: step {h.step} microbatch {h.microbatch}) "
                                       "and is banned")


class AsyncPipelineRunner(PipelineRunner):
    """The one-peer-per-stage runner with the asynchronous schedule (`runtime.schedule = "async"`)."""

    label = " (async)"

    def __init__(self) -> None:
        super().__init__()
        self.evaluation: Evaluation | None = None  # weight copies after evaluated updates; the head's results
        self._eval: EvalService | None = None  # /pmn/eval/1.0.0 (set up in prepare)

    async def prepare(self, ctx: NodeContext) -> int:
        stage = await super().prepare(ctx)
        cfg, r, worker = ctx.cfg, ctx.cfg.runtime, self._worker
        assert worker is not None
        if r.eval_every:  # the validation microbatches travel on /pmn/eval (the /pmn/act spec, built above, refuses them)
            worker.eval_batches, worker.eval_seed = r.eval_batches, r.eval_seed
        self.evaluation = Evaluation(worker, cfg.num_stages, r.eval_every, r.eval_keep)
        # evaluations only from the stage before ours (the chain's rule on chain; off chain, like /pmn/act, anyone)
        self._eval = EvalService(ctx.host, lambda: self.evaluation, ctx.discovery.stage_peers, r.eval_timeout_s,
                                 cfg.transport.max_frame_bytes, policy=ctx.access, scores=ctx.scores,
                                 idle_timeout_s=r.eval_idle_timeout_s)
        return stage

    def make_worker(self, ctx: NodeContext, stage: int) -> StageWorker:
        r = ctx.cfg.runtime
        return AsyncStageWorker.wrap(ctx.build_worker(stage), r.max_staleness, r.async_lookahead)

    def eval_plan(self, ctx: NodeContext) -> tuple[int, int]:
        """No evaluation on /pmn/act (no flush between steps to evaluate at): it runs on /pmn/eval (module doc)."""
        return (0, 0)

    async def run(self, ctx: NodeContext) -> None:
        assert isinstance(self._worker, AsyncStageWorker) and self._endpoint is not None
        assert self.evaluation is not None and self._eval is not None
        worker, r, ev, service = self._worker, ctx.cfg.runtime, self.evaluation, self._eval
        if worker.next_step >= r.steps:
            return
        stage, last = worker.spec.index, r.steps - 1
        bound = r.eval_timeout_s * ctx.cfg.num_stages  # the whole chain of one evaluation
        failure: NodeError | None = None  # raised outside the nursery (no exception groups)
        with ctx.log.progress_line(ctx.cfg.progress, r.steps, worker.next_step, worker.spec.index):
            await self._ensure_links(ctx, self._endpoint, first=True)
            runtime = AsyncPipelineRuntime(worker, r, self.links.up, self.links.down)
            peers = len(ctx.host.get_connected_peers())
            held: list[StepReport] = []  # the head's last record, written once the last evaluation is back
            async with trio.open_nursery() as evaluations:

                async def on_step(res: StepResult) -> None:
                    # the copy and the checkpoint in threads: channel tasks go on; the loop waits, so the live weights
                    # stay those after update res.step meanwhile
                    await ev.keep_weights(res.step)
                    if stage == 0 and ev.due(res.step):
                        ev.launch(evaluations, service, res.step)
                    report = step_report(res, peers)
                    if stage == 0 and res.step == last and ev.eval_every:
                        held.append(report)  # its evaluation fields once every evaluation is back (below)
                    else:
                        report.record.update(ev.take())
                        ctx.log.step(report)
                    if r.checkpoint_every and worker.next_step % r.checkpoint_every == 0:
                        # live weights, optimiser, next step (not the stash)
                        await trio.to_thread.run_sync(save_checkpoint, worker, ctx.data_dir)

                try:
                    await runtime.run(r.steps, on_step)
                except NodeError as exc:
                    worker.abort_step()
                    failure = exc
                finally:
                    runtime.detach()
                if failure is None and held:  # the head: every evaluation still out, then the last record
                    await ev.settle(bound)
                    held[0].record.update(ev.take())
                    ctx.log.step(held[0])
                elif failure is None and stage > 0 and ev.eval_every:  # later stages: until the last one passed
                    due = [s for s in range(r.steps) if ev.due(s)]
                    if due:
                        await ev.wait_served(due[-1], bound)
                error = ev.take_error()
                if error is not None:
                    ctx.log.status(last_eval_error=error)
                evaluations.cancel_scope.cancel()  # an evaluation still out is abandoned with the run
        if failure is not None:
            raise failure
