import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sharding.codecs import (
    CODEC_NAMES,
    SubspaceCodec,
    SubspaceFp32Codec,
    SubspaceInt8Codec,
    get_codec,
    token_id_bytes,
)
from sharding.config import PRESETS
from sharding.errors import CodecError, ShardingError
from sharding.subspace import from_subspace

DENSE_CFG = dataclasses.replace(PRESETS["tiny"], d_model=32, n_heads=2, seq_len=16)
SUB_CFG = dataclasses.replace(DENSE_CFG, subspace_rank=4)
FAST = settings(max_examples=40, deadline=None)


def _tensor(seed: int, shape: tuple[int, ...], scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


shapes = st.tuples(st.integers(1, 4), st.integers(1, 16))
scales = st.sampled_from([1e-6, 1e-2, 1.0, 30.0, 1e4])


@FAST
@given(shape=shapes, seed=st.integers(0, 2**31), scale=scales)
def test_dense_round_trip_is_exact(shape, seed, scale):
    codec = get_codec("dense", DENSE_CFG)
    ids = torch.zeros(shape, dtype=torch.long)
    h = _tensor(seed, (*shape, 32), scale)
    payload = codec.encode_activation(h, ids)
    assert len(payload) == codec.bytes_per_token * shape[0] * shape[1] == 128 * shape[0] * shape[1]
    assert torch.equal(codec.decode_activation(payload, ids), h)
    assert torch.equal(codec.decode_gradient(codec.encode_gradient(h, ids), ids), h)


@FAST
@given(shape=shapes, seed=st.integers(0, 2**31), scale=scales)
def test_bf16_round_trip_within_bf16_precision(shape, seed, scale):
    codec = get_codec("bf16", DENSE_CFG)
    ids = torch.zeros(shape, dtype=torch.long)
    h = _tensor(seed, (*shape, 32), scale)
    out = codec.decode_activation(codec.encode_activation(h, ids), ids)
    assert out.dtype == torch.float32 and out.shape == h.shape
    assert bool(((out - h).abs() <= h.abs() * 2**-8).all())
    assert codec.bytes_per_token == 64


@FAST
@given(shape=shapes, seed=st.integers(0, 2**31), scale=scales)
def test_int8_round_trip_within_half_step(shape, seed, scale):
    codec = get_codec("int8", DENSE_CFG)
    ids = torch.zeros(shape, dtype=torch.long)
    h = _tensor(seed, (*shape, 32), scale)
    payload = codec.encode_gradient(h, ids)
    assert len(payload) == (32 + 4) * shape[0] * shape[1]
    out = codec.decode_gradient(payload, ids)
    step = h.abs().amax(dim=-1, keepdim=True) / 127.0
    # half a step, plus fp32 rounding of values up to 127 steps large (a few ulps of 127 steps, < 1e-4 step)
    assert bool(((out - h).abs() <= step * (0.5 + 1e-4)).all())


@FAST
@given(
    shape=shapes,
    seed=st.integers(0, 2**31),
    scale=st.sampled_from([1e-2, 1.0, 30.0]),
    name=st.sampled_from(["subspace", "subspace-fp32", "subspace-int8"]),
)
def test_subspace_round_trip_of_states_in_the_subspace(shape, seed, scale, name):
    codec = get_codec(name, SUB_CFG)
    assert isinstance(codec, (SubspaceCodec, SubspaceFp32Codec, SubspaceInt8Codec))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, SUB_CFG.vocab_size, shape, generator=g)
    z = _tensor(seed + 1, (*shape, 4), scale)
    h = from_subspace(z, ids, codec.u, codec.e_fixed)
    payload = codec.encode_activation(h, ids)
    assert len(payload) == codec.bytes_per_token * shape[0] * shape[1]
    out = codec.decode_activation(payload, ids)
    zmax = z.abs().amax(dim=-1, keepdim=True)
    tol = {"subspace": 2**-8, "subspace-fp32": 1e-5, "subspace-int8": 2**-8 + 0.5 / 127 * 2}[name]
    # error lies in span(U) and is bounded by the wire precision of z
    err = (out - h).norm(dim=-1, keepdim=True)
    assert bool((err <= tol * zmax * 2 + 1e-4 * (1 + h.abs().amax(dim=-1, keepdim=True))).all())
    # gradients: the decoded gradient is the projection U U^T g
    gr = _tensor(seed + 2, (*shape, 32), scale)
    gout = codec.decode_gradient(codec.encode_gradient(gr, ids), ids)
    proj = gr @ codec.u @ codec.u.t()
    gtol = tol * (gr @ codec.u).abs().amax(dim=-1, keepdim=True) * 2 + 1e-6
    assert bool(((gout - proj).norm(dim=-1, keepdim=True) <= gtol).all())


