"""Local-swarm model: measured inputs -> WanConfig, start-up/warm-up invariants, trace summary, real runs."""

from __future__ import annotations

import copy
import json
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from simulations.calibrate import (
    DEFAULT_PATH,
    RUNTIME_KEYS,
    CalibrationConfig,
    check_calibration,
    check_runtime,
    load_calibration,
)
from simulations.errors import CalibrationError
from simulations.params import LinkConfig, WanConfig
from simulations.pipeline import simulate
from simulations.swarm_model import swarm_config
from simulations.swarm_run import SwarmSpec
from simulations.trace_summary import summarize_stage

RUNTIME = {"frame_cpu_s": 0.001, "frame_rtt_s": 0.002, "thread_dispatch_s": 0.0001, "connect_s": 0.25,
           "process_start_s": 2.0}


def _calibration() -> dict:
    data = copy.deepcopy(load_calibration(DEFAULT_PATH))
    data.pop("runtime", None)
    return data


def _spec(stages: int = 3, microbatches: int = 6) -> SwarmSpec:
    return SwarmSpec(stages=stages, microbatches=microbatches, microbatch_size=2, steps=4)


def test_swarm_config_maps_every_measured_input() -> None:
    cal = _calibration()
    rows = cal["stages"]
    for r in rows:  # CPU seconds are the work; wall seconds only when a calibration lacks them
        r.update(fwd_cpu_s=r["fwd_s"] / 2, bwd_cpu_s=r["bwd_s"] / 2, opt_cpu_s=r["opt_s"] / 2)
    cfg = swarm_config(cal, RUNTIME, _spec(), cores_by_busy=(0.5, 0.8, 0.8), cores=2)
    # without an in-node figure a frame side costs half the two-host per-frame CPU plus one hand-off;
    # end stages handle one frame per pass, the middle stage two
    side = 0.001 / 2 + 0.0001
    sides = (1, 2, 1)
    assert cfg.fwd_s == pytest.approx(tuple(r["fwd_s"] / 2 + n * side for r, n in zip(rows, sides, strict=True)))
    assert cfg.bwd_s == pytest.approx(tuple(r["bwd_s"] / 2 + n * side for r, n in zip(rows, sides, strict=True)))
    assert cfg.opt_s == pytest.approx(tuple(r["opt_s"] / 2 for r in rows))
    assert cfg.frame_overhead_s == 0.0
    node = swarm_config(cal, {**RUNTIME, "frame_side_cpu_s": 0.003}, _spec(), cores=2)
    assert node.fwd_s == pytest.approx(tuple(r["fwd_s"] / 2 + n * 0.003 for r, n in zip(rows, sides, strict=True)))
    assert cfg.step_overhead_s == pytest.approx(0.002 + 0.0001)
    assert cfg.link.latency_ms == pytest.approx(1.0)
    assert cfg.startup_s == pytest.approx(2 * 2.0 + 0.25)
    assert cfg.host_cores == 2.0 and cfg.cores_by_busy == (0.5, 0.8, 0.8)
    assert cfg.shared_cpus is None and cfg.schedule == "1f1b" and cfg.in_flight_per_stage == 6
    assert cfg.warmup_steps == 1
    idle = swarm_config(cal, RUNTIME, _spec(), cores=2)
    assert idle.cores_by_busy == ()
    # fewer granted cores: the steady state is slower, never faster
    assert simulate(cfg).steady_tokens_per_s < simulate(idle).steady_tokens_per_s


def test_processor_sharing_host() -> None:
    # two equal jobs on one core finish together at twice their work; one job alone runs at full speed
    two = _flat(num_stages=2, fwd_s=(1.0, 1.0), bwd_s=(1.0, 1.0), microbatches=1, steps=1, host_cores=1.0)
    res = simulate(two, trace=True)
    assert res.sim_time_s == pytest.approx(4.0)  # a single microbatch never overlaps: 4 x 1 s
    # thread-fair background: one busy job next to one background thread on one core runs at half speed
    bg = simulate(replace(two, background_load=1.0))
    assert bg.sim_time_s == pytest.approx(8.0)
    # a per-busy-count table overrides it: 0.25 cores for one busy job
    tab = simulate(replace(two, cores_by_busy=(0.25,)))
    assert tab.sim_time_s == pytest.approx(16.0)
    # many microbatches, 2 stages, 1 core: both stages' work shares it, total = all work
    many = simulate(replace(two, microbatches=6, in_flight_per_stage=6))
    assert many.sim_time_s == pytest.approx(6 * 4.0)
    assert many.microbatches_completed == 6
    with pytest.raises(ValueError, match="two CPU models"):
        simulate(replace(two, shared_cpus=1))
    with pytest.raises(ValueError, match="cores_by_busy"):
        simulate(replace(two, cores_by_busy=(0.0,)))


