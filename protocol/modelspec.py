"""The spec hash a researcher registers on chain, recomputed from what a node actually runs.

The registry stores keccak256 of the canonical JSON of the proposal's `model` and `training`
sections (sorted keys, no spaces; the encoding of `pmn.spec.ModelProposal.content_hash`). A node
knows its `ModelConfig` and its training settings, so it can recompute that hash and refuse to train a
model whose registered spec differs from its own.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from eth_utils import keccak

from protocol.errors import FieldError
from sharding.config import ModelConfig


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
    schedule: str = "gpipe"  # pipeline schedule: gpipe, 1f1b or async
    max_staleness: int = 0  # async: optimiser steps a gradient may lag the weights it updates

    def to_dict(self) -> dict[str, Any]:
        """Plain dict in field order (schedule fields only when not the gpipe default, see `training_dict`)."""
        return training_dict(dict(self.__dict__))


SCHEDULES = ("gpipe", "1f1b", "async")  # pipeline schedules a spec may name
SCHEDULE_DEFAULTS: dict[str, Any] = {"schedule": "gpipe", "max_staleness": 0}  # what a spec without them runs


def check_schedule(schedule: str, max_staleness: int) -> None:
    """Raise ValueError naming the bad field: an unknown schedule, or a staleness bound that does not fit it."""
    if schedule not in SCHEDULES:
        raise ValueError(f"training.schedule={schedule!r}: use one of {', '.join(SCHEDULES)}")
    if isinstance(max_staleness, bool) or not isinstance(max_staleness, int) or max_staleness < 0:
        raise ValueError(f"training.max_staleness={max_staleness!r}: must be an integer >= 0")
    if schedule != "async" and max_staleness != 0:
        raise ValueError(f"training.max_staleness={max_staleness} needs schedule = \"async\" "
                         f"({schedule} applies every gradient to the weights it was computed with)")


def training_dict(training: Mapping[str, Any]) -> dict[str, Any]:
    """The training section as hashed: schedule fields left out at their defaults, so specs written before
    the schedule option existed keep their spec hash (and run gpipe)."""
    return {k: v for k, v in training.items() if not (k in SCHEDULE_DEFAULTS and v == SCHEDULE_DEFAULTS[k])}


def canonical_spec(model: ModelConfig, training: Mapping[str, Any]) -> bytes:
    """Sorted-key, whitespace-free JSON of {"model": ..., "training": ...}."""
    return json.dumps({"model": model.to_dict(), "training": training_dict(training)}, sort_keys=True,
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
