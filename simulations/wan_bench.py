"""Calibrate the simulator's schedules against `benchmarks/wan.py` and report the error on held-out runs.

From the benchmark's JSON line: per-stage compute seconds per step of the calibration schedule (gpipe by
default) give each stage's forward and backward seconds per microbatch (backward = 2 x forward, the
optimiser step inside), the link is the emulated one (one-way delay = half the measured round trip,
rate as measured by the bulk transfer), and one free parameter, the runtime's seconds per frame outside
compute (`frame_overhead_s`: framing, hashing, Noise, acks), is fitted so that the simulated tokens/s of
the calibration schedule equals the measured one. The other schedules are then predicted without any
refit: `error` = |simulated - measured| / measured per held-out schedule (goal: <= 0.15). By default each
held-out run's stage compute is its own measured one (on a shared machine the CPU speed changes between
runs; the schedule and link model is what is validated), `--calibration-compute` uses the calibration
run's for all.

A `--replicas R` record (R nodes per stage, keyed by node) is simulated as the node's replicated engine as built
(`replicated_config`: delegated head work, in-flight and task caps, one bundle per replica and step; the record's
per-node compute, update seconds, contribution bytes and activation bytes), calibrated and validated the same way.

Such a run puts 3 R node processes and the shaper on one host. On a host with fewer cores than that, a node's compute
seconds (wall time) hold the time it waited for a core, by an amount that depends on how many others computed at the
time, and so on the schedule and the in-flight cap. A record that carries the nodes' compute and update *CPU* seconds
(`compute_cpu_s_per_step`, `update_cpu_s_per_step`: each node's compute thread's CPU time, recorded since session 32)
and the host's cores (`host_cpu`) can be simulated on a shared host instead (`--shared-host`, `shared_host`): the CPU
seconds run under processor sharing on that many cores (`WanConfig.host_cores`; the fitted per-frame overhead is work
shared the same way, the shaper's measured CPU per wall second background load), so that each run's contention comes
out of the simulation rather than out of its own measurement. By default each node has a core of its own and its wall
seconds, which predicted this host's runs at least as well (session 32: 16 replicated async runs, 2 cores, staleness 1
to 3, in-flight caps 2 and 4, finishes pipelined and not; each run calibrated on in turn and the other 15 predicted.
Largest held-out error per calibration, median: 0.151 with a core per node, 0.183 on the shared host; mean error
0.065 and 0.085; 7 and 4 of the 16 calibrations met the 0.15 goal on all 15 runs. The shared host's fitted overhead
varied less, 5.4-9.4 ms per frame against 6.3-16.6 ms. Identical settings here differ by up to 20 % in tokens/s
from run to run, e.g. 8333-10083 in three serial-finish runs at staleness 2, which bounds what either can predict).

`python -m simulations.wan_bench BENCH_OUTPUT [--write]` reads the last JSON line of a saved benchmark
output, prints the table and a JSON line, and with `--write` stores the record under `wan_benchmark` in
the calibration file (where `pmn simulate wan --vs datacenter` takes the measured async loss ratio; a replicated
record under `wan_benchmark_replicated`).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from .calibrate import DEFAULT_PATH
from .params import LinkConfig, WanConfig
from .pipeline import simulate

ERROR_GOAL = 0.15  # issue 19: simulator error on held-out settings
RECORD_MAX_INFLIGHT = 2  # the in-flight cap of replicated records that do not name one (`max_inflight`): the node's
# default before session 28


def shared_host(bench: dict[str, Any], schedule: str) -> bool:
    """Whether `schedule`'s run of `bench` can be simulated on its shared host: a replicated record with its nodes'
    CPU seconds and the host's cores."""
    rep = (bench.get("replicated") or {}).get(schedule) or {}
    host = (bench.get("host_cpu") or {}).get(schedule) or {}
    return "compute_cpu_s_per_step" in rep and "update_cpu_s_per_step" in rep and bool(host.get("cores"))


def on_shared_host(bench: dict[str, Any]) -> dict[str, Any]:
    """`bench` as its shared host ran it: each schedule that can be (`shared_host`) has its nodes' CPU seconds as its
    compute and update seconds, and names the host's cores and the shaper's CPU per wall second (`host_cores`,
    `background_load` under `replicated`), which `replicated_config` then simulates under processor sharing."""
    busy, rep = dict(bench["busy_s_per_step"]), dict(bench.get("replicated") or {})
    for schedule in [s for s in rep if shared_host(bench, s)]:
        r, cpu = rep[schedule], bench["host_cpu"][schedule]
        busy[schedule] = r["compute_cpu_s_per_step"]
        rep[schedule] = {**r, "update_s_per_step": r["update_cpu_s_per_step"], "host_cores": float(cpu["cores"]),
                         "background_load": float(cpu.get("cpu_per_wall", {}).get("shaper", 0.0))}
    return {**bench, "busy_s_per_step": busy, "replicated": rep}