def test_waterfill_and_granted_cores() -> None:
    from simulations.swarm_run import granted_cores, waterfill

    assert waterfill(2.0, [2.0, 1.0, 3.0]) == pytest.approx([2 / 3, 2 / 3, 2 / 3])
    assert waterfill(2.0, [0.2, 3.0]) == pytest.approx([0.2, 1.8])
    assert sum(waterfill(2.0, [5.0, 5.0, 5.0, 5.0])) == pytest.approx(2.0)
    assert granted_cores(2.0, 2, []) == 2.0 and granted_cores(2.0, 3, []) == 2.0
    assert granted_cores(2.0, 2, [[1], [3, 1]]) == pytest.approx((1.0 + 2 / 3) / 2)
    with pytest.raises(ValueError, match="busy"):
        granted_cores(2.0, 0, [])


def test_cores_from_load_and_probe() -> None:
    from simulations.swarm_model import cores_from_load, cores_from_probe

    assert cores_from_load({"others": [[4]]}, 3, cores=2) == pytest.approx((1.0, 1.0, 1.0))
    assert cores_from_load({"others": []}, 2, cores=2) == (1.0, 2.0)
    assert cores_from_probe(1.5, 3) == (1.0, 1.5, 1.5)


def test_load_sampler_counts_runnable_threads() -> None:
    from simulations.swarm_run import LoadSampler

    sampler = LoadSampler(interval_s=0.01)
    own, others = sampler.sample()
    assert own >= 0 and all(isinstance(n, int) and n > 0 for n in others)
    with sampler:
        for _ in range(1000):  # at most ~10 s; a sample takes a few ms
            if len(sampler.own) >= 3:
                break
            threading.Event().wait(0.01)
    out = sampler.result()
    assert out["samples"] >= 3 and len(out["others"]) == out["samples"]


def test_swarm_config_rejects_mismatched_or_bad_inputs() -> None:
    cal = _calibration()
    with pytest.raises(CalibrationError, match="3 stages, the swarm 2"):
        swarm_config(cal, RUNTIME, _spec(stages=2))
    for key in RUNTIME_KEYS:
        bad = {**RUNTIME, key: -1.0}
        with pytest.raises(CalibrationError, match=f"runtime.{key}"):
            swarm_config(cal, bad, _spec())
    with pytest.raises(CalibrationError, match="must be an object"):
        check_runtime([1, 2])
    broken = {**cal, "runtime": {**RUNTIME, "frame_rtt_s": float("nan")}}
    with pytest.raises(CalibrationError, match="frame_rtt_s"):
        check_calibration(broken)


def test_committed_calibration_holds_measured_runtime_inputs() -> None:
    data = load_calibration(DEFAULT_PATH)
    runtime = check_runtime(data["runtime"])
    assert "how" in runtime and runtime["frame_rtt_s"] > 0 and runtime["connect_s"] > 0
    run = runtime["calibration_run"]
    assert run["measured_tokens_per_s"] > 0 and run["simulated_tokens_per_s"] > 0
    assert set(run["trace_breakdown"]) == {str(s) for s in range(run["spec"]["stages"])}


def _flat(**kw: object) -> WanConfig:
    base: dict[str, object] = dict(num_stages=2, fwd_s=(1.0, 1.0), bwd_s=(2.0, 2.0), microbatches=4, steps=4,
                                   fwd_bytes_per_token=0.0, bwd_bytes_per_token=0.0, link=LinkConfig(latency_ms=0.0))
    base.update(kw)
    return WanConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe", "async"])
def test_startup_and_first_step_extra_shift_time_but_not_the_steady_state(schedule: str) -> None:
    base = simulate(_flat(schedule=schedule, warmup_steps=1))
    late = simulate(_flat(schedule=schedule, warmup_steps=1, startup_s=5.0, first_step_extra_s=0.5))
    assert late.microbatches_completed == late.microbatches_expected == 16
    assert late.startup_s == 5.0
    assert late.sim_time_s == pytest.approx(base.sim_time_s + 5.5)
    assert sum(late.step_times_s) == pytest.approx(late.sim_time_s - 5.0)
    assert late.step_times_s[0] == pytest.approx(base.step_times_s[0] + 0.5)
    assert late.steady_tokens_per_s == pytest.approx(base.steady_tokens_per_s)
    assert all(t > 0 for t in late.step_times_s)
    assert simulate(_flat(schedule=schedule, startup_s=5.0)).to_dict() == simulate(
        _flat(schedule=schedule, startup_s=5.0)).to_dict()


def test_steady_tokens_per_s_leaves_out_the_warmup_steps() -> None:
    res = simulate(_flat(warmup_steps=2, first_step_extra_s=3.0))
    steady = res.step_times_s[2:]
    assert res.steady_tokens_per_s == pytest.approx(len(steady) * 4 * 1024 / sum(steady))
    with pytest.raises(ValueError, match="warmup_steps"):
        simulate(_flat(warmup_steps=4))
    with pytest.raises(ValueError, match="startup_s"):
        simulate(_flat(startup_s=-1.0))


def _ev(ev: str, step: int, t0: float, t1: float, cpu: float = 0.0, mb: int = 0) -> dict:
    return {"ev": ev, "stage": 0, "step": step, "mb": mb, "t0": t0, "t1": t1, "cpu": cpu}


