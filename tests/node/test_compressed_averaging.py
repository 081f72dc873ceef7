"""Compressed replica averaging (`replica_averaging = "powersgd"`): the codec, the store, bad contributions
over real libp2p hosts (refused, counted against the sender, the step goes on without them), the spec option."""

from __future__ import annotations

import pytest
import torch
import trio

from node.config import NodeConfig
from node.errors import AveragingError
from node.net.host import full_addrs
from node.net.peerscore import PeerGuardConfig
from node.replicas.averaging import (
    ContributionCodec,
    ContributionStore,
    combine,
    pull,
    push,
    trainable,
)
from pmn.spec import ModelProposal, TrainingRecipe, proposal_from_dict
from protocol.modelspec import TrainingSection, proposal_spec_hash
from sharding import PRESETS, build_stage, partition
from tests.node.avg_pushes import assert_pushes_refused, serve
from tests.node.conftest import running_host

SHAPES = [(64, 64), (64,), (256, 64), (64, 256)]


def _codec(rank: int = 4, method: str = "powersgd") -> ContributionCodec:
    return ContributionCodec(SHAPES, method, rank)


def test_codec_sizes_round_trip_and_the_tag_names_the_rank() -> None:
    c = _codec()
    assert c.compressed and c.tag == "powersgd-r4-bf16"
    assert c.size == 64 * 64 + 64 + 2 * 256 * 64
    assert c.values == 4 * 128 + 64 + 2 * 4 * 320 and c.words == (c.values + 1) // 2
    assert c.ratio > 20
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(c.size, generator=g)
    words = c.encode(grad)
    assert words.dtype == torch.float32 and words.shape == (c.words,)
    c.check(words)
    dense = c.decode(words)
    assert dense.shape == (c.size,)
    # the 64 norm gains travel dense in bf16
    assert torch.allclose(dense[4096:4160], grad[4096:4160], rtol=1e-2)
    # error feedback holds exactly what was not sent (up to bf16 rounding of what was)
    assert c.encoder is not None and torch.allclose(dense + c.encoder.error, grad, atol=1e-5)
    d = ContributionCodec(SHAPES)
    assert not d.compressed and d.tag == "dense" and d.words == d.size and d.encode(grad) is grad
    with pytest.raises(AveragingError, match="replica_averaging"):
        ContributionCodec(SHAPES, "topk")


def test_a_stage_codec_fits_the_module_and_every_replica_decodes_alike() -> None:
    cfg = PRESETS["tiny"]
    module = build_stage(cfg, partition(cfg, 3)[1])
    a = ContributionCodec.for_module(module, "powersgd", 4, seed=1)
    b = ContributionCodec.for_module(module, "powersgd", 4, seed=1)
    assert a.size == sum(p.numel() for p in trainable(module))
    words = a.encode(torch.randn(a.size))
    assert torch.equal(a.decode(words), b.decode(words.clone()))  # the receiver's decode is the sender's


def test_check_and_combine_refuse_nan_factors_and_wrong_sizes() -> None:
    c = _codec()
    words = c.encode(torch.randn(c.size))
    with pytest.raises(AveragingError, match=r"shape \("):
        c.check(words[:-1])
    with pytest.raises(AveragingError, match="shape"):
        _codec(rank=2).check(words)  # a rank-4 contribution where the spec says rank 2
    bad = words.clone().view(torch.int16)
    bad[3] = torch.tensor([0x7FC0], dtype=torch.int16)  # a bf16 NaN inside P of the first matrix
    bad = bad.view(torch.float32)
    with pytest.raises(AveragingError, match="non-finite"):
        c.check(bad)
    with pytest.raises(AveragingError, match="non-finite"):
        c.decode(bad)
    good = [c.encode(torch.randn(c.size)) for _ in range(3)]
    # a contribution that does not decode is left out; the others are combined
    out = combine([*good, bad], 4, "mean", c)
    assert torch.allclose(out, combine(good, 4, "mean", c), atol=1e-5)
    assert torch.allclose(out, torch.stack([c.decode(w) for w in good]).mean(0) * 4, atol=1e-5)
    with pytest.raises(AveragingError, match="decodes"):
        combine([bad], 4, "mean", c)
    store = ContributionStore(c.words, c)
    with pytest.raises(AveragingError, match="words"):
        ContributionStore(c.words + 1, c)
    with pytest.raises(AveragingError, match="expected"):
        store.add(0, 0, 0, words[:-1])


