"""Simulator: the node's per-replica in-flight cap (`WanConfig.inflight_per_replica`, the node's
`replicas.max_inflight`) and the datacenter comparison's node-as-built figure that uses it."""

from __future__ import annotations

import math

import pytest

from pmn.cli import build_parser
from pmn.cmd_simulate import cmd_wan
from pmn.errors import CLIError
from simulations.calibrate import DEFAULT_PATH, load_calibration
from simulations.datacenter import NODE_MAX_INFLIGHT, run_vs_datacenter
from simulations.params import ChurnConfig, LinkConfig, WanConfig
from simulations.pipeline import PipelineSim, simulate


def _cfg(**kw: object) -> WanConfig:
    base: dict[str, object] = dict(
        num_stages=3, fwd_s=(0.05,) * 3, bwd_s=(0.1,) * 3, replicas=3, microbatches=24, steps=3,
        microbatch_tokens=256, fwd_bytes_per_token=64.0, bwd_bytes_per_token=64.0,
        link=LinkConfig(bandwidth_mbps=50.0, latency_ms=20.0), head_leader=True, schedule="gpipe",
        inflight_per_replica=2,
    )
    base.update(kw)
    return WanConfig(**base)  # type: ignore[arg-type]


def _replay(sim: PipelineSim) -> dict[tuple[tuple[int, int], tuple[int, int]], int]:
    """The most microbatches each (sender, receiver) pair held at once, rebuilt from the send/return trace; every
    count stays >= 0 and ends at 0 (each send came back or its attempt was dropped)."""
    held: dict[tuple[tuple[int, int], tuple[int, int]], int] = {}
    peak: dict[tuple[tuple[int, int], tuple[int, int]], int] = {}
    last = 0.0
    for t, sender, receiver, delta in sim.pair_trace:
        assert t >= last and delta in (1, -1) and receiver[0] == sender[0] + 1
        last = t
        held[(sender, receiver)] = held.get((sender, receiver), 0) + delta
        assert held[(sender, receiver)] >= 0
        peak[(sender, receiver)] = max(peak.get((sender, receiver), 0), held[(sender, receiver)])
    assert all(v == 0 for v in held.values())
    return peak


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "async"])
@pytest.mark.parametrize("cap", [1, 2])
def test_a_sender_never_has_more_than_the_cap_at_one_receiver(schedule: str, cap: int) -> None:
    sim = PipelineSim(_cfg(schedule=schedule, inflight_per_replica=cap, in_flight_per_stage=12), trace=True)
    res = sim.run()
    assert res.microbatches_completed == res.microbatches_expected == 72
    peak = _replay(sim)
    assert peak == sim.pair_peak  # the trace and the counters agree
    assert max(peak.values()) == cap and sim.cap_waits > 0  # the cap binds here, and holds
    # the head leader (stage 0, replica 0) is the only stage-0 sender and fills every stage-1 replica up to the cap
    assert {s for s, _ in peak if s[0] == 0} == {(0, 0)}
    assert {r for s, r in peak if s == (0, 0)} == {(1, 0), (1, 1), (1, 2)}
    # the head's outstanding microbatches, all receivers together, never pass cap x replicas
    out, most = 0, 0
    for _, sender, _, delta in sim.pair_trace:
        if sender == (0, 0):
            out += delta
            most = max(most, out)
    assert most == cap * 3


def test_the_cap_holds_under_churn_and_without_a_leader() -> None:
    cfg = _cfg(replicas=3, speed_sigma=0.3, head_leader=False, churn=ChurnConfig(mean_uptime_s=8.0, mean_downtime_s=1.0),
               link=LinkConfig(bandwidth_mbps=50.0, bandwidth_sigma=0.5, latency_ms=20.0, latency_sigma=0.5), seed=3)
    sim = PipelineSim(cfg, trace=True)
    res = sim.run()
    assert res.departures > 0 and res.failed_attempts > 0  # churn really happened: lost attempts release their slots
    assert res.microbatches_completed == res.microbatches_expected
    peak = _replay(sim)
    assert 1 <= max(peak.values()) <= 2 and peak == sim.pair_peak
    assert len({s for s, _ in peak if s[0] == 0}) > 1  # every head replica sends its share


def test_latency_bound_step_is_a_round_trip_per_cap_x_replicas_microbatches() -> None:
    """Zero compute and zero bytes: the head leader keeps cap x replicas microbatches in flight, so a step is
    ceil(microbatches / (cap x replicas)) round trips; 1F1B keeps num_stages (its head's depth), uncapped GPipe all of
    them. So with cap x replicas >= num_stages the capped flushed schedule lies between 1F1B and uncapped GPipe, and
    is not slower with a larger cap."""
    s_n, r_n, m = 4, 4, 32
    rtt = 2 * (s_n - 1) * 0.05

    def step(schedule: str, cap: int | None) -> float:
        cfg = _cfg(num_stages=s_n, fwd_s=(0.0,) * s_n, bwd_s=(0.0,) * s_n, replicas=r_n, microbatches=m,
                   fwd_bytes_per_token=0.0, bwd_bytes_per_token=0.0, link=LinkConfig(latency_ms=50.0),
                   schedule=schedule, inflight_per_replica=cap)
        return simulate(cfg).mean_step_s

    one_f_one_b, gpipe = step("1f1b", None), step("gpipe", None)
    assert one_f_one_b == pytest.approx(math.ceil(m / s_n) * rtt)
    assert gpipe == pytest.approx(rtt)
    times = {cap: step("gpipe", cap) for cap in (1, 2, 3, 4, 8, m)}
    for cap, t in times.items():
        assert t == pytest.approx(math.ceil(m / (cap * r_n)) * rtt)
        assert gpipe - 1e-9 <= t <= one_f_one_b + 1e-9  # cap x replicas >= num_stages for every cap here
    ordered = [times[c] for c in sorted(times)]
    assert all(a >= b - 1e-9 for a, b in zip(ordered, ordered[1:], strict=False))
    assert times[m] == pytest.approx(gpipe) and times[1] == pytest.approx(one_f_one_b)


