"""Model configuration: a frozen, validated, hashable description of the sharded GPT."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from eth_hash.auto import keccak


@dataclass(frozen=True)
class ModelConfig:
    """Decoder-only transformer; `subspace_rank` switches on the subspace-network architecture."""

    vocab_size: int = 256  # token vocabulary (256 = raw bytes)
    seq_len: int = 64  # context length in tokens
    d_model: int = 64  # width of the residual stream
    n_layers: int = 4  # number of transformer blocks
    n_heads: int = 4  # attention heads per block; must divide d_model
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * d_model
    subspace_rank: int | None = None  # k: residual stream kept in E_fixed[ids] + span(U); None = plain GPT
    free_tail_layers: int = 0  # last blocks left unconstrained in subspace mode (must sit on the tail stage)
    seed: int = 0  # model seed: every parameter, U and E_fixed derive from it
    init_std: float = 0.02  # std of the normal init of linear and embedding weights
    fixed_embed_std: float = 1.0  # std of the frozen token embedding E_fixed (subspace mode)
    rope_base: float = 10000.0  # rotary position embedding base
    norm_eps: float = 1e-6  # epsilon of every RMSNorm
    # -- architecture options (added later: at these defaults they are left out of to_dict and the hash) --
    mlp: str = "gelu"  # MLP of every block: "gelu" (fc, GELU, proj) or "swiglu" (Llama: proj(silu(gate) * up))
    mlp_hidden: int | None = None  # MLP hidden width; None = mlp_ratio * d_model (Llama's SwiGLU uses ~8/3 d_model)
    n_kv_heads: int | None = None  # key/value heads (grouped-query attention); None = n_heads (plain multi-head)
    qk_norm: bool = False  # RMSNorm with a learned gain over head_dim on queries and keys, before RoPE
    tie_embeddings: bool = False  # the LM head reuses the token embedding (embedding and head on one stage)
    subspace_param: str = "projected"  # subspace mode, how the constrained blocks' stream writers (attention out,
    # MLP down) are held: "projected" full (d, d_in) weights projected onto span(U) after every optimizer step, or
    # "coordinates" a (k, d_in) matrix A applied as U A (Pluralis's reference: the optimizer works in k coordinates)
    post_norm: str = "weightless"  # subspace mode, the norm on each sublayer output of a constrained block before it
    # is added to the stream: "weightless" RMSNorm (node0's), "scalar" RMSNorm times one learned gain per sublayer
    # (a per-coordinate gain would leave span(U)), or "none"

    def validate(self) -> ModelConfig:
        """Raise ValueError naming the offending field and the fix; return self when valid."""
        for name in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name}={value!r}: must be a positive integer")
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"ModelConfig.d_model={self.d_model} is not divisible by n_heads={self.n_heads}: "
                "choose n_heads that divides d_model"
            )
        if (self.d_model // self.n_heads) % 2 != 0:
            raise ValueError(
                f"ModelConfig: head size d_model/n_heads={self.d_model // self.n_heads} must be even "
                "for rotary embeddings: change d_model or n_heads"
            )
        if self.vocab_size > 2**32:
            raise ValueError(
                f"ModelConfig.vocab_size={self.vocab_size}: token ids travel as uint32 (uint16 up to 65536); "
                "use <= 4294967296"
            )
        if self.subspace_rank is not None:
            k = self.subspace_rank
            if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                raise ValueError(f"ModelConfig.subspace_rank={k!r}: must be a positive integer or None")
            if k > self.d_model:
                raise ValueError(
                    f"ModelConfig.subspace_rank={k} exceeds d_model={self.d_model}: use k <= d_model"
                )
        if self.subspace_param not in SUBSPACE_PARAMS:
            raise ValueError(f"ModelConfig.subspace_param={self.subspace_param!r}: use one of {list(SUBSPACE_PARAMS)}")
        if self.subspace_param != "projected" and self.subspace_rank is None:
            raise ValueError("ModelConfig.subspace_param only applies in subspace mode: set subspace_rank or use "
                             "'projected'")
        if self.post_norm not in POST_NORMS:
            raise ValueError(f"ModelConfig.post_norm={self.post_norm!r}: use one of {list(POST_NORMS)}")
        if self.post_norm != "weightless" and self.subspace_rank is None:
            raise ValueError("ModelConfig.post_norm only applies in subspace mode: set subspace_rank or use "
                             "'weightless'")
        ftl = self.free_tail_layers
        if not isinstance(ftl, int) or isinstance(ftl, bool) or ftl < 0:
            raise ValueError(f"ModelConfig.free_tail_layers={ftl!r}: must be an integer >= 0")
        if ftl > 0 and self.subspace_rank is None:
            raise ValueError(
                "ModelConfig.free_tail_layers only applies in subspace mode: set subspace_rank or use 0"
            )
        if ftl >= self.n_layers and ftl > 0:
            raise ValueError(
                f"ModelConfig.free_tail_layers={ftl} must be < n_layers={self.n_layers}: "
                "at least one block must be constrained"
            )
        self._validate_options()
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"ModelConfig.seed={self.seed!r}: must be an integer >= 0")
        for name in ("init_std", "fixed_embed_std", "rope_base", "norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"ModelConfig.{name}={value!r}: must be a positive number")
        return self

    def _validate_options(self) -> None:
        """The architecture options: ValueError naming the field and the fix (before any weight exists)."""
        if self.mlp not in MLP_KINDS:
            raise ValueError(f"ModelConfig.mlp={self.mlp!r} is unknown: use one of {', '.join(MLP_KINDS)}")
        for name in ("mlp_hidden", "n_kv_heads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"ModelConfig.{name}={value!r}: must be a positive integer or None (the default)")
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"ModelConfig.n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}: "
                "choose n_kv_heads that divides n_heads (each key/value head serves n_heads/n_kv_heads queries)"
            )
        for name in ("qk_norm", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig.{name}={getattr(self, name)!r}: must be true or false")

    @property
    def kv_heads(self) -> int:
        """Key/value heads (n_heads unless grouped-query attention)."""
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def hidden_dim(self) -> int:
        """Hidden width of the MLP."""
        return self.mlp_hidden if self.mlp_hidden is not None else self.mlp_ratio * self.d_model

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_heads

    @property
    def is_subspace(self) -> bool:
        """True when the residual stream is constrained to E_fixed[ids] + span(U)."""
        return self.subspace_rank is not None

    def is_constrained(self, block: int) -> bool:
        """True when block `block` writes only into span(U) (subspace mode, not a free tail layer)."""
        return self.is_subspace and block < self.n_layers - self.free_tail_layers

    def in_coordinates(self, block: int) -> bool:
        """True when block `block` is constrained and holds its stream writers in k coordinates (subspace_param)."""
        return self.is_constrained(block) and self.subspace_param == "coordinates"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field, except options added later that sit at their defaults (OPTION_DEFAULTS):
        the dict, and so the spec hash, of every config that existed before them is unchanged."""
        return {k: v for k, v in asdict(self).items() if k not in OPTION_DEFAULTS or OPTION_DEFAULTS[k] != v}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build and validate a config; unknown keys raise ValueError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"ModelConfig.from_dict: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**data).validate()

    def canonical_json(self) -> bytes:
        """Sorted-key, space-free JSON encoding (the input of spec_hash)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    def spec_hash(self) -> bytes:
        """32-byte keccak256 of canonical_json()."""
        return bytes(keccak(self.canonical_json()))


MLP_KINDS = ("gelu", "swiglu")  # values of ModelConfig.mlp
SUBSPACE_PARAMS = ("projected", "coordinates")  # values of ModelConfig.subspace_param
POST_NORMS = ("weightless", "scalar", "none")  # values of ModelConfig.post_norm
# fields added after specs were first registered, with the value that reproduces the model from before
OPTION_DEFAULTS: dict[str, Any] = {
    "mlp": "gelu", "mlp_hidden": None, "n_kv_heads": None, "qk_norm": False, "tie_embeddings": False,
    "subspace_param": "projected", "post_norm": "weightless",
}


def _llama(vocab_size: int, seq_len: int, d_model: int, n_layers: int, n_heads: int, n_kv_heads: int,
           mlp_hidden: int, rope_base: float = 10000.0) -> ModelConfig:
    """A Llama-style config: SwiGLU MLP, grouped-query attention, QK-norm, untied head."""
    return ModelConfig(vocab_size=vocab_size, seq_len=seq_len, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                       n_kv_heads=n_kv_heads, mlp="swiglu", mlp_hidden=mlp_hidden, qk_norm=True, rope_base=rope_base)


PRESETS: dict[str, ModelConfig] = {
    # tests and demo: a few ms per step on one CPU core
    "tiny": ModelConfig(vocab_size=256, seq_len=64, d_model=64, n_layers=4, n_heads=4),
    # tiny with the subspace architecture (k = 8, last block free)
    "tiny-subspace": ModelConfig(
        vocab_size=256, seq_len=64, d_model=64, n_layers=4, n_heads=4, subspace_rank=8, free_tail_layers=1
    ),
    # compression benchmark: d_model 512 so that 100x against fp32 is measurable
    "bench": ModelConfig(vocab_size=256, seq_len=128, d_model=512, n_layers=6, n_heads=8),
    "bench-subspace": ModelConfig(
        vocab_size=256,
        seq_len=128,
        d_model=512,
        n_layers=6,
        n_heads=8,
        subspace_rank=8,
        free_tail_layers=2,
    ),
    # tests: tiny with every Llama option (SwiGLU, 2 key/value heads for 4 query heads, QK-norm)
    "tiny-llama": _llama(256, 64, 64, 4, 4, 2, 192),
    # the same, subspace: every block constrained but the last two (as node0)
    "tiny-llama-subspace": replace(_llama(256, 64, 64, 4, 4, 2, 192), subspace_rank=8, free_tail_layers=2),
    # Llama-style presets for BPE vocabularies (override vocab_size with the tokenizer's in a spec);
    # parameter counts (sharding.flops.param_count): 126M, 338M, 1.11B
    "llama-125m": _llama(32768, 1024, 768, 12, 12, 4, 2048),
    "llama-350m": _llama(32768, 1024, 1024, 24, 16, 4, 2816),
    "llama-1b": _llama(32768, 2048, 2048, 16, 32, 8, 8192, rope_base=500000.0),
    # 8B class (Llama 3 8B shape: 32 layers, d 4096, 32 heads, GQA 8, SwiGLU 14336): validates and partitions,
    # never trained or allocated here; vocab 65536 until ids travel as uint32 (then 128256), 7.5B parameters
    "llama-8b": _llama(65536, 8192, 4096, 32, 32, 8, 14336, rope_base=500000.0),
}
