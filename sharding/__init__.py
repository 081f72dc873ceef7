"""Sharded GPT: model config, partitioning, FLOP counts, stage modules, boundary codecs, data, training.

The names below load on first use (PEP 562 `__getattr__`): reading a config or a spec (`sharding.config`,
`sharding.optimconfig`, `sharding.schedule`) does not import torch, so the `pmn` command line starts fast."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .partition import partition  # eager (no torch): the function must shadow its own submodule's name

if TYPE_CHECKING:
    from .codecs import CODEC_NAMES, Codec, get_codec, token_id_bytes
    from .config import PRESETS, ModelConfig
    from .data import Corpus, load_corpus
    from .errors import CodecError, DataError, ShardingError, StageError
    from .flops import model_flops_per_token, param_count, stage_flops_per_token
    from .model import GPT
    from .optimconfig import OptimConfig
    from .pipeline import LocalPipeline
    from .schedule import SCHEDULES, clip_coefficient, scheduled_lr
    from .stage import StageModule, build_model, build_stage
    from .stagespec import StageSpec, full_spec
    from .train import lr_at, make_optimizer, train_reference, validation_loss

_WHERE = {  # public name -> submodule that defines it
    "CODEC_NAMES": "codecs",
    "Codec": "codecs",
    "CodecError": "errors",
    "Corpus": "data",
    "DataError": "errors",
    "GPT": "model",
    "LocalPipeline": "pipeline",
    "ModelConfig": "config",
    "OptimConfig": "optimconfig",
    "PRESETS": "config",
    "SCHEDULES": "schedule",
    "ShardingError": "errors",
    "StageError": "errors",
    "StageModule": "stage",
    "StageSpec": "stagespec",
    "build_model": "stage",
    "build_stage": "stage",
    "clip_coefficient": "schedule",
    "full_spec": "stagespec",
    "get_codec": "codecs",
    "load_corpus": "data",
    "lr_at": "train",
    "make_optimizer": "train",
    "model_flops_per_token": "flops",
    "param_count": "flops",
    "scheduled_lr": "schedule",
    "stage_flops_per_token": "flops",
    "token_id_bytes": "codecs",
    "train_reference": "train",
    "validation_loss": "train",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'sharding' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


__all__ = [
    "CODEC_NAMES",
    "PRESETS",
    "Codec",
    "GPT",
    "SCHEDULES",
    "CodecError",
    "Corpus",
    "DataError",
    "LocalPipeline",
    "ModelConfig",
    "OptimConfig",
    "ShardingError",
    "StageError",
    "StageModule",
    "StageSpec",
    "build_model",
    "build_stage",
    "clip_coefficient",
    "full_spec",
    "get_codec",
    "load_corpus",
    "lr_at",
    "make_optimizer",
    "model_flops_per_token",
    "param_count",
    "partition",
    "scheduled_lr",
    "stage_flops_per_token",
    "token_id_bytes",
    "train_reference",
    "validation_loss",
]
