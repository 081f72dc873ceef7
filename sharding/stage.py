"""A pipeline stage holding only its own shard of the GPT, initialised deterministically per parameter."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .device import ExecutionPolicy, device_info
from .errors import StageError
from .memory import MemoryPlan, estimate_stage, require_fit
from .model import Block, RMSNorm, rope_tables
from .partition import check_spec
from .seeding import generator
from .stagespec import StageSpec, full_spec
from .subspace import fixed_embedding, restream, subspace_basis

# parameters whose init std is divided by sqrt(2 * n_layers) (residual output projections)
_RESIDUAL_OUT = ("attn.proj.weight", "mlp.proj.weight")


class StageModule(nn.Module):
    """Embedding (head stage), blocks [block_start, block_end), final norm + LM head (tail stage).

    Parameter names are global (`blocks.<i>.…`), so the union of all stages' state dicts equals the
    single-stage (unsplit) model's state dict.
    """

    def __init__(self, config: ModelConfig, spec: StageSpec, device: torch.device | str = "cpu") -> None:
        super().__init__()
        config.validate()
        check_spec(config, spec)
        self.config = config
        self.spec = spec
        self.activation_checkpointing = False  # recompute each block in backward (set by build_stage_on)
        with torch.device("meta"):
            self.embed = nn.Embedding(config.vocab_size, config.d_model) if spec.has_embedding else None
            self.blocks = nn.ModuleDict(
                {str(i): Block(config, config.is_constrained(i)) for i in spec.blocks}
            )
            self.norm_f = RMSNorm(config.d_model, config.norm_eps) if spec.has_lm_head else None
            self.lm_head = (
                nn.Linear(config.d_model, config.vocab_size, bias=False) if spec.has_lm_head else None
            )
        self.to_empty(device=device)
        cos, sin = rope_tables(config, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        sub = config.is_subspace
        self.u: torch.Tensor | None
        self.e_fixed: torch.Tensor | None
        self.register_buffer("u", subspace_basis(config).to(device) if sub else None, persistent=False)
        self.register_buffer("e_fixed", fixed_embedding(config).to(device) if sub else None, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise every parameter from (model seed, global parameter name), then project."""
        cfg = self.config
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("ln1.weight") or name.endswith("ln2.weight") or name == "norm_f.weight":
                    p.fill_(1.0)
                    continue
                std = cfg.init_std
                if name.endswith(_RESIDUAL_OUT):
                    std = std / math.sqrt(2 * cfg.n_layers)
                g = generator(cfg.seed, "param", name)
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)
        self.after_optimizer_step()

    def after_optimizer_step(self) -> None:
        """Project the constrained weights back onto span(U) (no-op in dense mode)."""
        if self.u is None:
            return
        u = self.u
        with torch.no_grad():
            if self.embed is not None:
                w = self.embed.weight  # (vocab, d): rows are written into the stream
                w.copy_((w @ u) @ u.t())
            for key, block in self.blocks.items():
                if not self.config.is_constrained(int(key)):
                    continue
                assert isinstance(block, Block)
                for lin in (block.attn.proj, block.mlp.proj):
                    w = lin.weight  # (d_out, d_in): columns are written into the stream
                    w.copy_(u @ (u.t() @ w))

    def _check_ids(self, ids: torch.Tensor) -> None:
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long or ids.dim() != 2:
            raise StageError(f"ids must be a 2-D torch.long tensor (B, T), got {_describe(ids)}")
        if ids.shape[1] < 1 or ids.shape[1] > self.config.seq_len:
            raise StageError(f"ids has T={ids.shape[1]}; need 1 <= T <= seq_len={self.config.seq_len}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise StageError(f"ids must lie in [0, vocab_size={self.config.vocab_size})")

    def forward(
        self, ids: torch.Tensor, h: torch.Tensor | None = None, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Head: embed ids; others: continue from boundary state h. Tail: loss (targets) or logits."""
        self._check_ids(ids)
        cfg = self.config
        if self.embed is not None:
            if h is not None:
                raise StageError("the head stage embeds ids itself: call it with h=None")
            x = self.embed(ids)
            if self.e_fixed is not None:
                x = x + self.e_fixed[ids]
        else:
            if h is None:
                raise StageError(f"stage {self.spec.index} is not the head stage: pass the boundary state h")
            expect = (ids.shape[0], ids.shape[1], cfg.d_model)
            if tuple(h.shape) != expect or h.dtype != torch.float32:
                raise StageError(f"h must be float32 of shape {expect}, got {_describe(h)}")
            x = h
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for key, block in self.blocks.items():
            if recompute:
                x = checkpoint(block, x, self.rope_cos, self.rope_sin, use_reentrant=False)
            else:
                x = block(x, self.rope_cos, self.rope_sin)
            if self.u is not None and self.e_fixed is not None and cfg.is_constrained(int(key)):
                x = restream(x, ids, self.u, self.e_fixed)
        if self.lm_head is None or self.norm_f is None:
            if targets is not None:
                raise StageError(f"stage {self.spec.index} is not the tail stage: it takes no targets")
            return x
        logits = self.lm_head(self.norm_f(x))
        if targets is None:
            return logits
        if not isinstance(targets, torch.Tensor) or targets.shape != ids.shape or targets.dtype != torch.long:
            raise StageError(f"targets must be torch.long of shape {tuple(ids.shape)}, got {_describe(targets)}")
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor dtype={x.dtype} shape={tuple(x.shape)}"
    return type(x).__name__


def build_stage(config: ModelConfig, spec: StageSpec, device: torch.device | str = "cpu") -> StageModule:
    """Build one stage, allocating only its own parameters."""
    return StageModule(config, spec, device)


def build_model(config: ModelConfig, device: torch.device | str = "cpu") -> StageModule:
    """The unsplit model: a single stage holding everything."""
    return StageModule(config, full_spec(config), device)


def plan_for(policy: ExecutionPolicy, microbatch_size: int, microbatches_in_flight: int,
             train: bool = True) -> MemoryPlan:
    """The memory plan of a stage run under `policy`."""
    return MemoryPlan(microbatch_size=microbatch_size, microbatches_in_flight=microbatches_in_flight,
                      compute_dtype=policy.compute_dtype_name,
                      activation_checkpointing=policy.activation_checkpointing, optimizer=train)


def build_stage_on(config: ModelConfig, spec: StageSpec, policy: ExecutionPolicy, plan: MemoryPlan,
                   free_bytes: int | None = None) -> StageModule:
    """Build one stage on `policy`'s device after checking it fits there (StageMemoryError before any weight
    is allocated otherwise). `free_bytes` overrides the device's reported free memory (a per-node budget)."""
    policy.validate()
    device = policy.torch_device
    free = free_bytes if free_bytes is not None else device_info(device).free_bytes
    require_fit(estimate_stage(config, spec, plan), free, str(device), policy.memory_headroom)
    module = StageModule(config, spec, device)
    module.activation_checkpointing = policy.activation_checkpointing
    return module
