"""Synchronous pipeline schedule over `/pmn/act/1.0.0` channels.

Each stage runs an event-driven loop per global step: whichever input is ready is processed
(activation from upstream -> forward, gradient from downstream -> backward). Sends go through an
unbounded local queue drained by one task per channel, so the loop never blocks on credits and
neighbours cannot deadlock. The optimiser steps once all microbatches of the step are done and
every frame is acknowledged (and, with gradient clipping, once the stages agreed on the global
gradient norm), so the result equals the single-process run (GPipe semantics).

`runtime.schedule` picks the order inside a step: "gpipe" forwards every microbatch as soon as its
input is there; "1f1b" lets stage s hold at most `num_stages - s` microbatches between forward and
backward (the 1F1B warm-up depth), so it stashes fewer activations; a ready backward always goes
first. Both apply the same gradients once per step, so both equal the single-process run.
`StepResult.busy_s` is the time spent in stage compute (the utilisation numerator).

`run_eval` (called by the runner after the update of every `runtime.eval_every`-th step) sends the fixed
validation microbatches through the pipeline forward only: the head reads them from the corpus's "val"
split and sends them as EVAL frames, each stage forwards them without a graph and stashes nothing, and the
tail returns their mean loss. Weights, gradients and optimiser state are not touched, so training is
the same with or without evaluation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import trio

from node.config import RuntimeConfig
from node.errors import NodeError, PeerLostError, UnexpectedFrameError
from node.training.worker import StageWorker, window_to_bytes
from node.wire import frames
from node.wire.channel import ActChannel
from sharding.train import grad_sq_norm

T = TypeVar("T")


@dataclass
class StepResult:
    """What one stage reports after a global step."""

    step: int  # global step index
    stage: int  # this stage
    loss: float | None  # mean microbatch loss (tail only)
    tokens: int  # tokens processed in the step
    seconds: float  # wall time of the step
    comm_wait_s: float  # time the loop spent waiting for frames or acks
    bytes_in: int = 0  # bytes received on both channels during the step
    bytes_out: int = 0  # bytes sent on both channels during the step
    busy_s: float = 0.0  # seconds spent in stage compute (forward, backward, optimiser, data) during the step
    extra: dict[str, Any] = field(default_factory=dict)  # free-form additions


class _Sender:
    """Unbounded outgoing queue for one channel, drained by `run`."""

    def __init__(self, ch: ActChannel) -> None:
        self.ch = ch
        self._send, self._recv = trio.open_memory_channel[tuple[frames.Kind, int, int, bytes, bytes]](math.inf)
        self.queued = 0
        self.sent = 0
        self.error: NodeError | None = None
        self._idle = trio.Event()
        self._idle.set()

    def put(self, kind: frames.Kind, step: int, mb: int, payload: bytes, window: bytes = b"") -> None:
        if self.error is not None:
            raise self.error
        self.queued += 1
        self._idle = trio.Event()
        self._send.send_nowait((kind, step, mb, payload, window))

    def put_norm(self, step: int, phase: int, value: float) -> None:
        """Queue a NORM frame behind the data frames already queued (the loop does not wait for the write)."""
        self.put(frames.Kind.NORM, step, phase, frames.encode_norm(value))

    async def run(self) -> None:
        async for kind, step, mb, payload, window in self._recv:
            try:
                if kind == frames.Kind.NORM:
                    await self.ch.send_norm(step, mb, frames.decode_norm(payload))
                else:
                    await self.ch.send_data(kind, step, mb, payload, window)
            except NodeError as exc:
                self.error = exc
                self._idle.set()
                return
            self.sent += 1
            if self.sent == self.queued:
                self._idle.set()

    async def drain(self) -> None:
        await self._idle.wait()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self._send.close()


class ChannelLoop:
    """What the schedules' runtimes share: the stage's neighbour channels (None at the ends), a wake-up on every
    arrival, their byte counts, and running a loop body beside one sender task per channel."""

    def __init__(self, worker: StageWorker, cfg: RuntimeConfig, upstream: ActChannel | None,
                 downstream: ActChannel | None) -> None:
        self.worker = worker
        self.cfg = cfg
        self.upstream = upstream
        self.downstream = downstream
        self.stage = worker.spec.index
        self._wake = trio.Event()
        for ch in (upstream, downstream):
            if ch is not None:
                ch.listeners.append(self._on_arrival)

    def _on_arrival(self) -> None:
        self._wake.set()

    def detach(self) -> None:
        """Stop listening to the channels (before they are replaced)."""
        for ch in (self.upstream, self.downstream):
            if ch is not None and self._on_arrival in ch.listeners:
                ch.listeners.remove(self._on_arrival)

    def _stats(self) -> tuple[int, int]:
        chans = [c for c in (self.upstream, self.downstream) if c is not None]
        return sum(c.stats.bytes_in for c in chans), sum(c.stats.bytes_out for c in chans)

    async def _with_senders(self, body: Callable[[_Sender | None, _Sender | None], Awaitable[T]],
                            upstream: bool = True) -> T:
        """`body(up_tx, down_tx)` while a task per channel drains its sender (`upstream=False`: no upstream
        sender); the senders are closed when it ends and its error is re-raised outside the nursery."""
        up_tx = _Sender(self.upstream) if self.upstream is not None and upstream else None
        down_tx = _Sender(self.downstream) if self.downstream is not None else None
        error: Exception | None = None
        result: T | None = None
        async with trio.open_nursery() as nursery:
            for tx in (up_tx, down_tx):
                if tx is not None:
                    nursery.start_soon(tx.run)
            try:
                result = await body(up_tx, down_tx)
            except Exception as exc:  # re-raised below, outside the nursery (no exception groups)
                error = exc
            finally:
                for tx in (up_tx, down_tx):
                    if tx is not None:
                        tx.close()
                nursery.cancel_scope.cancel()
        if error is not None:
            raise error
        return cast(T, result)


class PipelineRuntime(ChannelLoop):
    """Runs global steps of one stage given its live neighbour channels (None at the ends)."""

    def __init__(
        self,
        worker: StageWorker,
        cfg: RuntimeConfig,
        upstream: ActChannel | None = None,
        downstream: ActChannel | None = None,
        num_stages: int | None = None,
    ) -> None:
        super().__init__(worker, cfg, upstream, downstream)
        # 1F1B: microbatches this stage may hold between forward and backward (None: no bound, gpipe)
        self.in_flight_limit = (None if cfg.schedule != "1f1b" or num_stages is None
                                else max(1, num_stages - worker.spec.index))
        self.busy_s = 0.0  # compute seconds in the current step
        self.peak_in_flight = 0  # most microbatches held between forward and backward in the current step

    def _check(self, r: Any, step: int, kind: frames.Kind) -> int:
        h = r.frame.header
        if h.kind != kind:  # an EVAL frame while the step trains: counted against its sender
            ch = self.upstream if kind == frames.Kind.ACTIVATION else self.downstream
            if ch is not None:
                ch.scores.penalize(ch.peer, "unexpected-eval")
            raise UnexpectedFrameError(f"stage {self.stage} at step {step} expected {kind.name} frames from "
                                       f"stage {h.stage}, got {h.kind.name}")
        if h.microbatch >= self.worker.num_microbatches:
            raise UnexpectedFrameError(f"stage {self.stage} got microbatch {h.microbatch} from stage {h.stage}; "
                                       f"steps have {self.worker.num_microbatches} microbatches")
        if h.step != step:
            raise UnexpectedFrameError(f"stage {self.stage} at step {step} got a {kind.name.lower()} frame "
                                       f"for step {h.step} from stage {h.stage}")
        return int(h.microbatch)

    async def _compute(self, fn: Any, *args: Any) -> Any:
        """Run stage compute in a worker thread, adding its wall time to `busy_s`."""
        t = time.perf_counter()
        try:
            return await trio.to_thread.run_sync(fn, *args)
        finally:
            self.busy_s += time.perf_counter() - t

    async def run_step(self, step: int) -> StepResult:
        """Run global step `step` to completion (forward + backward of every microbatch, then AdamW)."""
        w = self.worker
        m = w.num_microbatches
        t0 = time.perf_counter()
        self.busy_s = 0.0
        b_in0, b_out0 = self._stats()
        waited = await self._with_senders(lambda up_tx, down_tx: self._loop(step, up_tx, down_tx))
        sq_norm = await self._exchange_sq_norm(step) if w.optim.grad_clip > 0 else None
        loss = await self._compute(w.step, step, sq_norm)
        b_in, b_out = self._stats()
        return StepResult(step=step, stage=self.stage, loss=loss, tokens=m * w.microbatch_size * w.config.seq_len,
                          seconds=time.perf_counter() - t0, comm_wait_s=waited, bytes_in=b_in - b_in0,
                          bytes_out=b_out - b_out0, busy_s=self.busy_s,
                          extra={"peak_in_flight": self.peak_in_flight})

    async def run_eval(self, step: int) -> float | None:
        """Forward the `worker.eval_batches` validation microbatches with the weights after update `step`
        (see the module doc); the tail's mean loss, None on the other stages."""
        w = self.worker
        losses: list[float] = []

        async def forward_all(_up: _Sender | None, down_tx: _Sender | None) -> None:
            for i in range(w.eval_batches):
                if self.upstream is None:
                    window, h_in = await self._compute(w.eval_window, i), None
                else:
                    window, h_in = await self._next_eval(step, i)
                out = await self._compute(w.forward_eval, window, h_in)
                if down_tx is None:
                    assert isinstance(out, float)
                    losses.append(out)
                else:
                    assert isinstance(out, bytes)
                    down_tx.put(frames.Kind.EVAL, step, i, out, window_to_bytes(window, w.id_bytes))
            if down_tx is not None and self.downstream is not None:
                await down_tx.drain()
                await self.downstream.wait_acked()

        await self._with_senders(forward_all, upstream=False)
        return sum(losses) / len(losses) if losses else None

    async def _next_eval(self, step: int, index: int) -> Any:
        """The (window, h) of validation microbatch `index` of the evaluation after `step`, from upstream.

        Anything else the upstream peer sends meanwhile is refused and counted against it; the wait is
        bounded by `runtime.frame_timeout_s`."""
        ch = self.upstream
        assert ch is not None
        while True:
            self._wake = trio.Event()
            r = await ch.try_recv()
            if r is not None:
                h = r.frame.header
                if h.kind != frames.Kind.EVAL or h.step != step or h.microbatch != index:
                    ch.scores.penalize(ch.peer, "unexpected-eval")
                    raise UnexpectedFrameError(
                        f"stage {self.stage} evaluating after step {step} expected validation microbatch {index} "
                        f"from stage {ch.remote_stage}, got {h.kind.name} for step {h.step} "
                        f"microbatch {h.microbatch}")
                return r.value
            if ch.failure is not None:
                raise ch.failure
            with trio.move_on_after(self.cfg.frame_timeout_s) as scope:
                await self._wake.wait()
            if scope.cancelled_caught:
                raise PeerLostError(f"stage {self.stage}: no validation microbatch from peer {ch.peer} (stage "
                                    f"{ch.remote_stage}) within frame_timeout_s={self.cfg.frame_timeout_s} after "
                                    f"step {step}", ch.peer, ch.remote_stage)

    async def _exchange_sq_norm(self, step: int) -> float:
        """The whole model's squared gradient norm of `step`, for global-norm clipping.

        A running float64 sum travels stage 0 -> last (each stage adding its parameters' squares in order,
        `sharding.train.grad_sq_norm`), and the last stage's total travels back to stage 0, so every
        stage clips with the same number the single process computes. Waits are bounded by
        `runtime.grad_norm_timeout_s`.
        """
        w, limit = self.worker, self.cfg.grad_norm_timeout_s
        total = 0.0
        if self.upstream is not None:
            total = await self.upstream.recv_norm(step, frames.NORM_PARTIAL, limit)
        total = await trio.to_thread.run_sync(grad_sq_norm, w.module, total)
        if self.downstream is not None:
            await self.downstream.send_norm(step, frames.NORM_PARTIAL, total)
            total = await self.downstream.recv_norm(step, frames.NORM_TOTAL, limit)
        if self.upstream is not None:
            await self.upstream.send_norm(step, frames.NORM_TOTAL, total)
        return total

    async def _loop(self, step: int, up_tx: _Sender | None, down_tx: _Sender | None) -> float:
        """The event loop of one step; returns the seconds spent waiting on the network."""
        w = self.worker
        spec = w.spec
        m = w.num_microbatches
        waited = 0.0
        fwd = bwd = 0
        self.peak_in_flight = 0
        while fwd < m or bwd < m:
            self.peak_in_flight = max(self.peak_in_flight, fwd - bwd)
            self._wake = trio.Event()
            for tx in (up_tx, down_tx):
                if tx is not None and tx.error is not None:
                    raise tx.error
            r = await self.downstream.try_recv() if self.downstream is not None else None
            if r is not None:
                mb = self._check(r, step, frames.Kind.GRADIENT)
                grad = await self._compute(w.backward, step, mb, r.value)
                if up_tx is not None and grad is not None:
                    up_tx.put(frames.Kind.GRADIENT, step, mb, grad)
                bwd += 1
                continue
            window = h_in = None
            mb = fwd
            room = self.in_flight_limit is None or fwd - bwd < self.in_flight_limit
            if self.upstream is not None and room:
                r = await self.upstream.try_recv()
                if r is not None:
                    mb = self._check(r, step, frames.Kind.ACTIVATION)
                    window, h_in = r.value
            elif fwd < m and room and self.upstream is None:
                window = await self._compute(w.head_window, step, fwd)
            if window is not None:
                out = await self._compute(w.forward, step, mb, window, h_in)
                fwd += 1
                if spec.is_last:
                    grad = await self._compute(w.backward, step, mb, None)
                    if up_tx is not None and grad is not None:
                        up_tx.put(frames.Kind.GRADIENT, step, mb, grad)
                    bwd += 1
                else:
                    assert down_tx is not None and isinstance(out, bytes)
                    down_tx.put(frames.Kind.ACTIVATION, step, mb, out, window_to_bytes(window, w.id_bytes))
                continue
            for ch in (self.upstream, self.downstream):
                if ch is not None and ch.failure is not None:
                    raise ch.failure  # a neighbour closed in order while we still wait for its frames
            tw = time.perf_counter()
            with trio.move_on_after(self.cfg.frame_timeout_s) as scope:
                await self._wake.wait()
            waited += time.perf_counter() - tw
            if scope.cancelled_caught:
                ch = self.upstream if fwd < m and self.upstream is not None else self.downstream
                assert ch is not None
                raise PeerLostError(
                    f"stage {self.stage}: no frame from peer {ch.peer} (stage {ch.remote_stage}) within "
                    f"frame_timeout_s={self.cfg.frame_timeout_s} at step {step}", ch.peer, ch.remote_stage)
        tw = time.perf_counter()
        for tx in (up_tx, down_tx):
            if tx is not None:
                await tx.drain()
        for ch in (self.upstream, self.downstream):
            if ch is not None:
                await ch.wait_acked()
        waited += time.perf_counter() - tw
        return waited
