"""Measured loss penalties of compressed replica averaging, per averaging option and optimiser, for the simulator.

`benchmarks/wan_averaging.py` trains the replicated local swarm twice at equal tokens, dense bf16 against a
compressed exchange, and ends with a JSON line. `python -m simulations.averaging_loss OUTPUT... [--write]` reads
those lines (several seeds of one setting, or several settings), prints one row per setting, and with `--write`
stores them under `averaging_loss` in the calibration file: one record per setting (averaging option, optimiser,
lr, power iterations, steps, model, dense baseline) holding each seed's ratio; new seeds join the stored record of
their setting (seeds gather across sessions), a seed run again replaces its own, other settings are kept. `pmn simulate wan --vs datacenter` takes the record of its own averaging option
(rank and factor bits), measured with the optimiser of the async penalty it uses where there is one and over the
longest training (nearest the target run's thousands of steps, as `simulations.async_loss` does), and uses the
median over its seeds, naming every seed's ratio. The median, not the mean: single 150-step runs of the Muon recipe
(lr 1e-2) on the wide model spike now and then (seed 2's dense control ended at 1.4063 against 1.23-1.24 on seeds
0 and 1, which made its ratio 0.90), and one such run should not move the figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .calibrate import DEFAULT_PATH

SETTING_KEYS = ("averaging", "exchange", "optimizer", "lr", "iterations", "steps", "model", "dense_baseline")  # one
# record each
EXCHANGE_DEFAULT = "microbatch"  # the spec's replica_exchange of records stored before the field existed


@dataclass(frozen=True)
class AveragingLoss:
    """One measured penalty: compressed over dense validation loss at equal tokens, the median over seeds."""

    ratio: float  # median over the record's seeds
    label: str  # where it comes from, for the output


def option_of(out: dict[str, Any]) -> str:
    """The averaging option (`simulations.averaging.Averaging.label`) a wan_averaging JSON line measured."""
    bits, block = int(out.get("bits") or 16), int(out.get("block_rank") or 0)
    return (f"powersgd:{int(out['rank'])}" + (f"/{block}" if block and block != int(out["rank"]) else "")
            + (f":int{bits}" if bits < 16 else ""))


def records_from_outputs(outs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per setting of `benchmarks/wan_averaging.py` JSON lines: seed -> loss ratio and compression
    (ValueError on a line that is not a swarm comparison)."""
    records: dict[tuple[Any, ...], dict[str, Any]] = {}
    for out in outs:
        if "loss_ratio_compressed_avg" not in out or "rank" not in out:
            raise ValueError("not a benchmarks/wan_averaging.py swarm line (no loss_ratio_compressed_avg or rank)")
        setting = {"averaging": option_of(out), "exchange": str(out.get("exchange") or EXCHANGE_DEFAULT), "optimizer": str(out.get("optimizer") or "adamw"),
                   "lr": out.get("lr"), "iterations": int(out.get("iterations") or 1), "steps": int(out["steps"]),
                   "model": str(out.get("model")), "dense_baseline": str(out.get("dense_baseline") or "dense")}
        rec = records.setdefault(_setting(setting), {**setting, "ratios": {}, "compression": {}})
        seed = str(out.get("seed", 0))
        rec["ratios"][seed] = float(out["loss_ratio_compressed_avg"])
        rec["compression"][seed] = float(out["replica_compression"])
    return list(records.values())


def merge_records(stored: list[dict[str, Any]] | None, new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`stored` with the records of `new` added; a setting already stored keeps its other seeds, and a seed run
    again takes the new run's ratio and compression (seeds gather across sessions)."""
    old = {_setting(r): r for r in stored or []}
    merged = []
    for r in new:
        before = old.pop(_setting(r), None)
        if before is not None:
            r = {**r, "ratios": {**before.get("ratios", {}), **r["ratios"]},
                 "compression": {**before.get("compression", {}), **r["compression"]}}
        merged.append(r)
    return list(old.values()) + merged


def _setting(record: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(record.get(k) or EXCHANGE_DEFAULT if k == "exchange" else record.get(k) for k in SETTING_KEYS)


def pick(records: Any, option: str, optimizer: str | None, exchange: str = EXCHANGE_DEFAULT) -> AveragingLoss | None:
    """The penalty measured for averaging `option`: among its records, those of `exchange` (the spec's
    replica_exchange) first, then of `optimizer` (the recipe whose async penalty the comparison uses), then the
    longest run, then the most seeds; None when nothing was measured for `option`."""
    if not isinstance(records, list):
        return None
    found = [r for r in records if isinstance(r, dict) and r.get("averaging") == option and r.get("ratios")]
    if not found:
        return None
    rec = max(found, key=lambda r: ((r.get("exchange") or EXCHANGE_DEFAULT) == exchange, r.get("optimizer") == optimizer,
                                    int(r.get("steps") or 0), len(r["ratios"])))
    ratios = [float(v) for _, v in sorted(rec["ratios"].items(), key=lambda kv: int(kv[0]))]
    seeds = " / ".join(sorted(rec["ratios"], key=int))
    label = (f"measured: benchmarks/wan_averaging.py, {option}, {rec.get('optimizer')} lr {rec.get('lr')}, "
             f"{rec.get('iterations')} power iteration(s), against {rec.get('dense_baseline')}, {rec.get('model')} "
             f"model, {rec.get('steps')} steps; seeds {seeds}: " + " / ".join(f"{r:.4f}" for r in ratios)
             + ", median used")
    measured_with = rec.get("exchange") or EXCHANGE_DEFAULT
    label = label.replace("benchmarks/wan_averaging.py, ", f"benchmarks/wan_averaging.py, {measured_with} exchange, ")
    if measured_with != exchange:
        label += f"; measured with the {measured_with} exchange, the comparison runs the {exchange} one"
    if optimizer is not None and rec.get("optimizer") != optimizer:
        label += f"; measured with {rec.get('optimizer')}, the async penalty with {optimizer}"
    return AveragingLoss(ratio=statistics.median(ratios), label=label)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("outputs", type=Path, nargs="+", help="saved outputs of benchmarks/wan_averaging.py (last lines)")
    p.add_argument("--write", action="store_true", help="store the records in the calibration file")
    p.add_argument("--calibration", type=Path, default=DEFAULT_PATH)
    a = p.parse_args(argv)
    records = records_from_outputs([json.loads(path.read_text().strip().splitlines()[-1]) for path in a.outputs])
    print(f"{'averaging':18} {'exchange':>10} {'optimizer':>9} {'lr':>7} {'steps':>5}  seed: ratio (compression)")
    for r in records:
        per_seed = ", ".join(f"{s}: {r['ratios'][s]:.4f} ({r['compression'][s]:.1f}x)" for s in sorted(r["ratios"], key=int))
        print(f"{r['averaging']:18} {r['exchange']:>10} {r['optimizer']:>9} {r['lr']!s:>7} {r['steps']:>5}  {per_seed}")
    if a.write:
        stored = json.loads(a.calibration.read_text())
        stored["averaging_loss"] = merge_records(stored.get("averaging_loss"), records)
        a.calibration.write_text(json.dumps(stored, indent=1) + "\n")
    print(json.dumps(records, sort_keys=True))


if __name__ == "__main__":
    main()
