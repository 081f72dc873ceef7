"""Optimiser configuration, the scheduled and clipped optimizer step, and the single-process reference loop."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import ModelConfig
from .data import Corpus
from .schedule import SCHEDULES, accumulate_sq_norm, clip_coefficient, scheduled_lr
from .stage import StageModule, build_model


@dataclass(frozen=True)
class OptimConfig:
    """AdamW, a warm-up + constant/cosine/WSD schedule (sharding.schedule), optional global-norm clipping.

    Pipeline stages clip with the global norm of the whole model (`optimizer_step(grad_sq_total=...)`,
    the squared norms exchanged between stages), so per-stage optimisers reproduce the single-process run.
    """

    lr: float = 3e-3  # peak learning rate
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW beta1, beta2
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.1  # decoupled weight decay on matrices (not on norm gains)
    warmup_steps: int = 10  # linear warm-up from lr/warmup_steps to lr
    decay_steps: int | None = None  # step at which the decay reaches min_lr_ratio * lr (the total steps)
    min_lr_ratio: float = 0.1  # final learning rate of cosine and wsd, as a fraction of lr
    data_seed: int = 0  # seed of Corpus.batch (which windows each step and microbatch sees)
    schedule: str | None = None  # constant | cosine | wsd; None = cosine if decay_steps is set, else constant
    cooldown_steps: int = 0  # wsd: the last steps before decay_steps, with lr falling linearly to the final lr
    grad_clip: float = 0.0  # clip the global gradient norm (all stages together) to this; 0 = no clipping

    @property
    def schedule_name(self) -> str:
        """The schedule this config runs (resolving None as before schedules had names)."""
        if self.schedule is not None:
            return self.schedule
        return "constant" if self.decay_steps is None else "cosine"

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
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise ValueError(f"OptimConfig.schedule={self.schedule!r} is unknown: use one of {', '.join(SCHEDULES)}")
        if self.schedule_name != "constant" and self.decay_steps is None:
            raise ValueError(f"OptimConfig.schedule={self.schedule_name!r} needs decay_steps (the total steps)")
        if self.schedule_name == "wsd":
            span = (self.decay_steps or 0) - self.warmup_steps
            if not isinstance(self.cooldown_steps, int) or not 1 <= self.cooldown_steps <= span:
                raise ValueError(f"OptimConfig.cooldown_steps={self.cooldown_steps!r}: wsd needs 1 <= cooldown_steps "
                                 f"<= total steps - warmup_steps = {span}")
        if not (isinstance(self.grad_clip, (int, float)) and math.isfinite(self.grad_clip) and self.grad_clip >= 0):
            raise ValueError(f"OptimConfig.grad_clip={self.grad_clip!r}: must be a finite number >= 0 (0 = off)")
        return self


def lr_at(step: int, optim: OptimConfig) -> float:
    """Learning rate used for optimizer step `step` (0-based)."""
    return scheduled_lr(step, optim.lr, optim.schedule_name, optim.warmup_steps, optim.decay_steps,
                        optim.min_lr_ratio, optim.cooldown_steps)


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


def grad_sq_norm(module: nn.Module, total: float = 0.0) -> float:
    """`total` plus the squared gradient entries of `module`, parameter by parameter in order (float64).

    Stage after stage this builds the global squared norm in the whole model's parameter order.
    """
    squares = [float(p.grad.detach().double().pow(2).sum()) for p in module.parameters() if p.grad is not None]
    return accumulate_sq_norm(total, squares)


def clip_gradients(module: nn.Module, total_sq_norm: float, max_norm: float) -> float:
    """Scale `module`'s gradients by clip_coefficient(total_sq_norm, max_norm); returns the coefficient."""
    coef = clip_coefficient(total_sq_norm, max_norm)
    if coef < 1.0:
        with torch.no_grad():
            for p in module.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
    return coef


def optimizer_step(
    module: StageModule, optimizer: torch.optim.Optimizer, step: int, optim: OptimConfig,
    grad_sq_total: float | None = None,
) -> None:
    """Clip (global norm), scheduled step, re-projection of constrained weights, zeroed gradients.

    `grad_sq_total` is the squared gradient norm of the whole model; a stage of a pipeline must pass it
    (exchanged with the other stages), a module holding the whole model may leave it to be computed here.
    """
    if optim.grad_clip > 0:
        if grad_sq_total is None:
            if module.spec.num_stages > 1:
                raise ValueError(f"stage {module.spec.index} of {module.spec.num_stages} clips with the global "
                                 "gradient norm: pass grad_sq_total, the squared norm summed over every stage")
            grad_sq_total = grad_sq_norm(module)
        clip_gradients(module, grad_sq_total, optim.grad_clip)
    set_lr(optimizer, lr_at(step, optim))
    optimizer.step()
    module.after_optimizer_step()
    optimizer.zero_grad(set_to_none=True)


def accumulate_step(model: StageModule, corpus: Corpus, step: int, num_microbatches: int, microbatch_size: int,
                    data_seed: int) -> float:
    """Forward and backward of every microbatch of `step` on the unsplit `model` (gradients accumulate as the
    mean over microbatches); returns the step's mean training loss. The optimizer step is the caller's."""
    seq_len = model.config.seq_len
    total = 0.0
    for mb in range(num_microbatches):
        window = corpus.batch("train", step, mb, microbatch_size, seq_len, data_seed)  # (B, T+1)
        loss = model(window[:, :-1], targets=window[:, 1:])
        (loss / num_microbatches).backward()
        total += float(loss.detach())
    return total / num_microbatches


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
        losses.append(accumulate_step(model, corpus, step, num_microbatches, microbatch_size, optim.data_seed))
        optimizer_step(model, opt, step, optim)
    return losses
