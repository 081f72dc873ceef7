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
    replica_averaging: str = "dense"  # replica gradient exchange: dense or powersgd (hashed only when not dense)
    powersgd_rank: int = 4  # PowerSGD rank (hashed only with replica_averaging = powersgd)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict in field order, as hashed (`hashed_training`: dense averaging adds no keys)."""
        return hashed_training(self.__dict__)


AVERAGING_DEFAULTS = {"replica_averaging": "dense", "powersgd_rank": 4}  # training keys a dense spec leaves out


def hashed_training(training: Mapping[str, Any]) -> dict[str, Any]:
    """The training keys a spec hash covers: the averaging keys are left out with dense averaging, so specs
    written before they existed keep their hash; with powersgd both are in."""
    out = dict(training)
    if out.get("replica_averaging", "dense") == "dense":
        for key in AVERAGING_DEFAULTS:
            out.pop(key, None)
    return out


def canonical_spec(model: ModelConfig, training: Mapping[str, Any]) -> bytes:
    """Sorted-key, whitespace-free JSON of {"model": ..., "training": ...}."""
    return json.dumps({"model": model.to_dict(), "training": hashed_training(training)}, sort_keys=True,
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
