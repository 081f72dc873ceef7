"""`sharding.sharedpowersgd`: PowerSGD whose code is linear across replicas (the all-reduce form)."""

from __future__ import annotations

import pytest
import torch

from sharding.gradcompress import GradCompressError, PowerSGDEncoder, PowerSGDLayout, powersgd_decode
from sharding.sharedpowersgd import SharedPowerSGD, round_trip

SHAPES = [(32, 24), (24,), (16, 40)]  # two compressed matrices at rank 4 and a dense vector


def _layout(rank: int = 4) -> PowerSGDLayout:
    lay = PowerSGDLayout.build(SHAPES, rank)
    assert [e.compressed for e in lay.entries] == [True, False, True]
    return lay


def _grads(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(_layout().size, generator=g) for _ in range(n)]


def _low_rank(rank: int, seed: int) -> torch.Tensor:
    """A flat gradient whose matrices have rank `rank` (the vector is arbitrary)."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for shape in SHAPES:
        if len(shape) == 2:
            parts.append((torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g)).reshape(-1))
        else:
            parts.append(torch.randn(shape, generator=g))
    return torch.cat(parts)


def test_a_sum_of_contributions_is_one_contribution() -> None:
    """What makes the sharded exchange possible: a round's messages are linear in the gradients, so the mean of
    the replicas' messages is the message of their mean gradient, and it has one contribution's size."""
    lay = _layout()
    shared = SharedPowerSGD(lay, 3, seed=1)
    grads = _grads(3, 0)
    mean_of_messages = torch.stack([shared._project(g) for g in grads]).mean(0)
    message_of_mean = shared._project(torch.stack(grads).mean(0))
    assert mean_of_messages.shape == (lay.wire_size,)
    assert torch.allclose(mean_of_messages, message_of_mean, atol=1e-5)
    # the node's own PowerSGD is not linear: each replica's Q is its own
    encs = [PowerSGDEncoder(lay, seed=s, error_feedback=False) for s in range(3)]
    mine = torch.stack([e.encode(g) for e, g in zip(encs, grads, strict=True)]).mean(0)
    assert not torch.allclose(mine, PowerSGDEncoder(lay, seed=0, error_feedback=False).encode(
        torch.stack(grads).mean(0)), atol=1e-2)


def test_replicas_with_one_gradient_get_what_one_replica_gets() -> None:
    g = _grads(1, 3)[0]
    for bits in (16, 8, 4):
        one = SharedPowerSGD(_layout(), 1, seed=5, bits=bits).step([g])
        three = SharedPowerSGD(_layout(), 3, seed=5, bits=bits).step([g, g, g])
        assert torch.allclose(one, three, atol=1e-6), bits


def test_low_rank_gradients_are_recovered_and_error_feedback_keeps_the_rest() -> None:
    lay = _layout(rank=4)
    shared = SharedPowerSGD(lay, 2, seed=0)
    a, b = _low_rank(1, 1), _low_rank(1, 2)  # the mean has rank <= 2 < 4
    mean = (a + b) / 2
    first = shared.step([a, b])
    # each replica's error is what its own share missed, so the errors average to what the step missed of the mean
    # gradient, up to the owners' bf16 rounding of the mean (2**-8 of it)
    missed = mean - first
    assert float((torch.stack(shared.errors).mean(0) - missed).norm()) < 2 ** -7 * float(mean.norm())
    # ... and not the replica's distance from the mean (which the mean's approximation would put there)
    assert float((shared.errors[0] - (a - first)).norm()) > 0.5 * float((a - mean).norm())
    for _ in range(3):  # the warm-started common Q converges on the mean's column space
        out = shared.step([a, b])
    rel = float((out - mean).norm() / mean.norm())
    assert rel < 0.02, rel  # bf16 rounding of each round


def test_error_feedback_delivers_a_constant_gradient_over_steps() -> None:
    """With a full-rank gradient sent every step, what was applied in total tracks what was computed in total."""
    lay = _layout(rank=2)
    shared = SharedPowerSGD(lay, 2, seed=0, bits=4)
    grads = _grads(2, 7)
    mean = torch.stack(grads).mean(0)
    applied = torch.zeros(lay.size)
    steps = 40
    for _ in range(steps):
        applied += shared.step(grads)
    rel = float((applied / steps - mean).norm() / mean.norm())
    first = float((SharedPowerSGD(lay, 2, seed=0, bits=4).step(grads) - mean).norm() / mean.norm())
    assert rel < 0.2 * first, (rel, first)


def test_bad_input_is_refused_and_leaves_the_state_as_it_was() -> None:
    lay = _layout()
    shared = SharedPowerSGD(lay, 2, seed=0, bits=4)
    shared.step(_grads(2, 0))
    errors, q = [e.clone() for e in shared.errors], {i: v.clone() for i, v in shared.q.items()}
    bad = _grads(2, 1)
    bad[1][5] = float("nan")
    cases = [(bad, "non-finite"), (_grads(3, 1), "3 gradients for 2 replicas"),
             ([torch.zeros(lay.size), torch.zeros(lay.size + 1)], "replica 1's gradient has shape")]
    for grads, what in cases:
        with pytest.raises(GradCompressError, match=what):
            shared.step(grads)
        assert all(torch.equal(x, y) for x, y in zip(errors, shared.errors, strict=True))
        assert all(torch.equal(q[i], shared.q[i]) for i in q)
    with pytest.raises(GradCompressError, match="travel in one of"):
        SharedPowerSGD(lay, 2, bits=2)
    with pytest.raises(GradCompressError, match="replicas >= 1"):
        SharedPowerSGD(lay, 0)


def test_what_travels_is_rounded_once_and_rounded_values_survive_another_trip() -> None:
    lay = _layout()
    wire = torch.randn(lay.wire_size, generator=torch.Generator().manual_seed(0))
    for bits in (16, 8, 4):
        once = round_trip(lay, wire, bits)
        assert not torch.equal(once, wire)
        assert torch.equal(round_trip(lay, once, bits), once)  # an owner's re-send of a rounded value changes nothing
    assert powersgd_decode(lay, round_trip(lay, wire, 4)).shape == (lay.size,)