def test_centered_clip_runs_on_the_decoded_contributions() -> None:
    """One inflated contribution among 5 moves the CenteredClip result little, the plain mean a lot."""
    c = _codec()
    g = torch.Generator().manual_seed(4)
    base = torch.randn(c.size, generator=g)
    honest = [c.encode(base + 0.01 * torch.randn(c.size, generator=g)) for _ in range(4)]
    attacker = ContributionCodec(SHAPES, "powersgd", 4).encode(-1000 * base)
    target = torch.stack([c.decode(w) for w in honest]).mean(0) * 5
    clipped = combine([*honest, attacker], 5, "centered_clip", c)
    mean = combine([*honest, attacker], 5, "mean", c)
    assert float((clipped - target).norm()) < 0.1 * float((mean - target).norm())


@pytest.mark.network
@pytest.mark.timeout(60)
def test_bad_pushes_are_refused_counted_and_the_step_goes_on_without_them() -> None:
    c = _codec()
    store = ContributionStore(c.words, c)
    guard = PeerGuardConfig(ban_score=-100.0, max_streams_per_peer=16)
    sender = _codec()
    good = sender.encode(torch.randn(c.size))
    nan = good.clone().view(torch.int16)
    nan[10] = torch.tensor([0x7F80], dtype=torch.int16)  # +Inf in bf16
    nan = nan.view(torch.float32)
    rank2 = _codec(rank=2).encode(torch.randn(c.size))
    blocks = ContributionCodec(SHAPES, "powersgd", 4, ranks=[8, None, 8, None])  # two matrices at a rank of their own

    async def main() -> None:
        async with running_host(141) as (server, _), running_host(142) as (client, _):
            svc = serve(server, store, guard)
            addr = full_addrs(server)[0]
            await push(client, addr, "aa", 0, 5, 0, 0, good, 1.0, 5.0, enc=c.tag)
            cases = [
                (nan, c.tag, "non-finite"),  # Inf in a factor
                (rank2, "powersgd-r2-bf16", "encoded as"),  # another rank, declared honestly
                (rank2, c.tag, "bytes"),  # another rank under the spec's tag: the size gives it away
                (blocks.encode(torch.randn(c.size)), blocks.tag, "encoded as"),  # another block rank, declared
                (blocks.encode(torch.randn(c.size)), c.tag, "bytes"),  # ... and under the spec's tag
                (good, "dense", "encoded as"),  # a dense push to a compressed stage (no tag = dense)
            ]
            await assert_pushes_refused(client, addr, svc, 5, cases)
            assert list(store.vecs[5]) == [(0, 0)]  # nothing of the bad pushes was kept
            # the step goes on with what is good: mb 1 (whose push was refused) is dropped from the combine
            store.commit(5, {0: 0, 1: 0})
            assert store.missing(5) == [1]
            flat = combine([h.vec for h in store.committed(5)], 2, "centered_clip", c)
            assert torch.isfinite(flat).all() and torch.allclose(flat, 2 * c.decode(good), atol=1e-5)

    trio.run(main)


