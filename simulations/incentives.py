"""Incentive model: honest nodes and four attacker classes, epoch by epoch, through the real accounting.

Every epoch each stage's microbatches are routed to its live identities in proportion to their
declared capacity (as SWARM-style routing does). Identities then behave by class:

- `honest`: computes every routed microbatch.
- `free_rider`: computes nothing and returns junk for every microbatch.
- `inflator`: declares `inflation_factor` x its real capacity (and stakes for it), so it is routed
  that much more work than it can do, and returns junk for the excess.
- `sybil`: one GPU behind `sybil_identities` identities in one stage, each staked and routed like a
  full node; the excess over one GPU's capacity is junk.
- `lazy`: replays a stale output instead of computing for a `lazy_fraction` of its microbatches.

Junk is co-signed by neighbours (they cannot tell), so it is credited by the accounting function
`protocol.accounting.compute_units` unless a spot check catches it: each microbatch is recomputed by an
auditor with probability `audit_rate_bps / 10000` (ModelRegistry `auditRateBps`), and an audited junk
microbatch is always caught (stage compute is deterministic). A caught identity's leaf is voided for
the epoch, `slash_bps / 10000` of its stake is taken (ContributionLedger `slashBps`), and it is
ejected. Stake is `stake_epochs` epochs of an honest full node's expected reward per declared
capacity unit (NodeRegistry `stakePerUnit`).

Money is in cost units: 1.0 = the compute cost of one PFLOP; a credited unit (1 FLOP) is worth
`unit_value` times its compute cost (the inference revenue it is expected to earn).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .economics import detection_probability, expected_epoch_gain, slash_amount

CLASSES = ("honest", "free_rider", "inflator", "sybil", "lazy")
COST_PER_UNIT = 1e-15  # cost units per compute unit (1 compute unit = 1 FLOP; 1.0 cost unit = 1 PFLOP)


def _default_population() -> dict[str, int]:
    return {"honest": 42, "free_rider": 5, "inflator": 5, "sybil": 2, "lazy": 4}


@dataclass(frozen=True)
class IncentiveConfig:
    """The population, the model terms (audit rate, slashing, stake) and the economics."""

    num_stages: int = 8  # pipeline stages of the protocolnanogpt model (units from its real stage specs)
    epochs: int = 40  # accounting epochs simulated
    microbatches_per_epoch: int = 256  # microbatches each stage processes per epoch
    microbatch_tokens: int = 8192  # tokens per microbatch
    audit_rate_bps: int = 500  # spot-check rate, basis points (ModelRegistry Terms.auditRateBps)
    slash_bps: int = 10_000  # stake share slashed per fraudulent leaf (ContributionLedger.slashBps)
    stake_epochs: float = 4.0  # stake per declared capacity unit, in epochs of an honest node's expected reward
    unit_value: float = 1.25  # value of one credited unit / its compute cost (honest margin = 25%)
    registration_cost: float = 0.02  # cost units (gas) per identity registration
    population: dict[str, int] = field(default_factory=_default_population)  # operators per class
    sybil_identities: int = 4  # identities behind each sybil operator's one GPU
    inflation_factor: float = 2.0  # an inflator's declared capacity / its real capacity
    lazy_fraction: float = 0.3  # share of its microbatches a lazy node does not compute
    seed: int = 0  # seed of routing, placement, laziness and audits

    def validate(self) -> IncentiveConfig:
        """Raise ValueError naming the bad field and the fix; return self."""
        for name in ("num_stages", "epochs", "microbatches_per_epoch", "microbatch_tokens", "sybil_identities"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"IncentiveConfig.{name}={value!r}: must be an integer >= 1")
        for name, lo, hi in (("audit_rate_bps", 0, 10_000), ("slash_bps", 0, 10_000)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ValueError(f"IncentiveConfig.{name}={value!r}: must be an integer in [{lo}, {hi}]")
        for name in ("stake_epochs", "unit_value", "registration_cost"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"IncentiveConfig.{name}={value!r}: must be a finite number >= 0")
        if not (isinstance(self.inflation_factor, (int, float)) and self.inflation_factor >= 1):
            raise ValueError(f"IncentiveConfig.inflation_factor={self.inflation_factor!r}: must be >= 1")
        if not (0.0 <= self.lazy_fraction <= 1.0):
            raise ValueError(f"IncentiveConfig.lazy_fraction={self.lazy_fraction!r}: must lie in [0, 1]")
        unknown = sorted(set(self.population) - set(CLASSES))
        if unknown:
            raise ValueError(f"IncentiveConfig.population has unknown classes {unknown}; use {list(CLASSES)}")
        if any(not isinstance(v, int) or v < 0 for v in self.population.values()):
            raise ValueError("IncentiveConfig.population counts must be integers >= 0")
        if self.population.get("honest", 0) < self.num_stages:
            raise ValueError(
                f"IncentiveConfig.population['honest']={self.population.get('honest', 0)} must be >= "
                f"num_stages={self.num_stages} so that every stage has an honest node"
            )
        return self


@dataclass
class _Identity:
    operator: int  # index of the operator owning it
    cls: str  # behaviour class
    stage: int  # stage served
    declared: float  # declared capacity (routing weight, stake multiple)
    real_fraction: float  # share of routed microbatches it really computes (before laziness)
    stake: float = 0.0  # bonded stake, cost units
    alive: bool = True  # not yet ejected
    credited: float = 0.0  # units credited over the run
    real_units: float = 0.0  # units of compute actually done
    slashed: float = 0.0  # stake lost
    caught_epoch: int | None = None  # epoch it was caught, if ever


def _stage_units_per_microbatch(cfg: IncentiveConfig) -> list[int]:
    """Real accounting: compute_units of each stage of the protocolnanogpt model for one microbatch."""
    from protocol.accounting import compute_units
    from sharding.partition import partition

    from .presets import protocolnanogpt_model

    model = protocolnanogpt_model(None)
    return [compute_units(model, spec, cfg.microbatch_tokens) for spec in partition(model, cfg.num_stages)]


def _build_population(cfg: IncentiveConfig, rng: np.random.Generator) -> list[_Identity]:
    """Honest nodes fill every stage round-robin; attackers land on random stages."""
    ids: list[_Identity] = []
    operator = 0
    for i in range(cfg.population.get("honest", 0)):
        ids.append(_Identity(operator, "honest", i % cfg.num_stages, 1.0, 1.0))
        operator += 1
    for cls in CLASSES[1:]:
        for _ in range(cfg.population.get(cls, 0)):
            stage = int(rng.integers(cfg.num_stages))
            if cls == "sybil":
                for _ in range(cfg.sybil_identities):
                    ids.append(_Identity(operator, cls, stage, 1.0, 1.0 / cfg.sybil_identities))
            elif cls == "inflator":
                ids.append(_Identity(operator, cls, stage, cfg.inflation_factor, 1.0 / cfg.inflation_factor))
            elif cls == "free_rider":
                ids.append(_Identity(operator, cls, stage, 1.0, 0.0))
            else:
                ids.append(_Identity(operator, cls, stage, 1.0, 1.0))
            operator += 1
    return ids


def simulate_incentives(cfg: IncentiveConfig) -> dict[str, Any]:
    """Run every epoch; return per-identity outcomes, per-class means and honest share errors."""
    cfg = cfg.validate()
    rng = np.random.default_rng(cfg.seed)
    units_mb = _stage_units_per_microbatch(cfg)
    ids = _build_population(cfg, rng)
    audit = cfg.audit_rate_bps / 10_000
    honest_per_stage = [sum(1 for i in ids if i.cls == "honest" and i.stage == s) for s in range(cfg.num_stages)]
    # expected reward of one honest capacity unit per epoch if only honest nodes served the stage
    ref_reward = [
        cfg.microbatches_per_epoch / max(honest_per_stage[s], 1) * units_mb[s] * COST_PER_UNIT * cfg.unit_value
        for s in range(cfg.num_stages)
    ]
    for ident in ids:
        ident.stake = cfg.stake_epochs * ref_reward[ident.stage] * ident.declared
    for epoch in range(cfg.epochs):
        for s in range(cfg.num_stages):
            live = [i for i in ids if i.alive and i.stage == s]
            weights = np.array([i.declared for i in live], dtype=float)
            routed = rng.multinomial(cfg.microbatches_per_epoch, weights / weights.sum())
            for ident, n in zip(live, routed, strict=True):
                n = int(n)
                real = int(round(n * ident.real_fraction))
                if ident.cls == "lazy":
                    real = n - int(rng.binomial(n, cfg.lazy_fraction))
                fake = n - real
                ident.real_units += real * units_mb[s]
                caught = fake > 0 and int(rng.binomial(fake, audit)) > 0
                if caught:
                    loss = slash_amount(ident.stake, cfg.slash_bps)
                    ident.stake -= loss
                    ident.slashed += loss
                    ident.alive = False
                    ident.caught_epoch = epoch
                else:
                    ident.credited += n * units_mb[s]
    return _summarise(cfg, ids, units_mb, ref_reward, audit)


def _summarise(
    cfg: IncentiveConfig, ids: list[_Identity], units_mb: list[int], ref_reward: list[float], audit: float
) -> dict[str, Any]:
    total_credited = sum(i.credited for i in ids)
    total_real = sum(i.real_units for i in ids)
    operators: dict[int, dict[str, Any]] = {}
    for ident in ids:
        op = operators.setdefault(ident.operator, {"cls": ident.cls, "net": 0.0, "caught": 0, "identities": 0})
        op["net"] += (
            ident.credited * COST_PER_UNIT * cfg.unit_value
            - ident.real_units * COST_PER_UNIT
            - ident.slashed
            - cfg.registration_cost
        )
        op["identities"] += 1
        op["caught"] += ident.caught_epoch is not None
    net: dict[str, float] = {}
    caught: dict[str, float] = {}
    for cls in CLASSES:
        rows = [o for o in operators.values() if o["cls"] == cls]
        if rows:
            net[cls] = float(np.mean([o["net"] for o in rows]))
            caught[cls] = float(np.mean([o["caught"] / o["identities"] for o in rows]))
    honest = []
    for ident in ids:
        if ident.cls != "honest":
            continue
        share = ident.credited / total_credited if total_credited else 0.0
        true = ident.real_units / total_real if total_real else 0.0
        honest.append({"stage": ident.stage, "share": share, "true_fraction": true})
    rel_errors = [abs(h["share"] / h["true_fraction"] - 1.0) for h in honest if h["true_fraction"] > 0]
    # analytic first-epoch expectation per class at stage 0's prices (routing share = declared / total)
    n_mb = cfg.microbatches_per_epoch / max(sum(1 for i in ids if i.stage == 0 and i.cls == "honest"), 1)
    unit_cost = units_mb[0] * COST_PER_UNIT
    analytic = {}
    for cls, declared, real_frac in (
        ("honest", 1.0, 1.0),
        ("free_rider", 1.0, 0.0),
        ("inflator", cfg.inflation_factor, 1.0 / cfg.inflation_factor),
        ("sybil", 1.0, 1.0 / cfg.sybil_identities),
        ("lazy", 1.0, 1.0 - cfg.lazy_fraction),
    ):
        n = n_mb * declared
        fake = int(round(n * (1.0 - real_frac)))
        analytic[cls] = expected_epoch_gain(
            reward=n * unit_cost * cfg.unit_value,
            cost=n * real_frac * unit_cost,
            stake=cfg.stake_epochs * ref_reward[0] * declared,
            slash_bps=cfg.slash_bps,
            audit_rate=audit,
            fake_microbatches=fake,
        )
    return {
        "net_earnings": net,
        "honest_share_error": max(rel_errors) if rel_errors else 0.0,
        "honest_share_error_mean": float(np.mean(rel_errors)) if rel_errors else 0.0,
        "honest_nodes": honest,
        "caught_fraction": caught,
        "first_epoch_expected_gain_per_identity": analytic,
        "detection_probability_32_fakes": detection_probability(audit, 32),
        "credited_units_total": total_credited,
        "real_units_total": total_real,
        "unit": "cost units (1.0 = compute cost of one PFLOP)",
        "terms": {
            "audit_rate_bps": cfg.audit_rate_bps,
            "slash_bps": cfg.slash_bps,
            "stake_per_capacity_unit": [cfg.stake_epochs * r for r in ref_reward],
            "stake_epochs": cfg.stake_epochs,
            "units_per_microbatch": units_mb,
            "accounting": "protocol.accounting.compute_units on the protocolnanogpt stage specs",
        },
        "config": {k: v for k, v in asdict(cfg).items()},
    }


def run_incentives(
    config: IncentiveConfig | None = None, plots_dir: str | Path | None = None, **overrides: Any
) -> dict[str, Any]:
    """The JSON object of `pmn simulate incentives`: `net_earnings` per class and `honest_share_error`."""
    from dataclasses import replace

    cfg = replace(config or IncentiveConfig(), **overrides)
    out = simulate_incentives(cfg)
    out["attackers_net_negative"] = all(v < 0 for k, v in out["net_earnings"].items() if k != "honest")
    if plots_dir is not None:
        from .plots import plot_incentives

        out["plots"] = [str(p) for p in plot_incentives(out, Path(plots_dir))]
    return out