def test_subspace_bytes_per_token_meet_100x_at_bench_width():
    cfg = PRESETS["bench-subspace"]
    codec = get_codec("subspace", cfg)
    dense = get_codec("dense", cfg)
    assert cfg.subspace_rank is not None
    assert codec.bytes_per_token == 2 * cfg.subspace_rank
    ratio = (dense.bytes_per_token + token_id_bytes(cfg)) / (codec.bytes_per_token + token_id_bytes(cfg))
    assert ratio >= 100


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_bad_inputs_raise_codec_error(name):
    codec = get_codec(name, SUB_CFG)
    ids = torch.zeros(2, 3, dtype=torch.long)
    good = torch.zeros(2, 3, 32)
    with pytest.raises(CodecError, match="shape"):
        codec.encode_activation(torch.zeros(2, 3, 31), ids)
    with pytest.raises(CodecError, match="shape"):
        codec.encode_gradient(torch.zeros(6, 32), ids)
    with pytest.raises(CodecError, match="float32"):
        codec.encode_activation(good.double(), ids)
    with pytest.raises(CodecError, match="float32"):
        codec.encode_gradient(good.to(torch.bfloat16), ids)
    for bad in (float("nan"), float("inf"), float("-inf")):
        h = good.clone()
        h[1, 2, 5] = bad
        with pytest.raises(CodecError, match="NaN or Inf"):
            codec.encode_activation(h, ids)
        with pytest.raises(CodecError, match="NaN or Inf"):
            codec.encode_gradient(h, ids)
    with pytest.raises(CodecError, match="ids"):
        codec.encode_activation(good, ids.float())
    with pytest.raises(CodecError, match="ids"):
        codec.encode_activation(good, torch.zeros(2, 3, 1, dtype=torch.long))
    payload = codec.encode_activation(good, ids)
    with pytest.raises(CodecError, match="bytes"):
        codec.decode_activation(payload[:-1], ids)
    with pytest.raises(CodecError, match="bytes"):
        codec.decode_gradient(payload + b"\x00", ids)
    with pytest.raises(CodecError, match="bytes"):
        codec.decode_activation("text", ids)  # type: ignore[arg-type]
    assert isinstance(CodecError("x"), ShardingError)


def test_decoded_nan_payload_rejected():
    codec = get_codec("dense", DENSE_CFG)
    ids = torch.zeros(1, 1, dtype=torch.long)
    payload = torch.full((1, 1, 32), float("nan")).numpy().tobytes()
    with pytest.raises(CodecError, match="NaN or Inf"):
        codec.decode_activation(payload, ids)


def test_unknown_codec_and_subspace_needs_rank():
    with pytest.raises(CodecError, match="unknown codec"):
        get_codec("zstd", DENSE_CFG)
    with pytest.raises(CodecError, match="subspace_rank"):
        get_codec("subspace", DENSE_CFG)


def test_subspace_ids_out_of_range():
    codec = get_codec("subspace", SUB_CFG)
    with pytest.raises(CodecError, match="ids must lie"):
        codec.encode_activation(torch.zeros(1, 2, 32), torch.tensor([[0, 256]]))
