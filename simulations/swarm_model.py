"""Simulate a real local swarm (P node processes over py-libp2p on this host) and check it against one.

Inputs of the simulation, all measured, none fitted to the run it is compared with:
- per-stage forward/backward/optimizer CPU seconds of the real stage code (`calibrate`, this thread's
  CPU time, so the host's other load does not inflate them), measured right before and after a run;
- the host's cores and the share of them the node processes get: every node is one busy torch thread;
  the OS shares the cores among runnable threads, and with Linux autogroup scheduling first among
  session groups, so the host's other sessions take their fair share as groups. `cores_by_busy[n-1]`,
  the cores granted when n nodes are busy, comes from the other groups' runnable threads sampled
  during the run (`swarm_run.LoadSampler`, water-filling) or from contention probes around it
  (`runtime_cal.measure_contention`: every stage in its own process at once, processes x CPU share);
  the simulation runs the stage work under processor sharing at that rate;
- the runtime's CPU per frame a node sends or accepts (`frame_side_cpu_s`: process CPU less compute
  and codec CPU, per frame, in the traced calibration run of `benchmarks/sim_validate.py`; without
  it, half the two-host micro-benchmark's per-frame CPU plus a thread hand-off), charged on the
  stage's work per pass (end stages one frame per pass, middle stages two); from
  `runtime_cal.measure_transport` (stored in the calibration file under "runtime"): one-way hop
  latency = half the one-frame round trip; the step barrier (drain, wait for the last ack, optimizer hand-off) = one round
  trip plus one hand-off; start-up = two node process start-ups (stage 0, then the rest together) +
  connect; the first step's extra time = the slowest stage's cold first repetition.
The runtime processes whichever input is ready, backward first, and flushes every step: `1f1b` with an
unbounded in-flight window (senders queue locally beyond the peer's credits).
"""

from __future__ import annotations

import copy
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from typing import Any

from .calibrate import CalibrationConfig, calibrate, check_calibration, check_runtime
from .errors import CalibrationError
from .params import LinkConfig, WanConfig
from .pipeline import simulate
from .runtime_cal import measure_contention, measure_transport
from .swarm_run import SwarmSpec, granted_cores, run_swarm
from .validation import LOOPBACK_MBPS, compare


def calibration_for(spec: SwarmSpec, repeats: int = 7) -> CalibrationConfig:
    """The stage-code calibration matching a swarm run (same model, stages, codec, microbatch, threads)."""
    return CalibrationConfig(model=spec.model, num_stages=spec.stages, microbatch_size=spec.microbatch_size,
                             codec=spec.codec, threads=spec.threads, warmup=2, repeats=repeats)


def measure_process_start(repeats: int = 3) -> float:
    """Median seconds for a fresh interpreter to import the node daemon (torch, libp2p, sharding)."""
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import node.daemon"], check=True, capture_output=True)
        samples.append(time.perf_counter() - t0)
    return float(statistics.median(samples))


def measure_runtime(spec: SwarmSpec, frames: int = 200) -> dict[str, Any]:
    """Runtime inputs for frames of `spec`'s size: transport costs and process start-up (see module doc)."""
    from sharding.codecs import get_codec, token_id_bytes

    from .calibrate import model_config

    config = model_config(spec.model)
    payload = get_codec(spec.codec, config).bytes_per_token * spec.microbatch_size * config.seq_len
    window = token_id_bytes(config) * spec.microbatch_size * (config.seq_len + 1)
    out = measure_transport(payload, window, frames)
    out["process_start_s"] = measure_process_start()
    out["how"] += "; process_start_s = median wall of `python -c 'import node.daemon'`"
    out["measured_at_unix"] = int(time.time())
    return out


