"""Optimiser configuration, learning-rate schedule and the single-process reference training loop."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import ModelConfig
from .data import Corpus
from .stage import StageModule, build_model


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up and optional cosine decay; no global grad-norm clipping (so that
    per-stage optimisers reproduce the single-process run exactly)."""

    lr: float = 3e-3  # peak learning rate
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW beta1, beta2
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.1  # decoupled weight decay on matrices (not on norm gains)
    warmup_steps: int = 10  # linear warm-up from lr/warmup_steps to lr
    decay_steps: int | None = None  # cosine decay to min_lr_ratio * lr by this step; None = constant
    min_lr_ratio: float = 0.1  # floor of the cosine decay, as a fraction of lr
    data_seed: int = 0  # seed of Corpus.batch (which windows each step and microbatch sees)

    def validate(self) -> OptimConfig:
        """Raise ValueError naming the field and the fix; return self when valid."""
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"OptimConfig.lr={self.lr!r}: must be a finite number > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"OptimConfig.betas={self.betas!r}: need two values in [0, 1)")
        if not self.eps > 0:
            raise ValueError(f"OptimConfig.eps={self.eps!r}: must be > 0")
        if not self.weight_decay >= 0:
            raise ValueError(f"OptimConfig.weight_decay={self.weight_decay!r}: must be >= 0")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"OptimConfig.warmup_steps={self.warmup_steps!r}: must be an integer >= 0")
        if self.decay_steps is not None and (not isinstance(self.decay_steps, int) or self.decay_steps < 1):
            raise ValueError(f"OptimConfig.decay_steps={self.decay_steps!r}: must be None or an integer >= 1")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"OptimConfig.min_lr_ratio={self.min_lr_ratio!r}: must be in [0, 1]")
        return self


def lr_at(step: int, optim: OptimConfig) -> float:
    """Learning rate used for optimizer step `step` (0-based)."""
    if optim.warmup_steps > 0 and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.decay_steps is None:
        return optim.lr
    span = max(1, optim.decay_steps - optim.warmup_steps)
    frac = min(1.0, (step - optim.warmup_steps) / span)
    floor = optim.min_lr_ratio * optim.lr
    return floor + (optim.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))


def make_optimizer(module: nn.Module, optim: OptimConfig, kernel: dict[str, bool] | None = None) -> torch.optim.AdamW:
    """AdamW over `module`'s parameters: matrices decayed, vectors (norm gains) not.

    kernel: AdamW's `fused` / `foreach` arguments (`ExecutionPolicy.adamw_kwargs()`); default: the
    single-tensor loop (`foreach=False`), the reference the golden losses were recorded with.
    """
    optim.validate()
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kw: dict[str, bool] = dict(kernel) if kernel is not None else {"foreach": False}
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, **kw)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimizer_step(
    module: StageModule, optimizer: torch.optim.Optimizer, step: int, optim: OptimConfig
) -> None:
    """Scheduled step, then re-projection of constrained weights, then zeroed gradients."""
    set_lr(optimizer, lr_at(step, optim))
    optimizer.step()
    module.after_optimizer_step()
    optimizer.zero_grad(set_to_none=True)


def train_reference(
    config: ModelConfig,
    optim: OptimConfig,
    steps: int,
    num_microbatches: int,
    microbatch_size: int,
    corpus: Corpus,
    model: StageModule | None = None,
) -> list[float]:
    """Train the unsplit model in one process; returns the per-step mean training loss."""
    config.validate()
    optim.validate()
    for name, value in (("steps", steps), ("num_microbatches", num_microbatches), ("microbatch_size", microbatch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"train_reference: {name}={value!r} must be an integer >= 1")
    model = model if model is not None else build_model(config)
    opt = make_optimizer(model, optim)
    losses = []
    for step in range(steps):
        total = 0.0
        for mb in range(num_microbatches):
            window = corpus.batch("train", step, mb, microbatch_size, config.seq_len, optim.data_seed)
            loss = model(window[:, :-1], targets=window[:, 1:])
            (loss / num_microbatches).backward()
            total += float(loss.detach())
        optimizer_step(model, opt, step, optim)
        losses.append(total / num_microbatches)
    return losses
