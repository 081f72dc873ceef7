"""`ModelConfig.post_norm`: the norm on constrained blocks' sublayer outputs (weightless, scalar gain, none).

Every choice keeps the residual stream of the constrained blocks in E_fixed[ids] + span(U); the scalar gain
trains; the default leaves every existing spec hash unchanged; a bad value is refused naming the field.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sharding.config import PRESETS, ModelConfig
from sharding.data import load_corpus
from sharding.model import GPT, Block
from sharding.subspace import off_subspace_residual
from sharding.train import OptimConfig, make_optimizer

BASE = PRESETS["tiny-subspace"]  # k = 8 of d = 64, the last block free


def _batch() -> torch.Tensor:
    return load_corpus("synthetic").batch("train", 0, 0, 4, BASE.seq_len, 0)  # (4, T + 1)


def _train(cfg: ModelConfig, steps: int = 3) -> tuple[GPT, torch.Tensor]:
    w = _batch()
    net = GPT(cfg)
    opt = make_optimizer(net, OptimConfig(lr=1e-2))
    for _ in range(steps):
        opt.zero_grad()
        net(w[:, :-1], targets=w[:, 1:]).backward()
        opt.step()
        net.after_optimizer_step()
    return net, w


@pytest.mark.parametrize("post_norm", ["weightless", "scalar", "none"])
def test_each_post_norm_keeps_the_constrained_stream_in_the_subspace(post_norm: str) -> None:
    cfg = dataclasses.replace(BASE, post_norm=post_norm).validate()
    net, w = _train(cfg)
    ids = w[:, :-1]
    assert net.u is not None and net.e_fixed is not None
    with torch.no_grad():
        x = net.embed_tokens(ids)
        for key in range(cfg.n_layers - cfg.free_tail_layers):
            block = net.blocks[str(key)]
            assert isinstance(block, Block)
            assert (block.post_attn is None) == (post_norm == "none")
            x = block(x, net.rope_cos, net.rope_sin, net.u)  # raw block output, before re-expression
            assert off_subspace_residual(x, ids, net.u, net.e_fixed) < 1e-5, key
        free = net.blocks[str(cfg.n_layers - 1)]
        assert isinstance(free, Block) and free.post_attn is None and free.post_mlp is None


def test_the_scalar_gains_start_at_one_train_and_are_not_decayed() -> None:
    cfg = dataclasses.replace(BASE, post_norm="scalar").validate()
    start = GPT(cfg)
    gains = [n for n, p in start.named_parameters() if n.endswith(("post_attn.weight", "post_mlp.weight"))]
    assert len(gains) == 2 * (cfg.n_layers - cfg.free_tail_layers)
    assert all(p.shape == (1,) and float(p.detach()) == 1.0 for n, p in start.named_parameters() if n in gains)
    net, _ = _train(cfg)
    moved = [n for n, p in net.named_parameters() if n in gains and float(p.detach()) != 1.0]
    assert moved == gains  # every gain received gradients and moved
    groups = make_optimizer(net, OptimConfig()).param_groups
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert all(id(p) in no_decay for n, p in net.named_parameters() if n in gains)


def test_post_norm_choices_give_different_models_and_hashes() -> None:
    w = _batch()
    losses = {}
    for post_norm in ("weightless", "none"):
        cfg = dataclasses.replace(BASE, post_norm=post_norm)
        with torch.no_grad():
            losses[post_norm] = float(GPT(cfg)(w[:, :-1], targets=w[:, 1:]))
    assert losses["weightless"] != losses["none"]
    assert "post_norm" not in BASE.to_dict()  # the default leaves every existing spec hash unchanged
    assert dataclasses.replace(BASE, post_norm="scalar").spec_hash() != BASE.spec_hash()
    with pytest.raises(ValueError, match="post_norm='layer'"):
        dataclasses.replace(BASE, post_norm="layer").validate()
    with pytest.raises(ValueError, match="post_norm only applies in subspace mode"):
        ModelConfig(post_norm="none").validate()
