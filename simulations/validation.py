"""Validation against reality: simulate a measured local run and report the throughput error.

Three measured references, from cheapest to most complete:
- `validate_in_process`: `sharding.pipeline.LocalPipeline` (all stages in one process, one after
  another) — the calibration run itself; the model is one shared CPU slot and no network.
- `validate_local_swarm`: a real swarm of node processes on 127.0.0.1 over libp2p
  (`node.testing.swarm.run_local_swarm`), simulated with every node sharing this host's cores and
  loopback links (TCP+Noise+yamux bandwidth and round trip from docs/FACTS).
- `compare_with_benchmark_json`: the last JSON line of `benchmarks/pipeline.py`, when it exists.
The local-swarm comparison that models the host's load, the runtime's per-frame CPU and processor
sharing from measured inputs is `simulations.swarm_model` (run by `benchmarks/sim_validate.py`); the
swarm functions here keep the earlier slot model (both cores free, wall-clock stage times).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from .calibrate import CalibrationConfig, calibrate
from .errors import ValidationDataError
from .params import LinkConfig, WanConfig
from .pipeline import simulate

VALIDATION_GOAL = 0.15  # issue goal: simulated tokens/s within 15% of the measured figure
LOOPBACK_MBPS = 186.0 * 8  # py-libp2p TCP+Noise+yamux pipelined throughput on loopback (docs FACTS), Mb/s
LOOPBACK_LATENCY_MS = 0.31  # half the measured small-message round trip of 616 us (docs FACTS)


def compare(measured_tokens_per_s: float, simulated_tokens_per_s: float) -> dict[str, Any]:
    """Relative error of the simulation against a measurement, and whether it meets the 15% goal."""
    if not (measured_tokens_per_s > 0):
        raise ValidationDataError(f"measured tokens/s must be > 0, got {measured_tokens_per_s!r}")
    error = abs(simulated_tokens_per_s - measured_tokens_per_s) / measured_tokens_per_s
    return {
        "measured_tokens_per_s": measured_tokens_per_s,
        "simulated_tokens_per_s": simulated_tokens_per_s,
        "error": error,
        "goal": VALIDATION_GOAL,
        "within_goal": error <= VALIDATION_GOAL,
    }


def local_config(
    calibration: dict[str, Any],
    microbatches: int,
    steps: int,
    shared_cpus: int | None,
    link: LinkConfig | None = None,
    in_process: bool = False,
) -> WanConfig:
    """A WanConfig for a run on this host: calibrated stage times, shared cores, loopback links.

    The node runtime processes whichever input is ready (backward first) and flushes every step,
    which is the `1f1b` schedule with an unbounded in-flight window.
    """
    stages = calibration["stages"]
    wire_fwd = calibration["codec_bytes_per_token"] + calibration["token_id_bytes"]
    wire_bwd = calibration["codec_bytes_per_token"]
    return WanConfig(
        num_stages=len(stages),
        fwd_s=tuple(s["fwd_s"] for s in stages),
        bwd_s=tuple(s["bwd_s"] for s in stages),
        opt_s=tuple(s["opt_s"] for s in stages),
        microbatches=microbatches,
        microbatch_tokens=calibration["tokens_per_microbatch"],
        steps=steps,
        schedule="1f1b",
        in_flight_per_stage=microbatches,
        fwd_bytes_per_token=0.0 if in_process else float(wire_fwd),
        bwd_bytes_per_token=0.0 if in_process else float(wire_bwd),
        link=LinkConfig(latency_ms=0.0) if in_process else (link or LinkConfig(LOOPBACK_MBPS, 0.0, LOOPBACK_LATENCY_MS)),
        shared_cpus=1 if in_process else shared_cpus,
    )


def measure_in_process(cal: CalibrationConfig, microbatches: int, steps: int) -> float:
    """Tokens/s of `LocalPipeline.train_step` for `cal`'s model, stages and codec (first step untimed)."""
    import torch

    from sharding.data import synthetic_corpus
    from sharding.pipeline import LocalPipeline

    from .calibrate import model_config

    config = model_config(cal.model)
    corpus = synthetic_corpus(seed=cal.seed)
    old = torch.get_num_threads()
    torch.set_num_threads(cal.threads)
    try:
        pipe = LocalPipeline(config, cal.num_stages, cal.codec)
        pipe.train_step(0, corpus, microbatches, cal.microbatch_size)
        times = []
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            pipe.train_step(step, corpus, microbatches, cal.microbatch_size)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(old)
    tokens = microbatches * cal.microbatch_size * config.seq_len
    return tokens / statistics.median(times)


def validate_in_process(
    cal: CalibrationConfig | None = None, microbatches: int = 4, steps: int = 3
) -> dict[str, Any]:
    """Calibrate, simulate the in-process pipeline, measure it, and compare."""
    cal = cal or CalibrationConfig()
    calibration = calibrate(cal, out_path=None)
    sim = simulate(local_config(calibration, microbatches, steps, None, in_process=True))
    measured = measure_in_process(cal, microbatches, steps)
    out = compare(measured, sim.tokens_per_s)
    out.update({"reference": "sharding.pipeline.LocalPipeline (in-process)", "calibration": calibration})
    return out


