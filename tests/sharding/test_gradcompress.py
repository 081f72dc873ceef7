"""Pure math of replica gradient compression: PowerSGD, top-k, DiLoCo's outer Nesterov step."""

from __future__ import annotations

import pytest
import torch

from sharding.gradcompress import (
    GradCompressError,
    OuterNesterov,
    PowerSGDEncoder,
    PowerSGDLayout,
    TopKEncoder,
    dequantize_factors,
    pack_nibbles,
    powersgd_decode,
    quantize_factors,
    topk_decode,
    unpack_nibbles,
)

SHAPES = [(32, 48), (48,), (16, 4, 4), (3, 3)]  # a matrix, a vector, a 3-d tensor (16 x 16), a small matrix


def test_layout_compresses_only_matrices_where_it_saves() -> None:
    lay = PowerSGDLayout.build(SHAPES, 2)
    assert [e.compressed for e in lay.entries] == [True, False, True, False]  # 2 (3 + 3) > 9: 3x3 stays dense
    assert lay.size == 32 * 48 + 48 + 256 + 9
    assert lay.wire_size == 2 * (32 + 48) + 48 + 2 * (16 + 16) + 9
    assert lay.ratio == pytest.approx(lay.size / lay.wire_size)
    with pytest.raises(GradCompressError, match="rank"):
        PowerSGDLayout.build(SHAPES, 0)



def test_a_matrix_may_have_a_rank_of_its_own() -> None:
    """ranks gives the first matrix rank 3 and leaves the 3-d tensor at the layout's rank 1: its wire, its int8
    scales and its warm start have 3 columns, a rank-3 gradient of it comes back exactly (and the rank-1 one of
    the other), and ranks of the wrong length or value are refused."""
    lay = PowerSGDLayout.build(SHAPES, 1, ranks=[3, None, None, 5])  # 5 (3 + 3) > 9: the 3x3 stays dense
    assert [e.rank for e in lay.entries] == [3, 0, 1, 0]
    assert lay.wire_size == 3 * (32 + 48) + 48 + (16 + 16) + 9
    assert lay.scale_count == 2 * 3 + 1 + 2 * 1 + 1
    g = torch.Generator().manual_seed(2)
    parts = [(torch.randn(32, 3, generator=g) @ torch.randn(3, 48, generator=g)).reshape(-1),
             torch.randn(48, generator=g),
             torch.outer(torch.randn(16, generator=g), torch.randn(16, generator=g)).reshape(-1),
             torch.randn(9, generator=g)]
    grad = torch.cat(parts)
    enc = PowerSGDEncoder(lay, error_feedback=False, iterations=3)
    assert enc.q[0].shape == (48, 3) and enc.q[2].shape == (16, 1)
    assert torch.allclose(powersgd_decode(lay, enc.encode(grad)), grad, atol=1e-4)
    codes, scales = enc.encode_quantized(grad, 8)
    assert codes.numel() == lay.wire_size and scales.numel() == lay.scale_count
    for bad, match in (([3, None], "2 entries for 4"), ([0, None, None, None], "rank"), ([True] * 4, "rank")):
        with pytest.raises(GradCompressError, match=match):
            PowerSGDLayout.build(SHAPES, 1, ranks=bad)


def test_rank_one_gradients_are_rebuilt_exactly_and_vectors_pass_dense() -> None:
    lay = PowerSGDLayout.build(SHAPES, 1)
    g = torch.Generator().manual_seed(1)
    parts = [torch.outer(torch.randn(32, generator=g), torch.randn(48, generator=g)).reshape(-1),
             torch.randn(48, generator=g),
             torch.outer(torch.randn(16, generator=g), torch.randn(16, generator=g)).reshape(-1),
             torch.outer(torch.randn(3, generator=g), torch.randn(3, generator=g)).reshape(-1)]  # 1 (3 + 3) < 9
    grad = torch.cat(parts)
    enc = PowerSGDEncoder(lay, seed=3)
    wire = enc.encode(grad)
    assert wire.shape == (lay.wire_size,)
    assert torch.allclose(powersgd_decode(lay, wire), grad, atol=1e-4)
    assert float(enc.error.abs().max()) < 1e-4


def test_error_feedback_loses_nothing_over_steps() -> None:
    """sum(decoded) = sum(gradients) - final error: what rank r misses now is sent later."""
    lay = PowerSGDLayout.build(SHAPES, 1)
    g = torch.Generator().manual_seed(2)
    enc = PowerSGDEncoder(lay, seed=0, wire_dtype=torch.bfloat16)
    sent = torch.zeros(lay.size)
    total = torch.zeros(lay.size)
    for _ in range(20):
        grad = torch.randn(lay.size, generator=g)
        total += grad
        sent += powersgd_decode(lay, enc.encode(grad))
    assert torch.allclose(sent + enc.error, total, atol=1e-3)
    # without error feedback nothing is kept and the missing part is lost
    plain = PowerSGDEncoder(lay, error_feedback=False)
    plain.encode(torch.randn(lay.size, generator=g))
    assert float(plain.error.abs().max()) == 0.0