def test_a_cap_that_never_binds_never_waits() -> None:
    """With the cap at every microbatch of the step it never binds (no wait) and a larger one gives the same run;
    without a cap nothing is counted."""
    loose = PipelineSim(_cfg(inflight_per_replica=24))
    looser = PipelineSim(_cfg(inflight_per_replica=1000))
    a, b = loose.run(), looser.run()
    assert loose.cap_waits == looser.cap_waits == 0 and a.step_times_s == b.step_times_s
    plain = PipelineSim(_cfg(inflight_per_replica=None))
    plain.run()
    assert plain.pair_peak == {} and plain.cap_waits == 0


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2"])
def test_bad_caps_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match=r"WanConfig.inflight_per_replica=.*must be None \(no cap\) or an integer >= 1"):
        _cfg(inflight_per_replica=bad).validate()
    if bad != 0:  # 0 is the comparison's "no cap"
        with pytest.raises(ValueError, match=r"inflight_per_replica=.*integer >= 1 .* or 0 \(no cap\)"):
            run_vs_datacenter(load_calibration(DEFAULT_PATH), steps=2, inflight_per_replica=bad)  # type: ignore[arg-type]


def test_cli_flag_reaches_the_comparison_and_bad_values_are_one_line_errors() -> None:
    args = build_parser().parse_args(["simulate", "wan", "--vs", "datacenter", "--inflight-per-replica", "-3"])
    assert args.inflight_per_replica == -3
    assert build_parser().parse_args(["simulate", "wan"]).inflight_per_replica is None
    with pytest.raises(CLIError, match="inflight_per_replica=-3"):
        cmd_wan(args)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["simulate", "wan", "--inflight-per-replica", "two"])


def test_node_as_built_uses_the_node_cap_and_names_it() -> None:
    from node.config import ReplicaConfig

    assert NODE_MAX_INFLIGHT == ReplicaConfig().max_inflight  # the literal follows the node's default
    cal = load_calibration(DEFAULT_PATH)
    kw: dict[str, object] = dict(schedule="gpipe", averaging="powersgd:12:int4", overlap_averaging=True,
                                 contributions="step", steps=2)
    built = run_vs_datacenter(cal, **kw)  # type: ignore[arg-type]
    assert built["node_as_built"] and built["wan"]["inflight_per_replica"] == NODE_MAX_INFLIGHT
    assert "replicas.max_inflight" in built["inflight_cap"]
    off = run_vs_datacenter(cal, inflight_per_replica=0, **kw)  # type: ignore[arg-type]
    assert off["wan"]["inflight_per_replica"] is None and off["inflight_cap"].startswith("none")
    # the head leader's 2 x 16 in flight against 8 stages of 50 ms links: slower than every forward at once
    assert built["wan"]["step_s"] > off["wan"]["step_s"]
    assert built["datacenter"] == off["datacenter"]  # the datacenter side is untouched
    given = run_vs_datacenter(cal, inflight_per_replica=8, **kw)  # type: ignore[arg-type]
    assert given["wan"]["inflight_per_replica"] == 8 and "given by the caller" in given["inflight_cap"]
    assert given["wan"]["step_s"] < built["wan"]["step_s"]
    lanes = run_vs_datacenter(cal, head="lanes", **kw)  # type: ignore[arg-type]
    assert not lanes["node_as_built"] and lanes["wan"]["inflight_per_replica"] is None


def test_cli_defaults_compare_the_node_as_built() -> None:
    from pmn.cmd_simulate import _node_as_built

    parser = build_parser()
    args = parser.parse_args(["simulate", "wan", "--vs", "datacenter"])
    contributions, head = _node_as_built(args, args.schedule or "async")
    assert (contributions, head) == ("step", "delegated")  # async with replicas runs only with the step exchange
    out = run_vs_datacenter(load_calibration(DEFAULT_PATH), schedule="async", max_staleness=args.max_staleness,
                            averaging=args.averaging, overlap_averaging=True, contributions=contributions,
                            head=head, steps=2)
    assert out["node_as_built"] and out["not_built"] == []
    # a flag given is kept; the head follows the contributions unless it is given too
    gpipe = parser.parse_args(["simulate", "wan", "--vs", "datacenter", "--schedule", "gpipe"])
    assert _node_as_built(gpipe, "gpipe") == ("microbatch", "leader")
    given = parser.parse_args(["simulate", "wan", "--vs", "datacenter", "--contributions", "microbatch",
                               "--head", "lanes"])
    assert _node_as_built(given, "async") == ("microbatch", "lanes")
    dense = parser.parse_args(["simulate", "wan", "--vs", "datacenter", "--averaging", "dense"])
    assert _node_as_built(dense, "async") == ("microbatch", "leader")