def measure_local_swarm(
    cal: CalibrationConfig, microbatches: int, steps: int, timeout_s: float = 300.0
) -> dict[str, Any]:
    """Run a real local swarm (node processes over libp2p on 127.0.0.1); tokens/s of its tail stage.

    The first step (connection set-up, warm-up) is excluded; the median over the others is reported.
    """
    from node.testing.swarm import run_local_swarm

    with tempfile.TemporaryDirectory(prefix="pmn-sim-validate-") as root:
        result = run_local_swarm(
            cal.num_stages,
            steps,
            root,
            model=cal.model,
            codec=cal.codec,
            microbatches=microbatches,
            microbatch_size=cal.microbatch_size,
            corpus=None,
            threads=[cal.threads] * cal.num_stages,
            timeout_s=timeout_s,
        )
    tail = sorted(result.steps[cal.num_stages - 1], key=lambda r: int(r["step"]))
    rows = tail[1:] if len(tail) > 1 else tail
    if not rows:
        raise ValidationDataError("the local swarm completed no step; nothing to compare")
    step_s = statistics.median(float(r["seconds"]) for r in rows)
    tokens = int(rows[0]["tokens"])
    return {"tokens_per_s": tokens / step_s, "step_s": step_s, "steps_measured": len(rows)}


def validate_local_swarm(
    cal: CalibrationConfig | None = None, microbatches: int = 4, steps: int = 4, timeout_s: float = 300.0
) -> dict[str, Any]:
    """Calibrate, simulate the local swarm on this host's cores, run the real swarm, and compare."""
    cal = cal or CalibrationConfig()
    calibration = calibrate(cal, out_path=None)
    cpus = os.cpu_count() or 1
    sim = simulate(local_config(calibration, microbatches, steps, shared_cpus=cpus))
    measured = measure_local_swarm(cal, microbatches, steps, timeout_s)
    out = compare(measured["tokens_per_s"], sim.tokens_per_s)
    out.update({"reference": "node.testing.swarm.run_local_swarm (libp2p on 127.0.0.1)", "measured": measured,
                "shared_cpus": cpus, "calibration": calibration})
    return out


def fit_runtime_overheads(
    calibration: dict[str, Any], measured_step_s: dict[int, float], shared_cpus: int | None, steps: int = 3
) -> tuple[float, float]:
    """Fit (frame_overhead_s, step_overhead_s) so simulated step times match two measured ones.

    `measured_step_s` maps microbatches per step -> measured seconds per step; the two smallest and
    largest counts are used: the per-frame overhead matches the slope, the per-step overhead the level.
    """
    if len(measured_step_s) < 2:
        raise ValidationDataError("fitting runtime overheads needs step times at two microbatch counts")
    (m1, t1), (m2, t2) = sorted(measured_step_s.items())[0], sorted(measured_step_s.items())[-1]

    def sim(m: int, frame: float) -> float:
        cfg = replace(local_config(calibration, m, steps, shared_cpus), frame_overhead_s=frame)
        return simulate(cfg).mean_step_s

    target = t2 - t1
    lo, hi = 0.0, 1.0
    if sim(m2, lo) - sim(m1, lo) >= target:
        frame = 0.0
    else:
        while sim(m2, hi) - sim(m1, hi) < target and hi < 1e3:
            hi *= 2
        for _ in range(50):
            mid = (lo + hi) / 2
            if sim(m2, mid) - sim(m1, mid) < target:
                lo = mid
            else:
                hi = mid
        frame = (lo + hi) / 2
    return frame, max(0.0, t1 - sim(m1, frame))


def validate_local_swarm_fitted(
    cal: CalibrationConfig | None = None,
    fit_microbatches: tuple[int, int] = (2, 8),
    held_out_microbatches: int = 4,
    steps: int = 4,
    timeout_s: float = 300.0,
) -> dict[str, Any]:
    """Fit the runtime overheads on two real swarm runs, then predict a third (held-out) run and compare."""
    cal = cal or CalibrationConfig()
    calibration = calibrate(cal, out_path=None)
    cpus = os.cpu_count() or 1
    fit_runs = {m: measure_local_swarm(cal, m, steps, timeout_s) for m in fit_microbatches}
    frame, step = fit_runtime_overheads(calibration, {m: r["step_s"] for m, r in fit_runs.items()}, cpus)
    held = measure_local_swarm(cal, held_out_microbatches, steps, timeout_s)
    base = local_config(calibration, held_out_microbatches, steps, shared_cpus=cpus)
    raw = simulate(base)
    fitted = simulate(replace(base, frame_overhead_s=frame, step_overhead_s=step))
    out = compare(held["tokens_per_s"], fitted.tokens_per_s)
    out.update({
        "reference": "node.testing.swarm.run_local_swarm (libp2p on 127.0.0.1), held-out microbatch count",
        "error_without_runtime_overheads": compare(held["tokens_per_s"], raw.tokens_per_s)["error"],
        "frame_overhead_s": frame,
        "step_overhead_s": step,
        "fit_runs": fit_runs,
        "held_out": held,
        "shared_cpus": cpus,
        "calibration": calibration,
    })
    return out


def compare_with_benchmark_json(path: str | Path, calibration: dict[str, Any]) -> dict[str, Any]:
    """Compare with a `benchmarks/pipeline.py` result (its last JSON line): needs tokens_per_s, microbatches."""
    p = Path(path)
    if not p.is_file():
        raise ValidationDataError(f"no benchmark result at {p}: run benchmarks/pipeline.py and save its output")
    lines = [ln for ln in p.read_text().splitlines() if ln.strip().startswith("{")]
    if not lines:
        raise ValidationDataError(f"{p} holds no JSON line")
    data = json.loads(lines[-1])
    missing = [k for k in ("tokens_per_s", "microbatches") if k not in data]
    if missing:
        raise ValidationDataError(f"{p}: benchmark JSON lacks {missing}")
    steps = int(data.get("steps", 4))
    sim = simulate(local_config(calibration, int(data["microbatches"]), steps, shared_cpus=os.cpu_count() or 1))
    out = compare(float(data["tokens_per_s"]), sim.tokens_per_s)
    out["reference"] = str(p)
    return out
