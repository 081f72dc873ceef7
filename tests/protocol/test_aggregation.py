"""Robust aggregation: NaN/Inf rejection, and 16 replicas with 3 / 7 sign-flipped x1000 attackers."""

from __future__ import annotations

import pytest
import torch

from protocol.aggregation import AggregationConfig, aggregate, centered_clip, coordinate_median, stack_finite
from protocol.errors import AggregationError

REPLICAS = 16
STEPS = 100
BATCH = 256


def _task(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Regression with a nonlinear target and label noise (an irreducible loss floor)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8192, 8, generator=g)
    w = torch.randn(8, 1, generator=g)
    y = torch.tanh(x @ w) + 0.5 * torch.sin(2 * x[:, :1]) + 0.3 * torch.randn(8192, 1, generator=g)
    return x, y


def _train(method: str, attackers: int) -> float:
    """SGD on a linear model; each of 16 replicas computes a gradient on its own minibatch; returns full loss."""
    torch.manual_seed(1)
    x, y = _task()
    model = torch.nn.Linear(8, 1)
    params: list[torch.Tensor] = list(model.parameters())
    loss_fn = torch.nn.MSELoss()
    g = torch.Generator().manual_seed(2)
    config = AggregationConfig(method=method)
    for _ in range(STEPS):
        grads = []
        for r in range(REPLICAS):
            idx = torch.randint(0, x.shape[0], (BATCH,), generator=g)
            model.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            flat = torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None])
            grads.append(-1000.0 * flat if r < attackers else flat.clone())
        update = aggregate(grads, config)
        with torch.no_grad():
            offset = 0
            for p in params:
                p -= 0.2 * update[offset:offset + p.numel()].reshape(p.shape)
                offset += p.numel()
    with torch.no_grad():
        return float(loss_fn(model(x), y))


@pytest.fixture(scope="module")
def honest_loss() -> float:
    return _train("mean", 0)


@pytest.mark.parametrize("attackers", [3, 7])
@pytest.mark.parametrize("method", ["centered_clip", "median"])
def test_robust_within_5_percent_of_honest(honest_loss, method, attackers):
    loss = _train(method, attackers)
    assert abs(loss - honest_loss) <= 0.05 * honest_loss, (method, attackers, loss, honest_loss)


@pytest.mark.parametrize("attackers", [3, 7])
def test_plain_mean_diverges(honest_loss, attackers):
    loss = _train("mean", attackers)
    assert not (loss < 10 * honest_loss)  # NaN counts as diverged


def test_training_actually_learns(honest_loss):
    _, y = _task()
    assert honest_loss < 0.5 * float(y.var())


def test_nan_and_inf_updates_rejected():
    good = [torch.full((3,), 1.0), torch.full((3,), 1.2), torch.full((3,), 0.8)]
    bad = [torch.tensor([float("nan"), 0.0, 0.0]), torch.tensor([0.0, float("inf"), 0.0])]
    stacked, rejected = stack_finite(good + bad)
    assert rejected == [3, 4] and stacked.shape == (3, 3)
    for method in ("centered_clip", "median", "mean"):
        out = aggregate(good + bad, AggregationConfig(method=method))
        assert torch.allclose(out, torch.ones(3), atol=1e-6)


def test_median_and_clip_basics():
    stacked = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [1000.0, -1000.0]], dtype=torch.float64)
    assert coordinate_median(stacked).tolist() == [2.5, 15.0]
    same = torch.ones(5, 4, dtype=torch.float64)
    assert torch.equal(centered_clip(same), torch.ones(4, dtype=torch.float64))


def test_bad_input_named():
    with pytest.raises(AggregationError) as err:
        aggregate([])
    assert err.value.field == "updates"
    with pytest.raises(AggregationError) as err:
        aggregate([torch.zeros(3), torch.zeros(4)])
    assert err.value.field == "updates[1]"
    with pytest.raises(AggregationError) as err:
        aggregate([torch.tensor([float("nan")])])
    assert err.value.field == "updates"
    with pytest.raises(ValueError, match="method"):
        aggregate([torch.zeros(2)], AggregationConfig(method="trimmed"))


