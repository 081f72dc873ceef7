"""The async schedule's reference: delayed gradients with weight stashing, and its golden losses."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from sharding import (
    PRESETS,
    OptimConfig,
    build_model,
    load_corpus,
    make_optimizer,
    partition,
    train_reference,
)
from sharding.delayed import ASYNC_GOLDEN_PATH, WeightStash, run_golden_async, train_delayed
from sharding.regression import GOLDEN_ATOL
from sharding.stage import StageModule
from sharding.train import optimizer_step


def _naive(steps: int, staleness: int) -> list[float]:
    """Delayed gradients from a kept history of state dicts: update k uses the gradient at weights k - S."""
    cfg, corpus, optim = PRESETS["tiny"], load_corpus("synthetic"), OptimConfig()
    model = build_model(cfg)
    opt = make_optimizer(model, optim)
    history = [copy.deepcopy(model.state_dict())]
    losses = []
    for k in range(steps):
        used = build_model(cfg)
        used.load_state_dict(history[max(0, k - staleness)])
        total = 0.0
        for mb in range(2):
            window = corpus.batch("train", k, mb, 2, cfg.seq_len, optim.data_seed)
            loss = used(window[:, :-1], targets=window[:, 1:])
            (loss / 2).backward()
            total += float(loss.detach())
        for live, u in zip(model.parameters(), used.parameters(), strict=True):
            live.grad = u.grad
        optimizer_step(model, opt, k, optim)
        history.append(copy.deepcopy(model.state_dict()))
        losses.append(total / 2)
    return losses


def test_staleness_zero_is_the_synchronous_run() -> None:
    corpus = load_corpus("synthetic")
    assert train_delayed(PRESETS["tiny"], OptimConfig(), 4, 2, 2, corpus, 0) == \
        train_reference(PRESETS["tiny"], OptimConfig(), 4, 2, 2, corpus)


def test_clipped_staleness_zero_is_the_clipped_synchronous_run_and_a_stage_must_pass_the_global_norm() -> None:
    corpus, clip = load_corpus("synthetic"), OptimConfig(lr=0.01, grad_clip=0.01)
    got = train_delayed(PRESETS["tiny"], clip, 4, 2, 2, corpus, 0)
    assert got == train_reference(PRESETS["tiny"], clip, 4, 2, 2, corpus)
    assert got != train_reference(PRESETS["tiny"], OptimConfig(lr=0.01), 4, 2, 2, corpus)
    stage = StageModule(PRESETS["tiny"], partition(PRESETS["tiny"], 2)[0])
    stash = WeightStash(stage, make_optimizer(stage, clip), clip, 1)
    with pytest.raises(ValueError, match="pass grad_sq_total"):
        stash.apply(0)
    stash.apply(0, grad_sq_total=4.0)  # a stage clips by the whole model's norm, given
    assert stash.next_update == 1


@pytest.mark.parametrize("staleness", [1, 2])
def test_stash_equals_a_history_of_weights(staleness: int) -> None:
    got = train_delayed(PRESETS["tiny"], OptimConfig(), 5, 2, 2, load_corpus("synthetic"), staleness, lookahead=0.0)
    assert got == pytest.approx(_naive(5, staleness), abs=1e-6)
    assert got != train_reference(PRESETS["tiny"], OptimConfig(), 5, 2, 2, load_corpus("synthetic"))


def test_stash_applies_in_order_and_keeps_staleness_plus_one_copies() -> None:
    model = build_model(PRESETS["tiny"])
    stash = WeightStash(model, make_optimizer(model, OptimConfig()), OptimConfig(), 2)
    assert sorted(stash.copies) == [0, 1, 2] and stash.ready(2) and not stash.ready(3)
    with pytest.raises(ValueError, match="out of order"):
        stash.apply(1)
    seen: list[int] = []
    stash.apply(0, lambda k, used: seen.append(k))
    assert seen == [0] and sorted(stash.copies) == [1, 2, 3]
    # step 3 computes with the weights after update 0, steps 1 and 2 with the initial ones
    assert all(torch.equal(a, b) for a, b in zip(stash.weights(3).parameters(), model.parameters(), strict=True))
    with pytest.raises(ValueError, match="staleness"):
        WeightStash(model, make_optimizer(model, OptimConfig()), OptimConfig(), -1)


def test_lookahead_extrapolates_the_stashed_copy_along_the_last_update() -> None:
    model = build_model(PRESETS["tiny"])
    stash = WeightStash(model, make_optimizer(model, OptimConfig()), OptimConfig(), 2, lookahead=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    for p in stash.weights(0).parameters():
        p.grad = torch.ones_like(p)
    stash.apply(0)
    after = list(model.parameters())
    for used, w0, w1 in zip(stash.weights(3).parameters(), before, after, strict=True):
        assert torch.allclose(used, w1 + 2 * (w1 - w0))  # S = 2 updates ahead
    got = train_delayed(PRESETS["tiny"], OptimConfig(), 4, 2, 2, load_corpus("synthetic"), 1)
    assert got != train_delayed(PRESETS["tiny"], OptimConfig(), 4, 2, 2, load_corpus("synthetic"), 1, lookahead=0.0)


@pytest.mark.timeout(300)
def test_async_golden_losses_reproduce() -> None:
    stored = json.loads(ASYNC_GOLDEN_PATH.read_text())
    fresh = run_golden_async()
    assert fresh["config"] == stored["config"] and fresh["staleness"] == stored["staleness"] == 2
    assert fresh["lookahead"] == stored["lookahead"] == 1.0
    worst = max(abs(a - b) for a, b in zip(fresh["losses"], stored["losses"], strict=True))
    assert worst <= GOLDEN_ATOL
    assert stored["losses"][-1] < stored["losses"][0] - 1.0  # the golden async run learns
