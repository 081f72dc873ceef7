"""A pipeline stage: the slice of `sharding.model.GPT` its StageSpec names, allocating only its own parameters."""

from __future__ import annotations

import torch

from .config import ModelConfig
from .errors import StageError
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