# -- the real sharded model: 16 replicas of the tail stage of a 2-stage transformer ------------------


def _train_stage(method: str, attackers: int, steps: int = 30, lr: float = 0.5) -> tuple[float, float]:
    """SGD on the tail stage (a `sharding` stage module) replicated 16 times over its own microbatches.

    The head stage is shared and frozen; each replica backpropagates the real cross-entropy of its own
    microbatch; attackers send their gradient sign-flipped x1000. Returns (initial, final) eval loss.
    """
    from sharding.config import ModelConfig
    from sharding.data import load_corpus
    from sharding.partition import partition
    from sharding.stage import build_stage

    config = ModelConfig(vocab_size=256, seq_len=16, d_model=32, n_layers=3, n_heads=2, mlp_ratio=2, seed=0)
    head, tail = (build_stage(config, s) for s in partition(config, 2))
    head.requires_grad_(False)
    params: list[torch.Tensor] = list(tail.parameters())
    corpus = load_corpus("synthetic")

    def loss_on(window: torch.Tensor) -> torch.Tensor:
        ids, targets = window[:, :-1], window[:, 1:]
        return tail(ids, head(ids), targets)

    held_out = corpus.batch("val", 0, 0, 32, config.seq_len, 0)
    with torch.no_grad():
        initial = float(loss_on(held_out))
    agg = AggregationConfig(method=method)
    for step in range(steps):
        grads = []
        for r in range(REPLICAS):
            tail.zero_grad()
            loss_on(corpus.batch("train", step, r, 4, config.seq_len, 0)).backward()
            flat = torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None])
            grads.append(-1000.0 * flat if r < attackers else flat.clone())
        try:
            update = aggregate(grads, agg)
        except AggregationError:  # every update non-finite: training has diverged
            return initial, float("nan")
        with torch.no_grad():
            offset = 0
            for p in params:
                p -= lr * update[offset:offset + p.numel()].reshape(p.shape)
                offset += p.numel()
    with torch.no_grad():
        return initial, float(loss_on(held_out))


@pytest.fixture(scope="module")
def honest_stage_loss() -> tuple[float, float]:
    torch.set_num_threads(1)
    return _train_stage("mean", 0)


def test_sharded_stage_honest_replicas_learn(honest_stage_loss):
    initial, final = honest_stage_loss
    assert final < 0.6 * initial


@pytest.mark.parametrize("attackers", [3, 7])
def test_sharded_stage_centered_clip_within_5_percent_and_mean_diverges(honest_stage_loss, attackers):
    _, honest = honest_stage_loss
    _, robust = _train_stage("centered_clip", attackers)
    # the attack must not cost more than 5 % of the honest loss; ending lower is no failure (on AVX-512
    # kernels the 3-attacker run ends 6 % below the honest one: clipping damps the lr=0.5 SGD steps)
    assert robust <= 1.05 * honest, (attackers, robust, honest)
    initial, plain = _train_stage("mean", attackers)
    assert not (plain < initial)  # worse than untrained (NaN counts as diverged)


def test_weighted_mean_skips_rejected_updates_and_refuses_bad_weights():
    """The mean weighs each update (a replica's bundle by its microbatch count); a non-finite update drops out with
    its weight; weights that do not fit the updates are refused naming the field."""
    mean = AggregationConfig(method="mean")
    ups = [torch.tensor([3.0, 0.0]), torch.tensor([0.0, 6.0]), torch.tensor([float("nan"), 1.0])]
    out = aggregate(ups, mean, weights=[2.0, 1.0, 5.0])
    assert torch.allclose(out, torch.tensor([2.0, 2.0]))  # (2 x [3, 0] + 1 x [0, 6]) / 3
    for bad in ([1.0], [1.0, 0.0, 1.0], [1.0, -1.0, 1.0]):
        with pytest.raises(AggregationError) as err:
            aggregate(ups, mean, weights=bad)
        assert err.value.field == "weights"
