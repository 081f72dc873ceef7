"""`ModelConfig.subspace_param = "coordinates"`: the constrained stream writers held as k coordinates A, applied as U A.

The same model as the projected parametrisation at the start, the same trajectory under plain SGD (the projected
update U U^T G equals U times the coordinate update U^T G), a different one under AdamW (its per-coordinate
scaling is what the option changes), and a stream that stays in E_fixed[ids] + span(U) without any projection.
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
COORDS = dataclasses.replace(BASE, subspace_param="coordinates")


def _batch() -> torch.Tensor:
    return load_corpus("synthetic").batch("train", 0, 0, 4, BASE.seq_len, 0)  # (4, T + 1)


def _loss(net: GPT, w: torch.Tensor) -> torch.Tensor:
    return net(w[:, :-1], targets=w[:, 1:])


def test_the_coordinates_model_starts_as_its_projected_twin_with_fewer_parameters() -> None:
    w = _batch()
    proj, coords = GPT(BASE), GPT(COORDS)
    with torch.no_grad():
        assert torch.allclose(_loss(proj, w), _loss(coords, w), atol=1e-5)
    first, last = coords.blocks["0"], coords.blocks[str(BASE.n_layers - 1)]
    assert isinstance(first, Block) and isinstance(last, Block)
    assert first.attn.proj.weight.shape == (BASE.subspace_rank, BASE.d_model)  # (k, d): coordinates in span(U)
    assert last.attn.proj.weight.shape == (BASE.d_model, BASE.d_model)  # free block
    n = sum(p.numel() for p in proj.parameters()) - sum(p.numel() for p in coords.parameters())
    per_block = (BASE.d_model - 8) * (BASE.d_model + BASE.hidden_dim)  # attn out (d, d) and MLP down (d, F)
    assert n == per_block * (BASE.n_layers - BASE.free_tail_layers)


def test_plain_sgd_follows_the_same_trajectory_in_both_parametrisations() -> None:
    w = _batch()
    nets = [GPT(BASE), GPT(COORDS)]
    for _ in range(3):
        for net in nets:
            opt = torch.optim.SGD(net.parameters(), lr=0.05)
            opt.zero_grad()
            _loss(net, w).backward()
            opt.step()
            net.after_optimizer_step()  # the projection (a no-op for the writers in coordinates)
    with torch.no_grad():
        before = _loss(GPT(BASE), w)
        after = [_loss(net, w) for net in nets]
    assert after[0] < before  # it trained
    assert torch.allclose(after[0], after[1], atol=1e-4)


def test_adamw_differs_and_the_stream_stays_in_the_subspace_without_projection() -> None:
    w = _batch()
    nets = [GPT(BASE), GPT(COORDS)]
    for net in nets:
        opt = make_optimizer(net, OptimConfig(lr=1e-2))
        for _ in range(3):
            opt.zero_grad()
            _loss(net, w).backward()
            opt.step()
            net.after_optimizer_step()
    ids = w[:, :-1]
    with torch.no_grad():
        assert not torch.allclose(_loss(nets[0], w), _loss(nets[1], w), atol=1e-4)  # Adam is not invariant
        coords = nets[1]
        assert coords.u is not None and coords.e_fixed is not None
        x = coords.embed_tokens(ids)
        for key in range(BASE.n_layers - BASE.free_tail_layers):
            x = coords.blocks[str(key)](x, coords.rope_cos, coords.rope_sin, coords.u)  # raw, before re-expression
            assert off_subspace_residual(x, ids, coords.u, coords.e_fixed) < 1e-5


def test_subspace_param_is_checked_and_hashed_only_when_set() -> None:
    assert BASE.to_dict() == {k: v for k, v in BASE.to_dict().items() if k != "subspace_param"}
    assert "subspace_param" not in BASE.to_dict()  # the default leaves every existing spec hash unchanged
    assert COORDS.spec_hash() != BASE.spec_hash()
    with pytest.raises(ValueError, match="subspace_param='rotated'"):
        dataclasses.replace(BASE, subspace_param="rotated").validate()
    with pytest.raises(ValueError, match="subspace_param only applies in subspace mode"):
        ModelConfig(subspace_param="coordinates").validate()