def test_trace_summary_breaks_a_step_down() -> None:
    events = [_ev("process_start", -1, 0.0, 0.0), _ev("step", 0, 2.0, 4.0)]
    for step, t in ((1, 10.0), (2, 20.0)):
        events += [
            _ev("step", step, t, t + 1.0),
            _ev("fwd", step, t + 0.1, t + 0.3, cpu=0.1),
            _ev("bwd", step, t + 0.3, t + 0.7, cpu=0.3),
            _ev("opt", step, t + 0.8, t + 0.9, cpu=0.1),
            _ev("accept", step, t + 0.0, t + 0.05),
            _ev("send", step, t + 0.7, t + 0.72),
        ]
    out = summarize_stage(events, warmup=1)
    assert out["step_s"] == pytest.approx(1.0)
    assert out["compute_wall_s"] == pytest.approx(0.7)
    assert out["compute_cpu_s"] == pytest.approx(0.5)
    assert out["idle_s"] == pytest.approx(0.3)
    assert out["accept_s"] == pytest.approx(0.05) and out["send_s"] == pytest.approx(0.02)
    assert out["fwd_wall_s"] == pytest.approx(0.2) and out["bwd_cpu_s"] == pytest.approx(0.3)
    assert out["first_step_s"] == pytest.approx(2.0)
    assert out["process_start_to_first_step_s"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="no step after"):
        summarize_stage(events, warmup=3)


def test_swarm_spec_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="stages"):
        SwarmSpec(stages=0, microbatches=2, microbatch_size=1, steps=3).validate()
    with pytest.raises(ValueError, match="steps"):
        SwarmSpec(stages=2, microbatches=2, microbatch_size=1, steps=2).validate()


def test_calibration_accepts_an_inline_model_and_rejects_bad_json(tmp_path: Path) -> None:
    from sharding.config import PRESETS
    from simulations.calibrate import model_config

    tiny = PRESETS["tiny"]
    assert model_config(json.dumps(tiny.to_dict())) == tiny
    path = tmp_path / "m.json"
    path.write_text(json.dumps(tiny.to_dict()))
    assert model_config(str(path)) == tiny
    with pytest.raises(ValueError, match="bad ModelConfig JSON"):
        CalibrationConfig(model='{"d_model": -1}').validate()
    with pytest.raises(ValueError, match="use one of"):
        CalibrationConfig(model="nope").validate()


@pytest.mark.timeout(120)
def test_transport_measurement_runs_real_libp2p_hosts() -> None:
    from simulations.runtime_cal import measure_transport

    out = measure_transport(payload_len=4096, window_len=516, n_frames=20)
    for key in ("connect_s", "frame_rtt_s", "frame_cpu_s", "thread_dispatch_s"):
        assert out[key] > 0, key
    assert out["frames"] == 20 and "how" in out


@pytest.mark.timeout(240)
def test_contention_measurement_runs_every_stage_in_its_own_process() -> None:
    from simulations.runtime_cal import measure_contention

    cal = CalibrationConfig(model="tiny", num_stages=2, microbatch_size=1, repeats=2)
    out = measure_contention(cal, repeats=2)
    assert out["processes"] == 2
    assert set(out["together_s"]) == {"0", "1"} and all(v > 0 for v in out["together_s"].values())


@pytest.mark.timeout(300)
def test_traced_real_swarm_records_every_microbatch_of_every_stage() -> None:
    from simulations.swarm_run import run_swarm
    from simulations.trace_summary import summarize

    spec = SwarmSpec(stages=2, microbatches=2, microbatch_size=1, steps=3, model="tiny", codec="dense")
    run = run_swarm(spec, trace=True, timeout_s=240)
    assert run.tokens_per_s() > 0
    for stage in (0, 1):
        events = run.traces[stage]
        for kind in ("fwd", "bwd"):
            got = sorted((e["step"], e["mb"]) for e in events if e["ev"] == kind)
            assert got == [(s, m) for s in range(3) for m in range(2)], (stage, kind)
        assert sorted(e["step"] for e in events if e["ev"] == "opt") == [0, 1, 2]
        assert all(e["t1"] >= e["t0"] for e in events)
    decoded = {(e["stage"], e["step"], e["mb"]) for e in run.traces[1] if e["ev"] == "decode"}
    assert decoded == {(1, s, m) for s in range(3) for m in range(2)}
    breakdown = summarize(run.traces, warmup=1)
    assert set(breakdown) == {"0", "1"} and all(b["step_s"] > 0 for b in breakdown.values())


def test_load_sampler_result_keeps_only_the_measured_window() -> None:
    from simulations.swarm_run import LoadSampler

    sampler = LoadSampler()
    sampler.own, sampler.others, sampler.times = [1, 2, 3], [[5], [1, 1], []], [10.0, 20.0, 30.0]
    whole = sampler.result()
    assert whole["samples"] == 3 and whole["other_running"] == pytest.approx(7 / 3)
    part = sampler.result((15.0, 30.0))
    assert part["samples"] == 2 and part["others"] == [[1, 1], []]
    assert part["other_groups"] == pytest.approx(1.0) and part["own_running"] == pytest.approx(2.5)
    assert sampler.result((40.0, 50.0))["samples"] == 0
