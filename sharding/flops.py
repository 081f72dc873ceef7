"""FLOP counts per token (forward + backward = 3x forward), pure integer arithmetic."""

from __future__ import annotations

from .config import ModelConfig
from .stagespec import StageSpec


def block_forward_flops(config: ModelConfig, block: int) -> int:
    """Forward FLOPs per token of one transformer block (matmuls only, full attention)."""
    d, r, t = config.d_model, config.mlp_ratio, config.seq_len
    proj = 2 * (4 * d * d)  # q, k, v, o projections
    mlp = 2 * (2 * r * d * d)  # up and down projections
    attn = 2 * (2 * t * d)  # scores and weighted sum against T keys
    flops = proj + mlp + attn
    if config.is_constrained(block):
        flops += 2 * (2 * d * int(config.subspace_rank or 0))  # stream re-projection onto span(U)
    return flops


def head_forward_flops(config: ModelConfig) -> int:
    """Forward FLOPs per token of the LM head (the embedding lookup is counted as free)."""
    return 2 * config.d_model * config.vocab_size


def stage_flops_per_token(config: ModelConfig, spec: StageSpec) -> int:
    """Forward+backward FLOPs per token of the shard described by `spec`."""
    fwd = sum(block_forward_flops(config, b) for b in range(spec.block_start, spec.block_end))
    if spec.has_lm_head:
        fwd += head_forward_flops(config)
    return 3 * fwd


def model_flops_per_token(config: ModelConfig) -> int:
    """Forward+backward FLOPs per token of the whole model."""
    fwd = sum(block_forward_flops(config, b) for b in range(config.n_layers)) + head_forward_flops(config)
    return 3 * fwd
