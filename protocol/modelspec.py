"""The spec hash a researcher registers on chain, recomputed from what a node actually runs.

The registry stores keccak256 of the canonical JSON of the proposal's `model` and `training`
sections, plus the hashed fields of its `data` section when it has one (sorted keys, no spaces; the
encoding of `pmn.spec.ModelProposal.content_hash`; a spec without [data] keeps its old hash). A node
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

    def to_dict(self) -> dict[str, Any]:
        """Plain dict in field order."""
        return dict(self.__dict__)


def canonical_spec(model: ModelConfig, training: Mapping[str, Any], data: Mapping[str, Any] | None = None) -> bytes:
    """Sorted-key, whitespace-free JSON of {"model": ..., "training": ...[, "data": ...]}.

    data: the hashed fields of the [data] section (`sharding.dataset.DataSpec.hashed()`), None without one.
    """
    body: dict[str, Any] = {"model": model.to_dict(), "training": dict(training)}
    if data is not None:
        body["data"] = dict(data)
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def proposal_spec_hash(model: ModelConfig, training: Mapping[str, Any], data: Mapping[str, Any] | None = None) -> bytes:
    """keccak256 of `canonical_spec(model, training, data)`: what the model registry stores as the spec hash."""
    return bytes(keccak(canonical_spec(model, training, data)))


def require_spec_hash(onchain: bytes, model: ModelConfig, training: TrainingSection, model_id: int,
                      data: Mapping[str, Any] | None = None) -> bytes:
    """Raise SpecMismatchError naming both hashes when the node's spec is not the registered one."""
    mine = proposal_spec_hash(model, training.to_dict(), data)
    if bytes(onchain) != mine:
        raise SpecMismatchError(
            "specHash",
            f"model {model_id} is registered with spec hash 0x{bytes(onchain).hex()}, this node runs spec hash "
            f"0x{mine.hex()} (model config 0x{model.spec_hash().hex()[:16]}… with training {training.to_dict()}, "
            f"data {dict(data) if data is not None else 'none (byte-level, unpinned)'}); "
            "start the node with the proposal's model and training settings")
    return mine
