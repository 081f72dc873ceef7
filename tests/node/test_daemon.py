"""Node processes on 127.0.0.1: pipeline training equals the single-process run; restart resumes;
a lost peer yields an error naming it and its stage."""

from __future__ import annotations

import json
import signal
import urllib.request

import pytest

from node.observability.status import node_status, read_progress
from node.testing.swarm import launch_swarm, run_local_swarm, start_node, stop_nodes, wait_nodes
from sharding import PRESETS, OptimConfig, load_corpus, train_reference
from tests.ports import free_port_run
from tests.waiting import wait_until

pytestmark = [pytest.mark.network]

M, B = 2, 2
ARGS = ["--microbatches", str(M), "--microbatch-size", str(B), "--corpus", "synthetic", "--threads", "1"]


def _reference(steps: int, preset: str = "tiny") -> list[float]:
    return train_reference(PRESETS[preset], OptimConfig(), steps, M, B, load_corpus("synthetic"))


@pytest.mark.timeout(240)
def test_two_stages_auto_stage_match_reference(tmp_path) -> None:
    res = run_local_swarm(2, 3, tmp_path, microbatches=M, microbatch_size=B, corpus="synthetic", threads=[1, 1],
                          timeout_s=200, auto_stage=True)
    assert [p["stage"] for p in res.peers] == [0, 1]  # the second node picked the unserved stage
    assert res.losses == pytest.approx(_reference(3), abs=1e-4)
    assert all(p["peer_id"].startswith("12D3KooW") for p in res.peers)


@pytest.mark.timeout(240)
def test_three_stages_subspace_match_reference(tmp_path) -> None:
    res = run_local_swarm(3, 2, tmp_path, model="tiny-subspace", codec="subspace-fp32", microbatches=M,
                          microbatch_size=B, corpus="synthetic", threads=[1, 1, 1], timeout_s=200)
    assert res.losses == pytest.approx(_reference(2, "tiny-subspace"), abs=1e-4)
    # every stage reported the bytes it moved
    assert all(r["bytes_out"] > 0 for recs in res.steps.values() for r in recs)


@pytest.mark.timeout(300)
def test_sigterm_checkpoints_metrics_and_restart_resumes(tmp_path) -> None:
    port = free_port_run(2)  # metrics ports of node 0 and node 1
    nodes = launch_swarm(tmp_path, 2, ["--steps", "1000", *ARGS], metrics_base_port=port)
    try:
        tail = nodes[1]
        wait_until(lambda: len(read_progress(tail.data_dir)) >= 2, 120, "two completed steps")
        text = urllib.request.urlopen(f"http://127.0.0.1:{port + 1}/metrics", timeout=10).read().decode()
        for n in nodes:
            n.proc.send_signal(signal.SIGTERM)
        codes = wait_nodes(nodes, 60)
    finally:
        stop_nodes(nodes)
    for name in ("pmn_tokens_per_second", "pmn_step", "pmn_tail_loss", "pmn_bytes_in_total", "pmn_peers"):
        assert name + "{" in text
    assert codes == [128 + signal.SIGTERM] * 2
    for n in nodes:
        st = node_status(n.data_dir)
        assert st["state"] == "stopped"
        assert (n.data_dir / "checkpoints" / f"stage{n.stage}" / "LATEST").exists()
    done = min(node_status(n.data_dir)["next_step"] for n in nodes)
    target = done + 2
    res = run_local_swarm(2, target, tmp_path, microbatches=M, microbatch_size=B, corpus="synthetic",
                          threads=[1, 1], timeout_s=200)
    # the restarted nodes kept their identities and lost no step: every step 0..target-1 matches
    assert [p["peer_id"] for p in res.peers] == [n.ready["peer_id"] for n in nodes]
    by_step = {r["step"]: r["loss"] for r in read_progress(nodes[1].data_dir)}
    assert sorted(by_step) == list(range(target))
    assert [by_step[s] for s in range(target)] == pytest.approx(_reference(target), abs=1e-4)


@pytest.mark.timeout(240)
def test_lost_peer_named_after_retries(tmp_path) -> None:
    fast = ["--frame-timeout", "3", "--redial-timeout", "2", "--step-retries", "1"]
    nodes = launch_swarm(tmp_path, 2, ["--steps", "1000", *ARGS, *fast])
    head, tail = nodes
    try:
        wait_until(lambda: len(read_progress(tail.data_dir)) >= 1, 120, "a completed step")
        tail.proc.kill()  # the tail disappears mid-run
        tail.proc.wait()
        code = head.proc.wait(timeout=120)
        assert head.proc.stdout is not None
        lines = [json.loads(ln) for ln in head.proc.stdout.read().decode().splitlines() if ln.startswith("{")]
    finally:
        stop_nodes(nodes)
    assert code == 1
    err = [ln for ln in lines if ln.get("event") == "error"][-1]["error"]
    assert "stage 1" in err and tail.ready["peer_id"] in err
    assert node_status(head.data_dir)["state"] == "failed"


@pytest.mark.timeout(300)
def test_killed_middle_stage_restarts_and_rejoins_without_losing_a_step(tmp_path) -> None:
    patient = ["--frame-timeout", "60", "--redial-timeout", "90", "--step-retries", "4"]
    steps = 6
    nodes = launch_swarm(tmp_path, 3, ["--steps", str(steps), *ARGS, *patient])
    head, middle, tail = nodes
    try:
        wait_until(lambda: len(read_progress(tail.data_dir)) >= 2, 120, "two completed steps")
        middle.proc.kill()  # crash mid-run: no checkpoint on the way out
        middle.proc.wait()
        args = ["--stages", "3", "--steps", str(steps), *ARGS, *patient, "--bootstrap", head.ready["addrs"][0]]
        restarted = start_node(1, middle.data_dir, args)
        nodes.append(restarted)
        assert restarted.ready["peer_id"] == middle.ready["peer_id"]  # same identity from the data dir
        codes = wait_nodes([head, restarted, tail], 200)
    finally:
        stop_nodes(nodes)
    assert codes == [0, 0, 0]
    by_step = {r["step"]: r["loss"] for r in read_progress(tail.data_dir)}  # last record of each step wins
    assert sorted(by_step) == list(range(steps))
    assert [by_step[s] for s in range(steps)] == pytest.approx(_reference(steps), abs=1e-4)
    # both neighbours noticed the loss and retried the interrupted step
    assert "last_retry" in node_status(head.data_dir) and "last_retry" in node_status(tail.data_dir)
