import dataclasses

import pytest
import torch

from sharding.codecs import SubspaceCodec
from sharding.config import PRESETS
from sharding.data import load_corpus
from sharding.errors import StageError
from sharding.model import Block
from sharding.partition import partition
from sharding.pipeline import LocalPipeline
from sharding.stage import build_model, build_stage
from sharding.subspace import off_subspace_residual
from sharding.train import OptimConfig

SUB = PRESETS["tiny-subspace"]
SUB_NO_FREE = dataclasses.replace(SUB, free_tail_layers=0)


def _window(cfg, b=3, seed=0):
    return load_corpus("synthetic").batch("train", seed, 0, b, cfg.seq_len, 0)


@pytest.mark.parametrize("cfg", [PRESETS["tiny"], SUB], ids=["dense", "subspace"])
def test_stage_holds_only_its_shard_and_union_is_the_model(cfg):
    full = build_model(cfg).state_dict()
    union: dict[str, torch.Tensor] = {}
    for spec in partition(cfg, 3):
        sd = build_stage(cfg, spec).state_dict()
        for name in sd:
            if name.startswith("blocks."):
                assert spec.block_start <= int(name.split(".")[1]) < spec.block_end
            assert name.startswith("blocks.") or (name.startswith("embed") == spec.has_embedding)
        assert not set(sd) & set(union)
        union.update(sd)
    assert set(union) == set(full)
    for name, t in full.items():
        assert torch.equal(union[name], t), name


@pytest.mark.parametrize("p", [1, 2, 3, 4])
@pytest.mark.parametrize(
    ("cfg", "codec"),
    [(PRESETS["tiny"], "dense"), (SUB, "dense"), (SUB, "subspace-fp32"), (SUB_NO_FREE, "subspace-fp32")],
    ids=["dense", "subspace-dense-wire", "subspace-fp32", "subspace-nofree"],
)
def test_split_equals_unsplit_loss_and_grads(cfg, codec, p):
    window = _window(cfg)
    model = build_model(cfg)
    loss = model(window[:, :-1], targets=window[:, 1:])
    loss.backward()
    pipe = LocalPipeline(cfg, p, codec)
    split_loss = pipe.forward_backward(window)
    assert abs(split_loss - float(loss.detach())) <= 1e-5
    grads = {n: prm.grad for st in pipe.stages for n, prm in st.named_parameters()}
    ref = dict(model.named_parameters())
    assert set(grads) == set(ref)
    for name, prm in ref.items():
        torch.testing.assert_close(grads[name], prm.grad, atol=1e-5, rtol=0, msg=name)


def test_split_training_matches_unsplit_over_steps():
    corpus = load_corpus("synthetic")
    optim = OptimConfig(lr=3e-3, warmup_steps=2)
    from sharding.train import train_reference

    ref = train_reference(SUB, optim, 4, 2, 2, corpus)
    pipe = LocalPipeline(SUB, 3, "subspace-fp32", optim)
    got = [pipe.train_step(s, corpus, 2, 2) for s in range(4)]
    assert max(abs(a - b) for a, b in zip(ref, got, strict=True)) <= 1e-5


def test_subspace_invariant_holds_after_training():
    corpus = load_corpus("synthetic")
    pipe = LocalPipeline(SUB, 2, "subspace", OptimConfig(lr=1e-2, warmup_steps=1))
    for s in range(5):
        pipe.train_step(s, corpus, 1, 4)
    window = _window(SUB, seed=7)
    ids = window[:, :-1]
    assert isinstance(pipe.codec, SubspaceCodec)
    u, e = pipe.codec.u, pipe.codec.e_fixed
    stage0 = pipe.stages[0]
    assert stage0.embed is not None
    with torch.no_grad():
        x = stage0.embed(ids) + e[ids]
        assert off_subspace_residual(x, ids, u, e) < 1e-5
        checked = 0
        for st in pipe.stages:
            if st is not stage0:
                x = pipe.codec.decode_activation(pipe.codec.encode_activation(x, ids), ids)
            for key, block in st.blocks.items():
                x = block(x, st.rope_cos, st.rope_sin)  # raw block output, before re-expression
                if SUB.is_constrained(int(key)):
                    assert off_subspace_residual(x, ids, u, e) < 1e-5, key
                    checked += 1
    assert checked == SUB.n_layers - SUB.free_tail_layers
    # weights that write into the stream stay in span(U)
    for st in pipe.stages:
        for key, block in st.blocks.items():
            if SUB.is_constrained(int(key)):
                assert isinstance(block, Block)
                w = block.attn.proj.weight
                assert (w - u @ (u.t() @ w)).abs().max() < 1e-5


def test_bad_stage_inputs():
    specs = partition(PRESETS["tiny"], 2)
    head, tail = (build_stage(PRESETS["tiny"], s) for s in specs)
    ids = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(StageError, match="torch.long"):
        head(ids.to(torch.int32))
    with pytest.raises(StageError, match="seq_len"):
        head(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(StageError, match="vocab_size"):
        head(ids + 300)
    with pytest.raises(StageError, match="pass the boundary state"):
        tail(ids)
    with pytest.raises(StageError, match="shape"):
        tail(ids, torch.zeros(2, 8, 32))
    with pytest.raises(StageError, match="no targets"):
        head(ids, targets=ids)
    assert tail(ids, head(ids)).shape == (2, 8, 256)
