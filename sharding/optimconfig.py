"""The optimiser recipe of a training run (AdamW or Muon, LR schedule, clipping): plain data, no torch, so configs and
specs can be read and validated without importing the model code."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .schedule import SCHEDULES

OPTIMIZERS = ("adamw", "muon")  # adamw: AdamW everywhere; muon: Muon on the blocks' matrices, AdamW on the rest


@dataclass(frozen=True)
class OptimConfig:
    """AdamW (or Muon on the blocks' matrices, `sharding.optimizers`), a warm-up + constant/cosine/WSD schedule
    (sharding.schedule), optional global-norm clipping.

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
    optimizer: str = "adamw"  # adamw | muon (Muon on the blocks' matrices, AdamW on embedding, head and norms)
    muon_momentum: float = 0.95  # muon: Nesterov momentum of the Muon part (AdamW's part keeps betas)

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
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"OptimConfig.optimizer={self.optimizer!r} is unknown: use one of {', '.join(OPTIMIZERS)}")
        if not (isinstance(self.muon_momentum, (int, float)) and 0 <= self.muon_momentum < 1):
            raise ValueError(f"OptimConfig.muon_momentum={self.muon_momentum!r}: must be in [0, 1)")
        return self
