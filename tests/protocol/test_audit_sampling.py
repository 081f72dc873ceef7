"""The audit sampling rule: deterministic, one stage per attester per window, requests allowed iff sampled,
the sample rate is the model's audit rate, and the hop seed comes from the epoch's live root on chain."""

from __future__ import annotations

import math
from typing import Any

import pytest
from eth_account import Account
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts import chain as chain_mod
from contracts.client import ProtocolContracts
from contracts.config import ChainConfig
from contracts.deploy import DeployParams, deploy_all
from contracts.eip712 import sign_quorum
from contracts.merkle import ContributionTree
from protocol.audit_sampling import (
    BACKWARD,
    FORWARD,
    AuditRule,
    attester_stage,
    audit_assignment,
    auditable,
    epoch_seed,
    is_hop_sampled,
    may_request,
    seed_from_chain,
    stage_assignment,
    stages_covered,
)
from protocol.errors import AuditSamplingError
from protocol.receipts import Receipt

ATTESTERS = [Account.from_key((7000 + i).to_bytes(32, "big")).address for i in range(12)]
OUTSIDER = Account.from_key((9999).to_bytes(32, "big")).address

attester_sets = st.lists(st.sampled_from(ATTESTERS), min_size=1, max_size=12, unique=True)
seeds = st.binary(min_size=32, max_size=32)
stage_counts = st.integers(1, 8)
epochs = st.integers(0, 2**20)
models = st.integers(1, 2**64)
rates = st.integers(0, 10_000)


def epoch_hops(model_id: int, epoch: int, num_stages: int, steps: int = 3, microbatches: int = 4) -> list[tuple]:
    """Every hop key of an epoch's pipeline traffic (forward and backward between neighbours)."""
    hops = []
    for step in range(steps):
        for mb in range(microbatches):
            for stage in range(num_stages):
                if stage < num_stages - 1:
                    hops.append((model_id, epoch, step, mb, stage, FORWARD))
                if stage > 0:
                    hops.append((model_id, epoch, step, mb, stage, BACKWARD))
    return hops


@settings(max_examples=60, deadline=None)
@given(seed=seeds, model_id=models, epoch=epochs, n=stage_counts, attesters=attester_sets, rate=rates)
def test_deterministic_and_independent_of_set_order(seed, model_id, epoch, n, attesters, rate) -> None:
    hops = epoch_hops(model_id, epoch, n)
    for a in attesters:
        one = audit_assignment(seed, a, model_id, epoch, n, attesters, hops, rate)
        two = audit_assignment(seed, a.lower(), model_id, epoch, n, list(reversed(attesters)) + attesters,
                               list(reversed(hops)), rate)
        assert one == two


