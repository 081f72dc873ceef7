"""Delegated head work, side by side: a replicated swarm on 127.0.0.1 with two head replicas, one middle replica
and a tail (`replica_exchange = step`), once with `replicas.head_delegation` off (the leader computes every
stage-0 microbatch, the standby idles) and once on (the leader hands microbatches to the standby). The head is made
the slow stage with `--debug-delay-s` (a sleep per compute call: window, forward, backward; it stands in for a
slower GPU, so two cores suffice); the other stages get a shorter delay. Prints a table; the last line is one
JSON object.

    python benchmarks/head_delegation.py [--quick] [--steps N] [--head-delay S] [--delay S]

Measured: tokens/s of the tail over the steps after the first (start-up excluded), the share of stage-0
microbatches each head replica computed, and the tail's loss at the last step (both runs see the same data; the
microbatches are summed in another order, so the losses agree closely, not bit for bit).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.observability.status import read_progress  # noqa: E402
from node.testing.swarm import NodeProcess, await_ready, spawn_node, start_node, stop_nodes, wait_nodes  # noqa: E402

M, B, SEQ = 8, 2, 64  # microbatches per step, sequences per microbatch, tokens per sequence (the tiny preset)
READY_S = 180.0  # seconds a node may take to start on a loaded machine


def _args(steps: int, delegation: bool) -> list[str]:
    return ["--stages", "3", "--steps", str(steps), "--replicated", "--microbatches", str(M), "--microbatch-size",
            str(B), "--corpus", "synthetic", "--threads", "1", "--replica-timeout", "10", "--avg-timeout", "10",
            "--commit-poll", "0.3", "--checkpoint-every", "0", "--replica-exchange", "step",
            "--max-inflight", "2", "--discovery-discovery-timeout-s", str(READY_S), "--replicas-start-quorum", "3",
            "--replicas-head-delegation" if delegation else "--no-replicas-head-delegation"]


def _records(n: NodeProcess) -> dict[int, dict[str, Any]]:
    return {int(r["step"]): r for r in read_progress(n.data_dir)}


def run(root: Path, steps: int, head_delay: float, delay: float, delegation: bool, timeout_s: float) -> dict[str, Any]:
    """One swarm run [0, 0, 1, 2]; returns tokens/s, each head replica's share of stage 0 and the last loss."""
    args = _args(steps, delegation)
    lead = start_node(0, root / "lead", args + ["--debug-delay-s", str(head_delay)], READY_S)
    boot = ["--bootstrap", lead.ready["addrs"][0]]
    rest = [spawn_node(0, root / "standby", args + boot + ["--debug-delay-s", str(head_delay)]),
            spawn_node(1, root / "mid", args + boot + ["--debug-delay-s", str(delay)]),
            spawn_node(2, root / "tail", args + boot + ["--debug-delay-s", str(delay)])]
    nodes = [lead, *rest]
    try:
        for n in rest:
            await_ready(n, READY_S)
        codes = wait_nodes(nodes, timeout_s)
    finally:
        stop_nodes(nodes)
    if codes != [0, 0, 0, 0]:
        raise SystemExit(f"a node failed (exit codes {codes}); logs under {root}")
    tail = _records(nodes[3])
    ends = [tail[s]["end_time"] for s in range(steps)]
    tokens = M * B * SEQ * (steps - 1)
    heads = [_records(n) for n in nodes[:2]]
    computed = [sum(len(r["mine"]) for r in h.values()) for h in heads]
    return {"tokens_per_s": tokens / (ends[-1] - ends[0]), "step_s": (ends[-1] - ends[0]) / (steps - 1),
            "leader_share": computed[0] / max(1, sum(computed)), "standby_share": computed[1] / max(1, sum(computed)),
            "final_loss": tail[steps - 1]["loss"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short runs")
    p.add_argument("--steps", type=int, default=None, help="global steps per run (default 6 quick, 20)")
    p.add_argument("--head-delay", type=float, default=0.2, help="seconds of debug delay per head compute call")
    p.add_argument("--delay", type=float, default=0.02, help="seconds of debug delay per compute call elsewhere")
    a = p.parse_args(argv)
    steps = a.steps or (6 if a.quick else 20)
    if steps < 2:
        p.error("--steps must be >= 2 (the first step is start-up)")
    root = Path(tempfile.mkdtemp(prefix="pmn-delegation-"))
    try:
        off = run(root / "off", steps, a.head_delay, a.delay, False, 600)
        on = run(root / "on", steps, a.head_delay, a.delay, True, 600)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{'head_delegation':16} {'tok/s':>8} {'step s':>7} {'leader':>7} {'standby':>8} {'final loss':>10}")
    for name, r in (("off", off), ("on", on)):
        print(f"{name:16} {r['tokens_per_s']:>8.0f} {r['step_s']:>7.3f} {r['leader_share']:>7.2f} "
              f"{r['standby_share']:>8.2f} {r['final_loss']:>10.4f}")
    print(json.dumps({"tokens_per_s_off": off["tokens_per_s"], "tokens_per_s_on": on["tokens_per_s"],
                      "speedup": on["tokens_per_s"] / off["tokens_per_s"], "step_s_off": off["step_s"],
                      "step_s_on": on["step_s"], "standby_share_off": off["standby_share"],
                      "standby_share_on": on["standby_share"], "final_loss_off": off["final_loss"],
                      "final_loss_on": on["final_loss"], "steps": steps, "head_delay_s": a.head_delay,
                      "delay_s": a.delay, "microbatches": M}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
