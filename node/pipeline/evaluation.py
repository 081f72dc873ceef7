"""Validation loss in replicated mode: `/pmn/eval/1.0.0`.

After the update of every `runtime.eval_every`-th step, every replica keeps a copy of its stage's weights
(`EvalSnapshots`: the weights every replica of the stage holds after that update, bit-identical across replicas
once the step's average is applied). The leading head replica then forwards the fixed validation microbatches
(`runtime.eval_batches` windows of the corpus's val split, `StageWorker.eval_window`) through its copy and sends
them, as unsigned EVAL frames (`node.wire.frames`; no receipt: evaluation is no training work), to one replica of
stage 1 on one `/pmn/eval/1.0.0` stream. That replica forwards them through its own copy of the same step and
passes them on to a replica of the next stage, and so on; the tail computes the mean loss and the answer travels
back along the streams. The head records it as `val_loss` (with `val_step`, the step it follows) in its next
progress record (`val_losses` lists every evaluation finished since the record before, when steps are shorter than
an evaluation), or in the record of the run's last step, which waits for it (bounded by `runtime.eval_timeout_s`). Training never waits for an evaluation but at the last step, and a failed one is
reported in the status file (`last_eval_error`) and skipped. The async schedule is evaluated the same way: the copy
is the live weights after the update, not the stashed ones later steps' work runs on; the one-peer-per-stage async
runner (`node.pipeline.asyncrun`) uses this protocol too (its stages after the head stay up after their last step
until the last evaluation passed through them).

Messages: one request per stream, a msgio header `{"type": "eval", "step", "batches"}` whose body is the
`batches` EVAL frames back to back (each header checked against the model's frame spec before its body is read:
sender stage, step, microbatch index in order, codec, shape, digest), answered by `{"type": "result", "val_loss",
"stage"}` or `{"type": "error", "message"}`. Who may send: a peer serving the stage before ours (the access
policy, `EVAL`); a malformed request is refused and counted against the sender; weights the replica no longer
keeps, or a next stage nobody answers for, are answered with an error that names them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import trio
from libp2p.custom_types import TProtocol

from node.errors import NodeError, NotAuthorizedError, PeerRefusedError
from node.net import msgio
from node.net.access import EVAL, AccessPolicy
from node.net.gate import ProtocolGate, reset_quietly
from node.net.peerscore import PeerScores
from node.training.worker import StageWorker, window_to_bytes
from node.wire import frames

EVAL_PROTOCOL = TProtocol(EVAL)


class EvalError(NodeError):
    """An evaluation request is malformed or refused, or an evaluation could not be completed."""


class EvalSnapshots:
    """Copies of this replica's stage weights after the updates an evaluation follows (newest `keep`)."""

    def __init__(self, keep: int) -> None:
        self.keep = keep  # copies kept (older ones are dropped when a newer one is added)
        self.copies: dict[int, torch.nn.Module] = {}  # step -> the stage module after that step's update
        self.changed = trio.Event()

    def add(self, step: int, module: torch.nn.Module) -> None:
        """Keep a copy of `module` (no gradients) as the weights after update `step` (called off the event loop)."""
        snap = copy.deepcopy(module).eval()
        for p in snap.parameters():
            p.grad = None
            p.requires_grad_(False)
        self.copies[step] = snap
        for old in sorted(self.copies)[:-self.keep]:
            del self.copies[old]

    def poke(self) -> None:
        """Wake the requests waiting for a copy (on the event loop, after `add`)."""
        self.changed.set()
        self.changed = trio.Event()

    async def wait(self, step: int, timeout_s: float) -> torch.nn.Module:
        """The copy of step `step`, waiting up to `timeout_s` while this replica has not applied it yet."""
        with trio.move_on_after(timeout_s):
            while step not in self.copies:
                if self.copies and max(self.copies) > step:
                    break  # applied later updates already: that step's copy was dropped, or never due
                await self.changed.wait()
        if step in self.copies:
            return self.copies[step]
        kept = sorted(self.copies)
        raise EvalError(f"this replica keeps no weights of step {step} to evaluate (kept: {kept or 'none'})")


