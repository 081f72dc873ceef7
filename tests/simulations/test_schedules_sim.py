"""Simulator: the async staleness bound, the averaging bytes model, the datacenter comparison, and the
calibration against benchmarks/wan.py."""

from __future__ import annotations

import argparse
import json

import pytest

from pmn.cmd_simulate import cmd_wan
from pmn.errors import CLIError
from sharding.partition import partition
from simulations.averaging import Averaging, sync_bytes_per_step
from simulations.calibrate import DEFAULT_PATH, load_calibration
from simulations.datacenter import run_vs_datacenter
from simulations.params import LinkConfig, WanConfig
from simulations.pipeline import simulate
from simulations.presets import protocolnanogpt_model
from simulations.wan_bench import validate


def _latency_bound(schedule: str, staleness: int | None = None) -> WanConfig:
    return WanConfig(num_stages=3, fwd_s=(0.01,) * 3, bwd_s=(0.02,) * 3, microbatches=8, microbatch_tokens=512,
                     steps=6, schedule=schedule, fwd_bytes_per_token=256, bwd_bytes_per_token=256,  # type: ignore[arg-type]
                     link=LinkConfig(200.0, 0.0, 50.0), max_staleness=staleness, warmup_steps=1)


def test_async_with_a_staleness_bound_hides_the_links_and_zero_does_not() -> None:
    gpipe = simulate(_latency_bound("gpipe"))
    s0 = simulate(_latency_bound("async", 0))
    s2 = simulate(_latency_bound("async", 2))
    assert s2.steady_tokens_per_s > 1.5 * gpipe.steady_tokens_per_s
    assert s0.steady_tokens_per_s < s2.steady_tokens_per_s
    assert s2.microbatches_completed == s0.microbatches_completed == 48
    with pytest.raises(ValueError, match="max_staleness"):
        _latency_bound("async", -1).validate()


def test_averaging_bytes_model() -> None:
    model = protocolnanogpt_model(16)
    spec = partition(model, 8)[3]
    dense = sync_bytes_per_step(model, spec, Averaging())
    assert dense == pytest.approx(2 * (2 * 12 * 1024 * 1024 + 2 * 2 * 1024), rel=1e-9)  # two blocks of bf16 grads
    assert 10 <= dense / sync_bytes_per_step(model, spec, Averaging.parse("powersgd:64")) <= 14  # r(m+n) vs mn
    assert dense / sync_bytes_per_step(model, spec, Averaging.parse("powersgd:4")) >= 100
    assert sync_bytes_per_step(model, spec, Averaging.parse("diloco:100")) == pytest.approx(dense / 100)
    assert Averaging.parse("powersgd:8").label() == "powersgd:8"
    # int8: a byte per factor value plus a bf16 scale per column and per norm-gain vector (4 here, 2 blocks)
    r8, r8q = Averaging.parse("powersgd:8"), Averaging.parse("powersgd:8:int8")
    assert r8q.label() == "powersgd:8:int8" and r8q.bits == 8 and r8.bits == 16
    low = sum(8 * (m + n) for m, n in [(3 * 1024, 1024), (1024, 1024), (4 * 1024, 1024), (1024, 4 * 1024)]) * 2
    assert sync_bytes_per_step(model, spec, r8q) == pytest.approx(low + 4 * 1024 + 2 * (2 * 8 * 4 * 2 + 4))
    assert sync_bytes_per_step(model, spec, r8) == pytest.approx(2 * (low + 4 * 1024))
    r8h = Averaging.parse("powersgd:8:int4")  # int4: half a byte per value, the same scales
    assert r8h.label() == "powersgd:8:int4" and r8h.bits == 4
    assert sync_bytes_per_step(model, spec, r8h) == pytest.approx((low + 4 * 1024) / 2 + 2 * (2 * 8 * 4 * 2 + 4))
    # the blocks' matrices at a rank of their own (the node's powersgd_block_rank): two blocks of 4 matrices at 16
    r8b = Averaging.parse("powersgd:8/16:int4")
    assert (r8b.label(), r8b.rank, r8b.block_rank) == ("powersgd:8/16:int4", 8, 16)
    assert sync_bytes_per_step(model, spec, r8b) == pytest.approx((2 * low + 4 * 1024) / 2 + 2 * (2 * 16 * 4 * 2 + 4))
    assert Averaging.parse("powersgd:8/8:int4") == r8h  # a block rank equal to the rank is no option of its own
    for bad in ("powersgd", "diloco:0", "topk:3", "dense:2", "powersgd:8:int2", "powersgd::int8", "powersgd:8/0",
                "powersgd:8/x:int4", "powersgd:/8"):
        with pytest.raises(ValueError, match="averaging"):
            Averaging.parse(bad)