def bench_config(bench: dict[str, Any], schedule: str, busy: dict[str, float], overhead_s: float) -> WanConfig:
    """The simulated counterpart of one benchmark run of `schedule`, with per-stage compute from `busy`."""
    m, stages = int(bench["microbatches"]), int(bench["stages"])
    per_mb = [busy[str(s)] / m for s in range(stages)]
    model = bench["model"]
    tokens = int(bench["microbatch_size"]) * int(model["seq_len"])
    fwd_bytes = bench["bytes_out_per_step"][schedule]["0"] / m / tokens
    link = bench["link_check"]
    return WanConfig(num_stages=stages, fwd_s=tuple(t / 3 for t in per_mb), bwd_s=tuple(2 * t / 3 for t in per_mb),
                     microbatches=m, microbatch_tokens=tokens, steps=int(bench["steps"]),
                     schedule=schedule,  # type: ignore[arg-type]
                     fwd_bytes_per_token=fwd_bytes, bwd_bytes_per_token=fwd_bytes,
                     frame_overhead_s=overhead_s,
                     max_staleness=int(bench["max_staleness"]) if schedule == "async" else None,
                     link=LinkConfig(bandwidth_mbps=float(link["bulk_mbit_s"]), latency_ms=float(link["rtt_ms"]) / 2),
                     warmup_steps=1)


def replicated_config(bench: dict[str, Any], schedule: str, busy: dict[str, float], overhead_s: float) -> WanConfig:
    """The simulated counterpart of one `--replicas R` benchmark run of `schedule` (R nodes per stage, keyed by node in
    the record): the node's replicated engine as `pmn simulate wan --vs datacenter` runs it as built (one head leader
    handing stage-0 microbatches out as tasks, `NODE_MAX_TASKS` per step of the window; the record's `max_inflight`
    per sender and downstream replica (`RECORD_MAX_INFLIGHT` when it names none); one bundle per replica and step
    pushed to its stage peers; async: each node's window, its finishes side by side when the record says
    `pipelined_finish`, one at a time for records before session 32, which name none).

    From the record, per node: compute seconds per step (`busy`; a stage's forward and backward seconds per microbatch
    are its replicas' sum over the microbatches, backward = 2 x forward), the update's seconds (`opt_s`, the stage's
    mean), the contribution's bytes (`grad_sync_bytes`) and the activation bytes sent (forward frames per token from
    stage 0's nodes, gradient frames from the last stage's).
    A record rewritten by `on_shared_host` (its `host_cores`) is simulated on that many cores, shared, with its
    background load."""
    from .datacenter import NODE_MAX_TASKS

    rep = bench["replicated"][schedule]
    m, stages, replicas = int(bench["microbatches"]), int(bench["stages"]), int(bench["replicas"])
    nodes = {s: [k for k, v in rep["stage_of_node"].items() if int(v) == s] for s in range(stages)}
    if sorted(len(v) for v in nodes.values()) != [replicas] * stages:
        raise ValueError(f"replicated record: stages of its nodes {rep['stage_of_node']} are not {stages} x {replicas}")
    base = bench_config(bench, schedule, {str(s): sum(busy[k] for k in nodes[s]) for s in range(stages)}, overhead_s)
    sent = bench["bytes_out_per_step"][schedule]

    def per_token(stage: int) -> float:  # activation-protocol bytes the stage's nodes sent per token
        return sum(float(sent[k]) for k in nodes[stage]) / m / base.microbatch_tokens

    staleness = base.max_staleness
    return replace(base, opt_s=tuple(sum(float(rep["update_s_per_step"][k]) for k in nodes[s]) / replicas
                                     for s in range(stages)),
                   host_cores=rep.get("host_cores"), background_load=float(rep.get("background_load", 0.0)),
                   replicas=replicas, fwd_bytes_per_token=per_token(0), bwd_bytes_per_token=per_token(stages - 1),
                   grad_sync_bytes=tuple(int(rep["contribution_bytes"][nodes[s][0]]) for s in range(stages)),
                   sync_collective="direct", sync_push=True, push_per_step=True, head_leader=True,
                   head_delegation=True, tasks_per_delegate=NODE_MAX_TASKS * ((staleness or 0) + 1),
                   inflight_per_replica=int(bench.get("max_inflight") or RECORD_MAX_INFLIGHT),
                   pipelined_finish=bool(bench.get("pipelined_finish")))  # records before session 32: one at a time


