"""Incentive model: attacker classes through the real accounting function."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from simulations.economics import audit_rate_for, detection_probability, expected_epoch_gain, slash_amount
from simulations.incentives import CLASSES, IncentiveConfig, run_incentives

SMALL = IncentiveConfig(epochs=12)


def test_default_terms_make_every_attacker_net_negative(tmp_path: Path) -> None:
    out = run_incentives(plots_dir=tmp_path)
    assert set(out["net_earnings"]) == set(CLASSES)
    assert out["net_earnings"]["honest"] > 0
    for cls in CLASSES[1:]:
        assert out["net_earnings"][cls] < 0, cls
        assert out["first_epoch_expected_gain_per_identity"][cls] < 0, cls
    assert out["attackers_net_negative"] is True
    assert out["honest_share_error"] < 0.01
    assert all(Path(p).is_file() for p in out["plots"])


def test_without_audits_or_slashing_attacks_pay() -> None:
    no_audit = run_incentives(SMALL, audit_rate_bps=0)
    assert no_audit["net_earnings"]["free_rider"] > 0
    assert no_audit["net_earnings"]["sybil"] > 0
    assert no_audit["honest_share_error"] > 0.05  # uncaught junk dilutes honest shares
    no_slash = run_incentives(SMALL, slash_bps=0)
    assert no_slash["net_earnings"]["free_rider"] > 0


def test_units_come_from_the_accounting_function() -> None:
    from protocol.accounting import compute_units
    from sharding.partition import partition
    from simulations.presets import protocolnanogpt_model

    out = run_incentives(SMALL, population={"honest": 16})
    model = protocolnanogpt_model(None)
    expect = [compute_units(model, s, 8192) for s in partition(model, 8)]
    assert out["terms"]["units_per_microbatch"] == expect
    assert out["honest_share_error"] == pytest.approx(0.0, abs=1e-12)
    assert out["credited_units_total"] == out["real_units_total"] == 12 * 256 * sum(expect)


def test_deterministic_for_a_seed() -> None:
    assert run_incentives(SMALL) == run_incentives(SMALL)


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"audit_rate_bps": 10_001}, "audit_rate_bps"),
        ({"slash_bps": -1}, "slash_bps"),
        ({"epochs": 0}, "epochs"),
        ({"population": {"honest": 8, "thief": 1}}, "unknown classes"),
        ({"population": {"honest": 3}}, "every stage"),
        ({"lazy_fraction": 1.5}, "lazy_fraction"),
    ],
)
def test_bad_config_names_the_field(kw: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        run_incentives(SMALL, **kw)


def test_economics_functions() -> None:
    assert detection_probability(0.05, 0) == 0.0
    assert detection_probability(1.0, 1) == 1.0
    assert detection_probability(0.05, 32) == pytest.approx(1 - 0.95**32)
    assert slash_amount(10.0, 2500) == 2.5
    assert expected_epoch_gain(10.0, 0.0, 100.0, 10_000, 0.0, 5) == 10.0
    assert expected_epoch_gain(10.0, 0.0, 100.0, 10_000, 1.0, 5) == -100.0
    rate = audit_rate_for(0.9, 32)
    assert detection_probability(rate, 32) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="audit_rate"):
        detection_probability(1.5, 1)
    with pytest.raises(ValueError, match="slash_bps"):
        slash_amount(1.0, 20_000)
