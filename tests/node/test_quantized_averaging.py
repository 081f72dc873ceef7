"""int8 and int4 PowerSGD contributions (`powersgd_bits = 8 | 4`): the codec's words, its checks, bad pushes over
real libp2p hosts (refused, counted against the sender, nothing stored), and the spec and node options."""

from __future__ import annotations

import pytest
import torch

from node.config import NodeConfig
from node.errors import AveragingError
from node.replicas.averaging import (
    ContributionCodec,
    combine,
)
from pmn.spec import proposal_from_dict
from tests.node.avg_pushes import assert_bad_pushes_keep_the_store

SHAPES = [(64, 64), (64,), (256, 64), (64, 256)]


def _codec(bits: int = 8, rank: int = 4, seed: int = 0) -> ContributionCodec:
    return ContributionCodec(SHAPES, "powersgd", rank, seed, bits)


def _scale_byte(c: ContributionCodec, i: int) -> int:
    """Byte offset of scale `i` inside a contribution's words (the codes first, then the bf16 scales)."""
    return c.code_bytes + 2 * i


@pytest.mark.parametrize(("bits", "top", "below"), [(8, 127, 16), (4, 7, 8)])
def test_quantized_words_shrink_and_decode_alike_on_every_replica(bits: int, top: int, below: int) -> None:
    c, wider = _codec(bits), _codec(below)  # int8 against bf16, int4 against int8
    assert c.tag == f"powersgd-r4-int{bits}" and c.values == wider.values  # the same factors
    assert c.code_bytes == (c.values if bits == 8 else (c.values + 1) // 2)  # int4: two codes to a byte
    assert c.words == (c.code_bytes + 2 * 2 * 4 * 3 + 2 + 3) // 4  # codes + bf16 scales (P, Q columns; one dense)
    assert c.ratio > 1.8 * wider.ratio
    grad = torch.randn(c.size, generator=torch.Generator().manual_seed(0))
    words = c.encode(grad)
    assert words.dtype == torch.float32 and words.shape == (c.words,)
    c.check(words)
    dense = c.decode(words)
    assert torch.equal(dense, _codec(bits).decode(words.clone()))  # a receiver decodes what the sender sent
    assert c.encoder is not None and torch.allclose(dense + c.encoder.error, grad, atol=1e-5)  # EF keeps the rest
    # the 64 norm gains are rounded to 2 top + 1 levels of their absmax, no finer than the next wider codes
    err, gains = float((dense[4096:4160] - grad[4096:4160]).abs().max()), float(grad[4096:4160].abs().max())
    assert err <= 0.51 * gains / top
    assert not torch.equal(dense, wider.decode(wider.encode(grad)))
    for bad in (2, 12, 32):
        with pytest.raises(AveragingError, match="powersgd_bits"):
            ContributionCodec(SHAPES, "powersgd", 4, 0, bad)


def test_int4_check_refuses_the_code_minus_8_bad_scales_and_int8_words() -> None:
    c = _codec(4)
    words = c.encode(torch.randn(c.size))
    raw = words.view(torch.uint8)
    bad = raw.clone()
    bad[5] = (int(bad[5]) & 0x0F) | 0x80  # the high nibble of byte 5 is 8: the code -8, outside -7 .. 7
    for fn in (c.check, c.decode):
        with pytest.raises(AveragingError, match=r"outside -7 \.\. 7"):
            fn(bad.view(torch.float32))
    bad = raw.clone()
    at = _scale_byte(c, 2)
    bad[at: at + 2] = torch.tensor([float("nan")], dtype=torch.bfloat16).view(torch.uint8)
    with pytest.raises(AveragingError, match="non-finite"):
        c.check(bad.view(torch.float32))
    with pytest.raises(AveragingError, match="shape"):
        c.check(_codec(8).encode(torch.randn(c.size)))  # int8 words where the spec says int4


def test_int8_check_refuses_bad_scales_codes_and_sizes() -> None:
    c = _codec()
    words = c.encode(torch.randn(c.size))
    raw = words.view(torch.uint8)
    for value, why in (("nan", "non-finite"), ("inf", "non-finite"), ("-1", "negative")):
        bad = raw.clone()
        at = _scale_byte(c, 3)
        bad[at: at + 2] = torch.tensor([float(value)], dtype=torch.bfloat16).view(torch.uint8)
        with pytest.raises(AveragingError, match=why):
            c.check(bad.view(torch.float32))
        with pytest.raises(AveragingError, match=why):
            c.decode(bad.view(torch.float32))
    bad = raw.clone()
    bad[0] = 128  # int8 -128
    with pytest.raises(AveragingError, match=r"outside -127 \.\. 127"):
        c.check(bad.view(torch.float32))
    with pytest.raises(AveragingError, match=r"shape \("):
        c.check(words[:-1])
    with pytest.raises(AveragingError, match="shape"):
        c.check(_codec(16).encode(torch.randn(c.size)))  # bf16 words where the spec says int8
    good = [c.encode(torch.randn(c.size)) for _ in range(3)]
    nan = raw.clone()
    nan[_scale_byte(c, 0): _scale_byte(c, 0) + 2] = torch.tensor([float("nan")], dtype=torch.bfloat16).view(torch.uint8)
    # a contribution that does not decode is left out of the combine; the others count
    assert torch.allclose(combine([*good, nan.view(torch.float32)], 4, "mean", c), combine(good, 4, "mean", c))


@pytest.mark.network
@pytest.mark.timeout(60)
@pytest.mark.parametrize("bits", [8, 4])
def test_bad_quantized_pushes_are_refused_counted_and_nothing_is_stored(bits: int) -> None:
    c = _codec(bits)
    good = _codec(bits, seed=1).encode(torch.randn(c.size))
    raw = good.view(torch.uint8).clone()
    raw[_scale_byte(c, 1): _scale_byte(c, 1) + 2] = torch.tensor([float("inf")], dtype=torch.bfloat16).view(torch.uint8)
    out_of_range = good.view(torch.uint8).clone()
    out_of_range[0] = 0x80 if bits == 8 else 0x08  # int8: the code -128; int4: a low nibble of 8, the code -8
    bf16 = _codec(16).encode(torch.randn(c.size))
    assert_bad_pushes_keep_the_store(c, good, [
        (raw.view(torch.float32), c.tag, "non-finite"),  # Inf in a column scale
        (out_of_range.view(torch.float32), c.tag, "outside"),  # a code the sender's quantiser never makes
        (bf16, "powersgd-r4-bf16", "encoded as"),  # bf16 factors, declared honestly
        (bf16, c.tag, "bytes"),  # bf16 factors under the int8 / int4 tag: the size gives them away
    ], seeds=(161 + bits, 162 + bits))


def test_spec_and_node_options_for_int8_factors() -> None:
    base = proposal_from_dict({"model": {"preset": "tiny"}, "training": {"replica_averaging": "powersgd"}})
    same = proposal_from_dict({"model": {"preset": "tiny"},
                               "training": {"replica_averaging": "powersgd", "powersgd_bits": 16}})
    assert same.content_hash() == base.content_hash()  # 16 (bf16) is the old behaviour: old hashes hold
    assert b"powersgd_bits" not in base.canonical_json()
    int8 = proposal_from_dict({"model": {"preset": "tiny"},
                               "training": {"replica_averaging": "powersgd", "powersgd_bits": 8}})
    assert b'"powersgd_bits":8' in int8.canonical_json() and int8.content_hash() != base.content_hash()
    int4 = proposal_from_dict({"model": {"preset": "tiny"},
                               "training": {"replica_averaging": "powersgd", "powersgd_bits": 4}})
    assert b'"powersgd_bits":4' in int4.canonical_json() and int4.content_hash() != int8.content_hash()
    for bad in (2, 8.0, True):
        with pytest.raises(Exception, match="powersgd_bits"):
            proposal_from_dict({"model": {"preset": "tiny"}, "training": {"powersgd_bits": bad}}).training.validate(
                base.model)
    cfg = NodeConfig()
    cfg.runtime.powersgd_bits = 4
    cfg.validate()
    cfg.runtime.powersgd_bits = 2
    with pytest.raises(ValueError, match="runtime.powersgd_bits"):
        cfg.validate()
