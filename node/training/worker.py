"""Stage worker: one pipeline stage's shard, optimiser and per-microbatch stash; no transport.

The runtime (or the lead's inference path) calls forward / backward / step; all payloads are the
codec's wire bytes, so the worker is the same whether the neighbour is local or remote.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from node.errors import NonFiniteError, UnexpectedFrameError
from node.wire import frames
from sharding import (
    Corpus,
    ModelConfig,
    OptimConfig,
    StageSpec,
    get_codec,
    make_optimizer,
    token_id_bytes,
)
from sharding.device import ExecutionPolicy
from sharding.stage import build_stage_on, plan_for
from sharding.train import optimizer_step


@dataclass
class _Stash:
    ids: torch.Tensor  # (B, T) token ids of the microbatch
    out: torch.Tensor | None  # this stage's boundary output (non-tail), still attached to the graph
    h_in: torch.Tensor | None  # received boundary input leaf (non-head)


def window_to_bytes(window: torch.Tensor, id_bytes: int) -> bytes:
    """(B, T+1) int64 token window -> little-endian uint16/uint32 bytes."""
    dt = np.uint16 if id_bytes == 2 else np.uint32
    return window.numpy().astype(dt).tobytes()


def bytes_to_window(raw: bytes, batch: int, seq_len: int, id_bytes: int, vocab_size: int) -> torch.Tensor:
    """Inverse of window_to_bytes; ids outside the vocabulary raise NonFiniteError."""
    dt = np.uint16 if id_bytes == 2 else np.uint32
    arr = np.frombuffer(raw, dtype=dt).astype(np.int64).reshape(batch, seq_len + 1)
    if arr.size and int(arr.max()) >= vocab_size:
        raise NonFiniteError(f"token window holds id {int(arr.max())} >= vocab_size {vocab_size}")
    return torch.from_numpy(arr)


class StageWorker:
    """Forward/backward/step of one stage with GPipe-style gradient accumulation."""

    def __init__(
        self,
        config: ModelConfig,
        spec: StageSpec,
        *,
        codec: str,
        optim: OptimConfig,
        num_microbatches: int,
        microbatch_size: int,
        corpus: Corpus | None = None,
        policy: ExecutionPolicy | None = None,
        eval_batches: int = 0,
        eval_seed: int = 1234,
        local_windows: bool = False,
    ) -> None:
        """policy: device, precision, AdamW kernel, compile, checkpointing (None: fp32 on CPU). The stage is
        refused (sharding.StageMemoryError) before any weight is allocated when it does not fit its device.
        eval_batches / eval_seed: the fixed validation microbatches `eval_window` reads (0 = no evaluation).
        local_windows: every stage reads training windows from `corpus` (the spec's dataset), so activation frames
        travel without them (FrameSpec.local_windows)."""
        if spec.is_first and corpus is None:
            raise ValueError("the head stage needs a corpus to read its data from")
        if local_windows and corpus is None:
            raise ValueError("local_windows needs the spec's dataset on every stage (corpus is None)")
        self.config = config
        self.spec = spec
        self.policy = (policy or ExecutionPolicy()).validate()
        self.device = self.policy.torch_device
        self.codec = get_codec(codec, config, low_precision_inputs=True)
        self.optim = optim
        self.num_microbatches = num_microbatches
        self.microbatch_size = microbatch_size
        self.corpus = corpus
        self.local_windows = local_windows  # training windows read from `corpus` on every stage, not sent
        self.eval_batches = eval_batches  # validation microbatches per evaluation (0 = this stage does not evaluate)
        self.eval_seed = eval_seed  # seed of the validation windows (Corpus.batch on the "val" split)
        plan = plan_for(self.policy, microbatch_size, num_microbatches, optimizer_name=optim.optimizer)
        self.module = build_stage_on(config, spec, self.policy, plan)
        self.optimizer = make_optimizer(self.module, optim, self.policy.adamw_kwargs())
        # what forward calls: the module, or its torch.compile wrapper (same parameters)
        self._run: Any = torch.compile(self.module) if self.policy.compile else self.module
        self.id_bytes = token_id_bytes(config)
        self.next_step = 0  # first step not yet applied by the optimiser
        self._stash: dict[tuple[int, int], _Stash] = {}
        self._losses: dict[int, list[float]] = {}
        # audit recorders: on_frame(frame) per decoded data frame, on_before_update(step, module) per step
        self.observers: list[Any] = []

    def frame_spec(self, max_frame_bytes: int) -> frames.FrameSpec:
        """What this model's boundary frames must look like."""
        if self.codec.name not in frames.CODEC_IDS:
            raise ValueError(f"codec {self.codec.name!r} has no wire id")
        return frames.FrameSpec(
            spec_hash=self.config.spec_hash(), codec=frames.CODEC_IDS[self.codec.name],
            microbatch_size=self.microbatch_size, seq_len=self.config.seq_len, d_model=self.config.d_model,
            bytes_per_token=self.codec.bytes_per_token, id_bytes=self.id_bytes, max_frame_bytes=max_frame_bytes,
            eval_batches=self.eval_batches, local_windows=self.local_windows,
        )

    # -- decoding (called off the event loop by the channel) --------------------------------------

    def decode(self, fr: frames.Frame) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        """ACTIVATION and EVAL -> (window, h); GRADIENT -> g. Codec errors (NaN/Inf, sizes) propagate.
        EVAL frames are not shown to the observers (the audit recorder): they are no training hop."""
        h = fr.header
        evaluating = h.kind == frames.Kind.EVAL
        limit, what = (self.eval_batches, "evaluations") if evaluating else (self.num_microbatches, "steps")
        if h.microbatch >= limit:
            raise UnexpectedFrameError(f"{'eval ' if evaluating else ''}microbatch {h.microbatch} out of range: "
                                       f"{what} have {limit}")
        decoded: tuple[torch.Tensor, torch.Tensor] | torch.Tensor
        if h.kind in (frames.Kind.ACTIVATION, frames.Kind.EVAL):
            window = bytes_to_window(fr.window, self.microbatch_size, self.config.seq_len, self.id_bytes,
                                     self.config.vocab_size)
            decoded = window, self.codec.decode_activation(fr.payload, window[:, :-1], self.device)
            if evaluating:
                return decoded
        else:
            stash = self._stash.get((h.step, h.microbatch))
            if stash is None:
                raise UnexpectedFrameError(f"gradient for step {h.step} microbatch {h.microbatch} that was never sent")
            decoded = self.codec.decode_gradient(fr.payload, stash.ids, self.device)
        for obs in self.observers:
            obs.on_frame(fr)
        return decoded

    def stash_ids(self, step: int, mb: int) -> torch.Tensor | None:
        """Token ids stashed by the forward of (step, mb), or None if there is none (replicated runtime)."""
        stash = self._stash.get((step, mb))
        return None if stash is None else stash.ids

    # -- schedule pieces --------------------------------------------------------------------------

    def head_window(self, step: int, mb: int) -> torch.Tensor:
        """The (B, T+1) data window of (step, mb), a pure function of the corpus and optimiser seed."""
        assert self.corpus is not None
        return self.corpus.batch("train", step, mb, self.microbatch_size, self.config.seq_len, self.optim.data_seed)

    def local_window(self, step: int, mb: int) -> bytes:
        """Wire bytes of the (step, mb) training window read from this node's dataset (FrameSpec.local_windows);
        UnexpectedFrameError for a microbatch outside the step (checked before any data is read)."""
        if mb >= self.num_microbatches:
            raise UnexpectedFrameError(f"activation for microbatch {mb} out of range: steps have {self.num_microbatches}")
        return window_to_bytes(self.head_window(step, mb), self.id_bytes)

    def eval_window(self, index: int) -> torch.Tensor:
        """The (B, T+1) window of validation microbatch `index`: the same for every evaluation, read from the
        corpus's "val" split only (never the train split)."""
        assert self.corpus is not None
        if not 0 <= index < self.eval_batches:
            raise ValueError(f"validation microbatch {index} out of range: evaluations have {self.eval_batches}")
        return self.corpus.batch("val", 0, index, self.microbatch_size, self.config.seq_len, self.eval_seed)

    def forward_eval(self, window: torch.Tensor, h_in: torch.Tensor | None,
                     module: torch.nn.Module | None = None) -> bytes | float:
        """Forward only, with the live weights (or `module`: a copy of this stage's, e.g. kept after an update) and
        no graph: non-tail returns the encoded activation, the tail the microbatch's loss. Nothing is stashed and no
        gradient, weight or optimiser state changes."""
        window = window.to(self.device)
        ids, targets = window[:, :-1], window[:, 1:]
        run = self._run if module is None else module
        with torch.no_grad(), self.policy.autocast():
            if self.spec.is_last:
                return float(run(ids, None if h_in is None else h_in.to(self.device), targets))
            out = run(ids, None if h_in is None else h_in.to(self.device))
        return self.codec.encode_activation(out, ids)

    def weights_for(self, step: int) -> torch.nn.Module:
        """The module the forward and backward of `step` run on (the live one; the async schedule stashes copies)."""
        return self.module

    def forward(self, step: int, mb: int, window: torch.Tensor, h_in: torch.Tensor | None) -> bytes | float:
        """Non-tail: run the shard and return the encoded activation. Tail: loss, backward, return loss."""
        window = window.to(self.device)
        ids, targets = window[:, :-1], window[:, 1:]
        if h_in is not None:
            h_in = h_in.to(self.device).detach().requires_grad_(True)
        module = self.weights_for(step)
        run = self._run if module is self.module else module  # the async schedule runs a stashed copy
        if self.spec.is_last:
            with self.policy.autocast():
                loss = run(ids, h_in, targets)
            (loss / self.num_microbatches).backward()
            self._stash[(step, mb)] = _Stash(ids=ids, out=None, h_in=h_in)
            value = float(loss.detach())
            self._losses.setdefault(step, []).append(value)
            return value
        with self.policy.autocast():
            out = run(ids, h_in)
        self._stash[(step, mb)] = _Stash(ids=ids, out=out, h_in=h_in)
        return self.codec.encode_activation(out.detach(), ids)

    def backward(self, step: int, mb: int, grad_out: torch.Tensor | None) -> bytes | None:
        """Backward of (step, mb) given d loss / d out (None at the tail, which already ran it).

        Returns the encoded gradient for the upstream stage, or None at the head.
        """
        stash = self._stash.pop((step, mb), None)
        if stash is None:
            raise UnexpectedFrameError(f"backward for step {step} microbatch {mb} without a forward")
        if grad_out is not None:
            assert stash.out is not None
            stash.out.backward(grad_out.to(self.device))
        if stash.h_in is None:
            return None
        assert stash.h_in.grad is not None
        return self.codec.encode_gradient(stash.h_in.grad, stash.ids)

    def step(self, step: int, grad_sq_total: float | None = None) -> float | None:
        """Apply the accumulated gradients (global-norm clip, scheduled lr, re-projection); returns the tail's
        mean loss. `grad_sq_total`: the whole model's squared gradient norm (needed when the recipe clips)."""
        if step != self.next_step:
            raise UnexpectedFrameError(f"optimizer step {step} out of order: next is {self.next_step}")
        if self._stash:
            raise UnexpectedFrameError(f"step {step} has unfinished microbatches {sorted(self._stash)}")
        for obs in self.observers:
            obs.on_before_update(step, self.module)
        optimizer_step(self.module, self.optimizer, step, self.optim, grad_sq_total)
        self.next_step = step + 1
        losses = self._losses.pop(step, None)
        return sum(losses) / len(losses) if losses else None

    def stash_tensors(self) -> dict[str, torch.Tensor]:
        """Weight copies the steps in flight compute with, by "<step>/<parameter>" (the async schedule's; none here)."""
        return {}

    def check_stash(self, tensors: dict[str, torch.Tensor], next_step: int) -> None:
        """ValueError unless `tensors` (a peer's `stash_tensors`) fit this worker at `next_step`: none here."""
        if tensors:
            raise ValueError(f"stage {self.spec.index} runs no stashed weight copies; got {len(tensors)} tensors")

    def install_stash(self, tensors: dict[str, torch.Tensor]) -> None:
        """Install `stash_tensors` of a peer of the stage (after its weights and `next_step`; `check_stash` first)."""
        self.check_stash(tensors, self.next_step)

    def drop_step(self, step: int) -> None:
        """Drop what `step` left behind before its update is applied: the stashes of forwards whose backward never
        ran (abandoned attempts), its losses and the gradients on the weights it computed with. Other steps in
        flight (the async schedule's) keep theirs."""
        for key in [k for k in self._stash if k[0] == step]:
            del self._stash[key]
        self._losses.pop(step, None)
        self.weights_for(step).zero_grad(set_to_none=True)

    def abort_step(self) -> None:
        """Drop a partially run step (gradients and stashes) so it can be retried from scratch."""
        self._stash.clear()
        self._losses.clear()
        self.optimizer.zero_grad(set_to_none=True)
