"""Memory a stage needs on its device, estimated before anything is allocated (pure arithmetic).

bytes = parameters (fp32 master weights) + gradients (fp32) + optimiser state (AdamW: exp_avg and exp_avg_sq,
      fp32; the Muon recipe: one fp32 momentum buffer per block matrix, AdamW's two for the rest)
      + buffers (rotary tables, U, E_fixed) + activations kept for backward.

Activations are per token per block, with coefficients calibrated on CPU against the tensors autograd
really saves (`torch.autograd.graph.saved_tensors_hooks`, see tests/sharding/test_memory.py): fp32
`48 d + 8 h` bytes (h = MLP hidden width, x 3/2 for SwiGLU), bf16 autocast `32 d + 4 h` (bf16 copies plus the fp32
residual stream and norms), plus `16 d` (fp32) / `8 d` (bf16) per constrained subspace block and `16 d`
with QK-norm; the
tail adds `16 V + 8 d` for logits and cross-entropy. Under bf16 autocast every microbatch's graph also
keeps its own bf16 copy of each linear weight (2 bytes per matmul parameter per microbatch in flight). Attention is counted without a T x T matrix:
`scaled_dot_product_attention` runs flash / memory-efficient kernels on CUDA and the flash kernel on
CPU (only a (B, H, T) log-sum-exp is saved). With activation checkpointing a block keeps only its
input (4 d) and one block's activations are live at a time. GPipe keeps every in-flight microbatch's
activations until its backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .config import ModelConfig
from .errors import StageMemoryError
from .optimconfig import OPTIMIZERS
from .stagespec import StageSpec

FP32 = 4  # bytes of one fp32 value
ADAMW_STATES = 2  # exp_avg and exp_avg_sq, fp32 each
MUON_STATES = 1  # momentum_buffer, fp32 (torch.optim.Muon), for each matrix inside a block
# activation bytes per token per block: (per d, per r*d, extra per d for a constrained subspace block)
_BLOCK_ACT = {"fp32": (48, 8, 16), "bf16": (32, 4, 8)}
_QK_NORM_PER_D = 16  # QK-norm's saved inputs and outputs of q and k, per token per d
_TAIL_PER_VOCAB = 16  # logits, log-softmax and their casts, per token per vocabulary entry
_TAIL_PER_D = 8  # final norm input and output, per token per d


@dataclass(frozen=True)
class MemoryPlan:
    """What a stage is trained with, as far as memory goes."""

    microbatch_size: int = 4  # sequences per microbatch
    microbatches_in_flight: int = 4  # microbatches whose activations are alive at once (GPipe: all of a step)
    compute_dtype: str = "fp32"  # "fp32" or "bf16" (autocast): the dtype of saved activations
    activation_checkpointing: bool = False  # blocks recompute their activations in backward
    optimizer: bool = True  # the stage trains (gradients and optimiser state); False: inference only
    optimizer_name: str = "adamw"  # the recipe's optimiser (sharding.optimconfig.OPTIMIZERS): what its state holds

    def validate(self) -> MemoryPlan:
        """Raise ValueError naming the bad field; return self."""
        if self.microbatch_size < 1 or self.microbatches_in_flight < 1:
            raise ValueError("MemoryPlan.microbatch_size and microbatches_in_flight must be >= 1")
        if self.optimizer_name not in OPTIMIZERS:
            raise ValueError(f"MemoryPlan.optimizer_name={self.optimizer_name!r}: choose one of {', '.join(OPTIMIZERS)}")
        if self.compute_dtype not in _BLOCK_ACT:
            raise ValueError(f"MemoryPlan.compute_dtype={self.compute_dtype!r}: choose one of {sorted(_BLOCK_ACT)}")
        return self


@dataclass(frozen=True)
class StageMemory:
    """Bytes one stage needs on its device."""

    stage: int  # stage index
    param_count: int  # trainable parameters of the stage
    params: int  # fp32 master weights
    grads: int  # fp32 gradients
    optimizer: int  # optimiser state (AdamW's two moments; Muon's momentum on block matrices)
    buffers: int  # non-trainable tensors (rotary tables, U, E_fixed)
    activations: int  # saved for backward, all in-flight microbatches

    @property
    def total(self) -> int:
        """Sum of every part."""
        return self.params + self.grads + self.optimizer + self.buffers + self.activations

    def describe(self) -> str:
        """`2.10 GiB (params 0.50 + grads 0.50 + optimizer 1.00 + buffers 0.00 + activations 0.10 GiB)`."""
        g = 2**30
        return (f"{self.total / g:.2f} GiB (params {self.params / g:.2f} + grads {self.grads / g:.2f} + "
                f"optimizer {self.optimizer / g:.2f} + buffers {self.buffers / g:.2f} + activations "
                f"{self.activations / g:.2f} GiB; {self.param_count:,} parameters)")


@lru_cache(maxsize=256)
def _meta_counts(config: ModelConfig, spec: StageSpec) -> tuple[int, int, int, int]:
    """(parameters, parameters outside the token embedding, buffer bytes, parameters of the matrices inside blocks:
    what the Muon recipe's Muon takes: sharding.optimizers.is_muon_param) of the stage built on `meta`
    (exact for every architecture option; nothing is allocated). The model code (torch) loads here, not at
    import: partitioning a spec's layers needs no torch until a stage's memory is estimated."""
    from .model import GPT
    from .optimizers import is_muon_param

    module = GPT(config, spec.blocks, spec.has_embedding, spec.has_lm_head, "meta")
    params = sum(p.numel() for p in module.parameters())
    embed = module.embed.weight.numel() if module.embed is not None and not config.tie_embeddings else 0
    buffers = sum(b.numel() * FP32 for b in module.buffers())
    block_matrices = sum(p.numel() for name, p in module.named_parameters() if is_muon_param(name, p))
    return params, params - embed, buffers, block_matrices


def stage_param_count(config: ModelConfig, spec: StageSpec) -> int:
    """Trainable parameters of the shard `spec` (equals sum(p.numel()) of the built StageModule)."""
    return _meta_counts(config, spec)[0]


def optimizer_state_bytes(config: ModelConfig, spec: StageSpec, optimizer_name: str = "adamw") -> int:
    """Bytes of the optimiser state of `spec`'s stage under the recipe's optimiser (fp32 throughout)."""
    params, _, _, block_matrices = _meta_counts(config, spec)
    muon = block_matrices if optimizer_name == "muon" else 0
    return FP32 * (ADAMW_STATES * (params - muon) + MUON_STATES * muon)


def stage_buffer_bytes(config: ModelConfig, spec: StageSpec | None = None) -> int:
    """Non-persistent buffers of a stage: rotary cos/sin, and U and E_fixed in subspace mode."""
    return _meta_counts(config, spec or StageSpec(0, 1, 0, config.n_layers, True, True))[2]


def _block_bytes(config: ModelConfig, spec: StageSpec, plan: MemoryPlan) -> list[int]:
    d = config.d_model
    hidden = config.mlp_hidden if config.mlp_hidden is not None else config.mlp_ratio * d
    if config.mlp == "swiglu":  # gate, up and their product are saved: 3/2 of the GELU MLP's hidden tensors
        hidden = hidden * 3 // 2
    per_d, per_rd, sub = _BLOCK_ACT[plan.compute_dtype]
    per_d += _QK_NORM_PER_D if config.qk_norm else 0
    return [per_d * d + per_rd * hidden + (sub * d if config.is_constrained(b) else 0) for b in spec.blocks]


def activation_bytes_per_token(config: ModelConfig, spec: StageSpec, plan: MemoryPlan) -> int:
    """Bytes saved for backward per token of one in-flight microbatch (checkpointing: block inputs only)."""
    d = config.d_model
    blocks = _block_bytes(config, spec, plan)
    total = FP32 * d * len(blocks) if plan.activation_checkpointing else sum(blocks)
    total += FP32 * d  # the stage's input (received h) or embedding output
    if spec.has_lm_head:
        total += _TAIL_PER_VOCAB * config.vocab_size + _TAIL_PER_D * d
    return total


def estimate_stage(config: ModelConfig, spec: StageSpec, plan: MemoryPlan | None = None) -> StageMemory:
    """Bytes `spec`'s stage needs when trained (or run) as `plan` says."""
    p = (plan or MemoryPlan()).validate()
    count = stage_param_count(config, spec)
    tokens = p.microbatch_size * config.seq_len * p.microbatches_in_flight
    per_mb_casts = 0
    if p.compute_dtype == "bf16":  # autocast's bf16 weight copies (matmul weights), saved by every microbatch's graph
        per_mb_casts = 2 * _meta_counts(config, spec)[1]
    activations = tokens * activation_bytes_per_token(config, spec, p) + per_mb_casts * p.microbatches_in_flight
    if p.activation_checkpointing:  # one block of one microbatch recomputed at a time in backward
        activations += p.microbatch_size * config.seq_len * max(_block_bytes(config, spec, p))
    return StageMemory(
        stage=spec.index, param_count=count, params=FP32 * count, grads=FP32 * count if p.optimizer else 0,
        optimizer=optimizer_state_bytes(config, spec, p.optimizer_name) if p.optimizer else 0, buffers=stage_buffer_bytes(config, spec),
        activations=activations if p.optimizer else 0,
    )


def require_fit(need: StageMemory, free_bytes: int | None, device: str, headroom: float = 0.9) -> None:
    """Raise StageMemoryError unless `need` fits in `headroom` x `free_bytes` (unknown free memory passes)."""
    if free_bytes is None:
        return
    budget = int(free_bytes * headroom)
    if need.total > budget:
        raise StageMemoryError(
            f"stage {need.stage} does not fit on {device}: it needs {need.describe()} but the device has "
            f"{free_bytes / 2**30:.2f} GiB free ({headroom:.0%} usable = {budget / 2**30:.2f} GiB); use more "
            "stages, smaller microbatches, bf16 or activation checkpointing"
        )
