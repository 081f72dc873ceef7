"""The spec hash a researcher registers on chain, recomputed from what a node actually runs.

The registry stores keccak256 of the canonical JSON of the proposal's `model` and `training`
sections (sorted keys, no spaces; the encoding of `pmn.spec.ModelProposal.content_hash`). A node
knows its `ModelConfig` and its training settings, so it can recompute that hash and refuse to train a
model whose registered spec differs from its own.

Fields added to either section after specs were first registered are left out of the canonical JSON
while they hold the value that reproduces the run from before (`ModelConfig.to_dict`, TRAINING_DEFAULTS),
so every spec registered before keeps its hash and any other value is covered by it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from eth_utils import keccak

from protocol.errors import FieldError
from sharding.config import ModelConfig
from sharding.schedule import SCHEDULES
from sharding.train import OptimConfig


class SpecMismatchError(FieldError):
    """The model's on-chain spec hash differs from the one the node recomputes from its own settings."""


@dataclass(frozen=True)
class TrainingSection:
    """The `training` section of a proposal, as a node runs it (same fields as pmn's TrainingRecipe)."""

    stages: int  # pipeline stages
    codec: str  # boundary codec name
    microbatches: int  # microbatches per global step
    microbatch_size: int  # sequences per microbatch
    lr: float  # AdamW peak learning rate
    warmup_steps: int  # linear warm-up steps
    data_seed: int  # seed of the data order
    # -- added later (left out of the hash at the TRAINING_DEFAULTS value) --
    schedule: str = "constant"  # LR after the warm-up: constant | cosine | wsd (sharding.schedule)
    total_steps: int | None = None  # optimizer steps of the run; cosine and wsd reach the final LR here
    min_lr_ratio: float = 0.1  # final LR of cosine and wsd, as a fraction of lr
    cooldown_steps: int = 0  # wsd: the last steps, over which the LR falls linearly to the final LR
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    weight_decay: float = 0.1  # AdamW decoupled weight decay (matrices only)
    adam_eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 0.0  # clip the global gradient norm (all stages together) to this; 0 = off
    batch_tokens: int | None = None  # tokens per optimizer step; when given, must equal microbatches *
    # microbatch_size * model.seq_len

    def to_dict(self) -> dict[str, Any]:
        """Plain dict in field order."""
        return dict(self.__dict__)

    def validate(self, model: ModelConfig) -> TrainingSection:
        """Raise ValueError naming the field and the fix; return self."""
        tokens = self.microbatches * self.microbatch_size * model.seq_len
        if self.batch_tokens is not None and self.batch_tokens != tokens:
            raise ValueError(f"training.batch_tokens={self.batch_tokens} but microbatches * microbatch_size * "
                             f"model.seq_len = {self.microbatches} * {self.microbatch_size} * {model.seq_len} = "
                             f"{tokens}: change one of them")
        if self.total_steps is not None and (not isinstance(self.total_steps, int) or self.total_steps < 1):
            raise ValueError(f"training.total_steps={self.total_steps!r}: must be an integer >= 1")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"training.schedule = {self.schedule!r} is unknown: use one of {', '.join(SCHEDULES)}")
        if self.schedule != "constant" and self.total_steps is None:
            raise ValueError(f"training.schedule = {self.schedule!r} needs training.total_steps (where the decay ends)")
        try:
            self.optim_config()
        except ValueError as exc:  # OptimConfig names its own fields: say which training fields those are
            message = str(exc)
            for optim_name, name in _OPTIM_NAMES.items():
                message = message.replace(f"OptimConfig.{optim_name}", f"training.{name}")
            raise ValueError(message) from None
        return self

    def optim_config(self) -> OptimConfig:
        """The optimiser settings every stage runs (validated)."""
        return OptimConfig(
            lr=self.lr, betas=(self.beta1, self.beta2), eps=self.adam_eps, weight_decay=self.weight_decay,
            warmup_steps=self.warmup_steps, decay_steps=None if self.schedule == "constant" else self.total_steps,
            min_lr_ratio=self.min_lr_ratio, data_seed=self.data_seed, schedule=self.schedule,
            cooldown_steps=self.cooldown_steps, grad_clip=self.grad_clip,
        ).validate()


# OptimConfig field -> the training field(s) it comes from (for error messages)
_OPTIM_NAMES = {"decay_steps": "total_steps", "eps": "adam_eps", "betas": "beta1/beta2", "lr": "lr",
                "weight_decay": "weight_decay", "warmup_steps": "warmup_steps", "min_lr_ratio": "min_lr_ratio",
                "schedule": "schedule", "cooldown_steps": "cooldown_steps", "grad_clip": "grad_clip"}

# training fields added after specs were first registered, with the value that reproduces the run from before
TRAINING_DEFAULTS: dict[str, Any] = {
    "schedule": "constant", "total_steps": None, "min_lr_ratio": 0.1, "cooldown_steps": 0, "beta1": 0.9,
    "beta2": 0.95, "weight_decay": 0.1, "adam_eps": 1e-8, "grad_clip": 0.0, "batch_tokens": None,
}
_FLOAT_FIELDS = {f.name for f in fields(TrainingSection) if f.type in ("float", float)}


def canonical_training(training: Mapping[str, Any]) -> dict[str, Any]:
    """The training section as hashed: later fields at their TRAINING_DEFAULTS value left out, and numbers of
    float fields as floats (so `grad_clip = 1` in a TOML file and 1.0 in a node's config hash alike)."""
    out: dict[str, Any] = {}
    for key, value in training.items():
        if key in TRAINING_DEFAULTS and TRAINING_DEFAULTS[key] == value and type(value) is not bool:
            continue
        if key in _FLOAT_FIELDS and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        out[key] = value
    return out


def canonical_spec(model: ModelConfig, training: Mapping[str, Any]) -> bytes:
    """Sorted-key, whitespace-free JSON of {"model": ..., "training": ...}."""
    return json.dumps({"model": model.to_dict(), "training": canonical_training(training)}, sort_keys=True,
                      separators=(",", ":")).encode()


def proposal_spec_hash(model: ModelConfig, training: Mapping[str, Any]) -> bytes:
    """keccak256 of `canonical_spec(model, training)`: what the model registry stores as the spec hash."""
    return bytes(keccak(canonical_spec(model, training)))


def require_spec_hash(onchain: bytes, model: ModelConfig, training: TrainingSection, model_id: int) -> bytes:
    """Raise SpecMismatchError naming both hashes when the node's spec is not the registered one."""
    mine = proposal_spec_hash(model, training.to_dict())
    if bytes(onchain) != mine:
        raise SpecMismatchError(
            "specHash",
            f"model {model_id} is registered with spec hash 0x{bytes(onchain).hex()}, this node runs spec hash "
            f"0x{mine.hex()} (model config 0x{model.spec_hash().hex()[:16]}… with training {training.to_dict()}); "
            "start the node with the proposal's model and training settings")
    return mine
