"""Which model a node trains (a sharding preset name or a JSON ModelConfig file: the one resolver), and the
training recipe it runs (`training_section`: the spec's `training` section, from the node's config).

`pmn node start` builds on it (it also accepts a spec TOML and hands the node its architecture as JSON).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from node.config import NodeConfig
from protocol.modelspec import TrainingSection
from sharding import PRESETS, ModelConfig, OptimConfig


def load_model_config(model: str) -> ModelConfig:
    """A preset name or a path to a JSON ModelConfig.

    ValueError names the choices when `model` is neither, and the file when it is not a ModelConfig.
    """
    if model in PRESETS:
        return PRESETS[model]
    path = Path(model).expanduser()
    if not path.exists():
        raise ValueError(f"model {model!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a file")
    try:
        return ModelConfig.from_dict(json.loads(path.read_text())).validate()
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path} is not a ModelConfig JSON file: {exc}") from None


def training_section(cfg: NodeConfig) -> TrainingSection:
    """The proposal `training` section a node with this config runs: stages, codec, microbatches from the
    runtime, lr from `optim_lr` (None = OptimConfig's default), everything else from `cfg.recipe`."""
    r = cfg.runtime
    lr = OptimConfig().lr if cfg.optim_lr is None else cfg.optim_lr
    return TrainingSection(stages=cfg.num_stages, codec=r.codec, microbatches=r.num_microbatches,
                           microbatch_size=r.microbatch_size, lr=lr, replica_averaging=r.replica_averaging,
                           powersgd_rank=r.powersgd_rank, powersgd_bits=r.powersgd_bits,
                           powersgd_iterations=r.powersgd_iterations, powersgd_block_rank=r.powersgd_block_rank,
                           replica_exchange=r.replica_exchange,
                           pipeline_schedule=r.schedule,
                           max_staleness=r.max_staleness, async_lookahead=r.async_lookahead, **asdict(cfg.recipe))


def optim_config(cfg: NodeConfig, model: ModelConfig) -> OptimConfig:
    """The optimiser settings every stage of this node runs; ValueError names the recipe field and the fix."""
    return training_section(cfg).validate(model).optim_config()
