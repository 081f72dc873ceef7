"""`recipe.optimizer = "muon"`: Muon on the blocks' matrices, AdamW on the rest, one optimiser that saves, loads,
splits into stages and runs delayed exactly as AdamW does."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from sharding.config import PRESETS
from sharding.data import load_corpus
from sharding.delayed import train_delayed
from sharding.optimizers import MuonAdamW, is_muon_param
from sharding.pipeline import LocalPipeline
from sharding.stage import build_model
from sharding.train import OptimConfig, accumulate_step, make_optimizer, optimizer_step, train_reference

MUON = OptimConfig(lr=1e-2, warmup_steps=2, optimizer="muon")


def _params_of(opt: MuonAdamW, part: type) -> set[int]:
    return {id(p) for inner in opt.parts if isinstance(inner, part) for g in inner.param_groups for p in g["params"]}


def test_blocks_matrices_go_to_muon_and_the_rest_to_adamw() -> None:
    model = build_model(PRESETS["tiny"])
    opt = make_optimizer(model, MUON)
    assert isinstance(opt, MuonAdamW)
    muon, adamw = _params_of(opt, torch.optim.Muon), _params_of(opt, torch.optim.AdamW)
    names = dict(model.named_parameters())
    assert {id(p) for n, p in names.items() if n.startswith("blocks.") and p.dim() == 2} == muon
    assert {id(names[n]) for n in ("embed.weight", "lm_head.weight", "norm_f.weight", "blocks.0.ln1.weight")} <= adamw
    assert muon | adamw == {id(p) for p in model.parameters()} and not muon & adamw
    assert not is_muon_param("embed.weight", names["embed.weight"])
    # one set of groups: the scheduled lr reaches both parts
    assert {g["lr"] for g in opt.param_groups} == {MUON.lr}


def test_a_saved_and_loaded_optimiser_continues_bit_for_bit() -> None:
    corpus, cfg = load_corpus("synthetic"), PRESETS["tiny"]
    torch.manual_seed(0)
    a = build_model(cfg)
    opt_a = make_optimizer(a, MUON)
    for k in range(3):
        accumulate_step(a, corpus, k, 2, 2, 0)
        optimizer_step(a, opt_a, k, MUON)
    saved = copy.deepcopy(opt_a.state_dict())
    assert {"momentum_buffer"} == set(saved["state"][0]) and {"exp_avg", "exp_avg_sq", "step"} == set(
        saved["state"][len(saved["state"]) - 1])
    b, c = copy.deepcopy(a), copy.deepcopy(a)
    opt_b, opt_c = make_optimizer(b, MUON), make_optimizer(c, MUON)
    opt_b.load_state_dict(saved)  # c keeps a fresh optimiser: its momentum and moments start at zero
    for k in range(3, 6):
        la, lb = (accumulate_step(m, corpus, k, 2, 2, 0) for m in (a, b))
        accumulate_step(c, corpus, k, 2, 2, 0)
        for m, o in ((a, opt_a), (b, opt_b), (c, opt_c)):
            optimizer_step(m, o, k, MUON)
        assert la == lb
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters(), strict=True))


def test_muon_trains_differently_from_adamw_and_both_learn() -> None:
    corpus, cfg = load_corpus("synthetic"), PRESETS["tiny"]
    torch.manual_seed(0)
    muon = train_reference(cfg, MUON, 8, 2, 2, corpus)
    torch.manual_seed(0)
    adamw = train_reference(cfg, OptimConfig(lr=1e-2, warmup_steps=2), 8, 2, 2, corpus)
    assert muon[0] == pytest.approx(adamw[0])  # the same initial weights and data
    assert muon[1:] != pytest.approx(adamw[1:], abs=1e-3)
    assert muon[-1] < muon[0] - 0.5 and all(math.isfinite(x) for x in muon)


@pytest.mark.parametrize("stages", [2, 3])
def test_split_pipeline_with_muon_equals_single_process(stages: int) -> None:
    # Muon orthogonalises each matrix on its own, so per-stage optimisers reproduce the whole model's
    cfg, corpus = PRESETS["tiny"], load_corpus("synthetic")
    torch.manual_seed(0)
    want = train_reference(cfg, MUON, 4, 2, 2, corpus)
    torch.manual_seed(0)
    pipe = LocalPipeline(cfg, stages, "dense", MUON)
    got = [pipe.train_step(k, corpus, 2, 2) for k in range(4)]
    assert got == pytest.approx(want, abs=1e-5)


def test_delayed_muon_with_zero_staleness_is_the_synchronous_run() -> None:
    cfg, corpus = PRESETS["tiny"], load_corpus("synthetic")
    torch.manual_seed(0)
    sync = train_reference(cfg, MUON, 4, 2, 2, corpus)
    torch.manual_seed(0)
    assert train_delayed(cfg, MUON, 4, 2, 2, corpus, 0) == pytest.approx(sync, abs=1e-6)
    torch.manual_seed(0)
    assert train_delayed(cfg, MUON, 4, 2, 2, corpus, 1, lookahead=2.0)[1:] != pytest.approx(sync[1:], abs=1e-4)


@pytest.mark.parametrize(("kwargs", "field"), [({"optimizer": "sgd"}, "optimizer='sgd' is unknown"),
                                               ({"muon_momentum": 1.0}, "muon_momentum"),
                                               ({"muon_momentum": math.nan}, "muon_momentum")])
def test_bad_optimizer_settings_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        OptimConfig(**kwargs).validate()