@pytest.mark.network
@pytest.mark.timeout(60)
def test_a_pull_answer_with_a_nan_factor_or_another_encoding_is_refused() -> None:
    c = _codec()
    guard = PeerGuardConfig(max_streams_per_peer=16)
    bad_store = ContributionStore(c.words, c)
    words = c.encode(torch.randn(c.size))
    nan = words.clone()
    nan[0] = float("nan")  # both bf16 halves of the first word become NaN
    bad_store.add(2, 0, 0, nan)  # a peer that stored (or forged) a bad contribution
    bad_store.commit(2, {0: 0})
    other = ContributionCodec(SHAPES, "powersgd", 2)
    other_store = ContributionStore(other.words, other)
    other_store.add(2, 0, 0, other.encode(torch.randn(c.size)))
    other_store.commit(2, {0: 0})

    async def main() -> None:
        async with running_host(151) as (s1, _), running_host(152) as (s2, _), running_host(153) as (client, _):
            serve(s1, bad_store, guard)
            serve(s2, other_store, guard)
            with pytest.raises(AveragingError, match="non-finite"):
                await pull(client, full_addrs(s1)[0], "aa", 0, 2, c.words, 0.0, 5.0, codec=c)
            with pytest.raises(AveragingError, match="encoded as"):
                await pull(client, full_addrs(s2)[0], "aa", 0, 2, c.words, 0.0, 5.0, codec=c)
            commit, items = await pull(client, full_addrs(s2)[0], "aa", 0, 2, other.words, 0.0, 5.0, codec=other)
            assert commit == {0: 0} and len(items) == 1

    trio.run(main)


def test_spec_option_keeps_old_hashes_and_hashes_powersgd() -> None:
    model = PRESETS["tiny"]
    old = ModelProposal(model, TrainingRecipe())
    assert b"replica_averaging" not in old.canonical_json() and b"powersgd_rank" not in old.canonical_json()
    assert proposal_from_dict({"model": {"preset": "tiny"}}).content_hash() == old.content_hash()
    ps = proposal_from_dict({"model": {"preset": "tiny"},
                             "training": {"replica_averaging": "powersgd", "powersgd_rank": 2}})
    assert b'"replica_averaging":"powersgd"' in ps.canonical_json() and ps.content_hash() != old.content_hash()
    ps4 = proposal_from_dict({"model": {"preset": "tiny"}, "training": {"replica_averaging": "powersgd"}})
    assert ps4.content_hash() != ps.content_hash()  # the rank is part of it
    with pytest.raises(Exception, match="replica_averaging"):
        proposal_from_dict({"model": {"preset": "tiny"}, "training": {"replica_averaging": "sparse"}})
    t = ps.training

    def section(**kw: object) -> TrainingSection:
        return TrainingSection(stages=t.stages, codec=t.codec, microbatches=t.microbatches,
                               microbatch_size=t.microbatch_size, lr=t.lr, warmup_steps=t.warmup_steps,
                               data_seed=t.data_seed, **kw)  # type: ignore[arg-type]

    # the node recomputes the same hashes from its own settings
    assert proposal_spec_hash(model, section().to_dict()) == old.content_hash()
    assert proposal_spec_hash(model, section(replica_averaging="powersgd", powersgd_rank=2).to_dict()) == \
        ps.content_hash()
    cfg = NodeConfig()
    cfg.runtime.replica_averaging = "diloco"
    with pytest.raises(ValueError, match="runtime.replica_averaging"):
        cfg.validate()


def test_power_iterations_are_a_spec_option_that_keeps_the_wire_size() -> None:
    one = proposal_from_dict({"model": {"preset": "tiny"}, "training": {"replica_averaging": "powersgd"}})
    same = proposal_from_dict({"model": {"preset": "tiny"},
                               "training": {"replica_averaging": "powersgd", "powersgd_iterations": 1}})
    assert same.content_hash() == one.content_hash() and b"powersgd_iterations" not in one.canonical_json()
    three = proposal_from_dict({"model": {"preset": "tiny"},
                                "training": {"replica_averaging": "powersgd", "powersgd_iterations": 3}})
    assert b'"powersgd_iterations":3' in three.canonical_json() and three.content_hash() != one.content_hash()
    t = three.training
    mine = TrainingSection(stages=t.stages, codec=t.codec, microbatches=t.microbatches,
                           microbatch_size=t.microbatch_size, lr=t.lr, warmup_steps=t.warmup_steps,
                           data_seed=t.data_seed, replica_averaging="powersgd", powersgd_iterations=3)
    assert proposal_spec_hash(PRESETS["tiny"], mine.to_dict()) == three.content_hash()  # what the node recomputes
    for bad in (0, 9, 2.0, True):
        with pytest.raises(Exception, match="powersgd_iterations"):
            proposal_from_dict({"model": {"preset": "tiny"}, "training": {"powersgd_iterations": bad}})
    cfg = NodeConfig()
    cfg.runtime.powersgd_iterations = 0
    with pytest.raises(ValueError, match="runtime.powersgd_iterations"):
        cfg.validate()
    shapes = [(64, 64), (64,), (256, 64)]
    c1, c3 = (ContributionCodec(shapes, "powersgd", 2, 0, 8, iterations=i) for i in (1, 3))
    assert c1.words == c3.words and c1.tag == c3.tag  # the same wire format: only the fit differs
    grad = torch.randn(c1.size, generator=torch.Generator().manual_seed(4))
    w3 = c3.encode(grad)
    d1, d3 = c1.decode(c1.encode(grad)), c3.decode(w3)
    assert torch.equal(c1.decode(w3.clone()), d3)  # decoding does not depend on the sender's iterations
    assert float((grad - d3).norm()) < float((grad - d1).norm())  # a closer fit of the same bytes
    with pytest.raises(AveragingError, match="powersgd_iterations"):
        ContributionCodec(shapes, "powersgd", 2, 0, 8, iterations=0)


