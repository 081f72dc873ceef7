"""The stage worker of the asynchronous schedule: weight stashing over `sharding.delayed.WeightStash`.

Step k's forward and backward run on a stashed copy of the weights after update k - S - 1 (S =
`runtime.max_staleness`; extrapolated along the last update by `runtime.async_lookahead` x S), so a stage
may work on steps up to S ahead of its last update while older gradients are still in flight, and the result
is the same whatever the timing (the single-process reference is `sharding.delayed.train_delayed`). A gradient frame for a microbatch whose backward
already ran, or for a step already applied (staler than the bound), decodes to `STALE` instead of
failing the channel: the runtime counts it against the sender and goes on without it. With
`recipe.grad_clip`, update k is clipped by step k's squared gradient norm summed over every stage
(`step_sq_norm` gives this stage's share; the runtime carries the sums, `node.pipeline.asyncrun`).
"""

from __future__ import annotations

from typing import Any

import torch

from node.errors import UnexpectedFrameError
from node.training.worker import StageWorker
from node.wire import frames
from sharding.delayed import ASYNC_LOOKAHEAD, WeightStash
from sharding.train import grad_sq_norm

STALE = object()  # what `decode` returns for a gradient that is staler than the bound (or a duplicate)


class AsyncStageWorker(StageWorker):
    """A `StageWorker` whose steps run on stashed weight copies (see the module doc)."""

    def __init__(self, *args: Any, max_staleness: int, lookahead: float = ASYNC_LOOKAHEAD, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._start_stash(max_staleness, lookahead)

    @classmethod
    def wrap(cls, worker: StageWorker, max_staleness: int, lookahead: float = ASYNC_LOOKAHEAD) -> AsyncStageWorker:
        """The async worker over `worker`'s module, optimiser and step (a resumed checkpoint included)."""
        me = cls.__new__(cls)
        me.__dict__.update(worker.__dict__)
        me._start_stash(max_staleness, lookahead)
        return me

    def _start_stash(self, max_staleness: int, lookahead: float) -> None:
        """The stash over this worker's module and optimiser, from its next step on."""
        self.max_staleness = max_staleness  # steps a gradient may lag the weights it updates
        self.stash = WeightStash(self.module, self.optimizer, self.optim, max_staleness, first_step=self.next_step,
                                 lookahead=lookahead)

    def stash_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{k}/{name}": t.detach().clone() for k, twin in self.stash.copies.items()
                for name, t in twin.state_dict().items()}

    def check_stash(self, tensors: dict[str, torch.Tensor], next_step: int) -> None:
        """ValueError unless `tensors` are copies (whole state dicts of this stage, by "<step>/<name>") of exactly the
        steps `next_step` .. `next_step + max_staleness`, or none at all."""
        if not tensors:
            return
        own = self.module.state_dict()
        steps = range(next_step, next_step + self.max_staleness + 1)
        if set(tensors) != {f"{k}/{n}" for k in steps for n in own}:
            got = sorted({key.split("/")[0] for key in tensors})
            raise ValueError(f"stashed copies of steps {got[:8]} ({len(tensors)} tensors) do not fit this stage at step "
                             f"{next_step} with max_staleness {self.max_staleness}: it stashes steps {list(steps)}")
        for key, t in tensors.items():
            mine = own[key.split("/", 1)[1]]
            if t.shape != mine.shape or t.dtype != mine.dtype:
                raise ValueError(f"stashed copy {key}: {t.dtype} {tuple(t.shape)}, the stage holds {mine.dtype} "
                                 f"{tuple(mine.shape)}")

    def install_stash(self, tensors: dict[str, torch.Tensor]) -> None:
        """A state sync's copies (checked with `check_stash` against `next_step`); none given: the stash starts again
        from the live weights."""
        self.check_stash(tensors, self.next_step)
        self._start_stash(self.max_staleness, self.stash.lookahead)
        for k, twin in self.stash.copies.items():
            if tensors:
                twin.load_state_dict({n: tensors[f"{k}/{n}"] for n in self.module.state_dict()})

    def ready(self, step: int) -> bool:
        """Whether the weights of `step` are stashed (update step - S - 1 is applied)."""
        return self.stash.ready(step)

    def weights_for(self, step: int) -> torch.nn.Module:
        if not self.stash.ready(step):
            raise UnexpectedFrameError(f"stage {self.spec.index}: step {step} is more than {self.max_staleness} "
                                       f"step(s) ahead of the last update ({self.next_step - 1})")
        return self.stash.weights(step)

    def decode(self, fr: frames.Frame) -> Any:
        h = fr.header
        if h.kind == frames.Kind.GRADIENT and (h.step, h.microbatch) not in self._stash:
            if h.step < self.next_step or self.stash.ready(h.step):
                for obs in self.observers:
                    obs.on_frame(fr)
                return STALE
        return super().decode(fr)

    def pending(self, step: int) -> int:
        """Microbatches of `step` whose forward ran here and whose backward did not yet."""
        return sum(1 for k, _ in self._stash if k == step)

    def step_sq_norm(self, step: int, below: float = 0.0) -> float:
        """`below` (the stages after this one) plus this stage's squared gradient norm of `step` (float64)."""
        if step != self.next_step or self.pending(step):
            raise UnexpectedFrameError(f"the gradient norm of step {step} is asked before its backward finished here "
                                       f"(next update {self.next_step})")
        return grad_sq_norm(self.stash.weights(step), below)

    def step(self, step: int, grad_sq_total: float | None = None) -> float | None:
        """Apply update `step` with the gradients accumulated on its copy (clipped by `grad_sq_total`, the whole
        model's squared norm of the step, when `recipe.grad_clip` is on); returns the tail's mean loss."""
        if step != self.next_step:
            raise UnexpectedFrameError(f"optimizer step {step} out of order: next is {self.next_step}")
        if self.pending(step):
            raise UnexpectedFrameError(f"step {step} has unfinished microbatches")

        def before(k: int, used: torch.nn.Module) -> None:
            for obs in self.observers:
                obs.on_before_update(k, used)

        self.stash.apply(step, before, grad_sq_total)
        self.next_step = step + 1
        losses = self._losses.pop(step, None)
        return sum(losses) / len(losses) if losses else None

    def abort_step(self) -> None:
        """Drop every step in flight (stashes, partial gradients); the stashed weights stay."""
        super().abort_step()
        self.stash.reset()