def _config(bench: dict[str, Any], schedule: str, busy: dict[str, float], overhead_s: float) -> WanConfig:
    """`bench_config`, or `replicated_config` for a `--replicas R` (R > 1) record."""
    replicated = int(bench.get("replicas", 1)) > 1
    return (replicated_config if replicated else bench_config)(bench, schedule, busy, overhead_s)


def _tokens_per_s(cfg: WanConfig) -> float:
    res = simulate(cfg)
    return res.steady_tokens_per_s or res.tokens_per_s


def fit_overhead(bench: dict[str, Any], schedule: str, busy: dict[str, float], iters: int = 30) -> float:
    """Seconds per frame outside compute that make the simulated tokens/s of `schedule` the measured one (on a shared
    host, `on_shared_host`: core-seconds shared as the compute is)."""
    want = float(bench["tokens_per_s"][schedule])
    lo, hi = 0.0, 0.5
    if _tokens_per_s(_config(bench, schedule, busy, lo)) <= want:
        return 0.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if _tokens_per_s(_config(bench, schedule, busy, mid)) > want:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _predict(bench: dict[str, Any], busy: dict[str, float], overhead: float, own_compute: bool,
             calibrated: str | None) -> dict[str, dict[str, Any]]:
    """Each schedule of `bench` simulated with the fitted `overhead`; `calibrated` names the one fitted on (not
    held out)."""
    rows = {}
    for schedule, measured in bench["tokens_per_s"].items():
        mine = busy
        if own_compute and schedule in bench["busy_s_per_step"]:
            mine = {k: float(v) for k, v in bench["busy_s_per_step"][schedule].items()}
        sim = _tokens_per_s(_config(bench, schedule, mine, overhead))
        rows[schedule] = {"measured_tokens_per_s": measured, "simulated_tokens_per_s": sim,
                          "error": abs(sim - measured) / measured, "held_out": schedule != calibrated,
                          "shared_host": "host_cores" in (bench.get("replicated") or {}).get(schedule, {})}
    return rows


def validate(bench: dict[str, Any], calibrate_on: str = "gpipe", own_compute: bool = True,
             held_out: list[dict[str, Any]] | None = None, host: bool = False) -> dict[str, Any]:
    """Fit on `calibrate_on`, predict the other schedules of the benchmark, and every schedule of each `held_out`
    record (other runs: another link, staleness or machine load; same swarm shape), without a refit; errors per
    schedule.

    own_compute: each held-out run's stage compute is its own measured `busy_s_per_step` (the machine's
    speed is an input, as a calibration file's stage times are; what is predicted is what the schedule and
    the links make of it); False: the calibration run's compute for every schedule of `bench` (a held-out record
    always uses its own).
    host: simulate each run on its shared host where its record allows it (`on_shared_host`); False (the default):
    every node on a core of its own with its wall compute seconds.
    """
    if host:
        bench, held_out = on_shared_host(bench), [on_shared_host(o) for o in held_out or []]
    busy = {k: float(v) for k, v in bench["busy_s_per_step"][calibrate_on].items()}
    overhead = fit_overhead(bench, calibrate_on, busy)
    rows = _predict(bench, busy, overhead, own_compute, calibrate_on)
    runs = [{"delay_ms": other.get("delay_ms"), "rate_mbit": other.get("rate_mbit"),
             "max_staleness": other.get("max_staleness"), "replicas": other.get("replicas", 1),
             "max_inflight": other.get("max_inflight"),
             "schedules": _predict(other, {}, overhead, True, None)} for other in held_out or []]
    held = [r["error"] for r in rows.values() if r["held_out"]] + \
        [r["error"] for run in runs for r in run["schedules"].values()]
    return {"calibrated_on": calibrate_on, "own_compute": own_compute,
            "shared_host": rows[calibrate_on]["shared_host"],
            "frame_overhead_s": overhead, "schedules": rows,
            "held_out_runs": runs, "max_held_out_error": max(held) if held else None, "error_goal": ERROR_GOAL,
            "goal_met": bool(held) and max(held) <= ERROR_GOAL}


