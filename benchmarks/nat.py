"""Training through real NAT: a 3-stage swarm in network namespaces (root, Linux, `ip` + `nft`), run three
ways. public: every stage on the public segment. relayed: stages 0 and 1 each behind their own home router
(nftables masquerade), hole punching off, so the activations and gradients between them go through the
circuit relay v2 of stage 2 (public). direct: the same homes with DCUtR, so that link is a hole-punched
direct connection. Prints a table; the last line is one JSON object with tokens/s of each run,
ratio_direct = direct / public, and the seconds from the first launch to the first trained step.

With `--rounds R` the three runs are interleaved R times (public, relayed, direct, public, ...) so that a
shared machine's load falls on every arm alike; each figure is the median over the rounds and
`ratio_direct_range` gives the smallest and largest per-round ratio.

    python benchmarks/nat.py [--quick] [--rounds R] [--steps N] [--model NAME]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.testing.nat_swarm import NatSwarmResult, run_nat_swarm  # noqa: E402
from node.testing.netns import available, nat_topology  # noqa: E402

ACT = "/pmn/act/1.0.0"
RUNS: dict[str, tuple[list[str], list[str]]] = {  # name -> (places of stages 0..2, extra flags)
    "public": (["public", "public", "public"], []),
    "relayed": (["home2", "home1", "public"], ["--no-nat-holepunch"]),
    "direct": (["home2", "home1", "public"], []),
}


def _tokens_per_s(res: NatSwarmResult) -> float:
    """Tail-stage tokens/s over every step but the first (start-up, connection set-up)."""
    recs = sorted(res.progress[len(res.ready) - 1], key=lambda r: int(r["step"]))[1:]
    seconds = sum(float(r["seconds"]) for r in recs)
    return sum(int(r["tokens"]) for r in recs) / seconds if seconds > 0 else 0.0


def _link_path(res: NatSwarmResult) -> str:
    """The path(s) stage 0's activation streams to stage 1 took, as stage 0 saw them."""
    peer = res.ready[1]["peer_id"]
    paths = res.statuses[0].get("nat", {}).get("stream_paths", {}).get(peer, {})
    return "+".join(sorted(p for p, protos in paths.items() if ACT in protos)) or "?"


def run(name: str, root: Path, steps: int, model: str, m: int, b: int) -> dict[str, Any]:
    places, extra = RUNS[name]
    args = ["--model", model, "--steps", str(steps), "--microbatches", str(m), "--microbatch-size", str(b),
            "--corpus", "synthetic", "--threads", "1", "--checkpoint-every", "0",
            "--discovery-discovery-timeout-s", "180", *extra]
    with nat_topology(homes=2) as topo:
        res = run_nat_swarm(topo, root / name, places, args, timeout_s=1800)
    return {"tokens_per_s": _tokens_per_s(res), "first_step_s": res.first_step_s, "seconds": res.seconds,
            "path_0_1": _link_path(res), "final_loss": res.losses[-1] if res.losses else None,
            "losses": res.losses}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model, 4 steps (a couple of minutes)")
    p.add_argument("--steps", type=int, default=None, help="global steps per run")
    p.add_argument("--model", default=None, help="model preset (default: tiny with --quick, else bench)")
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds of the three runs (medians reported)")
    a = p.parse_args()
    reason = available()
    if reason is not None:
        print(json.dumps({"error": f"benchmarks/nat.py {reason}"}))
        return 1
    model = a.model or ("tiny" if a.quick else "bench")
    steps = a.steps or (4 if a.quick else 8)
    m, b = (2, 2) if a.quick else (4, 2)
    rounds: list[dict[str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="pmn-nat-bench-") as tmp:
        for i in range(a.rounds):
            rounds.append({name: run(name, Path(tmp) / f"round{i}", steps, model, m, b) for name in RUNS})
    print(f"3-stage swarm, model {model}, {steps} steps, {m} microbatches of {b}, {a.rounds} interleaved "
          "round(s): link stage 0 -> stage 1")
    print(f"{'round':>5} {'run':8} {'link path':>22} {'tok/s':>9} {'first step s':>12} {'total s':>8} "
          f"{'final loss':>10}")
    for i, results in enumerate(rounds):
        for name, r in results.items():
            loss = f"{r['final_loss']:.6f}" if r["final_loss"] is not None else "-"
            print(f"{i:>5} {name:8} {r['path_0_1']:>22} {r['tokens_per_s']:>9.1f} {r['first_step_s']:>12.1f} "
                  f"{r['seconds']:>8.1f} {loss:>10}")
    same = all(r["public"]["losses"] == r["relayed"]["losses"] == r["direct"]["losses"] == rounds[0]["public"]["losses"]
               for r in rounds)
    print(f"per-step losses identical in every run: {same}")

    def med(name: str, key: str) -> float:
        return float(statistics.median(r[name][key] for r in rounds))

    pub = med("public", "tokens_per_s")
    ratios = [r["direct"]["tokens_per_s"] / r["public"]["tokens_per_s"] for r in rounds
              if r["public"]["tokens_per_s"]]
    print(json.dumps({"tokens_per_s_public": pub, "tokens_per_s_relayed": med("relayed", "tokens_per_s"),
                      "tokens_per_s_direct": med("direct", "tokens_per_s"),
                      "ratio_direct": med("direct", "tokens_per_s") / pub if pub else 0.0,
                      "ratio_direct_range": [min(ratios), max(ratios)] if ratios else None,
                      "ratio_relayed": med("relayed", "tokens_per_s") / pub if pub else 0.0,
                      "first_step_s_public": med("public", "first_step_s"),
                      "first_step_s_relayed": med("relayed", "first_step_s"),
                      "first_step_s_direct": med("direct", "first_step_s"),
                      "path_relayed": "/".join(sorted({r["relayed"]["path_0_1"] for r in rounds})),
                      "path_direct": "/".join(sorted({r["direct"]["path_0_1"] for r in rounds})),
                      "losses_identical": same, "model": model, "steps": steps, "rounds": a.rounds}))
    return 0

if __name__ == "__main__":
    sys.exit(main())
