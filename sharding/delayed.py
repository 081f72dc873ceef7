"""Delayed-gradient training with weight stashing: the single-process reference of the async schedule.

The asynchronous pipeline schedule lets every stage start step k before the gradients of steps
k-1, ..., k-S have come back (S = `max_staleness`). To keep the result a pure function of the data
(independent of timing), step k's forward and backward run on the weights *after* update k-S-1
(the initial weights for k <= S): a stashed copy, so the backward uses exactly the weights its forward
used. The gradient is then applied as update k to the live weights. With S = 0 this is the
synchronous run (`sharding.train.train_reference`).

Look-ahead (Nesterov-style correction of the delay): when update k-S-1 is applied, the copy stashed for
step k is not the new weights w but w + lookahead * S * (w - w_before), i.e. extrapolated along the
last update by the S updates step k's gradient will be late, so the gradient is taken near the weights it
will update. It stays a pure function of the data. Global-norm clipping (`OptimConfig.grad_clip`) clips update
k by the norm of step k's own (delayed) gradient, as the synchronous run clips each step's. Measured (tiny, stdlib corpus, lr 1e-3, 600 steps,
S = 1): validation loss over the synchronous run's 1.082 without it, 1.036 with lookahead 1.

Golden losses: `python -m sharding.delayed --write` (tiny, staleness 2, `sharding/golden/`).

`WeightStash` is that bookkeeping for one module (a whole model or one stage); `train_delayed` is the
reference loop over the unsplit model whose per-step losses the networked async schedule must equal.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .data import Corpus
from .stage import StageModule, build_model
from .train import OptimConfig, accumulate_step, make_optimizer, optimizer_step

ASYNC_LOOKAHEAD = 1.0  # the async schedule's default (training.async_lookahead): copies extrapolated by S x the
# last update; with Muon (recipe.optimizer), (S + 1) / S measured best: the copy then sits where the weights will be
# after the update its gradient makes (benchmarks/async_recipe.py)


class WeightStash:
    """Copies of a module, one per step in flight: `copies[k]` holds the weights step k computes with.

    On creation the copies of steps 0..S are the initial weights; `apply(k)` moves step k's gradients
    (accumulated on its copy) onto the live module, runs the optimiser, drops the copy and stashes the
    new live weights as the copy of step k+S+1.
    """

    def __init__(self, module: StageModule, optimizer: torch.optim.Optimizer, optim: OptimConfig,
                 staleness: int, first_step: int = 0, lookahead: float = 0.0) -> None:
        if staleness < 0:
            raise ValueError(f"staleness={staleness!r}: must be >= 0")
        self.module = module  # the live weights (what the optimiser updates and checkpoints save)
        self.optimizer = optimizer
        self.optim = optim
        self.staleness = staleness
        self.lookahead = lookahead  # extrapolate a stashed copy by lookahead x staleness x the last update
        self.next_update = first_step  # the next update to apply
        self.copies: dict[int, StageModule] = {}
        for k in range(first_step, first_step + staleness + 1):
            self.copies[k] = self._copy()

    def _copy(self, before: list[torch.Tensor] | None = None) -> StageModule:
        twin = copy.deepcopy(self.module)
        twin.zero_grad(set_to_none=True)
        if before is not None and self.lookahead and self.staleness:
            factor = self.lookahead * self.staleness
            with torch.no_grad():
                for p, old in zip(twin.parameters(), before, strict=True):
                    p.add_(p - old, alpha=factor)
        return twin

    def ready(self, step: int) -> bool:
        """Whether step `step` may run its forward now (its weights exist)."""
        return step in self.copies

    def weights(self, step: int) -> StageModule:
        """The module step `step` computes with (KeyError when that step is not in flight)."""
        return self.copies[step]

    def apply(self, step: int, before: Callable[[int, StageModule], None] | None = None,
              grad_sq_total: float | None = None) -> None:
        """Update `step` (in order) with the gradients accumulated on its copy; `before(step, copy)` runs first
        (the weights every hop of `step` was computed with). With `optim.grad_clip`, a stage of a pipeline passes
        `grad_sq_total`, step `step`'s squared gradient norm summed over every stage (`optimizer_step`)."""
        if step != self.next_update:
            raise ValueError(f"update {step} out of order: next is {self.next_update}")
        if self.optim.grad_clip > 0 and grad_sq_total is None and self.module.spec.num_stages > 1:
            raise ValueError(f"update {step} of stage {self.module.spec.index} clips with the global gradient norm: "
                             "pass grad_sq_total, the squared norm summed over every stage")
        twin = self.copies.pop(step)
        if before is not None:
            before(step, twin)
        for live, used in zip(self.module.parameters(), twin.parameters(), strict=True):
            live.grad = used.grad
        prior = [p.detach().clone() for p in self.module.parameters()] if self.lookahead and self.staleness else None
        optimizer_step(self.module, self.optimizer, step, self.optim, grad_sq_total)
        self.next_update = step + 1
        self.copies[step + self.staleness + 1] = self._copy(prior)

    def reset(self) -> None:
        """Drop partial gradients of every step in flight (a step to be retried from scratch)."""
        for twin in self.copies.values():
            twin.zero_grad(set_to_none=True)