@pytest.mark.timeout(300)
def test_datacenter_comparison_reports_the_slowdown() -> None:
    cal = load_calibration(DEFAULT_PATH)
    out = run_vs_datacenter(cal, max_staleness=2, averaging="diloco:100", steps=2)
    assert out["slowdown_vs_datacenter"] == pytest.approx(out["wan"]["time_to_target_s"]
                                                          / out["datacenter"]["time_to_target_s"])
    assert out["slowdown_vs_datacenter"] > 1.0  # the same device behind slower links is never faster here
    assert out["goal_met"] == (out["slowdown_vs_datacenter"] <= 1.3)
    assert out["stages"] == 8 and out["replicas"] == 16
    assert out["wan"]["averaging"] == "diloco:100" and out["datacenter"]["averaging"] == "dense"
    # beside it, against the datacenter's busiest-stage compute per step: no bubble, so a larger slowdown
    dc = out["datacenter"]
    assert 0 < dc["bubble_free_step_s"] < dc["step_s"]
    assert out["slowdown_vs_bubble_free_datacenter"] == pytest.approx(
        out["slowdown_vs_datacenter"] * dc["step_s"] / dc["bubble_free_step_s"])



@pytest.mark.timeout(300)
def test_the_wan_replicas_push_one_contribution_per_microbatch_as_the_node_does() -> None:
    """The node pushes a PowerSGD contribution for every microbatch a replica computes (16 per replica and step
    here; its head leader computes all 256 of stage 0 and pushes each to its 15 standbys), so the comparison's WAN
    bytes are 16 (stage 0: 256) times one contribution; one contribution per replica and step, fewer and larger
    microbatches and a head stage whose replicas share the microbatches (what-ifs, labelled as not built) cut them,
    and the head leader is the slower layout; bad layouts are refused."""
    cal = load_calibration(DEFAULT_PATH)
    model = protocolnanogpt_model(16)
    one = [sync_bytes_per_step(model, s, Averaging.parse("powersgd:6:int4")) for s in partition(model, 8)]
    runs = {name: run_vs_datacenter(cal, max_staleness=3, averaging="powersgd:6:int4", overlap_averaging=True,
                                    steps=4, **kw)
            for name, kw in (("node", {}), ("step", {"contributions": "step"}), ("large", {"microbatch_seqs": 16}),
                             ("lanes", {"head": "lanes"}))}
    for name, head, per in (("node", 256, 16), ("step", 1, 1), ("large", 32, 2), ("lanes", 16, 16)):
        wan = runs[name]["wan"]
        assert wan["replica_bytes_per_step"] == pytest.approx([head * one[0]] + [per * b for b in one[1:]], rel=1e-6)
    assert "(the node's default" in runs["node"]["wan"]["contributions"] and "(the node)" in runs["node"]["wan"]["head"]
    assert "replica_exchange = step" in runs["step"]["wan"]["contributions"]
    assert "commit reaches its stage" in runs["step"]["wan"]["contributions"]
    assert "not built in the node" in runs["lanes"]["wan"]["head"]
    assert runs["large"]["wan"]["microbatches"] == 32 and runs["node"]["wan"]["microbatches"] == 256
    assert runs["step"]["wan"]["step_s"] < runs["node"]["wan"]["step_s"]
    assert runs["lanes"]["wan"]["step_s"] < runs["node"]["wan"]["step_s"]
    with pytest.raises(ValueError, match="head="):
        run_vs_datacenter(cal, steps=2, head="all")
    # what the node does not have is named: async with replicas, a data-parallel head
    assert any("async schedule with replicated stages" in x for x in runs["node"]["not_built"])
    assert any("data-parallel head" in x for x in runs["lanes"]["not_built"])
    assert not any("head" in x for x in runs["node"]["not_built"])
    built = run_vs_datacenter(cal, schedule="gpipe", averaging="powersgd:6:int4", overlap_averaging=True, steps=2,
                              contributions="step")
    assert built["node_as_built"] and built["not_built"] == [] and not runs["node"]["node_as_built"]
    assert runs["large"]["datacenter"] == runs["node"]["datacenter"]  # the datacenter keeps its own layout
    for bad in (0, 3, 64, True):
        with pytest.raises(ValueError, match="microbatch_seqs"):
            run_vs_datacenter(cal, steps=2, microbatch_seqs=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="contributions="):
        run_vs_datacenter(cal, steps=2, averaging="powersgd:6:int4", overlap_averaging=True, contributions="replica")
    with pytest.raises(ValueError, match="needs averaging=powersgd"):
        run_vs_datacenter(cal, steps=2, averaging="diloco:100", contributions="step")


