"""Sharded GPT: model config, partitioning, FLOP counts, stage modules, boundary codecs, data, training."""

from .codecs import CODEC_NAMES, Codec, get_codec, token_id_bytes
from .config import PRESETS, ModelConfig
from .data import Corpus, load_corpus
from .errors import CodecError, DataError, ShardingError, StageError
from .flops import model_flops_per_token, param_count, stage_flops_per_token
from .model import GPT
from .partition import partition
from .pipeline import LocalPipeline
from .schedule import SCHEDULES, clip_coefficient, scheduled_lr
from .stage import StageModule, build_model, build_stage
from .stagespec import StageSpec, full_spec
from .train import OptimConfig, lr_at, make_optimizer, train_reference

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
]
