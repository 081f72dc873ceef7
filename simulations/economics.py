"""Pure functions of the incentive model: spot-check detection, stake, slashing, expected value."""

from __future__ import annotations

import math


def detection_probability(audit_rate: float, fake_microbatches: int) -> float:
    """Chance that at least one of `fake_microbatches` is spot-checked when each is audited with `audit_rate`.

    A spot check recomputes the audited microbatch from its committed input, so an audited fake is
    always caught (stage compute is deterministic for its inputs).
    """
    if not (0.0 <= audit_rate <= 1.0):
        raise ValueError(f"audit_rate={audit_rate!r}: must lie in [0, 1]")
    if fake_microbatches < 0:
        raise ValueError(f"fake_microbatches={fake_microbatches!r}: must be >= 0")
    return 1.0 - (1.0 - audit_rate) ** fake_microbatches


def slash_amount(stake: float, slash_bps: int) -> float:
    """Stake taken for one fraudulent leaf: stake x slashBps / 10000 (ContributionLedger.challengeLeaf)."""
    if not (0 <= slash_bps <= 10_000):
        raise ValueError(f"slash_bps={slash_bps!r}: must lie in [0, 10000] (the contract's bound)")
    return stake * slash_bps / 10_000


def expected_epoch_gain(
    reward: float, cost: float, stake: float, slash_bps: int, audit_rate: float, fake_microbatches: int
) -> float:
    """One epoch's expected net for a node whose leaf (`reward`) is voided and stake slashed when caught."""
    p = detection_probability(audit_rate, fake_microbatches)
    return (1.0 - p) * reward - cost - p * slash_amount(stake, slash_bps)


def audit_rate_for(target_detection: float, fake_microbatches: int) -> float:
    """Smallest audit rate catching `fake_microbatches` fakes in one epoch with `target_detection` probability."""
    if not (0.0 < target_detection < 1.0) or fake_microbatches < 1:
        raise ValueError("target_detection must lie in (0, 1) and fake_microbatches be >= 1")
    return 1.0 - math.exp(math.log(1.0 - target_detection) / fake_microbatches)
