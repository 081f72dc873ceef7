"""A researcher's model proposal: architecture, training recipe and on-chain terms, from one TOML file.

The content hash registered on-chain is keccak256 of the canonical JSON of `model` and `training`
(sorted keys, no spaces), plus the hashed fields of `data` when the proposal has a [data] section (a
spec without one keeps its hash: byte-level tokens, the node's own corpus); the terms are stored
on-chain field by field.
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
from sharding.dataset import DataSpec, check_tokenizer
from sharding.errors import DataError
from sharding.partition import partition

TrainingRecipe = TrainingSection  # a proposal's [training] table (one declaration: protocol.modelspec)


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
    data: DataSpec | None = None  # dataset and tokenizer ([data]); None = byte-level, not pinned (old specs)

    def validate(self) -> ModelProposal:
        """Raise ValueError naming the field and the fix (no file is read)."""
        self.model.validate()
        if self.data is not None:
            try:
                self.data.validate()
            except DataError as exc:
                raise ValueError(str(exc)) from None
            if self.data.tokenizer == "byte" and self.model.vocab_size < 256:
                raise ValueError(f"[model] vocab_size={self.model.vocab_size} is smaller than the byte-level "
                                 "tokenizer's 256 ids: set vocab_size >= 256")
        partition(self.model, self.training.stages)
        get_codec(self.training.codec, self.model)
        if self.training.microbatches < 1 or self.training.microbatch_size < 1:
            raise ValueError("training.microbatches and training.microbatch_size must be >= 1")
        self.training.validate(self.model)
        if not 0 < self.terms.audit_rate <= 1:
            raise ValueError(f"terms.audit_rate={self.terms.audit_rate}: must be in (0, 1]")
        if self.terms.epoch_length < 1 or self.terms.challenge_window_s < 1:
            raise ValueError("terms.epoch_length and terms.challenge_window_s must be >= 1")
        if self.terms.inference_fee_wei < 0:
            raise ValueError("terms.inference_fee_wei must be >= 0")
        return self

    def canonical_json(self) -> bytes:
        """Sorted-key, whitespace-free JSON of model, training and [data]'s hashed fields (what the hash covers)."""
        return canonical_spec(self.model, asdict(self.training), None if self.data is None else self.data.hashed())

    def content_hash(self) -> bytes:
        """keccak256 of `canonical_json()`: the spec hash registered on-chain."""
        return bytes(keccak(self.canonical_json()))

    def check_local_data(self) -> None:
        """The local tokenizer file matches [data] tokenizer_hash and fits the model (ConfigError otherwise)."""
        if self.data is not None:
            try:
                check_tokenizer(self.data, self.model.vocab_size)
            except DataError as exc:
                raise ConfigError(str(exc)) from None

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
    unknown = sorted(set(data) - {"model", "training", "terms", "data"})
    if unknown:
        raise ConfigError(f"{where}: unknown table(s) {', '.join(unknown)}; expected [model], [training], [terms], "
                          "[data]")
    model_table = dict(data.get("model", {}))
    preset = model_table.pop("preset", None)
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"{where}: [model] preset '{preset}' is unknown; choose one of {', '.join(sorted(PRESETS))}")
    base = PRESETS[preset] if preset else ModelConfig()
    try:
        model = replace(base, **_typed(ModelConfig, model_table, f"{where} [model]"))
        training = TrainingRecipe(**_typed(TrainingRecipe, data.get("training", {}), f"{where} [training]"))
        terms = ProposalTerms(**_typed(ProposalTerms, data.get("terms", {}), f"{where} [terms]"))
        data_spec = None
        if "data" in data:
            data_spec = _relative_to(DataSpec(**_typed(DataSpec, data["data"], f"{where} [data]")), where)
        return ModelProposal(model, training, terms, data_spec).validate()
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _relative_to(spec: DataSpec, where: str) -> DataSpec:
    """Local paths of [data] given relative to the spec file, made absolute (hashes do not depend on them)."""
    base = Path(where).expanduser().parent
    if not Path(where).exists():
        return spec

    def fix(p: str) -> str:
        if not p or Path(p).expanduser().is_absolute():
            return p
        return str((base / p).resolve())

    special = spec.source in ("stdlib", "synthetic") or spec.source.startswith("synthetic:")
    return replace(spec, source=spec.source if special else fix(spec.source), tokenizer_path=fix(spec.tokenizer_path),
                   prepared_dir=fix(spec.prepared_dir))


def load_proposal(path: Path) -> ModelProposal:
    """Parse and validate a spec TOML file; errors name the file, the table and the field."""
    if not path.exists():
        raise ConfigError(f"spec file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    return proposal_from_dict(data, str(path))
