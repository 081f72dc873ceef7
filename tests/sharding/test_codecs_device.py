"""Codecs with autocast outputs and explicit devices: same wire bytes, no silent casts."""

from __future__ import annotations

import pytest
import torch

from sharding.codecs import CODEC_NAMES, get_codec
from sharding.config import ModelConfig
from sharding.errors import CodecError

SUB_CFG = ModelConfig(vocab_size=64, seq_len=8, d_model=32, n_layers=2, n_heads=4, subspace_rank=8,
                      free_tail_layers=1)


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_low_precision_inputs_encode_like_their_fp32_values(name):
    strict = get_codec(name, SUB_CFG)
    codec = get_codec(name, SUB_CFG, low_precision_inputs=True)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    h = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(1))
    for dtype in (torch.bfloat16, torch.float16):
        low = h.to(dtype)
        assert codec.encode_activation(low, ids) == strict.encode_activation(low.float(), ids)
        assert codec.encode_gradient(low, ids) == strict.encode_gradient(low.float(), ids)
        with pytest.raises(CodecError, match="float32"):
            strict.encode_activation(low, ids)
    with pytest.raises(CodecError, match="float64"):
        codec.encode_activation(h.double(), ids)  # narrowing fp64 would be a silent cast


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_decode_onto_an_explicit_device_is_the_same(name):
    codec = get_codec(name, SUB_CFG)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))
    h = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(3))
    payload = codec.encode_activation(h, ids)
    cpu = torch.device("cpu")
    assert torch.equal(codec.decode_activation(payload, ids, cpu), codec.decode_activation(payload, ids))
    g = codec.encode_gradient(h, ids)
    assert torch.equal(codec.decode_gradient(g, ids, cpu), codec.decode_gradient(g, ids))
    z = codec.wire_vectors(h, ids)
    assert z.shape == (2, 8, getattr(codec, "width", 32))
