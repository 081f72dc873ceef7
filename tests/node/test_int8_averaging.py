"""int8 PowerSGD contributions (`powersgd_bits = 8`): the codec's words, its checks, bad pushes over real
libp2p hosts (refused, counted against the sender, nothing stored), and the spec and node options."""

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
    """Byte offset of scale `i` inside a contribution's words (int8 codes first, then the bf16 scales)."""
    return c.values + 2 * i


def test_int8_words_are_half_of_bf16_and_decode_alike_on_every_replica() -> None:
    c8, c16 = _codec(8), _codec(16)
    assert c8.tag == "powersgd-r4-int8" and c16.tag == "powersgd-r4-bf16"
    assert c8.values == c16.values  # the same factors
    assert c8.words == (c8.values + 2 * 2 * 4 * 3 + 2 + 3) // 4  # codes + bf16 scales (P, Q columns; one dense)
    assert c8.ratio > 1.9 * c16.ratio
    grad = torch.randn(c8.size, generator=torch.Generator().manual_seed(0))
    words = c8.encode(grad)
    assert words.dtype == torch.float32 and words.shape == (c8.words,)
    c8.check(words)
    dense = c8.decode(words)
    assert torch.equal(dense, _codec(8).decode(words.clone()))  # a receiver decodes what the sender sent
    assert c8.encoder is not None and torch.allclose(dense + c8.encoder.error, grad, atol=1e-5)  # EF keeps the rest
    # the 64 norm gains are rounded to 255 levels of their absmax
    assert float((dense[4096:4160] - grad[4096:4160]).abs().max()) <= 0.51 * float(grad[4096:4160].abs().max()) / 127
    with pytest.raises(AveragingError, match="powersgd_bits"):
        ContributionCodec(SHAPES, "powersgd", 4, 0, 4)


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
    with pytest.raises(AveragingError, match="-128"):
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
def test_bad_int8_pushes_are_refused_counted_and_nothing_is_stored() -> None:
    c = _codec()
    good = _codec(seed=1).encode(torch.randn(c.size))
    raw = good.view(torch.uint8).clone()
    raw[_scale_byte(c, 1): _scale_byte(c, 1) + 2] = torch.tensor([float("inf")], dtype=torch.bfloat16).view(torch.uint8)
    bf16 = _codec(16).encode(torch.randn(c.size))
    assert_bad_pushes_keep_the_store(c, good, [
        (raw.view(torch.float32), c.tag, "non-finite"),  # Inf in a column scale
        (bf16, "powersgd-r4-bf16", "encoded as"),  # bf16 factors, declared honestly
        (bf16, c.tag, "bytes"),  # bf16 factors under the int8 tag: the size gives them away
    ], seeds=(161, 162))


def test_spec_and_node_options_for_int8_factors() -> None:
    base = proposal_from_dict({"model": {"preset": "tiny"}, "training": {"replica_averaging": "powersgd"}})
    same = proposal_from_dict({"model": {"preset": "tiny"},
                               "training": {"replica_averaging": "powersgd", "powersgd_bits": 16}})
    assert same.content_hash() == base.content_hash()  # 16 (bf16) is the old behaviour: old hashes hold
    assert b"powersgd_bits" not in base.canonical_json()
    int8 = proposal_from_dict({"model": {"preset": "tiny"},
                               "training": {"replica_averaging": "powersgd", "powersgd_bits": 8}})
    assert b'"powersgd_bits":8' in int8.canonical_json() and int8.content_hash() != base.content_hash()
    for bad in (4, 8.0, True):
        with pytest.raises(Exception, match="powersgd_bits"):
            proposal_from_dict({"model": {"preset": "tiny"}, "training": {"powersgd_bits": bad}}).training.validate(
                base.model)
    cfg = NodeConfig()
    cfg.runtime.powersgd_bits = 4
    with pytest.raises(ValueError, match="runtime.powersgd_bits"):
        cfg.validate()
