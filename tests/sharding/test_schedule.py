"""LR schedules (pure), global-norm clipping, and the split pipeline reproducing the clipped single process."""

import math

import pytest
import torch

from sharding.config import PRESETS
from sharding.data import load_corpus
from sharding.partition import partition
from sharding.pipeline import LocalPipeline
from sharding.schedule import clip_coefficient, scheduled_lr
from sharding.stage import build_model, build_stage
from sharding.train import (
    OptimConfig,
    clip_gradients,
    grad_sq_norm,
    lr_at,
    make_optimizer,
    optimizer_step,
    train_reference,
)


def test_constant_and_cosine_are_the_schedules_of_before():
    legacy = OptimConfig(lr=1.0, warmup_steps=4, decay_steps=14, min_lr_ratio=0.1)
    named = OptimConfig(lr=1.0, warmup_steps=4, decay_steps=14, min_lr_ratio=0.1, schedule="cosine")
    assert [lr_at(s, legacy) for s in range(20)] == [lr_at(s, named) for s in range(20)]
    assert lr_at(9, named) == pytest.approx(0.55)
    assert [lr_at(s, OptimConfig(lr=0.5, warmup_steps=2, schedule="constant")) for s in range(4)] == [
        0.25, 0.5, 0.5, 0.5]


def test_wsd_is_stable_then_decays_linearly_to_the_final_lr():
    o = OptimConfig(lr=1.0, warmup_steps=2, decay_steps=12, schedule="wsd", cooldown_steps=4, min_lr_ratio=0.2)
    lrs = [lr_at(s, o) for s in range(14)]
    assert lrs[:2] == [0.5, 1.0] and lrs[2:8] == [1.0] * 6
    assert lrs[8:13] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    assert lrs[13] == pytest.approx(0.2)
    assert scheduled_lr(100, 1.0, "cosine", 0, 10, 0.0) == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"schedule": "linear"}, "schedule='linear' is unknown"), ({"schedule": "cosine"}, "needs decay_steps"),
     ({"schedule": "wsd", "decay_steps": 10, "cooldown_steps": 0}, "cooldown_steps"),
     ({"schedule": "wsd", "decay_steps": 10, "warmup_steps": 5, "cooldown_steps": 6}, "cooldown_steps"),
     ({"grad_clip": -1.0}, "grad_clip"), ({"grad_clip": math.inf}, "grad_clip")],
)
def test_bad_schedule_or_clip_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        OptimConfig(**kwargs).validate()


def test_clip_coefficient():
    assert clip_coefficient(4.0, 0.0) == 1.0
    assert clip_coefficient(4.0, 10.0) == 1.0
    assert clip_coefficient(4.0, 1.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="not a finite"):
        clip_coefficient(math.nan, 1.0)


def test_clip_equals_torch_clip_grad_norm():
    cfg = PRESETS["tiny"]
    window = load_corpus("synthetic").batch("train", 0, 0, 2, cfg.seq_len, 0)
    a, b = build_model(cfg), build_model(cfg)
    for m in (a, b):
        m(window[:, :-1], targets=window[:, 1:]).backward()
    norm = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.05)
    assert math.sqrt(grad_sq_norm(a)) == pytest.approx(float(norm), rel=1e-6)
    assert float(norm) > 0.05  # the clip is active
    before: dict[str, torch.Tensor] = {}
    for n, p in a.named_parameters():
        assert p.grad is not None
        before[n] = p.grad.clone()
    assert clip_gradients(a, grad_sq_norm(a), 0.05) < 1.0
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-9, msg=n)
        assert p.grad is not None
        assert not torch.equal(p.grad, before[n])


def test_a_stage_refuses_to_clip_with_its_own_norm():
    cfg = PRESETS["tiny"]
    stage = build_stage(cfg, partition(cfg, 2)[1])
    optim = OptimConfig(grad_clip=1.0)
    with pytest.raises(ValueError, match="pass grad_sq_total"):
        optimizer_step(stage, make_optimizer(stage, optim), 0, optim)


@pytest.mark.parametrize(("preset", "stages", "codec"),
                         [("tiny", 3, "dense"), ("tiny-llama-subspace", 3, "subspace-fp32")])
def test_split_pipeline_with_clip_and_cosine_equals_single_process(preset, stages, codec):
    cfg = PRESETS[preset]
    corpus = load_corpus("synthetic")
    optim = OptimConfig(lr=1e-2, warmup_steps=2, schedule="cosine", decay_steps=6, grad_clip=0.3)
    ref = train_reference(cfg, optim, 6, 2, 2, corpus)
    pipe = LocalPipeline(cfg, stages, codec, optim)
    got = [pipe.train_step(s, corpus, 2, 2) for s in range(6)]
    assert max(abs(a - b) for a, b in zip(ref, got, strict=True)) <= 1e-5
    unclipped = train_reference(cfg, OptimConfig(lr=1e-2, warmup_steps=2, schedule="cosine", decay_steps=6), 6, 2,
                                2, corpus)
    assert abs(unclipped[-1] - ref[-1]) > 1e-3  # the clip changed the run
