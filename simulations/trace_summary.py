"""Where a real swarm's step time goes, from the traces of `simulations.node_trace` (pure functions).

Per stage, over the steps after the warm-up: step seconds; compute wall and CPU seconds (forward,
backward, optimizer, data window); seconds the event loop spent accepting frames (digest, decode hand-off,
countersign, ack write) and sending them (credit wait, digest, write); idle seconds (the rest: waiting
for a neighbour, GIL and thread hand-offs); the process's CPU seconds and the runtime's share of them
(process CPU less compute and codec CPU: event loop, transport, frames, hand-offs) per frame sent or
accepted; the first step's and the start-up's seconds.
"""

from __future__ import annotations

import statistics
from typing import Any

COMPUTE = ("fwd", "bwd", "opt", "window")


def _dur(e: dict[str, Any]) -> float:
    return float(e["t1"]) - float(e["t0"])


def summarize_stage(events: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """Breakdown of one stage's trace (see the module docstring); medians over the measured steps."""
    steps = {int(e["step"]): e for e in events if e["ev"] == "step"}
    measured = [k for k in sorted(steps) if k >= warmup]
    if not measured:
        raise ValueError(f"trace has no step after the {warmup} warm-up step(s)")
    rows = []
    for k in measured:
        mine = [e for e in events if int(e["step"]) == k]
        comp = [e for e in mine if e["ev"] in COMPUTE]
        step_s = _dur(steps[k])
        busy = sum(_dur(e) for e in comp)
        rows.append({
            "step_s": step_s,
            "compute_wall_s": busy,
            "compute_cpu_s": sum(float(e["cpu"]) for e in comp),
            "process_cpu_s": float(steps[k]["cpu"]),
            "runtime_cpu_s": float(steps[k]["cpu"]) - sum(float(e["cpu"]) for e in comp + [
                e for e in mine if e["ev"] == "decode"]),
            "frames": sum(1 for e in mine if e["ev"] in ("send", "accept")),
            "accept_s": sum(_dur(e) for e in mine if e["ev"] == "accept"),
            "send_s": sum(_dur(e) for e in mine if e["ev"] == "send"),
            "decode_cpu_s": sum(float(e["cpu"]) for e in mine if e["ev"] == "decode"),
            "idle_s": step_s - busy,
        })
    out: dict[str, Any] = {k: float(statistics.median(r[k] for r in rows)) for k in rows[0]}
    out["runtime_cpu_per_frame_s"] = out["runtime_cpu_s"] / out["frames"] if out["frames"] else 0.0
    out["compute_wall_over_cpu"] = out["compute_wall_s"] / out["compute_cpu_s"] if out["compute_cpu_s"] else 0.0
    for kind in ("fwd", "bwd"):
        xs = [e for e in events if e["ev"] == kind and int(e["step"]) >= warmup]
        out[f"{kind}_wall_s"] = float(statistics.median(_dur(e) for e in xs)) if xs else 0.0
        out[f"{kind}_cpu_s"] = float(statistics.median(float(e["cpu"]) for e in xs)) if xs else 0.0
    if 0 in steps:
        out["first_step_s"] = _dur(steps[0])
    starts = [e for e in events if e["ev"] == "process_start"]
    if starts and 0 in steps:
        out["process_start_to_first_step_s"] = float(steps[0]["t0"]) - float(starts[0]["t0"])
    return out


def summarize(traces: dict[int, list[dict[str, Any]]], warmup: int) -> dict[str, dict[str, Any]]:
    """`summarize_stage` for every stage, keyed by the stage index as a string."""
    return {str(s): summarize_stage(ev, warmup) for s, ev in sorted(traces.items())}
