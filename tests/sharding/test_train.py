import math

import pytest
import torch

from sharding.config import PRESETS
from sharding.data import load_corpus
from sharding.stage import build_model
from sharding.train import OptimConfig, lr_at, make_optimizer, validation_loss


def test_lr_schedule():
    o = OptimConfig(lr=1.0, warmup_steps=4, decay_steps=14, min_lr_ratio=0.1)
    assert [lr_at(s, o) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, o) == 1.0
    assert math.isclose(lr_at(9, o), 0.55)
    assert math.isclose(lr_at(14, o), 0.1) and math.isclose(lr_at(100, o), 0.1)
    assert lr_at(50, OptimConfig(lr=0.5, warmup_steps=0)) == 0.5


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"lr": 0.0}, "lr"), ({"betas": (0.9, 1.0)}, "betas"), ({"warmup_steps": -1}, "warmup_steps"),
     ({"decay_steps": 0}, "decay_steps"), ({"min_lr_ratio": 2.0}, "min_lr_ratio")],
)
def test_bad_optim_config(kwargs, field):
    with pytest.raises(ValueError, match=field):
        OptimConfig(**kwargs).validate()


def test_optimizer_groups_decay_only_matrices():
    model = build_model(PRESETS["tiny"])
    opt = make_optimizer(model, OptimConfig())
    decayed, plain = opt.param_groups
    assert all(p.dim() == 2 for p in decayed["params"]) and plain["weight_decay"] == 0.0
    assert all(p.dim() == 1 for p in plain["params"])
    n = sum(p.numel() for p in model.parameters())
    assert n == sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert isinstance(opt, torch.optim.AdamW)


def test_validation_loss_averages_the_same_validation_windows_for_every_model() -> None:
    cfg = PRESETS["tiny"]
    corpus = load_corpus("synthetic")
    net = build_model(cfg)
    with torch.no_grad():
        want = [float(net(w[:, :-1], targets=w[:, 1:]))
                for w in (corpus.batch("val", 0, b, 4, cfg.seq_len, 7) for b in range(2))]
        assert validation_loss(net, corpus, cfg.seq_len, windows=8, batch_size=4, seed=7) == sum(want) / 2
    with pytest.raises(ValueError, match="windows=6 must be a positive multiple of batch_size=4"):
        validation_loss(net, corpus, cfg.seq_len, windows=6, batch_size=4)
