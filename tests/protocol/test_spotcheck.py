"""Spot checks: honest hops pass, random / skipped work fails, sampling matches 1 - (1 - r)^n, fraud quorum."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from protocol.errors import SignatureError, SpotCheckError
from protocol.receipts import (
    BACKWARD,
    FORWARD,
    Receipt,
    StaticKeyRegistry,
    countersign,
    payload_digest,
    sign_receipt,
)
from protocol.spotcheck import (
    HopInput,
    SpotCheckConfig,
    check_hop,
    detection_probability,
    fraud_evidence,
    is_sampled,
    sample_hops,
    sign_fraud,
    verify_fraud,
    window_bytes,
)
from sharding.codecs import get_codec
from sharding.config import ModelConfig
from sharding.partition import partition
from sharding.stage import build_stage

from .conftest import make_keys

CONFIG = ModelConfig(vocab_size=256, seq_len=16, d_model=32, n_layers=3, n_heads=4)
STAGES = partition(CONFIG, 3)
CHECK = SpotCheckConfig(audit_rate=1.0, tolerance=1e-2)


def _window(seed=0):
    return torch.randint(0, 256, (2, CONFIG.seq_len + 1), generator=torch.Generator().manual_seed(seed))


def _hop(domain, keys, stage, payload, window, state, input_payload=None, direction=FORWARD):
    receiver = stage + 1 if direction == FORWARD else stage - 1
    wb = window_bytes(window, CONFIG) if direction == FORWARD else b""
    r = Receipt(1, 0, 5, 3, stage, direction, keys[stage].address, keys[receiver].address,
                payload_digest(payload, wb), window[:, :-1].numel())
    signed = countersign(sign_receipt(r, domain, keys[stage]), keys[receiver])
    return HopInput(signed, payload, window, state, input_payload)


def _honest_stage1(domain, keys, codec="dense"):
    c = get_codec(codec, CONFIG)
    torch.manual_seed(0)
    head, mid = build_stage(CONFIG, STAGES[0]), build_stage(CONFIG, STAGES[1])
    window = _window()
    ids = window[:, :-1]
    with torch.no_grad():
        h0 = c.encode_activation(head(ids), ids)
        h1 = mid(ids, c.decode_activation(h0, ids))
    state = {k: v.clone() for k, v in mid.state_dict().items()}
    return c, window, h0, h1, state


@pytest.mark.parametrize("codec", ["dense", "bf16"])
def test_honest_forward_hop_passes_and_cheats_fail(domain, keys, codec):
    c, window, h0, h1, state = _honest_stage1(domain, keys, codec)
    ids = window[:, :-1]
    honest = _hop(domain, keys, 1, c.encode_activation(h1, ids), window, state, h0)
    result = check_hop(CONFIG, STAGES[1], codec, honest, CHECK)
    assert result.passed and result.relative_error <= 1e-3
    cheats = {
        "random": torch.randn_like(h1),
        "skip": c.decode_activation(h0, ids),  # passes its input on without running its blocks
        "scaled": h1 * 1.1,
    }
    for name, fake in cheats.items():
        hop = _hop(domain, keys, 1, c.encode_activation(fake, ids), window, state, h0)
        result = check_hop(CONFIG, STAGES[1], codec, hop, CHECK)
        assert not result.passed, name
        assert result.relative_error > 0.05


def test_head_stage_checked_without_input(domain, keys):
    c = get_codec("dense", CONFIG)
    torch.manual_seed(0)  # the stage's initial weights and the random output come from torch's global generator
    head = build_stage(CONFIG, STAGES[0])
    window = _window(1)
    ids = window[:, :-1]
    with torch.no_grad():
        out = head(ids)
    state = head.state_dict()
    assert check_hop(CONFIG, STAGES[0], "dense", _hop(domain, keys, 0, c.encode_activation(out, ids), window, state),
                     CHECK).passed
    bad = _hop(domain, keys, 0, c.encode_activation(torch.randn_like(out), ids), window, state)
    assert not check_hop(CONFIG, STAGES[0], "dense", bad, CHECK).passed


def test_tail_backward_hop(domain, keys):
    c, window, _, h1, _ = _honest_stage1(domain, keys)
    ids, targets = window[:, :-1], window[:, 1:]
    tail = build_stage(CONFIG, STAGES[2])
    h_in_payload = c.encode_activation(h1, ids)
    h_in = c.decode_activation(h_in_payload, ids).requires_grad_(True)
    (tail(ids, h_in, targets) / 4).backward()
    grad = c.encode_gradient(h_in.grad, ids)
    state = tail.state_dict()
    hop = _hop(domain, keys, 2, grad, window, state, h_in_payload, direction=BACKWARD)
    assert check_hop(CONFIG, STAGES[2], "dense", hop, CHECK, grad_scale=0.25).passed
    lazy = _hop(domain, keys, 2, c.encode_gradient(torch.zeros_like(h_in.grad) + 1e-6, ids), window, state,
                h_in_payload, direction=BACKWARD)
    assert not check_hop(CONFIG, STAGES[2], "dense", lazy, CHECK, grad_scale=0.25).passed


def test_payload_not_matching_signed_digest_is_rejected(domain, keys):
    c, window, h0, h1, state = _honest_stage1(domain, keys)
    hop = _hop(domain, keys, 1, c.encode_activation(h1, window[:, :-1]), window, state, h0)
    swapped = dataclasses.replace(hop, payload=c.encode_activation(h1 * 2, window[:, :-1]))
    with pytest.raises(SpotCheckError) as err:
        check_hop(CONFIG, STAGES[1], "dense", swapped, CHECK)
    assert err.value.field == "payload"
    with pytest.raises(SpotCheckError) as err:
        check_hop(CONFIG, STAGES[1], "dense", dataclasses.replace(hop, input_payload=None), CHECK)
    assert err.value.field == "input_payload"
    with pytest.raises(SpotCheckError) as err:
        check_hop(CONFIG, STAGES[1], "dense", dataclasses.replace(hop, state_dict={}), CHECK)
    assert err.value.field == "state_dict"


def test_rexecution_restores_torch_settings(domain, keys):
    c, window, h0, h1, state = _honest_stage1(domain, keys)
    threads = torch.get_num_threads()
    check_hop(CONFIG, STAGES[1], "dense", _hop(domain, keys, 1, c.encode_activation(h1, window[:, :-1]),
                                                 window, state, h0), SpotCheckConfig(audit_rate=1.0, threads=1))
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()


def test_sampling_rate_and_analytic_detection():
    keys = [(1, 0, s, m, 1, 0) for s in range(100) for m in range(40)]
    for rate in (0.05, 0.2):
        picked = sum(is_sampled(k, rate, seed=7) for k in keys)
        assert abs(picked / len(keys) - rate) < 0.02
    assert [is_sampled(k, 0.2, 7) for k in keys[:50]] == [is_sampled(k, 0.2, 7) for k in keys[:50]]
    assert [is_sampled(k, 0.2, 7) for k in keys[:200]] != [is_sampled(k, 0.2, 8) for k in keys[:200]]
    assert all(is_sampled(k, 1.0, 3) for k in keys[:100])
    assert detection_probability(0.05, 0) == 0.0
    assert detection_probability(1.0, 1) == 1.0
    assert detection_probability(0.2, 10) == pytest.approx(1 - 0.8**10)
    with pytest.raises(ValueError, match="audit_rate"):
        sample_hops([], SpotCheckConfig(audit_rate=0.0))


def test_fraud_verdict_needs_quorum_of_attesters(domain, keys, registry):
    c, window, h0, h1, state = _honest_stage1(domain, keys)
    hop = _hop(domain, keys, 1, c.encode_activation(torch.randn_like(h1), window[:, :-1]), window, state, h0)
    result = check_hop(CONFIG, STAGES[1], "dense", hop, CHECK)
    evidence = fraud_evidence(hop, result, CHECK)
    assert evidence.node == keys[1].address and len(evidence.hash()) == 32
    attesters = make_keys(3, offset=60)
    att_registry = StaticKeyRegistry(a.address for a in attesters)
    sigs = [sign_fraud(domain, evidence, a)[1] for a in attesters[:2]]
    assert verify_fraud(domain, evidence, sigs, att_registry, registry, 2) == [a.address for a in attesters[:2]]
    with pytest.raises(SpotCheckError) as err:
        verify_fraud(domain, evidence, sigs[:1], att_registry, registry, 2)
    assert err.value.field == "signatures"
    forged = dataclasses.replace(
        evidence, receipt=dataclasses.replace(evidence.receipt, sender_signature=b"\x02" * 65)
    )
    with pytest.raises(SignatureError):
        verify_fraud(domain, forged, sigs, att_registry, registry, 2)
    honest = _hop(domain, keys, 1, c.encode_activation(h1, window[:, :-1]), window, state, h0)
    with pytest.raises(SpotCheckError) as err:
        fraud_evidence(honest, check_hop(CONFIG, STAGES[1], "dense", honest, CHECK), CHECK)
    assert err.value.field == "result"
