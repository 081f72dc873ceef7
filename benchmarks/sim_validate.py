"""Simulator vs reality: predict a real local libp2p swarm's tokens/s and report the error (goal 15%).

Full run: calibrates the stage times on the real stage code, runs the real swarm (node processes on
127.0.0.1) at two microbatch counts to fit the runtime's per-frame and per-step overheads, then
predicts a third, held-out microbatch count and compares with its measurement. Also reports the
error without the fitted overheads (pure compute + network model) and the protocolnanogpt preset.

    python benchmarks/sim_validate.py --quick   # in-process pipeline only, < 60 s
    python benchmarks/sim_validate.py           # real swarm, about 2 minutes
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simulations.calibrate import CalibrationConfig  # noqa: E402
from simulations.validation import validate_in_process, validate_local_swarm_fitted  # noqa: E402
from simulations.wan import run_wan  # noqa: E402


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="in-process comparison only (< 60 s)")
    ap.add_argument("--steps", type=int, default=5, help="swarm steps per run (the first is excluded)")
    args = ap.parse_args()
    cal = CalibrationConfig(model="tiny", num_stages=2, microbatch_size=4, threads=1)
    rows = []
    inproc = validate_in_process(cal, microbatches=4, steps=3)
    rows.append(("in-process LocalPipeline", inproc))
    result: dict = {"mode": "quick" if args.quick else "full", "in_process_error": inproc["error"]}
    if not args.quick:
        swarm = validate_local_swarm_fitted(cal, steps=args.steps)
        rows.append(("libp2p swarm, held-out M=4", swarm))
        result.update({
            "swarm_error": swarm["error"],
            "swarm_error_without_runtime_overheads": swarm["error_without_runtime_overheads"],
            "frame_overhead_s": swarm["frame_overhead_s"],
            "step_overhead_s": swarm["step_overhead_s"],
            "swarm_measured_tokens_per_s": swarm["measured_tokens_per_s"],
            "swarm_simulated_tokens_per_s": swarm["simulated_tokens_per_s"],
            "fit_runs_tokens_per_s": {m: r["tokens_per_s"] for m, r in swarm["fit_runs"].items()},
        })
    wan = run_wan("protocolnanogpt", compare_schedules=False)
    result.update({"tokens_per_s": wan["tokens_per_s"], "speedup_vs_dense": wan["speedup_vs_dense"]})
    print(f"{'reference':<30}{'measured tok/s':>16}{'simulated tok/s':>17}{'error':>9}")
    for name, r in rows:
        print(f"{name:<30}{r['measured_tokens_per_s']:>16.0f}{r['simulated_tokens_per_s']:>17.0f}{r['error']:>9.1%}")
    print(f"protocolnanogpt: subspace {wan['tokens_per_s']:.0f} tok/s, speedup vs dense {wan['speedup_vs_dense']:.1f}x")
    print(json.dumps(result, sort_keys=True))
    return result


if __name__ == "__main__":
    main()