def test_overlapped_averaging_and_what_if_penalties_are_labelled() -> None:
    """DiLoCo's exchange sent while the replicas compute shortens the WAN step (here the 8 stages' outer
    exchanges every 100 steps held their compute); loss penalties given by the caller replace the calibration
    file's and say so; overlapping needs DiLoCo or PowerSGD, and a ratio that is no ratio is refused naming the field."""
    cal = load_calibration(DEFAULT_PATH)
    held = run_vs_datacenter(cal, max_staleness=4, averaging="diloco:100", steps=2)
    over = run_vs_datacenter(cal, max_staleness=4, averaging="diloco:100", steps=2, overlap_averaging=True,
                             async_loss_ratio=1.01, averaging_loss_ratio=1.005)
    assert over["wan"]["averaging_overlapped"] and not held["wan"]["averaging_overlapped"]
    assert over["wan"]["step_s"] < held["wan"]["step_s"]
    assumed = over["inputs"]["assumed"]
    assert (assumed["async_loss_ratio"], assumed["averaging_loss_ratio"]) == (1.01, 1.005)
    assert "given by the caller" in assumed["async_loss_source"]
    assert "given by the caller" in assumed["averaging_loss_source"]
    assert held["inputs"]["assumed"]["async_loss_source"].startswith("measured")
    with pytest.raises(ValueError, match="overlap_averaging needs averaging=diloco"):
        run_vs_datacenter(cal, averaging="dense", steps=2, overlap_averaging=True)
    for bad in (0.0, float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="async_loss_ratio"):
            run_vs_datacenter(cal, steps=2, async_loss_ratio=bad)


def test_cli_defaults_run_the_nodes_averaging_overlapped_and_dense_held() -> None:
    """Unless told otherwise the comparison runs what the node runs: PowerSGD rank 12 int4 pushed during the step
    at staleness 3, one contribution per replica and step, the head's work delegated; dense averaging is a held
    all-reduce; an explicit flag wins."""
    from pmn.cli import build_parser
    from pmn.cmd_simulate import _node_as_built, _overlap

    parse = build_parser().parse_args
    args = parse(["simulate", "wan", "--vs", "datacenter"])
    assert (args.averaging, args.max_staleness, _overlap(args)) == ("powersgd:12:int4", 3, True)
    assert (args.contributions, args.microbatch_seqs, args.head) == (None, 2, None)  # resolved per schedule:
    assert _node_as_built(args, "async") == ("step", "delegated")  # the node as built
    assert _overlap(parse(["simulate", "wan", "--vs", "datacenter", "--averaging", "dense"])) is False
    assert _overlap(parse(["simulate", "wan", "--vs", "datacenter", "--no-overlap-averaging"])) is False
    assert _overlap(parse(["simulate", "wan", "--vs", "datacenter", "--averaging", "diloco:50"])) is True


def test_cli_refuses_other_presets_for_the_datacenter_comparison() -> None:
    args = argparse.Namespace(preset="home1000", vs="datacenter", schedule=None, max_staleness=2,
                              averaging="dense", json=True, plots=None)
    with pytest.raises(CLIError, match="protocolnanogpt"):
        cmd_wan(args)


