"""Spot checks across precisions: a bf16-autocast node passes an fp32 re-execution; perturbations are caught."""

from __future__ import annotations

import pytest
import torch

from protocol.accounting import accounting_function_hash
from protocol.receipts import BACKWARD, FORWARD, Receipt, countersign, payload_digest, sign_receipt
from protocol.spotcheck import (
    MEAN_WEIGHT,
    SPOTCHECK_RULE,
    TOLERANCES,
    HopInput,
    SpotCheckConfig,
    check_hop,
    hop_score,
    reexecute,
    spotcheck_rule_hash,
    window_bytes,
)
from sharding.codecs import get_codec
from sharding.config import PRESETS, ModelConfig
from sharding.partition import partition
from sharding.stage import build_stage

DENSE = ModelConfig(vocab_size=256, seq_len=32, d_model=64, n_layers=3, n_heads=4)
SUB = PRESETS["tiny-subspace"]
DEFAULT = SpotCheckConfig(audit_rate=1.0)  # the pinned default tolerance (bf16 execution allowed)


def _setup(config: ModelConfig, codec: str, stage: int, seed: int = 0):
    """Weights moved off their init (as after training), a window, and the stage's input payload."""
    specs = partition(config, 3)
    torch.manual_seed(seed)
    modules = [build_stage(config, s) for s in specs]
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                if p.dim() >= 2:
                    p.add_(torch.randn_like(p) * 0.02)
            m.after_optimizer_step()
    window = torch.randint(0, config.vocab_size, (4, config.seq_len + 1), generator=torch.Generator().manual_seed(seed))
    ids = window[:, :-1]
    c = get_codec(codec, config)
    payload = None
    h = None
    with torch.no_grad():
        for s in range(stage):
            out = modules[s](ids, h)
            payload = c.encode_activation(out, ids)
            h = c.decode_activation(payload, ids)
    state = {k: v.clone() for k, v in modules[stage].state_dict().items()}
    return specs[stage], window, state, payload


def _hop(keys, domain, stage, direction, payload, window, state, input_payload):
    receiver = stage + 1 if direction == FORWARD else stage - 1
    wb = window_bytes(window, DENSE) if direction == FORWARD else b""
    r = Receipt(1, 0, 5, 3, stage, direction, keys[stage].address, keys[receiver].address,
                payload_digest(payload, wb), window[:, :-1].numel())
    return HopInput(countersign(sign_receipt(r, domain, keys[stage]), keys[receiver]), payload, window, state,
                    input_payload)


def _bf16_node_hop(keys, domain, config, codec, stage, direction, scale=1.0):
    """The hop an honest node running bf16 autocast sends (its payload recomputed here on CPU under autocast)."""
    spec, window, state, input_payload = _setup(config, codec, stage)
    probe = _hop(keys, domain, stage, direction, b"", window, state, input_payload)
    tensor, payload = reexecute(config, spec, codec, probe, precision="bf16")
    if direction == BACKWARD:
        payload = get_codec(codec, config).encode_gradient(tensor * scale, window[:, :-1])
    return spec, tensor * scale, _hop(keys, domain, stage, direction, payload, window, state, input_payload)


@pytest.mark.parametrize(("config", "codec"), [(DENSE, "dense"), (SUB, "subspace"), (SUB, "subspace-fp32")])
def test_bf16_node_passes_fp32_reexecution(keys, domain, config, codec):
    for stage, direction in ((0, FORWARD), (1, FORWARD), (2, BACKWARD)):
        scale = 0.25 if direction == BACKWARD else 1.0
        spec, _, hop = _bf16_node_hop(keys, domain, config, codec, stage, direction, scale)
        result = check_hop(config, spec, codec, hop, DEFAULT, grad_scale=scale)
        assert result.passed, (stage, result.relative_error)
        # the measured noise is far inside the tolerance (the margin SPOTCHECK_RULE states), and not zero:
        # the payload really came from a bf16 execution
        assert 0 < result.relative_error <= TOLERANCES["bf16"] / 3, (stage, result.relative_error)
        fp32 = check_hop(config, spec, codec, hop, SpotCheckConfig(audit_rate=1.0, tolerance=TOLERANCES["fp32"]),
                         grad_scale=scale)
        assert fp32.relative_error == result.relative_error  # the score does not depend on the tolerance


@pytest.mark.parametrize(("config", "codec"), [(DENSE, "dense"), (SUB, "subspace")])
def test_perturbation_of_ten_times_the_tolerance_is_caught(keys, domain, config, codec):
    tol = DEFAULT.tolerance
    spec, out, honest = _bf16_node_hop(keys, domain, config, codec, 1, FORWARD)
    c = get_codec(codec, config)
    ids = honest.window[:, :-1]
    z = c.wire_vectors(out, ids)
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(z.shape, generator=gen)
    noise = noise / noise.norm(dim=-1, keepdim=True) * z.norm(dim=-1, keepdim=True)  # relative size 1 per token
    one_token = torch.zeros_like(z)
    one_token[2, 5] = 10 * tol * noise[2, 5]
    every_token_small = (10 * tol / MEAN_WEIGHT) * noise  # below the per-token limit, caught by the mean
    for name, dz in (("one token x10", one_token), ("every token x10", 10 * tol * noise),
                     ("every token, mean x10", every_token_small)):
        u = getattr(c, "u", None)
        dh = dz @ u.t() if u is not None else dz
        fake = _hop(keys, domain, 1, FORWARD, c.encode_activation(out + dh, ids), honest.window, honest.state_dict,
                    honest.input_payload)
        result = check_hop(config, spec, codec, fake, DEFAULT)
        assert not result.passed, (name, result.relative_error)
    assert check_hop(config, spec, codec, honest, DEFAULT).passed


def test_skipped_and_scaled_work_is_caught_under_the_default_tolerance(keys, domain):
    spec, out, honest = _bf16_node_hop(keys, domain, SUB, "subspace", 1, FORWARD)
    c = get_codec("subspace", SUB)
    ids = honest.window[:, :-1]
    assert honest.input_payload is not None
    skipped = c.decode_activation(honest.input_payload, ids)
    for fake in (skipped, out * 1.1, torch.randn_like(out)):
        hop = _hop(keys, domain, 1, FORWARD, c.encode_activation(fake, ids), honest.window, honest.state_dict,
                   honest.input_payload)
        assert not check_hop(SUB, spec, "subspace", hop, DEFAULT).passed


def test_score_definition():
    r = torch.ones(1, 4, 3)
    assert hop_score(r, r) == (0.0, 0.0, 0.0)
    s = r.clone()
    s[0, 0] *= 1.5  # one token 50 % off: worst 0.5, mean 0.125
    score, worst, mean = hop_score(s, r)
    assert worst == pytest.approx(0.5) and mean == pytest.approx(0.125) and score == pytest.approx(MEAN_WEIGHT * 0.125)
    tiny = r.clone()
    tiny[0, 1] = 1e-6  # a near-zero token is compared against 0.1 x the mean norm, not against itself
    _, worst, _ = hop_score(tiny + 1e-3, tiny)
    assert worst < 0.02


def test_rule_is_pinned_in_the_accounting_hash():
    assert "v2" in SPOTCHECK_RULE and str(TOLERANCES["bf16"]) in SPOTCHECK_RULE
    assert len(spotcheck_rule_hash()) == 32 and len(accounting_function_hash()) == 32
    assert DEFAULT.tolerance == TOLERANCES["bf16"]
