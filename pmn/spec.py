"""A researcher's model proposal: architecture, training recipe and on-chain terms, from one TOML file.

The content hash registered on-chain is keccak256 of the canonical JSON of `model` and `training`
(sorted keys, no spaces); the terms are stored on-chain field by field.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from eth_utils import keccak

from pmn.errors import ConfigError
from protocol.modelspec import TrainingSection, canonical_spec
from sharding.codecs import get_codec
from sharding.config import PRESETS, ModelConfig
from sharding.partition import partition


@dataclass(frozen=True)
class TrainingRecipe:
    """How the swarm trains the model (part of the content hash: nodes with another recipe are refused)."""

    stages: int = 3  # pipeline stages (one shard each)
    codec: str = "dense"  # boundary codec: dense, bf16, int8, subspace (needs model.subspace_rank)
    microbatches: int = 2  # microbatches per global step (gradient accumulation)
    microbatch_size: int = 4  # sequences per microbatch
    lr: float = 3e-3  # AdamW peak learning rate
    warmup_steps: int = 10  # linear warm-up steps
    data_seed: int = 0  # seed of the data order
    # the rest of the recipe (protocol.modelspec.TrainingSection; these defaults are the run of older specs)
    schedule: str = "constant"  # LR after the warm-up: constant | cosine | wsd
    total_steps: int | None = None  # optimizer steps of the run; cosine and wsd reach the final LR here
    min_lr_ratio: float = 0.1  # final LR of cosine and wsd, as a fraction of lr
    cooldown_steps: int = 0  # wsd: the last steps, over which the LR falls linearly to the final LR
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    weight_decay: float = 0.1  # AdamW decoupled weight decay (matrices only)
    adam_eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 0.0  # clip the global gradient norm (all stages together) to this; 0 = off
    batch_tokens: int | None = None  # tokens per step; when given, must equal microbatches * microbatch_size * seq_len

    def section(self) -> TrainingSection:
        """The same recipe as the node-side `protocol.modelspec.TrainingSection`."""
        return TrainingSection(**asdict(self))


@dataclass(frozen=True)
class ProposalTerms:
    """Economic terms, immutable once training starts."""

    metadata_uri: str = ""  # where the human description lives
    epoch_length: int = 10  # training steps per accounting epoch
    challenge_window_s: int = 3600  # seconds a settled epoch root may be challenged with a fraud proof
    audit_rate: float = 0.05  # fraction of microbatches spot-checked by attesters (> 0)
    inference_fee_wei: int = 10**15  # minimum fee per inference request


@dataclass(frozen=True)
class ModelProposal:
    """Everything a researcher proposes."""

    model: ModelConfig
    training: TrainingRecipe = field(default_factory=TrainingRecipe)
    terms: ProposalTerms = field(default_factory=ProposalTerms)

    def validate(self) -> ModelProposal:
        """Raise ValueError naming the field and the fix."""
        self.model.validate()
        partition(self.model, self.training.stages)
        get_codec(self.training.codec, self.model)
        if self.training.microbatches < 1 or self.training.microbatch_size < 1:
            raise ValueError("training.microbatches and training.microbatch_size must be >= 1")
        self.training.section().validate(self.model)
        if not 0 < self.terms.audit_rate <= 1:
            raise ValueError(f"terms.audit_rate={self.terms.audit_rate}: must be in (0, 1]")
        if self.terms.epoch_length < 1 or self.terms.challenge_window_s < 1:
            raise ValueError("terms.epoch_length and terms.challenge_window_s must be >= 1")
        if self.terms.inference_fee_wei < 0:
            raise ValueError("terms.inference_fee_wei must be >= 0")
        return self

    def canonical_json(self) -> bytes:
        """Sorted-key, whitespace-free JSON of model and training (what the hash covers)."""
        return canonical_spec(self.model, asdict(self.training))

    def content_hash(self) -> bytes:
        """keccak256 of `canonical_json()`: the spec hash registered on-chain."""
        return bytes(keccak(self.canonical_json()))

    @property
    def audit_rate_bps(self) -> int:
        """Audit rate in basis points, as stored on-chain."""
        return max(1, round(self.terms.audit_rate * 10_000))


def _typed(cls: type, table: dict[str, Any], where: str) -> dict[str, Any]:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return dict(table)


def proposal_from_dict(data: dict[str, Any], where: str = "spec") -> ModelProposal:
    """Build and validate a proposal from parsed TOML tables `model`, `training`, `terms`."""
    unknown = sorted(set(data) - {"model", "training", "terms"})
    if unknown:
        raise ConfigError(f"{where}: unknown table(s) {', '.join(unknown)}; expected [model], [training], [terms]")
    model_table = dict(data.get("model", {}))
    preset = model_table.pop("preset", None)
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"{where}: [model] preset '{preset}' is unknown; choose one of {', '.join(sorted(PRESETS))}")
    base = PRESETS[preset] if preset else ModelConfig()
    try:
        model = replace(base, **_typed(ModelConfig, model_table, f"{where} [model]"))
        training = TrainingRecipe(**_typed(TrainingRecipe, data.get("training", {}), f"{where} [training]"))
        terms = ProposalTerms(**_typed(ProposalTerms, data.get("terms", {}), f"{where} [terms]"))
        return ModelProposal(model, training, terms).validate()
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def load_proposal(path: Path) -> ModelProposal:
    """Parse and validate a spec TOML file; errors name the file, the table and the field."""
    if not path.exists():
        raise ConfigError(f"spec file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    return proposal_from_dict(data, str(path))