def _bench_from_sim() -> dict:
    """A benchmark record whose 'measurements' are the simulator's own (the fit must then be exact)."""
    base = {"microbatches": 4, "stages": 3, "steps": 5, "max_staleness": 2, "microbatch_size": 2,
            "model": {"seq_len": 64}, "link_check": {"bulk_mbit_s": 200.0, "rtt_ms": 100.0},
            "busy_s_per_step": {"gpipe": {"0": 0.12, "1": 0.12, "2": 0.12}},
            "bytes_out_per_step": {s: {"0": 4 * 128 * 256} for s in ("gpipe", "1f1b", "async")}}
    from simulations.wan_bench import _tokens_per_s, bench_config

    busy = {"0": 0.12, "1": 0.12, "2": 0.12}
    base["tokens_per_s"] = {s: _tokens_per_s(bench_config(base, s, busy, 0.003)) for s in ("gpipe", "1f1b", "async")}
    return base


def test_calibration_recovers_a_known_overhead_and_predicts_held_out_schedules() -> None:
    out = validate(_bench_from_sim())
    assert out["frame_overhead_s"] == pytest.approx(0.003, abs=2e-4)
    assert out["max_held_out_error"] < 0.02 and out["goal_met"]
    assert {s for s, r in out["schedules"].items() if r["held_out"]} == {"1f1b", "async"}
    json.dumps(out)


def test_the_measured_averaging_ratio_applies_to_the_method_it_was_measured_for() -> None:
    """benchmarks/wan.py measures PowerSGD's loss ratio: the comparison takes it for powersgd, naming the rank and
    factors it was measured at, and assumes nothing measured for DiLoCo; the PowerSGD run with the node's pushes
    sends direct."""
    cal = load_calibration(DEFAULT_PATH)
    bench = {**cal.get("wan_benchmark", {}), "loss_ratio_compressed_avg": 1.03,
             "averaging": {"steps": 150, "model": "wide", "rank": 8, "bits": 8}}
    cal = {**cal, "wan_benchmark": bench}
    ps = run_vs_datacenter(cal, averaging="powersgd:8:int8", steps=2, overlap_averaging=True)
    assumed = ps["inputs"]["assumed"]
    assert assumed["averaging_loss_ratio"] == 1.03
    # a record from before iterations and the bf16 baseline were recorded: one iteration, against fp32 dense
    assert ("PowerSGD rank 8, int8 factors, 1 power iteration(s), against dense, wide model, 150 steps"
            in assumed["averaging_loss_source"])
    newer = {**cal, "wan_benchmark": {**bench, "averaging": {"steps": 150, "model": "wide", "rank": 6, "bits": 8,
                                                             "iterations": 3, "dense_baseline": "dense-bf16"}}}
    src = run_vs_datacenter(newer, averaging="powersgd:6:int8", steps=2)["inputs"]["assumed"]["averaging_loss_source"]
    assert "PowerSGD rank 6, int8 factors, 3 power iteration(s), against dense-bf16, wide model" in src
    assert ps["wan"]["averaging_collective"] == "direct" and ps["wan"]["averaging"] == "powersgd:8:int8"
    dl = run_vs_datacenter(cal, averaging="diloco:100", steps=2)["inputs"]["assumed"]
    assert dl["averaging_loss_ratio"] == 1.0 and "no penalty assumed" in dl["averaging_loss_source"]
    old = {**cal, "wan_benchmark": {k: v for k, v in bench.items() if k != "averaging"}}  # a record without the method
    assert run_vs_datacenter(old, averaging="powersgd:8", steps=2)["inputs"]["assumed"]["averaging_loss_ratio"] == 1.0


def test_async_utilisation_by_bound_rises_towards_the_frame_overhead_ceiling() -> None:
    """With 50 ms links a bound of 0 would idle through the round trip; each step of staleness hides more of it,
    until the per-frame overhead, not the links, is what keeps a stage from its compute."""
    from simulations.wan_bench import async_utilisation

    bench = _bench_from_sim()
    busy = {"0": 0.12, "1": 0.12, "2": 0.12}
    util = async_utilisation(bench, busy, 0.003, bounds=(0, 1, 2, 4))
    assert list(util) == ["0", "1", "2", "4"] and all(0 < u <= 1 for u in util.values())
    assert util["0"] < util["1"] <= util["2"] <= util["4"]
    assert util["4"] < 1  # frames cost 3 ms each outside compute
    free = async_utilisation(bench, busy, 0.0, bounds=(4,))
    assert free["4"] > util["4"]  # without the overhead the deepest bound is busier
