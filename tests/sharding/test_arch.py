"""Architecture options: SwiGLU, grouped-query attention, QK-norm, tied embeddings, presets up to 8B class."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from sharding.codecs import SubspaceCodec
from sharding.config import OPTION_DEFAULTS, PRESETS, ModelConfig
from sharding.data import load_corpus
from sharding.flops import model_flops_per_token, param_count
from sharding.model import GPT, Block, CausalSelfAttention, SwiGLU, apply_rope, rope_tables
from sharding.partition import check_spec, partition
from sharding.pipeline import LocalPipeline
from sharding.stage import build_model, build_stage
from sharding.stagespec import StageSpec
from sharding.subspace import off_subspace_residual
from sharding.train import OptimConfig

LLAMA = PRESETS["tiny-llama"]
LLAMA_SUB = PRESETS["tiny-llama-subspace"]
TIED = dataclasses.replace(LLAMA, tie_embeddings=True)


def _window(cfg, b=3, seed=0):
    return load_corpus("synthetic").batch("train", seed, 0, b, cfg.seq_len, 0)


def test_existing_spec_hashes_are_unchanged():
    # the hashes before the options existed: registered specs and checkpoints keep matching
    assert PRESETS["tiny"].spec_hash().hex() == "4447d92dc9c572b369b362ff78a845f1851b54858763f6b8a767f0c28c865b90"
    assert PRESETS["tiny-subspace"].spec_hash().hex() == (
        "cca6e5740c036e201322ee8080e10d76610a03ecb3619607db749c84e3d95e66")
    assert not set(PRESETS["bench"].to_dict()) & set(OPTION_DEFAULTS)


@pytest.mark.parametrize("change", [{"mlp": "swiglu"}, {"n_kv_heads": 2}, {"qk_norm": True},
                                    {"tie_embeddings": True}, {"mlp_hidden": 100}])
def test_each_option_is_in_the_dict_and_the_hash(change):
    cfg = dataclasses.replace(PRESETS["tiny"], **change).validate()
    assert cfg.spec_hash() != PRESETS["tiny"].spec_hash()
    assert set(change) <= set(cfg.to_dict())
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("changes", "field"),
    [({"mlp": "relu"}, "ModelConfig.mlp='relu' is unknown: use one of gelu, swiglu"),
     ({"n_kv_heads": 3}, "n_kv_heads=3 does not divide n_heads=4"),
     ({"n_kv_heads": 0}, "n_kv_heads"),
     ({"mlp_hidden": 0}, "mlp_hidden"),
     ({"qk_norm": "yes"}, "qk_norm"),
     ({"tie_embeddings": 1}, "tie_embeddings")],
)
def test_bad_option_is_one_line_naming_the_field_before_any_weight(changes, field):
    cfg = dataclasses.replace(PRESETS["tiny"], **changes)
    with pytest.raises(ValueError, match=field) as err:
        GPT(cfg)
    assert "\n" not in str(err.value)


def test_defaults_build_the_model_of_before():
    # GELU MLP with fc (4d, d), fused qkv (3d, d), an untied head: the parameter names and shapes of before
    shapes = {n: tuple(p.shape) for n, p in build_model(PRESETS["tiny"]).named_parameters()}
    assert shapes["blocks.0.attn.qkv.weight"] == (192, 64) and shapes["blocks.0.mlp.fc.weight"] == (256, 64)
    assert shapes["lm_head.weight"] == (256, 64) and not any("q_norm" in n or "k_norm" in n for n in shapes)


def test_gqa_attention_equals_repeated_key_value_heads():
    torch.manual_seed(0)
    attn = CausalSelfAttention(LLAMA)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 16, LLAMA.d_model)
    cos, sin = rope_tables(LLAMA)
    got = attn(x, cos, sin)
    d, kv, hd = LLAMA.d_model, LLAMA.kv_heads * LLAMA.head_dim, LLAMA.head_dim
    q, k, v = attn.qkv(x).split([d, kv, kv], dim=-1)
    q = q.view(2, 16, 4, hd).transpose(1, 2)
    k = k.view(2, 16, 2, hd).transpose(1, 2)
    v = v.view(2, 16, 2, hd).transpose(1, 2)
    assert attn.q_norm is not None and attn.k_norm is not None
    q, k = apply_rope(attn.q_norm(q), cos, sin), apply_rope(attn.k_norm(k), cos, sin)
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)  # query heads 0,1 share kv head 0
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(got, attn.proj(y.transpose(1, 2).reshape(2, 16, d)))


def test_swiglu_is_gated():
    mlp = SwiGLU(LLAMA)
    torch.nn.init.normal_(mlp.fc.weight)
    torch.nn.init.normal_(mlp.proj.weight)
    x = torch.randn(3, LLAMA.d_model)
    gate, up = x @ mlp.fc.weight[:192].t(), x @ mlp.fc.weight[192:].t()
    torch.testing.assert_close(mlp(x), (F.silu(gate) * up) @ mlp.proj.weight.t())


@pytest.mark.parametrize("name", ["tiny", "tiny-subspace", "tiny-llama", "tiny-llama-subspace", "llama-125m"])
def test_param_count_matches_the_module(name):
    cfg = PRESETS[name]
    device = "meta" if name.startswith("llama") else "cpu"
    assert sum(p.numel() for p in GPT(cfg, device=device).parameters()) == param_count(cfg)
    specs = partition(cfg, 2)
    assert sum(param_count(cfg, s) for s in specs) == param_count(cfg)


def test_presets_sizes_and_the_8b_class_spec_partitions_without_allocating():
    assert 115e6 < param_count(PRESETS["llama-125m"]) < 135e6
    assert 320e6 < param_count(PRESETS["llama-350m"]) < 370e6
    assert 0.95e9 < param_count(PRESETS["llama-1b"]) < 1.2e9
    big = PRESETS["llama-8b"]
    assert (big.n_layers, big.d_model, big.n_heads, big.kv_heads, big.mlp) == (32, 4096, 32, 8, "swiglu")
    assert 7e9 < param_count(big) < 9e9
    for n in (4, 8, 32):
        specs = partition(big, n)
        assert [s.block_end - s.block_start for s in specs][0] >= 1 and specs[-1].block_end == 32
    meta = GPT(big, device="meta")  # shapes only: no storage
    assert all(p.is_meta for p in meta.parameters())
    assert sum(p.numel() for p in meta.parameters()) == param_count(big)
    assert model_flops_per_token(big) > 6 * 7e9  # 6 N per token, plus attention


def test_defaults_keep_the_flop_counts():
    # q, k, v, o = 4 d^2, GELU MLP = 2 r d^2, attention 2 T d: the counts compute units were credited with
    cfg = PRESETS["tiny"]
    d, r, t, v = cfg.d_model, cfg.mlp_ratio, cfg.seq_len, cfg.vocab_size
    assert model_flops_per_token(cfg) == 3 * (cfg.n_layers * (8 * d * d + 4 * r * d * d + 4 * t * d) + 2 * d * v)


@pytest.mark.parametrize("cfg", [LLAMA, LLAMA_SUB], ids=["llama", "llama-subspace"])
@pytest.mark.parametrize("p", [2, 3])
def test_split_equals_unsplit_with_llama_options(cfg, p):
    window = _window(cfg)
    model = build_model(cfg)
    loss = model(window[:, :-1], targets=window[:, 1:])
    loss.backward()
    pipe = LocalPipeline(cfg, p, "subspace-fp32" if cfg.is_subspace else "dense")
    assert abs(pipe.forward_backward(window) - float(loss.detach())) <= 1e-5
    grads = {n: prm.grad for st in pipe.stages for n, prm in st.named_parameters()}
    for name, prm in model.named_parameters():
        torch.testing.assert_close(grads[name], prm.grad, atol=1e-5, rtol=0, msg=name)


def test_tied_embeddings_share_one_matrix_on_one_stage():
    model = build_model(TIED)
    assert model.lm_head is None and "lm_head.weight" not in model.state_dict()
    assert param_count(TIED) == param_count(LLAMA) - TIED.vocab_size * TIED.d_model
    window = _window(TIED)
    ids, targets = window[:, :-1], window[:, 1:]
    loss = model(ids, targets=targets)
    assert model.embed is not None and model.norm_f is not None
    x = model.embed(ids)
    for block in model.blocks.values():
        x = block(x, model.rope_cos, model.rope_sin)
    want = F.cross_entropy((model.norm_f(x) @ model.embed.weight.t()).reshape(-1, TIED.vocab_size), targets.reshape(-1))
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert model.embed.weight.grad is not None
    # trains on one stage, loss goes down
    pipe = LocalPipeline(TIED, 1, "dense", OptimConfig(lr=1e-2, warmup_steps=1))
    corpus = load_corpus("synthetic")
    losses = [pipe.train_step(s, corpus, 1, 4) for s in range(6)]
    assert losses[-1] < losses[0]


def test_tied_embeddings_refuse_more_than_one_stage():
    with pytest.raises(ValueError, match="tie_embeddings.*use one stage or tie_embeddings = false"):
        partition(TIED, 2)
    with pytest.raises(ValueError, match="tie_embeddings"):
        check_spec(TIED, StageSpec(0, 2, 0, 2, True, False))
    with pytest.raises(ValueError, match="tie_embeddings"):
        build_stage(TIED, StageSpec(1, 2, 2, 4, False, True))


def test_tied_head_in_subspace_mode_is_the_whole_input_embedding():
    cfg = dataclasses.replace(LLAMA_SUB, tie_embeddings=True)
    model = build_model(cfg)
    assert model.e_fixed is not None and model.embed is not None
    torch.testing.assert_close(model.head_weight(), model.embed.weight + model.e_fixed)


def test_subspace_residual_stays_in_the_subspace_with_swiglu_and_gqa():
    cfg = LLAMA_SUB
    assert (cfg.mlp, cfg.kv_heads < cfg.n_heads, cfg.free_tail_layers) == ("swiglu", True, 2)
    corpus = load_corpus("synthetic")
    pipe = LocalPipeline(cfg, 2, "subspace", OptimConfig(lr=1e-2, warmup_steps=1))
    for s in range(5):
        pipe.train_step(s, corpus, 1, 4)
    window = _window(cfg, seed=7)
    ids = window[:, :-1]
    assert isinstance(pipe.codec, SubspaceCodec)
    u, e = pipe.codec.u, pipe.codec.e_fixed
    stage0 = pipe.stages[0]
    checked = 0
    with torch.no_grad():
        x = stage0.embed_tokens(ids)
        assert off_subspace_residual(x, ids, u, e) < 1e-5
        for st in pipe.stages:
            if st is not stage0:
                x = pipe.codec.decode_activation(pipe.codec.encode_activation(x, ids), ids)
            for key, block in st.blocks.items():
                x = block(x, st.rope_cos, st.rope_sin)  # raw block output, before re-expression
                if cfg.is_constrained(int(key)):
                    assert block.post_attn is not None and block.post_mlp is not None  # the weightless post-norms
                    assert off_subspace_residual(x, ids, u, e) < 1e-5, key
                    checked += 1
                else:
                    assert block.post_attn is None and block.post_mlp is None
    assert checked == cfg.n_layers - 2
    for st in pipe.stages:
        for key, block in st.blocks.items():
            if cfg.is_constrained(int(key)):
                assert isinstance(block, Block) and isinstance(block.mlp, SwiGLU)
                for w in (block.attn.proj.weight, block.mlp.proj.weight):  # attention out, SwiGLU down
                    assert (w - u @ (u.t() @ w)).abs().max() < 1e-5
    assert math.isfinite(pipe.evaluate(corpus, 1, 2))


@pytest.mark.parametrize("name", ["llama-125m", "llama-350m", "llama-1b", "llama-8b"])
def test_subspace_option_with_each_large_preset_validates_and_partitions(name):
    base = PRESETS[name]
    cfg = dataclasses.replace(base, subspace_rank=max(1, base.d_model // 100), free_tail_layers=2).validate()
    specs = partition(cfg, 4)
    assert specs[-1].block_start <= cfg.n_layers - 2  # the two free layers sit on the tail stage
    meta = GPT(cfg, device="meta")
    posts = [int(k) for k, b in meta.blocks.items() if b.post_attn is not None]
    assert posts == list(range(cfg.n_layers - 2))  # the weightless post-norm in every constrained block
