"""A pipeline stage: the slice of `sharding.model.GPT` its StageSpec names, allocating only its own parameters."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .device import ExecutionPolicy, device_info
from .errors import StageError
from .memory import MemoryPlan, estimate_stage, require_fit
from .model import GPT
from .partition import check_spec
from .stagespec import StageSpec, full_spec


class StageModule(GPT):
    """One pipeline stage: the `GPT` slice named by a StageSpec (embedding on the first stage, blocks
    [block_start, block_end), final norm + LM head on the last), with its inputs checked.

    Parameter names are global (`blocks.<i>.…`), so the union of all stages' state dicts equals the
    single-stage (unsplit) model's state dict.
    """

    def __init__(self, config: ModelConfig, spec: StageSpec, device: torch.device | str = "cpu") -> None:
        config.validate()
        check_spec(config, spec)
        super().__init__(config, spec.blocks, spec.has_embedding, spec.has_lm_head, device)
        self.spec = spec
        self.activation_checkpointing = False  # blocks recompute their activations in backward

    def enable_activation_checkpointing(self) -> None:
        """Recompute every block's activations in backward (torch.utils.checkpoint, non-reentrant).

        Each block instance's `forward` is wrapped (the blocks themselves and the parameter names are unchanged).
        """
        if self.activation_checkpointing:
            return
        for block in self.blocks.values():
            block.forward = _checkpointed(block.forward)
        self.activation_checkpointing = True

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
        else:
            if h is None:
                raise StageError(f"stage {self.spec.index} is not the head stage: pass the boundary state h")
            expect = (ids.shape[0], ids.shape[1], cfg.d_model)
            if tuple(h.shape) != expect or h.dtype != torch.float32:
                raise StageError(f"h must be float32 of shape {expect}, got {_describe(h)}")
        if not self.has_head:
            if targets is not None:
                raise StageError(f"stage {self.spec.index} is not the tail stage: it takes no targets")
        elif targets is not None and (
            not isinstance(targets, torch.Tensor) or targets.shape != ids.shape or targets.dtype != torch.long
        ):
            raise StageError(f"targets must be torch.long of shape {tuple(ids.shape)}, got {_describe(targets)}")
        return super().forward(ids, h, targets)


def _checkpointed(forward: Any) -> Any:
    def run(*args: Any) -> Any:
        if torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False)
        return forward(*args)

    return run


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
             train: bool = True, optimizer_name: str = "adamw") -> MemoryPlan:
    """The memory plan of a stage run under `policy`, trained with the recipe's `optimizer_name`."""
    return MemoryPlan(microbatch_size=microbatch_size, microbatches_in_flight=microbatches_in_flight,
                      compute_dtype=policy.compute_dtype_name,
                      activation_checkpointing=policy.activation_checkpointing, optimizer=train,
                      optimizer_name=optimizer_name)


def build_stage_on(config: ModelConfig, spec: StageSpec, policy: ExecutionPolicy, plan: MemoryPlan,
                   free_bytes: int | None = None) -> StageModule:
    """Build one stage on `policy`'s device after checking it fits there (StageMemoryError before any weight
    is allocated otherwise). `free_bytes` overrides the device's reported free memory (a per-node budget)."""
    policy.validate()
    device = policy.torch_device
    free = free_bytes if free_bytes is not None else device_info(device).free_bytes
    require_fit(estimate_stage(config, spec, plan), free, str(device), policy.memory_headroom)
    module = StageModule(config, spec, device)
    if policy.activation_checkpointing:
        module.enable_activation_checkpointing()
    return module
