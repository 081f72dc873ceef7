"""FLOP counts per token (forward + backward = 3x forward), pure integer arithmetic."""

from __future__ import annotations

from .config import ModelConfig
from .stagespec import StageSpec


def block_forward_flops(config: ModelConfig, block: int) -> int:
    """Forward FLOPs per token of one transformer block (matmuls only, full attention)."""
    d, f, t = config.d_model, config.hidden_dim, config.seq_len
    kv = config.kv_heads * config.head_dim  # width of k and v (d unless grouped-query attention)
    proj = 2 * (2 * d * d + 2 * d * kv)  # q, o projections and k, v projections
    mlp = 2 * ((3 if config.mlp == "swiglu" else 2) * f * d)  # (gate,) up and down projections
    attn = 2 * (2 * t * d)  # scores and weighted sum against T keys (every query head)
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


def param_count(config: ModelConfig, spec: StageSpec | None = None) -> int:
    """Trainable parameters of the whole model (or of the stage `spec`), without allocating anything."""
    d, f, v = config.d_model, config.hidden_dim, config.vocab_size
    kv = config.kv_heads * config.head_dim
    norm_gains = 2 * d + (2 * config.head_dim if config.qk_norm else 0)  # ln1, ln2 (+ q_norm, k_norm)
    block = d * (d + 2 * kv) + d * d + (3 if config.mlp == "swiglu" else 2) * f * d + norm_gains
    blocks = range(config.n_layers) if spec is None else spec.blocks
    total = block * len(blocks)
    if spec is None or spec.has_embedding:
        total += v * d
    if spec is None or spec.has_lm_head:
        total += d + (0 if config.tie_embeddings else v * d)  # final norm gain + head
    return total