def train_delayed(
    config: ModelConfig,
    optim: OptimConfig,
    steps: int,
    num_microbatches: int,
    microbatch_size: int,
    corpus: Corpus,
    staleness: int,
    model: StageModule | None = None,
    lookahead: float = ASYNC_LOOKAHEAD,
) -> list[float]:
    """Train the unsplit model with gradients `staleness` steps late (and the look-ahead the async schedule
    runs); returns the per-step mean loss."""
    config.validate()
    optim.validate()
    model = model if model is not None else build_model(config)
    stash = WeightStash(model, make_optimizer(model, optim), optim, staleness, lookahead=lookahead)
    losses = []
    for step in range(steps):
        # the step's gradients on the weights it was scheduled with (`staleness` updates behind)
        losses.append(accumulate_step(stash.weights(step), corpus, step, num_microbatches, microbatch_size,
                                      optim.data_seed))
        stash.apply(step)
    return losses


ASYNC_GOLDEN_PATH = Path(__file__).parent / "golden" / "tiny_async_50_steps.json"
ASYNC_GOLDEN_STALENESS = 2  # the staleness bound of the golden async run


def run_golden_async() -> dict[str, Any]:
    """The async schedule's golden record: tiny, synthetic:0, the sync golden's optimiser, staleness 2."""
    from .config import PRESETS
    from .data import load_corpus
    from .regression import (
        GOLDEN_CORPUS,
        GOLDEN_MICROBATCH_SIZE,
        GOLDEN_MICROBATCHES,
        GOLDEN_OPTIM,
        GOLDEN_STEPS,
    )

    corpus = load_corpus(GOLDEN_CORPUS)
    losses = train_delayed(PRESETS["tiny"], GOLDEN_OPTIM, GOLDEN_STEPS, GOLDEN_MICROBATCHES, GOLDEN_MICROBATCH_SIZE,
                           corpus, ASYNC_GOLDEN_STALENESS)
    return {"corpus": GOLDEN_CORPUS, "corpus_manifest_hash": corpus.manifest_hash.hex(),
            "optim": asdict(GOLDEN_OPTIM), "microbatches": GOLDEN_MICROBATCHES,
            "microbatch_size": GOLDEN_MICROBATCH_SIZE, "staleness": ASYNC_GOLDEN_STALENESS,
            "lookahead": ASYNC_LOOKAHEAD,
            "config": PRESETS["tiny"].to_dict(), "losses": losses}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="the async schedule's golden losses (sharding/golden)")
    parser.add_argument("--write", action="store_true", help="overwrite the stored golden file")
    args = parser.parse_args(argv)
    record = run_golden_async()
    if args.write:
        ASYNC_GOLDEN_PATH.write_text(json.dumps(record, indent=1) + "\n")
    print(f"tiny/async-staleness-{ASYNC_GOLDEN_STALENESS}: first {record['losses'][0]:.4f} "
          f"last {record['losses'][-1]:.4f}")


if __name__ == "__main__":
    main()
