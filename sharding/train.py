"""Optimiser configuration, the scheduled and clipped optimizer step, and the single-process reference loop."""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .data import Corpus
from .optimconfig import OptimConfig
from .optimizers import build_muon_adamw, split_params
from .schedule import accumulate_sq_norm, clip_coefficient, scheduled_lr
from .stage import StageModule, build_model


def lr_at(step: int, optim: OptimConfig) -> float:
    """Learning rate used for optimizer step `step` (0-based)."""
    return scheduled_lr(step, optim.lr, optim.schedule_name, optim.warmup_steps, optim.decay_steps,
                        optim.min_lr_ratio, optim.cooldown_steps)


def make_optimizer(module: nn.Module, optim: OptimConfig,
                   kernel: dict[str, bool] | None = None) -> torch.optim.Optimizer:
    """AdamW over `module`'s parameters: matrices decayed, vectors (norm gains) not; with `optim.optimizer` "muon",
    the blocks' matrices go to Muon instead (`sharding.optimizers.MuonAdamW`).

    kernel: AdamW's `fused` / `foreach` arguments (`ExecutionPolicy.adamw_kwargs()`); default: the
    single-tensor loop (`foreach=False`), the reference the golden losses were recorded with.
    """
    optim.validate()
    kw: dict[str, bool] = dict(kernel) if kernel is not None else {"foreach": False}
    if optim.optimizer == "muon":
        return build_muon_adamw(module, optim.lr, optim.weight_decay, optim.muon_momentum, optim.betas, optim.eps, kw)
    _, decay, no_decay = split_params(module, muon=False)
    groups = [
        {"params": decay, "weight_decay": optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
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


@torch.no_grad()
def validation_loss(model: StageModule, corpus: Corpus, seq_len: int, windows: int = 64, batch_size: int = 8,
                    seed: int = 1234) -> float:
    """Mean loss of the unsplit `model` over `windows` deterministic windows of the corpus's validation split, in
    batches of `batch_size` (the same windows for every model: the benchmarks' equal-tokens comparisons)."""
    if windows < batch_size or windows % batch_size:
        raise ValueError(f"validation_loss: windows={windows} must be a positive multiple of batch_size={batch_size}")
    total = 0.0
    for b in range(windows // batch_size):
        w = corpus.batch("val", 0, b, batch_size, seq_len, seed)  # (batch_size, seq_len + 1)
        total += float(model(w[:, :-1], targets=w[:, 1:]))
    return total / (windows // batch_size)