def swarm_config(
    calibration: dict[str, Any],
    runtime: dict[str, Any],
    spec: SwarmSpec,
    cores_by_busy: tuple[float, ...] = (),
    cores: int | None = None,
) -> WanConfig:
    """The WanConfig of a local swarm run on `cores` cores (default: this host's): the stage work is its
    measured CPU seconds, run under processor sharing; `cores_by_busy[n-1]` = cores the node processes
    get when n of them are busy (the host's other load; empty = all cores)."""
    check_calibration(calibration)
    check_runtime(runtime)
    stages = calibration["stages"]
    if len(stages) != spec.stages:
        raise CalibrationError(f"calibration has {len(stages)} stages, the swarm {spec.stages}")

    def cpu(row: dict[str, Any], key: str) -> float:  # CPU seconds; wall seconds for older calibrations
        return float(row.get(key.replace("_s", "_cpu_s"), row[key]))

    dispatch = float(runtime["thread_dispatch_s"])
    rtt = float(runtime["frame_rtt_s"])
    per_side = frame_side_cpu(runtime)
    last = spec.stages - 1

    def sides(index: int) -> int:  # frames a stage sends or accepts per forward (and per backward) pass
        return (index > 0) + (index < last)

    def with_frames(row: dict[str, Any], key: str) -> float:
        return cpu(row, key) + sides(int(row["index"])) * per_side
    seq = calibration["model_config"]["seq_len"]
    wire_fwd = calibration["codec_bytes_per_token"] + calibration["token_id_bytes"] * (seq + 1) / seq
    cold = max(s.get("first_fwd_bwd_s", s["fwd_s"] + s["bwd_s"]) - s["fwd_s"] - s["bwd_s"] for s in stages)
    return WanConfig(
        num_stages=spec.stages,
        fwd_s=tuple(with_frames(s, "fwd_s") for s in stages),
        bwd_s=tuple(with_frames(s, "bwd_s") for s in stages),
        opt_s=tuple(cpu(s, "opt_s") for s in stages),
        microbatches=spec.microbatches,
        microbatch_tokens=calibration["tokens_per_microbatch"],
        steps=spec.steps,
        warmup_steps=spec.warmup,
        schedule="1f1b",
        in_flight_per_stage=spec.microbatches,
        fwd_bytes_per_token=float(wire_fwd),
        bwd_bytes_per_token=float(calibration["codec_bytes_per_token"]),
        frame_overhead_s=0.0,  # per stage, in fwd_s/bwd_s: sides x frame_side_cpu
        step_overhead_s=rtt + dispatch,
        link=LinkConfig(bandwidth_mbps=LOOPBACK_MBPS, latency_ms=rtt / 2 * 1e3),
        host_cores=float(cores or os.cpu_count() or 1),
        cores_by_busy=tuple(cores_by_busy),
        startup_s=2 * float(runtime["process_start_s"]) + float(runtime["connect_s"]),
        first_step_extra_s=max(0.0, cold),
    )


def frame_side_cpu(runtime: dict[str, Any]) -> float:
    """Runtime CPU seconds per frame a node sends or accepts: the in-node figure of the traced calibration
    run when the calibration holds one, else half the two-host micro-benchmark's per-frame CPU plus one
    thread hand-off."""
    node = runtime.get("frame_side_cpu_s")
    if isinstance(node, (int, float)) and not isinstance(node, bool) and node >= 0:
        return float(node)
    return float(runtime["frame_cpu_s"]) / 2 + float(runtime["thread_dispatch_s"])


def measure_inputs(spec: SwarmSpec, repeats: int = 7, contention: bool = True) -> dict[str, Any]:
    """The stage code measured now: the calibration (alone: wall and CPU seconds) and, with `contention`,
    the cores all stages got running at once in their own processes (`measure_contention`: processes x
    CPU share), an estimate of the host's other load from a probe."""
    cal = calibration_for(spec, repeats)
    calibration = calibrate(cal, out_path=None)
    probe = None
    if contention:
        probe = spec.stages * float(measure_contention(cal, repeats=repeats)["cpu_share"])
    return {"calibration": calibration, "probe_cores": probe}


