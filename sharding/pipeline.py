"""An in-process pipeline: stages run one after another, every boundary crossing the wire codec.

This is the single-machine reference of what the networked runtime does (same stage calls, same
payload bytes), used by the correctness tests and the compression benchmark.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from .codecs import Codec, get_codec, token_id_bytes
from .config import ModelConfig
from .data import Corpus
from .device import ExecutionPolicy
from .partition import partition, validate_specs
from .stage import StageModule, build_stage, build_stage_on, plan_for
from .stagespec import StageSpec
from .train import OptimConfig, grad_sq_norm, make_optimizer, optimizer_step


class LocalPipeline:
    """Stages of one model in one process, exchanging encoded payloads at each boundary."""

    def __init__(
        self,
        config: ModelConfig,
        specs: Sequence[StageSpec] | int,
        codec: str | Codec,
        optim: OptimConfig | None = None,
        policy: ExecutionPolicy | None = None,
        microbatch_size: int = 4,
        num_microbatches: int = 4,
    ) -> None:
        """policy: device, precision and kernels of every stage (None: fp32 on CPU, the reference);
        microbatch_size / num_microbatches size the memory check of a policy's stages."""
        config.validate()
        self.config = config
        self.specs = list(partition(config, specs) if isinstance(specs, int) else specs)
        validate_specs(config, self.specs)
        self.codec = get_codec(codec, config) if isinstance(codec, str) else codec
        self.optim = (optim or OptimConfig()).validate()
        self.policy = policy
        if policy is None:
            self.device = torch.device("cpu")
            self.stages: list[StageModule] = [build_stage(config, s) for s in self.specs]
            self.optimizers = [make_optimizer(st, self.optim) for st in self.stages]
        else:
            self.device = policy.validate().torch_device
            self.codec.allow_low_precision_inputs()
            plan = plan_for(policy, microbatch_size, num_microbatches, optimizer_name=self.optim.optimizer)
            self.stages = [build_stage_on(config, s, policy, plan) for s in self.specs]
            self.optimizers = [make_optimizer(st, self.optim, policy.adamw_kwargs()) for st in self.stages]
        self.bytes_sent = 0  # codec payload bytes that crossed boundaries, both directions
        self.id_bytes_sent = 0  # token-id bytes that travelled beside forward payloads

    @property
    def wire_bytes_per_token(self) -> int:
        """Codec payload plus token-id bytes per token per boundary crossing."""
        return self.codec.bytes_per_token + token_id_bytes(self.config)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext() if self.policy is None else self.policy.autocast()

    def _forward(self, window: torch.Tensor, train: bool) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        window = window.to(self.device)
        ids, targets = window[:, :-1], window[:, 1:]
        saved: list[tuple[torch.Tensor, torch.Tensor]] = []  # (stage output, next stage's input leaf)
        h: torch.Tensor | None = None
        n = len(self.stages)
        for i, stage in enumerate(self.stages):
            is_last = i == n - 1
            with self._autocast():
                out = stage(ids, h, targets if is_last else None)
            if is_last:
                return out, saved
            payload = self.codec.encode_activation(out.detach(), ids)
            self.bytes_sent += len(payload)
            self.id_bytes_sent += ids.numel() * token_id_bytes(self.config)
            h = self.codec.decode_activation(payload, ids, self.device)
            if train:
                h.requires_grad_(True)
                saved.append((out, h))
        raise AssertionError("unreachable")

    def forward_backward(self, window: torch.Tensor, scale: float = 1.0) -> float:
        """One microbatch: forward through all stages, backward with encoded gradients; returns loss."""
        ids = window[:, :-1].to(self.device)
        loss, saved = self._forward(window, train=True)
        (loss * scale).backward()
        for out, h_in in reversed(saved):
            assert h_in.grad is not None
            payload = self.codec.encode_gradient(h_in.grad, ids)
            self.bytes_sent += len(payload)
            out.backward(self.codec.decode_gradient(payload, ids, self.device))
        return float(loss.detach())

    def train_step(self, step: int, corpus: Corpus, num_microbatches: int, microbatch_size: int) -> float:
        """One optimizer step over `num_microbatches` microbatches; returns the mean loss."""
        total = 0.0
        for mb in range(num_microbatches):
            window = corpus.batch("train", step, mb, microbatch_size, self.config.seq_len, self.optim.data_seed)
            total += self.forward_backward(window, 1.0 / num_microbatches)
        sq_norm = None
        if self.optim.grad_clip > 0:  # the global squared norm, accumulated stage after stage (as the nodes do)
            sq_norm = 0.0
            for stage in self.stages:
                sq_norm = grad_sq_norm(stage, sq_norm)
        for stage, opt in zip(self.stages, self.optimizers, strict=True):
            optimizer_step(stage, opt, step, self.optim, sq_norm)
        return total / num_microbatches

    @torch.no_grad()
    def evaluate(self, corpus: Corpus, batches: int, batch_size: int, split: str = "val", seed: int = 1234) -> float:
        """Mean loss over `batches` deterministic windows of `split`, through the codec."""
        total = 0.0
        for b in range(batches):
            window = corpus.batch(split, 0, b, batch_size, self.config.seq_len, seed)
            loss, _ = self._forward(window, train=False)
            total += float(loss)
        return total / batches
