"""Memory estimator against what torch really allocates and saves; refusal before allocation; budgets in partition."""

from __future__ import annotations

import pytest
import torch

from sharding.config import PRESETS, ModelConfig
from sharding.device import ExecutionPolicy
from sharding.errors import StageMemoryError
from sharding.memory import (
    MemoryPlan,
    estimate_stage,
    optimizer_state_bytes,
    require_fit,
    stage_buffer_bytes,
    stage_param_count,
)
from sharding.optimconfig import OptimConfig
from sharding.partition import partition
from sharding.stage import build_stage, build_stage_on, plan_for
from sharding.stagespec import StageSpec, full_spec
from sharding.train import make_optimizer, optimizer_step

DENSE = ModelConfig(vocab_size=256, seq_len=64, d_model=128, n_layers=4, n_heads=4)
SUB = ModelConfig(vocab_size=256, seq_len=64, d_model=128, n_layers=4, n_heads=4, subspace_rank=8, free_tail_layers=1)


@pytest.mark.parametrize("config", [DENSE, SUB, PRESETS["tiny-llama"], PRESETS["tiny-llama-subspace"]])
def test_param_and_buffer_counts_match_the_built_module(config):
    for spec in [*partition(config, 3), full_spec(config)]:
        module = build_stage(config, spec)
        assert stage_param_count(config, spec) == sum(p.numel() for p in module.parameters())
        buffers = sum(b.numel() * b.element_size() for b in module.buffers())
        assert stage_buffer_bytes(config, spec) == buffers


def _saved_bytes(config: ModelConfig, spec: StageSpec, batch: int, bf16: bool) -> int:
    """Bytes of the non-parameter tensors autograd saves for backward in one microbatch."""
    torch.manual_seed(0)
    module = build_stage(config, spec)
    params = {p.data_ptr() for p in module.parameters()}
    ids = torch.randint(0, config.vocab_size, (batch, config.seq_len))
    h = None if spec.has_embedding else torch.randn(batch, config.seq_len, config.d_model, requires_grad=True)
    seen: dict[tuple[int, torch.dtype, tuple[int, ...]], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in params:
            seen[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        module(ids, h, ids if spec.has_lm_head else None)
    return sum(seen.values())


@pytest.mark.parametrize("config", [DENSE, SUB, PRESETS["tiny-llama"], PRESETS["tiny-llama-subspace"]])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_activation_estimate_bounds_what_autograd_saves(config, dtype):
    batch = 2
    plan = MemoryPlan(microbatch_size=batch, microbatches_in_flight=1, compute_dtype=dtype)
    for spec in partition(config, 3):
        measured = _saved_bytes(config, spec, batch, dtype == "bf16")
        estimated = estimate_stage(config, spec, plan).activations
        assert measured <= estimated <= 1.6 * measured, (spec, measured, estimated)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_optimizer_state_estimate_equals_the_state_after_a_step(optimizer):
    """AdamW keeps two fp32 moments per parameter; the Muon recipe one momentum buffer per block matrix and AdamW's
    two for the embedding, head and norms: the estimate equals the bytes of the real state after one step."""
    for spec in partition(SUB, 3):
        module = build_stage(SUB, spec)
        opt = make_optimizer(module, OptimConfig(optimizer=optimizer))
        for p in module.parameters():
            p.grad = torch.ones_like(p)
        optimizer_step(module, opt, 0, OptimConfig(optimizer=optimizer))
        real = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                   if isinstance(t, torch.Tensor) and t.numel() > 1)  # the moments, not AdamW's step counters
        assert optimizer_state_bytes(SUB, spec, optimizer) == real
        plan = MemoryPlan(optimizer_name=optimizer)
        assert estimate_stage(SUB, spec, plan).optimizer == real
    with pytest.raises(ValueError, match="optimizer_name"):
        MemoryPlan(optimizer_name="sgd").validate()
    muon, adamw = (estimate_stage(SUB, partition(SUB, 3)[1], MemoryPlan(optimizer_name=o)).optimizer
                   for o in ("muon", "adamw"))
    assert muon < adamw  # a middle stage is almost all block matrices: about half the state


def test_estimate_parts_and_checkpointing():
    spec = partition(DENSE, 2)[0]
    est = estimate_stage(DENSE, spec, MemoryPlan(microbatch_size=4, microbatches_in_flight=4))
    n = stage_param_count(DENSE, spec)
    assert (est.params, est.grads, est.optimizer) == (4 * n, 4 * n, 8 * n)
    assert est.total == est.params + est.grads + est.optimizer + est.buffers + est.activations
    ckpt = estimate_stage(DENSE, spec, MemoryPlan(microbatch_size=4, microbatches_in_flight=4,
                                                  activation_checkpointing=True))
    assert ckpt.activations < est.activations / 2 and ckpt.params == est.params
    infer = estimate_stage(DENSE, spec, MemoryPlan(optimizer=False))
    assert infer.grads == infer.optimizer == infer.activations == 0


def test_stage_too_big_is_refused_with_its_bytes_and_the_free_memory():
    spec = partition(DENSE, 2)[0]
    plan = MemoryPlan(microbatch_size=4, microbatches_in_flight=4)
    need = estimate_stage(DENSE, spec, plan)
    policy = ExecutionPolicy("cpu")
    assert build_stage_on(DENSE, spec, policy, plan, free_bytes=2 * need.total) is not None
    with pytest.raises(StageMemoryError) as err:
        build_stage_on(DENSE, spec, policy, plan, free_bytes=need.total)
    msg = str(err.value)
    for part in ("params", "grads", "optimizer", "activations", "GiB free", "stage 0", "cpu"):
        assert part in msg
    require_fit(need, None, "cpu")  # unknown free memory: nothing to refuse on


def test_refused_before_any_weight_is_allocated():
    # one qkv matrix of this model is 2**60 bytes: had allocation been tried, torch would fail with its own
    # RuntimeError; the refusal must come first, from the estimate, against this machine's real free memory
    huge = ModelConfig(vocab_size=256, seq_len=64, d_model=2**28, n_layers=2, n_heads=2**20)
    policy = ExecutionPolicy("cpu")
    with pytest.raises(StageMemoryError, match="does not fit on cpu"):
        build_stage_on(huge, partition(huge, 2)[0], policy, plan_for(policy, 1, 1))


def test_partition_respects_memory_budgets():
    cfg = ModelConfig(vocab_size=256, seq_len=64, d_model=128, n_layers=8, n_heads=4)
    plan = MemoryPlan(microbatch_size=4, microbatches_in_flight=4)
    balanced = partition(cfg, 2)
    roomy = [10**12, 10**12]
    assert partition(cfg, 2, memory_budgets=roomy, memory_plan=plan) == balanced
    assert partition(cfg, 2, [1.0, 1.0], roomy, plan) == balanced  # throughputs and budgets together
    # node 0 can hold only 2 blocks + the embedding: the split moves blocks to node 1
    small = estimate_stage(cfg, StageSpec(0, 2, 0, 2, True, False), plan).total
    specs = partition(cfg, 2, memory_budgets=[small, 10**12], memory_plan=plan)
    assert specs[0].block_end == 2 and specs[1].block_start == 2
    with pytest.raises(ValueError, match="fits memory_budgets"):
        partition(cfg, 2, memory_budgets=[1024, 1024], memory_plan=plan)
    with pytest.raises(ValueError, match="memory_budgets"):
        partition(cfg, 2, memory_budgets=[10**12])