def mean_inputs(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-stage means of several `measure_inputs` results (brackets around a run)."""
    calibration = copy.deepcopy(samples[0]["calibration"])
    for i, row in enumerate(calibration["stages"]):
        for key in ("fwd_s", "bwd_s", "opt_s", "fwd_cpu_s", "bwd_cpu_s", "opt_cpu_s"):
            if key in row:
                row[key] = statistics.mean(s["calibration"]["stages"][i][key] for s in samples)
    probes = [s["probe_cores"] for s in samples if s["probe_cores"] is not None]
    return {"calibration": calibration, "probe_cores": statistics.mean(probes) if probes else None}


def cores_from_load(load: dict[str, Any], stages: int, cores: int | None = None) -> tuple[float, ...]:
    """cores_by_busy for n = 1..stages from a LoadSampler result (group-fair share next to the others)."""
    c = float(cores or os.cpu_count() or 1)
    return tuple(granted_cores(c, n, load.get("others", [])) for n in range(1, stages + 1))


def cores_from_probe(probe_cores: float, stages: int) -> tuple[float, ...]:
    """cores_by_busy for n = 1..stages from a probe's cores: at most n, at most the probe's figure."""
    return tuple(min(float(n), probe_cores) for n in range(1, stages + 1))


def predict_from(
    inputs: dict[str, Any], runtime: dict[str, Any], spec: SwarmSpec, cores_by_busy: tuple[float, ...] = ()
) -> dict[str, Any]:
    """Simulate the swarm `spec` from measured inputs (`measure_inputs`), the runtime inputs and the
    cores the host gives it (empty = all of them, i.e. an otherwise idle host)."""
    calibration = inputs["calibration"]
    cfg = swarm_config(calibration, runtime, spec, cores_by_busy)
    res = simulate(cfg)
    plain = simulate(swarm_config(calibration, runtime, spec, ()))
    return {
        "tokens_per_s": res.steady_tokens_per_s,
        "tokens_per_s_idle_host": plain.steady_tokens_per_s,
        "step_s": statistics.mean(res.step_times_s[spec.warmup:]),
        "end_to_end_s": res.sim_time_s,
        "stage_cpu_s": [s.get("fwd_cpu_s", 0.0) + s.get("bwd_cpu_s", 0.0) for s in calibration["stages"]],
        "cores_by_busy": list(cores_by_busy),
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("link", "churn")},
    }


def predict_swarm(
    spec: SwarmSpec, runtime: dict[str, Any], contention: bool = True, repeats: int = 7
) -> dict[str, Any]:
    """Measure the stage code now (alone, and all stages at once) and simulate the swarm `spec`."""
    inputs = measure_inputs(spec, repeats, contention)
    cores = cores_from_probe(inputs["probe_cores"], spec.stages) if inputs["probe_cores"] else ()
    return predict_from(inputs, runtime, spec, cores)


def validate_swarm(spec: SwarmSpec, runtime: dict[str, Any], repeats: int = 3) -> dict[str, Any]:
    """Measure, run the real swarm, measure again, simulate; `repeats` times back to back; medians.

    The stage code (CPU seconds) is measured right before and right after each swarm run and averaged.
    The host's other load is taken from `LoadSampler` during the run (primary: the other scheduling
    groups' runnable threads -> cores granted to the swarm) and, for comparison, from the contention
    probes around it. The error of the median measured vs the median simulated
    tokens/s is kept as `error_of_medians`; `error` is the median of the runs' own (paired) errors.
    """
    rows = []
    for _ in range(repeats):
        before = measure_inputs(spec)
        run = run_swarm(spec)
        after = measure_inputs(spec)
        inputs = mean_inputs([before, after])
        pred = predict_from(inputs, runtime, spec, cores_from_load(run.load, spec.stages))
        probe = predict_from(inputs, runtime, spec, cores_from_probe(inputs["probe_cores"], spec.stages))
        measured = run.tokens_per_s()
        rows.append({
            "measured_tokens_per_s": measured,
            "simulated_tokens_per_s": pred["tokens_per_s"],
            "error": compare(measured, pred["tokens_per_s"])["error"],
            "error_with_probe_load": compare(measured, probe["tokens_per_s"])["error"],
            "error_idle_host_model": compare(measured, pred["tokens_per_s_idle_host"])["error"],
            "measured_wall_s": run.wall_s,
            "simulated_end_to_end_s": pred["end_to_end_s"],
            "stage_cpu_s": pred["stage_cpu_s"],
            "cores_by_busy_during": pred["cores_by_busy"],
            "probe_cores": [before["probe_cores"], after["probe_cores"]],
            "other_groups_during": run.load["other_groups"],
            "other_running_during": run.load["other_running"],
        })
    med_meas = statistics.median(r["measured_tokens_per_s"] for r in rows)
    med_sim = statistics.median(r["simulated_tokens_per_s"] for r in rows)
    out = compare(med_meas, med_sim)
    # each run is paired with the simulation of its own conditions: the headline is the median of
    # those paired errors; the error of the two medians (unpaired) is kept alongside
    out["error_of_medians"] = out["error"]
    out["error"] = statistics.median(r["error"] for r in rows)
    out["within_goal"] = out["error"] <= out["goal"]
    out.update({
        "spec": asdict(spec),
        "signed_errors": [(r["simulated_tokens_per_s"] - r["measured_tokens_per_s"]) / r["measured_tokens_per_s"]
                          for r in rows],
        "end_to_end_error": compare(statistics.median(r["measured_wall_s"] for r in rows),
                                    statistics.median(r["simulated_end_to_end_s"] for r in rows))["error"],
        "runs": rows,
    })
    return out