@settings(max_examples=80, deadline=None)
@given(model_id=models, epoch=epochs, n=stage_counts, attesters=attester_sets)
def test_one_stage_per_attester_spread_evenly(model_id, epoch, n, attesters) -> None:
    assignment = stage_assignment(model_id, epoch, n, attesters)
    assert set(assignment) == set(attesters)
    assert all(0 <= s < n for s in assignment.values())
    counts = [list(assignment.values()).count(s) for s in range(n)]
    a = len(attesters)
    assert all(c in (a // n, -(-a // n)) for c in counts)  # floor or ceil of A/P per stage
    assert len({s for s in assignment.values()}) == min(a, n)  # fewer attesters than stages: A stages audited
    if a >= n:  # no attester covers every stage of a model with more than one stage
        assert all(c >= 1 for c in counts)


@settings(max_examples=60, deadline=None)
@given(seed=seeds, model_id=models, epoch=epochs, n=st.integers(2, 6), attesters=attester_sets, rate=rates)
def test_assigned_hops_are_of_the_one_stage_and_auditable(seed, model_id, epoch, n, attesters, rate) -> None:
    hops = epoch_hops(model_id, epoch, n)
    for a in attesters:
        asg = audit_assignment(seed, a, model_id, epoch, n, attesters, hops, rate)
        assert asg.stage == attester_stage(a, model_id, epoch, n, attesters)
        assert all(h[4] == asg.stage and auditable(h, n) for h in asg.hops)
        assert set(asg.hops) <= set(hops)


@settings(max_examples=60, deadline=None)
@given(seed=seeds, model_id=models, epoch=epochs, n=st.integers(1, 5), attesters=attester_sets, rate=rates,
       data=st.data())
def test_a_request_is_allowed_iff_sampled(seed, model_id, epoch, n, attesters, rate, data) -> None:
    hops = epoch_hops(model_id, epoch, n, steps=2)
    foreign = [(model_id + 1, epoch, 0, 0, 0, FORWARD), (model_id, epoch + 1, 0, 0, 0, FORWARD),
               (model_id, epoch, 0, 0, n, FORWARD), (model_id, epoch, 0, 0, 0, 2)]
    who = data.draw(st.sampled_from(attesters + [OUTSIDER]))
    asg = audit_assignment(seed, who, model_id, epoch, n, attesters, hops, rate)
    for hop in hops + foreign:
        assert may_request(seed, who, model_id, epoch, n, attesters, hop, rate) == (hop in asg.hops)
    if who == OUTSIDER:
        assert asg.stage is None and asg.hops == ()


@settings(max_examples=25, deadline=None)
@given(seed=seeds, attester=st.sampled_from(ATTESTERS), rate=rates)
def test_sample_rate_is_the_audit_rate(seed, attester, rate) -> None:
    n_hops = 4000
    hops = [(1, 0, step, mb, 0, FORWARD) for step in range(100) for mb in range(40)]
    k = sum(is_hop_sampled(seed, attester, h, rate) for h in hops)
    p = rate / 10_000
    sigma = math.sqrt(n_hops * p * (1 - p))
    assert abs(k - n_hops * p) <= 5 * sigma + 1e-9  # exact at p = 0 and p = 1
    # the assignment is exactly that draw over its stage's auditable hops
    two_stage = epoch_hops(1, 0, 2, steps=20)
    asg = audit_assignment(seed, attester, 1, 0, 2, [attester], two_stage, rate)
    assert asg.stage in (0, 1)
    assert asg.hops == tuple(sorted(h for h in two_stage if h[4] == asg.stage and auditable(h, 2)
                                    and is_hop_sampled(seed, attester, h, rate)))


def test_rate_extremes_and_per_attester_draws() -> None:
    seed = b"\x01" * 32
    hops = epoch_hops(5, 3, 1, steps=5)  # a one-stage model has no hops at all
    assert hops == []
    hops = epoch_hops(5, 3, 2, steps=5)
    a = ATTESTERS[0]
    all_of_stage = audit_assignment(seed, a, 5, 3, 2, [a], hops, 10_000)
    assert len(all_of_stage.hops) == 20  # every auditable hop of its stage: one per microbatch
    assert audit_assignment(seed, a, 5, 3, 2, [a], hops, 0).hops == ()
    # different attesters of one stage draw different samples; a new seed draws a new sample
    hops = [(5, 3, s, m, 0, FORWARD) for s in range(50) for m in range(8)]
    draw = {x: {h for h in hops if is_hop_sampled(seed, x, h, 5_000)} for x in ATTESTERS[:2]}
    assert draw[ATTESTERS[0]] != draw[ATTESTERS[1]]
    assert draw[ATTESTERS[0]] != {h for h in hops if is_hop_sampled(b"\x02" * 32, ATTESTERS[0], h, 5_000)}


@settings(max_examples=40, deadline=None)
@given(model_id=models, window=st.integers(0, 2**16), n=st.integers(2, 8), attesters=attester_sets,
       w=st.integers(1, 32))
def test_one_stage_for_the_whole_window(model_id, window, n, attesters, w) -> None:
    rule = AuditRule(window_epochs=w)
    epochs_of_window = range(window * w, (window + 1) * w)
    for a in attesters:
        assert len(stages_covered(a, model_id, epochs_of_window, n, attesters, rule)) == 1


def test_rotation_across_windows_is_what_bounds_lifetime_coverage() -> None:
    # with a fixed set, an attester changes stage only at window boundaries: at most ceil(E / W) + 1 stages in E epochs
    rule = AuditRule(window_epochs=16)
    attesters = ATTESTERS[:6]
    for a in attesters:
        for start in (0, 5, 100):
            assert len(stages_covered(a, 1, range(start, start + 16), 8, attesters, rule)) <= 2
            assert len(stages_covered(a, 1, range(start, start + 40), 8, attesters, rule)) <= 4


def test_receipts_and_signed_receipts_are_hops() -> None:
    r = Receipt(3, 0, 1, 2, 0, FORWARD, ATTESTERS[0], ATTESTERS[1], b"\x00" * 32, 10)
    seed = b"\x05" * 32
    a = ATTESTERS[2]
    assert may_request(seed, a, 3, 0, 2, [a], r, 10_000) == may_request(seed, a, 3, 0, 2, [a], r.key, 10_000) is True
    assert audit_assignment(seed, a, 3, 0, 2, [a], [r], 10_000).hops == (r.key,)


def test_malformed_requests_are_refused_and_bad_local_inputs_raise() -> None:
    seed, a = b"\x03" * 32, ATTESTERS[0]
    good = (1, 0, 0, 0, 0, FORWARD)
    assert may_request(seed, a, 1, 0, 2, [a], good, 10_000)
    for bad_hop in [(1, 0, 0, 0, 0), (1, 0, -1, 0, 0, FORWARD), (1, 0, "0", 0, 0, FORWARD), (1, 0, 0, 0, True, 0),
                    (1, 0, 0, 2**32, 0, FORWARD), "hop", None, (1.0, 0, 0, 0, 0, 0)]:
        assert may_request(seed, a, 1, 0, 2, [a], bad_hop, 10_000) is False, bad_hop
    assert may_request(seed, "not an address", 1, 0, 2, [a], good, 10_000) is False
    bad_args: list[tuple[dict[str, Any], str]] = [
        ({"seed": b"short"}, "seed"), ({"num_stages": 0}, "num_stages"), ({"attesters": ["0x12"]}, "attesters"),
        ({"audit_rate_bps": 10_001}, "audit_rate_bps"), ({"rule": AuditRule(window_epochs=0)}, "window_epochs")]
    for kwargs, field in bad_args:
        args = {"seed": seed, "attester": a, "model_id": 1, "epoch": 0, "num_stages": 2, "attesters": [a],
                "hop": good, "audit_rate_bps": 10_000} | kwargs
        with pytest.raises(AuditSamplingError) as err:
            may_request(**args)
        assert err.value.field == field


def test_seed_comes_from_the_live_root_on_chain() -> None:
    cfg = ChainConfig(fixed_gas=3_000_000)
    w3 = chain_mod.connect(None, cfg)
    acc = chain_mod.test_accounts(w3)
    dep = deploy_all(w3, acc[0], [v.address for v in acc[1:4]], 2, DeployParams(unbonding_delay_s=100), cfg)
    pc = ProtocolContracts(w3, dep, cfg)
    mid = pc.propose_model(acc[4], b"\x11" * 32, "m", 3, b"\x22" * 32, 10, 3600, 500, 1)
    pc.start_training(acc[4], mid)
    with pytest.raises(AuditSamplingError, match="no live root"):
        seed_from_chain(pc, mid, 0)  # before the root is on chain nobody may audit the epoch
    tree = ContributionTree(mid, 0, {acc[5].address: 10})
    typed = pc.epoch_root_typed_data(mid, 0, tree.root, tree.total_units, b"\x33" * 32)
    pc.submit_epoch_root(acc[8], mid, 0, tree.root, tree.total_units, b"\x33" * 32, sign_quorum(acc[1:3], typed))
    seed = seed_from_chain(pc, mid, 0)
    assert seed == epoch_seed(mid, 0, tree.root) and len(seed) == 32
    assert seed != epoch_seed(mid, 1, tree.root) and seed != epoch_seed(mid + 1, 0, tree.root)
    # the attesters of the rule are the quorum's validators
    assert stage_assignment(mid, 0, 3, pc.validators()).keys() == {a.address for a in acc[1:4]}
