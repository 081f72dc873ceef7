"""Dense bf16 contributions (`replica_averaging = dense-bf16`): half the bytes of fp32, every replica (the
sender too) combines the same rounded values, NaN/Inf and wrong sizes are refused over real libp2p hosts
(counted against the sender, nothing stored), and the spec and node options."""

from __future__ import annotations

import pytest
import torch

from node.config import NodeConfig
from node.errors import AveragingError
from node.replicas.averaging import ContributionCodec, combine
from pmn.errors import ConfigError
from pmn.spec import proposal_from_dict
from tests.node.avg_pushes import assert_bad_pushes_keep_the_store

SHAPES = [(64, 64), (63,)]  # an odd value count: the last word is zero-padded


def _codec() -> ContributionCodec:
    return ContributionCodec(SHAPES, "dense-bf16")


def test_bf16_words_are_half_of_fp32_and_every_replica_combines_the_rounded_values() -> None:
    c, fp32 = _codec(), ContributionCodec(SHAPES, "dense")
    assert c.tag == "dense-bf16" and c.compressed and not fp32.compressed
    assert c.size == fp32.size == 64 * 64 + 63 and c.words == (c.size + 1) // 2 and c.ratio == pytest.approx(2, rel=1e-3)
    grads = [torch.randn(c.size, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    words = [c.encode(g) for g in grads]
    assert all(w.dtype == torch.float32 and w.shape == (c.words,) for w in words)
    for g, w in zip(grads, words, strict=True):
        c.check(w)
        dense = c.decode(w)
        assert torch.equal(dense, g.to(torch.bfloat16).float())  # rounded once, to the nearest bf16
        assert not torch.equal(dense, g)
    # the sender combines its own words like any receiver: replicas apply bit-identical updates
    mine = combine(words, 4, "mean", c)
    theirs = combine([w.clone() for w in words], 4, "mean", _codec())
    assert torch.equal(mine, theirs)
    assert torch.allclose(mine, torch.stack(grads).sum(0), atol=0.05)
    # a dense fp32 contribution is refused where the spec says bf16 (its size gives it away)
    with pytest.raises(AveragingError, match=r"dense-bf16 contribution has shape"):
        c.check(grads[0])


def test_bf16_check_refuses_nan_and_inf_and_combine_leaves_them_out() -> None:
    c = _codec()
    good = [c.encode(torch.randn(c.size)) for _ in range(3)]
    for value in ("nan", "inf", "-inf"):
        bad = good[0].clone().view(torch.bfloat16)
        bad[17] = float(value)
        with pytest.raises(AveragingError, match=r"1 non-finite value"):
            c.check(bad.view(torch.float32))
        with pytest.raises(AveragingError, match="non-finite"):
            c.decode(bad.view(torch.float32))
        # a contribution that does not decode is left out of the combine; the others count
        assert torch.equal(combine([*good, bad.view(torch.float32)], 4, "mean", c), combine(good, 4, "mean", c))


@pytest.mark.network
@pytest.mark.timeout(60)
def test_bad_bf16_pushes_are_refused_counted_and_nothing_is_stored() -> None:
    c = _codec()
    good = c.encode(torch.randn(c.size))
    nan = good.clone().view(torch.bfloat16)
    nan[5] = float("nan")
    fp32 = torch.randn(c.size)
    assert_bad_pushes_keep_the_store(c, good, [
        (nan.view(torch.float32), c.tag, "non-finite"),  # NaN in one value
        (fp32, "dense", "encoded as"),  # fp32 values, declared honestly
        (fp32, c.tag, "bytes"),  # fp32 values under the bf16 tag: the size gives them away
    ], seeds=(171, 172))


def test_spec_and_node_options_for_dense_bf16() -> None:
    base = proposal_from_dict({"model": {"preset": "tiny"}})
    bf16 = proposal_from_dict({"model": {"preset": "tiny"}, "training": {"replica_averaging": "dense-bf16"}})
    bf16.training.validate(bf16.model)
    assert b'"replica_averaging":"dense-bf16"' in bf16.canonical_json()
    assert bf16.content_hash() != base.content_hash() and b"replica_averaging" not in base.canonical_json()
    with pytest.raises(ConfigError, match="replica_averaging='bf16': use dense, dense-bf16 or powersgd"):
        proposal_from_dict({"model": {"preset": "tiny"}, "training": {"replica_averaging": "bf16"}})
    cfg = NodeConfig()
    cfg.runtime.replica_averaging = "dense-bf16"
    cfg.validate()
    cfg.runtime.replica_averaging = "fp8"
    with pytest.raises(ValueError, match="runtime.replica_averaging"):
        cfg.validate()
    with pytest.raises(AveragingError, match="replica_averaging='fp8'"):
        ContributionCodec(SHAPES, "fp8")