def test_the_blocks_matrices_may_travel_at_a_rank_of_their_own() -> None:
    """powersgd_block_rank gives the blocks' matrices (Muon's) their own rank, the embedding keeps powersgd_rank;
    the tag names both ranks, a block rank equal to the rank (or 0) is the plain codec, and it is a spec option that
    leaves the hash of specs without it alone."""
    from node.model import training_section
    from sharding.optimizers import is_muon_param

    model = PRESETS["tiny"]
    stage = build_stage(model, partition(model, 2)[0])
    base = ContributionCodec.for_module(stage, "powersgd", 2, bits=4)
    mixed = ContributionCodec.for_module(stage, "powersgd", 2, bits=4, block_rank=4)
    assert mixed.layout is not None and base.layout is not None
    named = [(n, p) for n, p in stage.named_parameters() if p.requires_grad]
    kinds = {is_muon_param(n, p) for (n, p), e in zip(named, mixed.layout.entries, strict=True) if e.compressed}
    assert kinds == {True, False}  # the blocks' matrices and the embedding are both compressed here
    for (n, p), e in zip(named, mixed.layout.entries, strict=True):
        assert e.rank == (0 if not e.compressed else 4 if is_muon_param(n, p) else 2)
    assert (base.tag, mixed.tag) == ("powersgd-r2-int4", "powersgd-r2+r4-int4") and mixed.words > base.words
    same = ContributionCodec.for_module(stage, "powersgd", 2, bits=4, block_rank=2)
    assert (same.tag, same.words) == (base.tag, base.words)
    grad = torch.randn(mixed.size, generator=torch.Generator().manual_seed(3))
    words = mixed.encode(grad)
    mixed.check(words)
    assert torch.isfinite(mixed.decode(words)).all()
    # the spec option
    plain = proposal_from_dict({"model": {"preset": "tiny"}, "training": {"replica_averaging": "powersgd"}})
    zero = proposal_from_dict({"model": {"preset": "tiny"},
                               "training": {"replica_averaging": "powersgd", "powersgd_block_rank": 0}})
    assert zero.content_hash() == plain.content_hash() and b"powersgd_block_rank" not in plain.canonical_json()
    twelve = proposal_from_dict({"model": {"preset": "tiny"},
                                 "training": {"replica_averaging": "powersgd", "powersgd_block_rank": 12}})
    assert b'"powersgd_block_rank":12' in twelve.canonical_json() and twelve.content_hash() != plain.content_hash()
    for bad in (-1, 2.0, True):
        with pytest.raises(Exception, match="powersgd_block_rank"):
            proposal_from_dict({"model": {"preset": "tiny"}, "training": {"powersgd_block_rank": bad}})
    cfg = NodeConfig()
    cfg.runtime.replica_averaging, cfg.runtime.powersgd_block_rank = "powersgd", 12
    assert training_section(cfg).powersgd_block_rank == 12  # what the node hashes against the registered spec
    cfg.runtime.powersgd_block_rank = -1
    with pytest.raises(ValueError, match="runtime.powersgd_block_rank"):
        cfg.validate()
