"""Learning-rate schedules and global-norm gradient clipping: pure arithmetic, no torch.

Schedules (all with a linear warm-up from lr/warmup_steps to lr over the first `warmup_steps` steps):
- constant: lr after the warm-up.
- cosine: half a cosine from lr at the end of the warm-up to min_lr_ratio * lr at `total_steps`.
- wsd (warmup-stable-decay): lr until `total_steps - cooldown_steps`, then linear to min_lr_ratio * lr
  at `total_steps` (so a run can be continued from before its cool-down).

Clipping: the global gradient norm is sqrt of the sum of squared gradient entries over every parameter of
the model. Pipeline stages each hold some parameters, so the sum is accumulated in a fixed order (the
model's parameter order: stage 0's parameters first): `accumulate_sq_norm` adds one stage's squares to a
running float64 total that travels from the first stage to the last, and the last stage's total goes
back to every stage. Every stage then scales its gradients by the same `clip_coefficient`, which is what
one process holding the whole model computes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

SCHEDULES = ("constant", "cosine", "wsd")  # the names of the LR schedules
CLIP_EPS = 1e-6  # added to the norm in the clip coefficient (as torch.nn.utils.clip_grad_norm_)


def scheduled_lr(step: int, lr: float, schedule: str, warmup_steps: int, total_steps: int | None,
                 min_lr_ratio: float, cooldown_steps: int = 0) -> float:
    """Learning rate of optimizer step `step` (0-based)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is unknown: use one of {', '.join(SCHEDULES)}")
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if total_steps is None:
        raise ValueError(f"schedule {schedule!r} needs total_steps")
    floor = min_lr_ratio * lr
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        frac = min(1.0, (step - warmup_steps) / span)
        return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))
    start = total_steps - cooldown_steps  # wsd: first step of the cool-down
    if step < start:
        return lr
    frac = min(1.0, (step - start) / max(1, cooldown_steps))
    return lr + (floor - lr) * frac


def accumulate_sq_norm(total: float, sq_norms: Iterable[float]) -> float:
    """`total` plus each squared norm in order (float64): one stage's share of the global squared norm."""
    for s in sq_norms:
        total += s
    return total


def clip_coefficient(total_sq_norm: float, max_norm: float) -> float:
    """The factor every gradient is multiplied by: min(1, max_norm / (norm + CLIP_EPS)); 1 when max_norm is 0.

    A non-finite norm raises ValueError (a NaN/Inf gradient must not be applied).
    """
    if not math.isfinite(total_sq_norm) or total_sq_norm < 0:
        raise ValueError(f"global squared gradient norm {total_sq_norm!r} is not a finite number >= 0")
    if max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (math.sqrt(total_sq_norm) + CLIP_EPS))
