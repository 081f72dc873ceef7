"""The async schedule's measured loss penalty, per staleness bound and training length, for the simulator.

What one step of gradient delay costs shrinks as training grows (`benchmarks/async_recipe.py --horizons`),
so a penalty measured over 300 steps overstates it for a run of thousands. `pmn simulate wan --vs
datacenter` therefore takes, from the record this module stores in the calibration file, the ratio
measured at the WAN's staleness bound over the training length nearest (in log steps) to the steps
the target run takes, and labels it with both.

`python -m simulations.async_loss RECIPE_OUTPUT... [--write]` reads the last JSON line of saved
`benchmarks/async_recipe.py` outputs (`--staleness 1,2 --horizons 300,1000,3000` gives every pair), prints
the ratios, and with `--write` stores them under `async_loss` in the calibration file. With several outputs,
a later one's bounds replace an earlier one's (e.g. a clipped run at bound 1 over an unclipped run of 1 and
2); each bound keeps the recipe it was measured with (`recipes`: lr:warmup, the clip and LR schedule if any, the
optimiser if not AdamW, and the look-ahead).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .calibrate import DEFAULT_PATH


@dataclass(frozen=True)
class AsyncLoss:
    """One measured penalty: async validation loss over sync at equal tokens."""

    ratio: float  # async / sync validation loss at equal tokens, same recipe
    staleness: int  # the staleness bound it was measured at
    steps: int  # training steps of both runs (the horizon)
    label: str  # where it comes from, for the output


def record_from_recipe(out: dict[str, Any]) -> dict[str, Any]:
    """The calibration record of one `benchmarks/async_recipe.py` JSON line: staleness -> steps -> ratio of
    the grid's first recipe (the one both arms ran)."""
    recipe = str(out["grid"]).split(",")[0].strip()
    key = f"{float(recipe.split(':')[0]):g}:{int(recipe.split(':')[1])}"
    by_bound = out.get("loss_ratio_by_staleness") or {
        str(out["staleness"]): out.get("loss_ratio_by_steps") or {str(out["steps"]): out["loss_ratio_same_recipe"]}}
    ratios = {str(b): {str(n): float(r[key]) for n, r in by_steps.items()} for b, by_steps in by_bound.items()}
    model = out["model"]
    clip = float(out.get("grad_clip") or 0.0)
    schedule = str(out.get("schedule") or "constant")
    optimizer = str(out.get("optimizer") or "adamw")
    label = key + (f", grad clip {clip:g}" if clip else "") + (f", lr {schedule}" if schedule != "constant" else "")
    label += f", {optimizer}" if optimizer != "adamw" else ""
    lookaheads = out.get("lookahead_by_staleness") or {}  # per bound (older outputs: one for all)
    recipes = {b: f"{label}, look-ahead {float(lookaheads.get(b, out.get('lookahead') or 0)):g}" for b in ratios}
    return {"ratios": ratios, "recipe": key, "recipes": recipes, "lookahead": out.get("lookahead"),
            "optimizer": optimizer,
            "model": f"d_model {model['d_model']} x {model['n_layers']} layers, seq {model['seq_len']}"}


def merge_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One record from several (`record_from_recipe`): a later record's bounds replace an earlier one's, each with
    its recipe label (optimiser and look-ahead included); the model must agree (ValueError otherwise: the ratios
    would not describe one model)."""
    merged = dict(records[0])
    merged["ratios"], merged["recipes"] = dict(records[0]["ratios"]), dict(records[0].get("recipes") or {})
    for rec in records[1:]:
        if rec.get("model") != merged.get("model"):
            raise ValueError(f"async_loss records disagree on model: {merged.get('model')!r} vs {rec.get('model')!r}")
        merged["ratios"].update(rec["ratios"])
        merged["recipes"].update(rec.get("recipes") or {b: rec["recipe"] for b in rec["ratios"]})
    return merged


def pick(record: dict[str, Any] | None, staleness: int, target_steps: float) -> AsyncLoss | None:
    """The ratio measured at `staleness` over the horizon nearest `target_steps` (log distance); None when the
    record has nothing at that bound."""
    if not isinstance(record, dict):
        return None
    by_steps = (record.get("ratios") or {}).get(str(staleness))
    if not by_steps:
        return None
    steps = min((int(n) for n in by_steps), key=lambda n: (abs(math.log(n / target_steps)), -n))
    ratio = float(by_steps[str(steps)])
    label = (f"measured: benchmarks/async_recipe.py, staleness {staleness}, {steps} steps (the measured length "
             f"nearest the target's {target_steps:g}), {record.get('model')}, recipe lr:warmup[, ...] "
             f"{(record.get('recipes') or {}).get(str(staleness), record.get('recipe'))}")
    return AsyncLoss(ratio=ratio, staleness=staleness, steps=steps, label=label)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe_output", type=Path, nargs="+",
                   help="saved outputs of benchmarks/async_recipe.py (their last lines); later bounds replace earlier")
    p.add_argument("--write", action="store_true", help="store the record in the calibration file")
    p.add_argument("--calibration", type=Path, default=DEFAULT_PATH)
    a = p.parse_args(argv)
    record = merge_records([record_from_recipe(json.loads(path.read_text().strip().splitlines()[-1]))
                            for path in a.recipe_output])
    print(f"{record['model']}\n{'bound':>5} {'steps':>6} {'ratio':>7}  recipe")
    for b, by_steps in sorted(record["ratios"].items(), key=lambda kv: int(kv[0])):
        for n, r in sorted(by_steps.items(), key=lambda kv: int(kv[0])):
            print(f"{b:>5} {n:>6} {r:>7.4f}  {record['recipes'][b]}")
    if a.write:
        stored = json.loads(a.calibration.read_text())
        stored["async_loss"] = record
        a.calibration.write_text(json.dumps(stored, indent=1) + "\n")
    print(json.dumps(record, sort_keys=True))


if __name__ == "__main__":
    main()