def test_decode_refuses_wrong_sizes_and_nan_in_a_factor() -> None:
    lay = PowerSGDLayout.build(SHAPES, 2)
    wire = PowerSGDEncoder(lay).encode(torch.randn(lay.size))
    with pytest.raises(GradCompressError, match="expected"):
        powersgd_decode(lay, wire[:-1])
    with pytest.raises(GradCompressError, match="expected"):
        powersgd_decode(PowerSGDLayout.build(SHAPES, 3), wire)  # rank 2 words for a rank-3 layout
    for bad in (float("nan"), float("inf")):
        w = wire.clone()
        w[5] = bad  # inside P of the first matrix
        with pytest.raises(GradCompressError, match="non-finite"):
            powersgd_decode(lay, w)


def test_int8_codes_scale_each_factor_column_and_round_trip_within_half_a_step() -> None:
    lay = PowerSGDLayout.build(SHAPES, 2)
    assert lay.scale_count == 2 * 2 + 1 + 2 * 2 + 1  # P and Q columns of the 2 matrices, one per dense entry
    wire = PowerSGDEncoder(lay, seed=1).encode(torch.randn(lay.size, generator=torch.Generator().manual_seed(5)))
    wire[:32 * 2].view(32, 2)[:, 1] *= 1000.0  # one column of P far larger than the rest: its own scale
    codes, scales = quantize_factors(lay, wire)
    assert codes.dtype == torch.int8 and codes.shape == (lay.wire_size,) and scales.shape == (lay.scale_count,)
    assert int(codes.abs().max()) == 127 and int(codes.min()) >= -127
    assert torch.equal(scales, scales.to(torch.bfloat16).float())  # the scales travel in bf16 exactly
    back = dequantize_factors(lay, codes, scales)
    for block, orig in zip(lay.blocks(back), lay.blocks(wire.clone()), strict=True):
        step = block.abs().amax(0) / 127  # one code of this column
        assert bool(((block - orig).abs() <= 0.51 * step + 1e-12).all())  # each value within half a code
    zero = torch.zeros(lay.wire_size)
    zc, zs = quantize_factors(lay, zero)
    assert not zc.any() and not zs.any() and not dequantize_factors(lay, zc, zs).any()  # an all-zero column


@pytest.mark.parametrize(("bits", "half_code"), [(8, 0.05), (4, 0.8)])
def test_error_feedback_carries_the_rounding_to_later_contributions(bits: int, half_code: float) -> None:
    lay = PowerSGDLayout.build(SHAPES, 1)
    g = torch.Generator().manual_seed(6)
    enc = PowerSGDEncoder(lay, seed=0)
    sent = torch.zeros(lay.size)
    total = torch.zeros(lay.size)
    for _ in range(20):
        grad = torch.randn(lay.size, generator=g)
        total += grad
        sent += powersgd_decode(lay, dequantize_factors(lay, *enc.encode_quantized(grad, bits), bits))
    assert torch.allclose(sent + enc.error, total, atol=1e-3)
    # a vector entry (dense in PowerSGD) is only rounded: its error is about half a code (gradients ~ 1: int8
    # codes ~ 0.03, int4 codes ~ 0.5)
    assert float(enc.error[32 * 48: 32 * 48 + 48].abs().max()) < half_code


def test_int8_decode_refuses_bad_codes_and_scales() -> None:
    lay = PowerSGDLayout.build(SHAPES, 2)
    codes, scales = quantize_factors(lay, PowerSGDEncoder(lay).encode(torch.randn(lay.size)))
    with pytest.raises(GradCompressError, match="expected"):
        dequantize_factors(lay, codes[:-1], scales)
    with pytest.raises(GradCompressError, match="int8"):
        dequantize_factors(lay, codes.to(torch.int16), scales)
    with pytest.raises(GradCompressError, match="expected"):
        dequantize_factors(PowerSGDLayout.build(SHAPES, 3), codes, scales)  # a rank-2 contribution, rank-3 layout
    for bad, why in ((float("nan"), "non-finite"), (float("inf"), "non-finite"), (-1.0, "negative")):
        s = scales.clone()
        s[2] = bad
        with pytest.raises(GradCompressError, match=why):
            dequantize_factors(lay, codes, s)
    c = codes.clone()
    c[0] = -128
    with pytest.raises(GradCompressError, match="outside -127 .. 127"):
        dequantize_factors(lay, c, scales)
    w = PowerSGDEncoder(lay).encode(torch.randn(lay.size))
    w[3] = float("nan")
    with pytest.raises(GradCompressError, match="non-finite"):
        quantize_factors(lay, w)


