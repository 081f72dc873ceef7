"""Audit benchmark: how often is cheating caught within an epoch, at audit rates 0.05, 0.2 and 1.0?

A 3-stage swarm trains in one process (real torch stages, every hop signed, countersigned and stored
in each node's sqlite store; the cheating is injected into the stage code, which the libp2p runtime
has no hook for): stage 1 sends random activations for a fraction of its microbatches, stage 0
reports 10x its work by fabricating receipts no neighbour countersigned.

Every checkable hop is re-executed once (deterministic CPU) to know its check outcome; then, for many
attester seeds, the real seeded sampler picks hops at each rate and the cheater counts as caught in an
epoch when a sampled hop of it fails its check. Measured catch probability is compared with the
analytic 1 - (1 - r)^n (n = faked hops in the epoch), averaged over epochs. Honest nodes' sampled hops
count as false positives if they fail. The inflating node's credited units are divided by the units of
the work its neighbours co-signed.

    python benchmarks/audit.py --quick     # < 60 s
    python benchmarks/audit.py
Last line: JSON with `audit` (list of {rate, measured, expected}) and `credited_over_verified`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eth_account import Account  # noqa: E402

from protocol.accounting import compute_units  # noqa: E402
from protocol.epoch import EpochContext, build_epoch  # noqa: E402
from protocol.localswarm import Behaviour, LocalSwarm, LocalSwarmConfig  # noqa: E402
from protocol.receipts import Domain, StaticKeyRegistry  # noqa: E402
from protocol.spotcheck import SpotCheckConfig, detection_probability, is_sampled  # noqa: E402
from sharding.config import ModelConfig  # noqa: E402

RATES = (0.05, 0.2, 1.0)


@dataclass(frozen=True)
class AuditBenchConfig:
    """Shape and budget of one run."""

    epochs: int = 4  # accounting epochs trained
    epoch_length: int = 4  # optimizer steps per epoch
    microbatches: int = 4  # microbatches per step
    random_fraction: float = 0.25  # fraction of stage 1's forward hops replaced by random activations
    inflate: int = 10  # stage 0's self-reported work multiplier
    trials: int = 2000  # attester seeds per (rate, epoch)
    tolerance: float = 1e-2  # spot-check relative L2 tolerance


QUICK = AuditBenchConfig(epochs=2, epoch_length=2, microbatches=4, trials=400)


def run(cfg: AuditBenchConfig) -> dict[str, object]:
    """Train, re-execute every checkable hop once, then simulate attester sampling; return the figures."""
    model = ModelConfig(vocab_size=256, seq_len=16, d_model=32, n_layers=3, n_heads=4)
    keys = [Account.from_key((77 + i).to_bytes(32, "big")) for i in range(3)]
    domain = Domain(31337, "0x" + "c0" * 20)
    registry = StaticKeyRegistry(k.address for k in keys)
    swarm_cfg = LocalSwarmConfig(model, num_stages=3, microbatches=cfg.microbatches, microbatch_size=2,
                                 epoch_length=cfg.epoch_length, model_id=1)
    behaviours = {0: Behaviour(inflate=cfg.inflate, seed=1), 1: Behaviour(random_fraction=cfg.random_fraction, seed=2)}
    check = SpotCheckConfig(audit_rate=1.0, tolerance=cfg.tolerance)
    cheater, inflator = keys[1].address, keys[0].address
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        swarm = LocalSwarm(swarm_cfg, keys, domain, registry, Path(tmp), behaviours)
        epochs = []
        credited = verified = 0
        for epoch in range(cfg.epochs):
            swarm.train_epoch(epoch)
            gathered = swarm.gathered(epoch)
            result = build_epoch(gathered, EpochContext(1, epoch, model, tuple(swarm.specs), domain), registry)
            credited += result.totals.get(inflator, 0)
            # the work stage 0's neighbours co-signed: every microbatch of the epoch it really ran
            verified += cfg.epoch_length * cfg.microbatches * compute_units(model, swarm.specs[0], swarm.tokens_per_hop)
            unique = {s.receipt.key: s for s in gathered if s.cosigned}
            outcomes = {k: swarm.check(s, check) for k, s in unique.items() if swarm.checkable(s)}
            bad = sum(1 for k in swarm.bad_hops if k[1] == epoch)
            epochs.append((epoch, outcomes, bad))
        reported = swarm.self_reported[inflator]
        swarm.close()
    train_check_s = time.perf_counter() - t0

    rows = []
    false_positives = 0
    honest_sampled = 0
    for rate in RATES:
        caught = 0
        expected = 0.0
        for epoch, outcomes, bad in epochs:
            expected += detection_probability(rate, bad)
            for seed in range(cfg.trials):
                hit = False
                for key, res in outcomes.items():
                    if not is_sampled(key, rate, seed * 1000 + epoch):
                        continue
                    if res.node == cheater:
                        hit = hit or not res.passed
                    else:
                        honest_sampled += 1
                        false_positives += 0 if res.passed else 1
                caught += hit
        n_trials = cfg.trials * len(epochs)
        rows.append({"rate": rate, "measured": round(caught / n_trials, 4), "expected": round(expected / len(epochs), 4)})

    bad_counts = [bad for _, _, bad in epochs]
    max_err = max(res.relative_error for _, outcomes, _ in epochs for res in outcomes.values() if res.node != cheater)
    print(f"audit benchmark: 3 stages, {cfg.epochs} epochs x {cfg.epoch_length} steps x {cfg.microbatches} microbatches; "
          f"stage 1 fakes {cfg.random_fraction:.0%} of its activations, stage 0 reports {cfg.inflate}x")
    print(f"faked hops per epoch: {bad_counts}; honest max relative error {max_err:.2e} (tolerance {cfg.tolerance})")
    print(f"{'audit rate':>10} {'measured P(caught/epoch)':>26} {'analytic 1-(1-r)^n':>20}")
    for row in rows:
        print(f"{row['rate']:>10} {row['measured']:>26} {row['expected']:>20}")
    ratio = credited / verified if verified else 0.0
    print(f"inflating node: self-reported {reported} hops for {reported // cfg.inflate} real; "
          f"credited/verified units = {ratio:.4f}; false positives on honest hops: {false_positives}/{honest_sampled}")
    print(f"train + re-execution {train_check_s:.1f} s")
    return {
        "audit": rows,
        "credited_over_verified": ratio,
        "self_reported_over_verified": reported / (reported // cfg.inflate),
        "faked_hops_per_epoch": bad_counts,
        "false_positives": false_positives,
        "honest_hops_sampled": honest_sampled,
        "trials_per_epoch": cfg.trials,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small run (< 60 s)")
    a = p.parse_args(argv)
    out = run(QUICK if a.quick else AuditBenchConfig())
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
