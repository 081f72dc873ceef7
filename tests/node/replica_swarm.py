"""Helpers for replicated-mode process tests: launch nodes with explicit stages, read their records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from node.observability.status import node_status, read_progress
from node.testing.swarm import (
    NodeProcess,
    launch_replicas,
    start_node,
    stop_nodes,
    wait_nodes,
)
from node.training.checkpoint import latest_checkpoint

M, B = 4, 2  # microbatches per step, sequences per microbatch
FAST = ["--replicated", "--microbatches", str(M), "--microbatch-size", str(B), "--corpus", "synthetic",
        "--threads", "1", "--replica-timeout", "3", "--ban-base", "1", "--ban-max", "4", "--avg-timeout", "10",
        "--commit-poll", "0.3", "--no-replica-timeout", "30", "--max-inflight", "2", "--checkpoint-every", "0",
        # a step of this tiny model takes ~15 ms and a state transfer ~10 steps: peers keep enough steps for a
        # replica that just fetched the state to replay the ones since (replicas.keep_steps)
        "--keep-steps", "32",
        # on a loaded shared machine a node may take minutes to start: the head waits that long for the first
        "--discovery-discovery-timeout-s", "180"]
# the step exchange with a checkpoint every step (all kept) and a slowed compute: a replica lost before its bundle
# costs a rollback, and a step is long enough for the test hook to kill it mid-step
STEP_ROLLBACK = ["--replica-exchange", "step", "--checkpoint-every", "1", "--checkpoint-keep", "0", "--debug-delay-s",
                 "0.05", "--no-replica-timeout", "600"]
READY_TIMEOUT_S = 180.0  # a node's start (imports, keys, first discovery round) on a loaded shared machine


def launch(root: Path, stages: list[int], steps: int, extra: dict[int, list[str]] | None = None,
           common: list[str] | None = None) -> list[NodeProcess]:
    """Node i serves stages[i] (`extra[i]`: its own flags); node 0 (stage 0) starts first, the rest bootstrap from it
    together (`node.testing.swarm.launch_replicas`)."""
    return launch_replicas(root, stages, ["--steps", str(steps), *FAST, *(common or [])], READY_TIMEOUT_S, extra=extra)


def join(root: Path, name: str, stage: int, steps: int, boot: NodeProcess, num_stages: int,
         extra: list[str] | None = None) -> NodeProcess:
    """Start one more replica that bootstraps from `boot`."""
    args = ["--stages", str(num_stages), "--steps", str(steps), *FAST, "--bootstrap", boot.ready["addrs"][0],
            *(extra or [])]
    return start_node(stage, root / name, args, READY_TIMEOUT_S)


def records(node: NodeProcess, stage: int | None = None, gen: int | None = None) -> dict[int, dict[str, Any]]:
    """The node's progress records by step (the last record of a step wins), only those of `stage` if given
    (a node that moved has records of two stages) and of rollback generation `gen` if given (steps after a
    rollback's step are recorded once per generation)."""
    return {int(r["step"]): r for r in read_progress(node.data_dir) if (stage is None or r["stage"] == stage)
            and (gen is None or r.get("rollback_gen", 0) == gen)}


def check_exactly_once(stage_nodes: list[NodeProcess], steps: range | list[int], stage: int | None = None,
                       gen: int | None = None) -> None:
    """Every step of the stage (of rollback generation `gen`, if given) combined each microbatch exactly once, and the replicas that applied a step
    agree on the committed attempts; every committed attempt was computed by exactly one replica's record or
    (for a replica that died) is covered by a survivor's pull."""
    recs = [records(n, stage, gen) for n in stage_nodes]
    for s in steps:
        applied = [r[s]["applied"] for r in recs if s in r]
        assert applied, f"step {s}: no replica of the stage applied it"
        for a in applied:
            assert sorted(mb for mb, _ in a) == list(range(M)), f"step {s}: applied {a}"
            assert a == applied[0], f"step {s}: replicas applied different commits {applied}"
        for r in recs:
            if s in r:
                assert r[s]["dropped"] == [], f"step {s}: dropped contributions {r[s]['dropped']}"
        # every committed microbatch is one replica's own work (no microbatch computed into the step twice)
        mine = [tuple(x) for r in recs if s in r for x in r[s]["mine"]]
        assert len(mine) == len(set(mine)), f"step {s}: a committed attempt was claimed twice: {mine}"


def check_rollback(survivors: list[NodeProcess], lost_step: int, steps: int) -> tuple[list[dict[int, dict[str, Any]]], int]:
    """The survivors (one replica per stage) rolled back to a step no later than `lost_step` and trained rollback
    generation 1 from there to the last step, each applying every microbatch exactly once; returns their
    generation-1 records and the step they rolled back to."""
    gen1 = [records(n, gen=1) for n in survivors]
    assert all(gen1), "no rollback happened"
    rolled_to = min(min(r) for r in gen1)
    assert rolled_to <= lost_step, (rolled_to, lost_step)
    assert all(sorted(r) == list(range(rolled_to, steps)) for r in gen1)
    for n in survivors:
        check_exactly_once([n], list(range(rolled_to, steps)), gen=1)
    return gen1, rolled_to


def check_identical_weights(groups: list[list[NodeProcess]]) -> None:
    """The replicas of each group (one stage) ended with bit-identical weights (their newest checkpoints)."""
    for group in groups:
        weights = []
        for n in group:
            ckpt = latest_checkpoint(n.data_dir, n.stage)
            assert ckpt is not None, f"no checkpoint of stage {n.stage} in {n.data_dir}"
            weights.append(load_file(str(ckpt / "model.safetensors")))
        assert all(w.keys() == weights[0].keys() for w in weights)
        assert all(torch.equal(w[k], weights[0][k]) for w in weights[1:] for k in w), f"stage {group[0].stage}"


def check_one_takeover(lead: NodeProcess, standby: NodeProcess, window: int = 0) -> int:
    """The standby head took the step authority over from `lead` exactly once, in term 1, at the step after the
    last one the leader applied or (`window`: the async schedule's max_staleness) up to `window` steps later: the
    leader may have sent the COMMIT of such steps and died before applying them, while committing microbatches of
    later ones; returns that step."""
    takeover = [e for e in node_status(standby.data_dir)["bans"] if e["event"] == "takeover"]
    assert len(takeover) == 1 and takeover[0]["peer"] == lead.ready["peer_id"] and takeover[0]["term"] == 1, takeover
    s = int(takeover[0]["step"])
    lr = records(lead)
    first = max(lr) + 1 if lr else 0  # the first step the leader did not apply
    assert s not in lr and first <= s <= first + window, (s, first)
    return s


def run_to_end(root: Path, stages: list[int], steps: int, timeout_s: float, extra: dict[int, list[str]] | None = None,
               common: list[str] | None = None) -> tuple[list[NodeProcess], list[int]]:
    """`launch` the nodes, wait up to `timeout_s` for every one to exit (stopping any left either way); the nodes and
    their exit codes."""
    nodes = launch(root, stages, steps, extra=extra, common=common)
    try:
        codes = wait_nodes(nodes, timeout_s)
    finally:
        stop_nodes(nodes)
    return nodes, codes
