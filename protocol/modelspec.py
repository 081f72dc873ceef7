"""The spec hash a researcher registers on chain, recomputed from what a node actually runs.

The registry stores keccak256 of the canonical JSON of the proposal's `model` and `training`
sections, plus the hashed fields of its `data` section when it has one (sorted keys, no spaces; the
encoding of `pmn.spec.ModelProposal.content_hash`; a spec without [data] keeps its old hash). A node
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
from sharding.optimconfig import OptimConfig
from sharding.schedule import SCHEDULES


class SpecMismatchError(FieldError):
    """The model's on-chain spec hash differs from the one the node recomputes from its own settings."""


@dataclass(frozen=True)
class TrainingSection:
    """The `training` section of a proposal: how the swarm trains the model, all of it in the content hash
    (nodes with another recipe are refused). `pmn`'s proposals hold it (`pmn.spec.TrainingRecipe` is this
    class); a node copies it into its `node.config` settings. A spec received from the chain or a peer is read
    with `from_dict`, which requires the fields every spec has had."""

    stages: int = 3  # pipeline stages (one shard each)
    codec: str = "dense"  # boundary codec: dense, bf16, int8, subspace (needs model.subspace_rank)
    microbatches: int = 2  # microbatches per global step (gradient accumulation)
    microbatch_size: int = 4  # sequences per microbatch
    lr: float = 3e-3  # peak learning rate (AdamW and Muon alike)
    warmup_steps: int = 10  # linear warm-up steps
    data_seed: int = 0  # seed of the data order
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
    replica_averaging: str = "dense"  # replica gradient exchange: dense (fp32) | dense-bf16 | powersgd
    # (sharding.gradcompress)
    powersgd_rank: int = 4  # PowerSGD rank r (used with replica_averaging = powersgd)
    powersgd_bits: int = 16  # PowerSGD factors on the wire: 16 (bf16), 8 or 4 (int8 / int4 codes, one bf16 scale per column)
    powersgd_iterations: int = 1  # PowerSGD power iterations per contribution (more: a closer rank-r fit, same bytes)
    powersgd_block_rank: int = 0  # PowerSGD rank of the transformer blocks' matrices (Muon's under optimizer = muon);
    # 0: powersgd_rank like the other matrices. Muon orthogonalises its update, and a rank-6 fit of those matrices
    # cost it a few per cent of loss where the embedding and head at rank 6 cost nothing measurable
    replica_exchange: str = "microbatch"  # when a replica's contributions leave: microbatch (one per microbatch it
    # computes, held by a second replica before its gradient goes upstream: a lost replica loses nothing) or step (one
    # per replica and step, the sum of its committed microbatches, once the commit is known: a step's worth of bytes
    # fewer; a replica lost before its step's contribution went out costs the stage a re-fetch or a rollback)
    pipeline_schedule: str = "gpipe"  # pipeline schedule: gpipe, 1f1b (both exact) or async (delayed gradients)
    max_staleness: int = 0  # async: optimiser steps a gradient may lag the weights it updates (0 for gpipe/1f1b)
    async_lookahead: float = 1.0  # async: stashed weights extrapolated along the last update by this x max_staleness
    optimizer: str = "adamw"  # adamw | muon (Muon on the blocks' matrices, AdamW on embedding, head and norms;
    # sharding.optimizers: the async schedule's delayed gradients cost Muon less)
    muon_momentum: float = 0.95  # muon: Nesterov momentum of the Muon part

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingSection:
        """The section of a received spec (ValueError naming a missing or unknown field; not yet validated):
        the fields of the first specs must be present, later ones default to their TRAINING_DEFAULTS value."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        missing = [name for name in REQUIRED_TRAINING if name not in data]
        if unknown or missing:
            raise ValueError("training: " + "; ".join(
                ([f"unknown field(s) {', '.join(unknown)}"] if unknown else [])
                + ([f"missing field(s) {', '.join(missing)}"] if missing else [])))
        return cls(**data)

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
        if self.replica_averaging not in REPLICA_AVERAGING or self.powersgd_rank < 1:
            raise ValueError(f"training.replica_averaging={self.replica_averaging!r}: use dense, dense-bf16 or "
                             "powersgd, "
                             f"with training.powersgd_rank >= 1 (got {self.powersgd_rank})")
        if type(self.powersgd_bits) is not int or self.powersgd_bits not in POWERSGD_BITS:
            raise ValueError(f"training.powersgd_bits={self.powersgd_bits!r}: use 16 (bf16 factors), 8 (int8) or 4 "
                             f"(int4)")
        if self.replica_exchange not in REPLICA_EXCHANGE:
            raise ValueError(f"training.replica_exchange={self.replica_exchange!r}: use one of "
                             f"{', '.join(REPLICA_EXCHANGE)}")
        if type(self.powersgd_block_rank) is not int or self.powersgd_block_rank < 0:
            raise ValueError(f"training.powersgd_block_rank={self.powersgd_block_rank!r}: use an integer >= 1, or 0 for "
                             "training.powersgd_rank")
        if type(self.powersgd_iterations) is not int or not 1 <= self.powersgd_iterations <= MAX_POWER_ITERATIONS:
            raise ValueError(f"training.powersgd_iterations={self.powersgd_iterations!r}: use an integer from 1 to "
                             f"{MAX_POWER_ITERATIONS}")
        check_schedule(self.pipeline_schedule, self.max_staleness, self.async_lookahead)
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
            cooldown_steps=self.cooldown_steps, grad_clip=self.grad_clip, optimizer=self.optimizer,
            muon_momentum=self.muon_momentum,
        ).validate()


# OptimConfig field -> the training field(s) it comes from (for error messages)
_OPTIM_NAMES = {"decay_steps": "total_steps", "eps": "adam_eps", "betas": "beta1/beta2", "lr": "lr",
                "weight_decay": "weight_decay", "warmup_steps": "warmup_steps", "min_lr_ratio": "min_lr_ratio",
                "schedule": "schedule", "cooldown_steps": "cooldown_steps", "grad_clip": "grad_clip",
                "optimizer": "optimizer", "muon_momentum": "muon_momentum"}

# training fields every spec has had (a received spec without one is refused)
REQUIRED_TRAINING = ("stages", "codec", "microbatches", "microbatch_size", "lr", "warmup_steps", "data_seed")

# training fields added after specs were first registered, with the value that reproduces the run from before
TRAINING_DEFAULTS: dict[str, Any] = {
    "schedule": "constant", "total_steps": None, "min_lr_ratio": 0.1, "cooldown_steps": 0, "beta1": 0.9,
    "beta2": 0.95, "weight_decay": 0.1, "adam_eps": 1e-8, "grad_clip": 0.0, "batch_tokens": None,
    "replica_averaging": "dense", "powersgd_rank": 4, "pipeline_schedule": "gpipe", "max_staleness": 0,
    "powersgd_bits": 16, "powersgd_iterations": 1, "optimizer": "adamw", "muon_momentum": 0.95,
    "async_lookahead": 1.0, "powersgd_block_rank": 0, "replica_exchange": "microbatch",
}
MAX_LOOKAHEAD = 8.0  # largest async look-ahead factor a spec may ask for
MAX_POWER_ITERATIONS = 8  # most PowerSGD power iterations a spec may ask of every replica per contribution
PIPELINE_SCHEDULES = ("gpipe", "1f1b", "async")  # pipeline schedules a spec may name
REPLICA_AVERAGING = ("dense", "dense-bf16", "powersgd")  # replica exchanges a spec may name (fp32, bf16, PowerSGD)
REPLICA_EXCHANGE = ("microbatch", "step")  # when replicas' contributions leave: per microbatch, or per replica and step
POWERSGD_BITS = (16, 8, 4)  # PowerSGD factor widths a spec may name: bf16 factors, or int8 / int4 codes (two int4
# codes to a byte) with bf16 column scales (sharding.gradcompress.CODE_MAX holds the codes' ranges)


def check_schedule(schedule: str, max_staleness: int, lookahead: float = 1.0) -> None:
    """Raise ValueError naming the bad field: an unknown pipeline schedule, or a staleness bound or look-ahead that
    does not fit it."""
    if schedule not in PIPELINE_SCHEDULES:
        raise ValueError(f"training.pipeline_schedule={schedule!r}: use one of {', '.join(PIPELINE_SCHEDULES)}")
    if isinstance(max_staleness, bool) or not isinstance(max_staleness, int) or max_staleness < 0:
        raise ValueError(f"training.max_staleness={max_staleness!r}: must be an integer >= 0")
    if schedule != "async" and max_staleness != 0:
        raise ValueError(f"training.max_staleness={max_staleness} needs pipeline_schedule = \"async\" "
                         f"({schedule} applies every gradient to the weights it was computed with)")
    if isinstance(lookahead, bool) or not isinstance(lookahead, (int, float)) or not 0 <= lookahead <= MAX_LOOKAHEAD:
        raise ValueError(f"training.async_lookahead={lookahead!r}: must be a number from 0 to {MAX_LOOKAHEAD:g}")
    if schedule != "async" and lookahead != TRAINING_DEFAULTS["async_lookahead"]:
        raise ValueError(f"training.async_lookahead={lookahead} needs pipeline_schedule = \"async\" ({schedule} "
                         "computes every gradient on the weights it updates: there is no delay to correct)")
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


def canonical_spec(model: ModelConfig, training: Mapping[str, Any], data: Mapping[str, Any] | None = None) -> bytes:
    """Sorted-key, whitespace-free JSON of {"model": ..., "training": ...[, "data": ...]}.

    data: the hashed fields of the [data] section (`sharding.dataset.DataSpec.hashed()`), None without one.
    """
    body: dict[str, Any] = {"model": model.to_dict(), "training": canonical_training(training)}
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