def test_int4_codes_round_trip_within_half_a_step_and_pack_two_to_a_byte() -> None:
    lay = PowerSGDLayout.build(SHAPES, 2)
    wire = PowerSGDEncoder(lay, seed=1).encode(torch.randn(lay.size, generator=torch.Generator().manual_seed(5)))
    codes, scales = quantize_factors(lay, wire, bits=4)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) == 7 and int(codes.min()) >= -7
    back = dequantize_factors(lay, codes, scales, bits=4)
    for block, orig in zip(lay.blocks(back), lay.blocks(wire.clone()), strict=True):
        step = block.abs().amax(0) / 7  # one code of this column
        assert bool(((block - orig).abs() <= 0.51 * step + 1e-12).all())
    for n in (1, 2, 7, codes.numel()):  # odd counts end with a zero high nibble
        packed = pack_nibbles(codes[:n])
        assert packed.dtype == torch.uint8 and packed.numel() == (n + 1) // 2
        assert torch.equal(unpack_nibbles(packed, n), codes[:n])
    every = torch.arange(-8, 8, dtype=torch.int8)  # all 16 nibbles survive packing (the decoder refuses -8)
    assert torch.equal(unpack_nibbles(pack_nibbles(every), 16), every)
    with pytest.raises(GradCompressError, match="expected at least"):
        unpack_nibbles(pack_nibbles(codes)[:-1], codes.numel())
    with pytest.raises(GradCompressError, match="uint8"):
        unpack_nibbles(pack_nibbles(codes).to(torch.int8), codes.numel())


def test_int4_decode_refuses_the_code_minus_8_and_unknown_widths() -> None:
    lay = PowerSGDLayout.build(SHAPES, 2)
    codes, scales = quantize_factors(lay, PowerSGDEncoder(lay).encode(torch.randn(lay.size)), bits=4)
    c = codes.clone()
    c[7] = -8
    with pytest.raises(GradCompressError, match=r"int4 .* outside -7 \.\. 7"):
        dequantize_factors(lay, c, scales, bits=4)
    c[7] = 100  # an int8 code is not an int4 one
    with pytest.raises(GradCompressError, match="outside"):
        dequantize_factors(lay, c, scales, bits=4)
    for bits in (2, 16, 8.0):
        with pytest.raises(GradCompressError, match="8 or 4 bits"):
            quantize_factors(lay, torch.zeros(lay.wire_size), bits=bits)  # type: ignore[arg-type]


def test_topk_keeps_the_largest_with_error_feedback_and_refuses_bad_indices() -> None:
    enc = TopKEncoder(100, 0.05)
    grad = torch.zeros(100)
    grad[[3, 50, 97]] = torch.tensor([5.0, -7.0, 1.0])
    grad[10] = 0.5
    wire = enc.encode(grad)
    assert wire.numel() == 10
    dec = topk_decode(wire, 100, 0.05)
    assert torch.equal(dec[[3, 50, 97, 10]], torch.tensor([5.0, -7.0, 1.0, 0.5]))
    assert torch.allclose(dec + enc.error, grad)
    for i, v in ((5, 100.0), (6, 1.5), (7, -1.0)):  # out of range, not an integer, negative
        w = wire.clone()
        w[i] = v
        with pytest.raises(GradCompressError, match="indices"):
            topk_decode(w, 100, 0.05)
    w = wire.clone()
    w[6] = w[5]
    with pytest.raises(GradCompressError, match="repeats"):
        topk_decode(w, 100, 0.05)


def test_outer_nesterov_step() -> None:
    opt = OuterNesterov(3, lr=0.5, momentum=0.9)
    start = torch.tensor([1.0, 2.0, 3.0])
    delta = torch.tensor([0.1, 0.0, -0.2])
    new = opt.step(start, delta)
    # v = delta; theta = start - lr (delta + mu v) = start - 0.5 * 1.9 delta
    assert torch.allclose(new, start - 0.95 * delta)
    new2 = opt.step(new, delta)
    v2 = 0.9 * delta + delta
    assert torch.allclose(new2, new - 0.5 * (delta + 0.9 * v2))
    with pytest.raises(GradCompressError, match="non-finite"):
        opt.step(start, torch.tensor([float("nan"), 0.0, 0.0]))


def test_more_power_iterations_fit_the_best_rank_r_approximation_closer_at_the_same_size() -> None:
    """A cold start (random Q) of one iteration is far from the truncated SVD; each further iteration of the
    same encoder call gets nearer, and the wire vector keeps its size."""
    lay = PowerSGDLayout.build([(64, 96)], 4)
    g = torch.Generator().manual_seed(5)
    spectrum = torch.logspace(0, -2, 64)  # a decaying spectrum, as gradients have
    u, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
    v, _ = torch.linalg.qr(torch.randn(96, 64, generator=g))
    m = (u * spectrum) @ v.T
    best = torch.linalg.matrix_norm(m - (u[:, :4] * spectrum[:4]) @ v[:, :4].T)  # the rank-4 truncated SVD's error
    errors = []
    for iterations in (1, 2, 4):
        enc = PowerSGDEncoder(lay, seed=0, error_feedback=False, iterations=iterations)
        wire = enc.encode(m.reshape(-1))
        assert wire.shape == (lay.wire_size,)
        errors.append(float(torch.linalg.matrix_norm(powersgd_decode(lay, wire).reshape(64, 96) - m)))
    assert errors[0] > errors[1] > errors[2] >= float(best) * (1 - 1e-4)
    assert errors[2] < 1.1 * float(best) < errors[0]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(GradCompressError, match="power iterations"):
            PowerSGDEncoder(lay, iterations=bad)  # type: ignore[arg-type]