def async_utilisation(bench: dict[str, Any], busy: dict[str, float], overhead_s: float,
                      bounds: tuple[int, ...] = (1, 2, 3)) -> dict[str, float]:
    """Simulated busiest-stage utilisation of the async schedule at each staleness bound in `bounds`, with stage
    compute `busy` (seconds per step) and the fitted per-frame overhead, over the benchmark's links.

    Given a run with a core per stage (the calibration run's compute: gpipe leaves most of a small host idle)
    it says what the schedule makes of the links where the benchmark's own async run shared too few cores;
    `busy` x simulated steps per second, the first step left out as in benchmarks/wan.py."""
    out = {}
    for bound in bounds:
        cfg = _config({**bench, "max_staleness": bound}, "async", busy, overhead_s)
        steps_per_s = _tokens_per_s(cfg) / cfg.tokens_per_step
        out[str(bound)] = max(busy.values()) * steps_per_s
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bench_output", type=Path, help="saved output of benchmarks/wan.py (its last line is read)")
    p.add_argument("--calibrate-on", default="gpipe")
    p.add_argument("--write", action="store_true", help="store the record in the calibration file")
    p.add_argument("--calibration-compute", action="store_true",
                   help="predict every schedule with the calibration run's compute (not each run's own)")
    p.add_argument("--shared-host", action="store_true",
                   help="simulate a record that carries its nodes' CPU seconds on its host's cores, shared (see the "
                        "module docstring); default: every node on a core of its own with its wall compute seconds")
    p.add_argument("--calibration", type=Path, default=DEFAULT_PATH)
    p.add_argument("--held-out", type=Path, nargs="*", default=[],
                   help="saved outputs of other benchmarks/wan.py runs (same swarm shape) to predict with the overhead "
                        "fitted on BENCH_OUTPUT")
    a = p.parse_args(argv)
    bench = json.loads(a.bench_output.read_text().strip().splitlines()[-1])
    others = [json.loads(path.read_text().strip().splitlines()[-1]) for path in a.held_out]
    out = validate(bench, a.calibrate_on, own_compute=not a.calibration_compute, held_out=others,
                   host=a.shared_host)
    busy = {k: float(v) for k, v in (on_shared_host(bench) if a.shared_host else bench)["busy_s_per_step"][
        a.calibrate_on].items()}
    out["async_utilisation_calibration_compute"] = async_utilisation(bench, busy, out["frame_overhead_s"])
    print(f"{'schedule':<10}{'measured':>10}{'simulated':>11}{'error':>8}  held out")
    for s, r in out["schedules"].items():
        print(f"{s:<10}{r['measured_tokens_per_s']:>10.0f}{r['simulated_tokens_per_s']:>11.0f}{r['error']:>8.3f}  "
              f"{r['held_out']}")
    for path, run in zip(a.held_out, out["held_out_runs"], strict=True):
        print(f"held-out run {path.name}: {run['delay_ms']} ms, {run['rate_mbit']} Mbit/s, staleness "
              f"{run['max_staleness']}, {run['replicas']} node(s) per stage")
        for s, r in run["schedules"].items():
            print(f"{s:<10}{r['measured_tokens_per_s']:>10.0f}{r['simulated_tokens_per_s']:>11.0f}{r['error']:>8.3f}  "
                  f"True")
    worst = out["max_held_out_error"]
    print(f"largest held-out error {worst:.3f} (goal {ERROR_GOAL})" if worst is not None
          else "nothing held out: give --held-out runs, or a record with more schedules than the calibration's")
    print("async utilisation with the calibration run's compute, by staleness bound: " + ", ".join(
        f"{b}: {u:.3f}" for b, u in out["async_utilisation_calibration_compute"].items()))
    if a.write:
        stored = json.loads(a.calibration.read_text())
        key = "wan_benchmark_replicated" if int(bench.get("replicas", 1)) > 1 else "wan_benchmark"  # the loss ratios
        # of `pmn simulate wan --vs datacenter` come from the unreplicated record
        stored[key] = {"validation": out, **{k: bench.get(k) for k in (
            "loss_ratio_async", "loss_ratio_compressed_avg", "averaging", "replica_compression", "max_staleness",
            "utilisation", "tokens_per_s")}, "loss_steps": (bench.get("val_loss") or {}).get("steps")}
        a.calibration.write_text(json.dumps(stored, indent=1) + "\n")
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main()