class Evaluation:
    """One stage worker's evaluation: its weight copies, and (at the leading head) the evaluations it started."""

    def __init__(self, worker: StageWorker, num_stages: int, eval_every: int, keep: int) -> None:
        self.worker = worker  # the stage worker served now (its eval_batches and eval_seed are set)
        self.stage = worker.spec.index
        self.num_stages = num_stages
        self.eval_every = eval_every  # evaluate after the update of every this many steps (0 = never)
        self.snapshots = EvalSnapshots(keep)
        self.results: dict[int, float] = {}  # step -> validation loss (leading head: evaluations done)
        self.errors: dict[int, str] = {}  # step -> why its evaluation failed (leading head)
        self.pending: set[int] = set()  # steps whose evaluation the leading head started and that did not finish
        self.served: set[int] = set()  # steps whose evaluation passed through this stage (stages after the head)
        self.changed = trio.Event()  # set (and replaced) whenever one finished (head) or passed through (others)

    def due(self, step: int) -> bool:
        """Whether an evaluation follows the update of `step`."""
        return self.eval_every > 0 and self.worker.eval_batches > 0 and (step + 1) % self.eval_every == 0

    async def keep_weights(self, step: int) -> None:
        """After the update of `step` (the worker's module holds its weights): keep a copy when an evaluation is due."""
        if self.due(step):
            await trio.to_thread.run_sync(self.snapshots.add, step, self.worker.module)
            self.snapshots.poke()

    def finished(self, step: int, loss: float | None, error: str | None) -> None:
        self.pending.discard(step)
        if loss is not None:
            self.results[step] = loss
        if error is not None:
            self.errors[step] = error
        self._poke()

    def _poke(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def take_error(self) -> str | None:
        """The status line of the newest failed evaluation since the last call (None when none failed)."""
        if not self.errors:
            return None
        step = max(self.errors)
        line = f"evaluation after step {step}: {self.errors[step]}"
        self.errors.clear()
        return line

    def take(self) -> dict[str, Any]:
        """Progress-record fields of the evaluations finished since the last call ({} when none): the newest one's
        `val_loss` and `val_step`, and every one as `val_losses` ([step, loss] pairs, oldest first)."""
        if not self.results:
            return {}
        step = max(self.results)
        fields = {"val_loss": self.results[step], "val_step": step,
                  "val_losses": [[s, self.results[s]] for s in sorted(self.results)]}
        self.results.clear()
        return fields

    def note_served(self, step: int) -> None:
        self.served.add(step)
        self._poke()

    async def wait_served(self, step: int, timeout_s: float) -> bool:
        """Wait up to `timeout_s` until the evaluation of `step` passed through this stage; whether it did."""
        with trio.move_on_after(timeout_s):
            while step not in self.served:
                await self.changed.wait()
        return step in self.served

    def launch(self, nursery: trio.Nursery, service: EvalService, step: int) -> None:
        """The leading head: start the evaluation after update `step` in `nursery` (pending until it finished)."""
        self.pending.add(step)
        nursery.start_soon(service.evaluate, self, step)

    async def settle(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` until every evaluation started finished (well or not)."""
        with trio.move_on_after(timeout_s):
            while self.pending:
                await self.changed.wait()

    def encode(self, step: int, outputs: Sequence[tuple[bytes, bytes]], max_frame_bytes: int) -> bytes:
        """The EVAL frames of (payload, window bytes) `outputs`, as this stage sends them."""
        spec = self.worker.frame_spec(max_frame_bytes)
        return b"".join(frames.encode_frame(frames.Kind.EVAL, spec.spec_hash, self.stage, step, i, payload=payload,
                                            window=window, codec=spec.codec, dtype=spec.dtype, shape=spec.shape,
                                            id_dtype=spec.id_dtype)
                        for i, (payload, window) in enumerate(outputs))


def head_outputs(worker: StageWorker, module: torch.nn.Module) -> list[tuple[bytes, bytes]]:
    """(activation payload, window bytes) of every validation microbatch through the head's copy `module`."""
    out = []
    for i in range(worker.eval_batches):
        window = worker.eval_window(i)
        payload = worker.forward_eval(window, None, module)
        assert isinstance(payload, bytes)
        out.append((payload, window_to_bytes(window, worker.id_bytes)))
    return out


def stage_outputs(worker: StageWorker, module: torch.nn.Module, decoded: Sequence[tuple[torch.Tensor, torch.Tensor]]
                  ) -> list[tuple[bytes, bytes]] | float:
    """A middle stage: (payload, window bytes) per microbatch through `module`; the tail: their mean loss."""
    results = [worker.forward_eval(window, h, module) for window, h in decoded]
    if worker.spec.is_last:
        losses = [float(x) for x in results]
        return sum(losses) / len(losses)
    return [(out, window_to_bytes(window, worker.id_bytes))  # type: ignore[misc]
            for out, (window, _) in zip(results, decoded, strict=True)]


class EvalService:
    """Serves `/pmn/eval/1.0.0` for the stage this node serves now, and sends evaluations on to the next stage."""

    def __init__(self, host: Any, current: Callable[[], Evaluation | None], next_stage: Callable[[int], list[Any]],
                 timeout_s: float, max_frame_bytes: int, policy: AccessPolicy | None = None,
                 scores: PeerScores | None = None, idle_timeout_s: float = 30.0) -> None:
        self.host = host
        self.current = current  # the evaluation of the worker served now (None while none is)
        self.next_stage = next_stage  # stage -> its live replicas' announcements (ours tried in that order)
        self.timeout_s = timeout_s  # bound per stage: stage k allows (num_stages - k) times this for its part (its
        # weights, its forward) and the rest of the chain
        self.max_frame_bytes = max_frame_bytes  # the transport's frame limit (each EVAL frame is checked against it)
        self.idle_timeout_s = idle_timeout_s  # a request that sends nothing for this long is dropped
        self.served = 0  # evaluations answered without error
        self.gate = ProtocolGate(EVAL, policy, None, scores)  # policy, bans, stream caps
        host.set_stream_handler(EVAL_PROTOCOL, self._handle)

    def _limits(self, ev: Evaluation) -> msgio.MessageLimits:
        return msgio.MessageLimits(max_header_bytes=1024, max_body_bytes=ev.worker.eval_batches * self.max_frame_bytes,
                                   max_depth=2, idle_timeout_s=self.idle_timeout_s).validate()

    async def _handle(self, stream: Any) -> None:
        try:
            async with self.gate.serve(stream) as peer:
                ev = self.current()
                try:
                    if ev is None or ev.stage == 0:
                        raise NotAuthorizedError("this node evaluates no stage that takes evaluations now")
                    await self.gate.authorize(peer, ev.stage)
                    with trio.fail_after(self.timeout_s * (ev.num_stages - ev.stage)):
                        reply = await self._serve(stream, peer, ev)
                except NotAuthorizedError:
                    reply = {"type": "error", "message": "not authorized"}
                except (EvalError, trio.TooSlowError) as exc:
                    reply = {"type": "error", "message": str(exc) or "evaluation timed out at stage "
                             f"{ev.stage if ev else '?'} (runtime.eval_timeout_s={self.timeout_s} per stage)"}
                await msgio.write_message(stream, reply)
                if reply["type"] != "error":
                    self.served += 1
                await stream.close()
        except PeerRefusedError:
            return
        except Exception:  # a reset stream: nothing to answer
            await reset_quietly(stream)

    async def _serve(self, stream: Any, peer: Any, ev: Evaluation) -> dict[str, Any]:
        """Read, check and run one request; anything the sender got wrong is counted against it."""
        try:
            step, body = await self._read(stream, ev)
            decoded = await trio.to_thread.run_sync(self._decode, ev, step, body)
        except EvalError:
            self.gate.refuse(peer, "malformed")
            raise
        module = await ev.snapshots.wait(step, self.timeout_s)
        out = await trio.to_thread.run_sync(stage_outputs, ev.worker, module, decoded)
        if isinstance(out, float):
            ev.note_served(step)
            return {"type": "result", "val_loss": out, "stage": ev.stage}
        reply = await self.send(ev, step, ev.encode(step, out, self.max_frame_bytes))
        ev.note_served(step)
        return reply

    async def _read(self, stream: Any, ev: Evaluation) -> tuple[int, bytes]:
        limits = self._limits(ev)
        header, size = await msgio.read_header(stream, limits, EvalError)
        if header["type"] != "eval":
            raise EvalError(f"unknown request type {header['type'][:32]!r}: expected eval")
        step = msgio.int_field(header, "step", 0, 1 << 40, EvalError)
        batches = msgio.int_field(header, "batches", 1, 1 << 16, EvalError)
        if batches != ev.worker.eval_batches:
            raise EvalError(f"an evaluation of {batches} microbatches; this model evaluates {ev.worker.eval_batches}")
        spec = ev.worker.frame_spec(self.max_frame_bytes)
        expected = batches * (frames.HEADER_SIZE + spec.window_len + spec.payload_len)  # unsigned, window carried
        if size != expected:  # refused unread: what a stage may send is exactly known
            raise EvalError(f"an evaluation body of {size} bytes; {batches} eval frames of this model take {expected}")
        return step, await msgio.read_body(stream, size, limits, EvalError)

    def _decode(self, ev: Evaluation, step: int, body: bytes) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The (window, activation) of each EVAL frame of `body`, every header checked before its body is split."""
        spec = ev.worker.frame_spec(self.max_frame_bytes)
        decoded: list[tuple[torch.Tensor, torch.Tensor]] = []
        at = 0
        try:
            for i in range(ev.worker.eval_batches):
                h = frames.decode_header(body[at:at + frames.HEADER_SIZE], self.max_frame_bytes)
                if h.kind != frames.Kind.EVAL or (h.stage, h.step, h.microbatch) != (ev.stage - 1, step, i):
                    raise EvalError(f"frame {i}: a {h.kind.name.lower()} frame of stage {h.stage} step {h.step} "
                                    f"microbatch {h.microbatch}, expected the eval frame of stage {ev.stage - 1} step "
                                    f"{step} microbatch {i}")
                frames.check_data_header(h, spec)
                end = at + frames.HEADER_SIZE + h.body_len
                if end > len(body):
                    raise EvalError(f"frame {i} declares {h.body_len} body bytes, {len(body) - at} are left")
                fr = frames.split_body(h, body[at + frames.HEADER_SIZE:end])
                window, act = ev.worker.decode(fr)  # type: ignore[misc]
                if not bool(torch.isfinite(act).all()):
                    raise EvalError(f"frame {i}: the activation holds NaN or Inf")
                decoded.append((window, act))
                at = end
        except EvalError:
            raise
        except Exception as exc:  # the frame layer's and the codec's errors, each naming what was wrong
            raise EvalError(f"eval frames of step {step}: {exc}") from exc
        if at != len(body):
            raise EvalError(f"{len(body) - at} bytes after the {ev.worker.eval_batches} eval frames")
        return decoded

    async def send(self, ev: Evaluation, step: int, body: bytes) -> dict[str, Any]:
        """Send our stage's EVAL frames of `step` to a replica of the next stage (each live one in turn until one
        answers) and return its result."""
        from node.net.host import parse_peer_addr

        why: list[str] = []
        for entry in self.next_stage(ev.stage + 1):
            try:
                info = parse_peer_addr(entry.addrs[0])
                with trio.fail_after(self.timeout_s * (ev.num_stages - ev.stage - 1)):  # the rest of the chain's part
                    await self.host.connect(info)
                    stream = await self.host.new_stream(info.peer_id, [EVAL_PROTOCOL])
                    try:
                        await msgio.write_message(stream, {"type": "eval", "step": step,
                                                           "batches": ev.worker.eval_batches}, body)
                        reply, _ = await msgio.read_message(stream, 4096, EvalError)
                    finally:
                        await stream.close()
            except Exception as exc:  # a dead or refusing replica, or one that timed out: try the next
                why.append(f"{entry.peer_id}: {type(exc).__name__}: {exc}"[:200])
                continue
            if reply.get("type") == "error":
                why.append(f"{entry.peer_id}: {str(reply.get('message'))[:200]}")
                continue
            loss = reply.get("val_loss")
            if reply.get("type") != "result" or isinstance(loss, bool) or not isinstance(loss, int | float) \
                    or not math.isfinite(loss):
                why.append(f"{entry.peer_id}: a malformed result {str(reply)[:120]}")
                continue
            return {"type": "result", "val_loss": float(loss), "stage": reply.get("stage")}
        raise EvalError(f"no replica of stage {ev.stage + 1} evaluated step {step}: " + ("; ".join(why) or
                                                                                        "none is announced"))

    async def evaluate(self, ev: Evaluation, step: int) -> None:
        """The leading head: the evaluation after update `step`, from its weight copy to the tail and back."""
        try:
            with trio.fail_after(self.timeout_s * ev.num_stages):
                module = await ev.snapshots.wait(step, 0.0)
                outputs = await trio.to_thread.run_sync(head_outputs, ev.worker, module)
                reply = await self.send(ev, step, ev.encode(step, outputs, self.max_frame_bytes))
        except (EvalError, trio.TooSlowError) as exc:
            ev.finished(step, None, str(exc) or f"the evaluation of step {step} timed out")
            return
        ev.finished(step, float(reply["val_loss"]), None)
