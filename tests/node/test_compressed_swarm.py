"""PowerSGD replica averaging (rank 2, int8 factors, 2 power iterations: the encoding with the most steps between
the gradient and what a replica applies) in a replicated swarm of real node processes on 127.0.0.1: every step applies each
microbatch exactly once, the two replicas of the middle stage end bit-identical, and their averaging traffic
is the compressed size; the same for dense bf16 contributions (half of fp32). bf16 factors share all of this but
the codec, tested in test_compressed_averaging."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from node.replicas.averaging import ContributionCodec
from node.testing.swarm import stop_nodes, wait_nodes
from node.training.checkpoint import latest_checkpoint
from sharding import PRESETS, build_stage, partition
from tests.node.replica_swarm import M, check_exactly_once, launch, records

pytestmark = [pytest.mark.network]

STEPS = 6


ENCODINGS = {  # name -> (node flags, the codec they give the middle stage, most bytes per dense fp32 byte)
    "powersgd": (["--replica-averaging", "powersgd", "--powersgd-rank", "2", "--powersgd-bits", "4",
                  "--powersgd-iterations", "2"], ("powersgd", 2, 4), 1 / 8),  # int4: the spec's recommended codes
    "dense-bf16": (["--replica-averaging", "dense-bf16"], ("dense-bf16", 4, 16), 1 / 1.9),
}


@pytest.mark.timeout(480)
@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_encoded_swarm_applies_every_microbatch_once_and_keeps_replicas_identical(tmp_path, encoding) -> None:
    flags, (method, rank, bits), most = ENCODINGS[encoding]
    # the head waits up to 120 s for the middle replicas to come up (processes start slowly on a busy machine)
    nodes = launch(tmp_path, [0, 1, 1, 2], STEPS, common=[*flags, "--no-replica-timeout", "120"])
    try:
        codes = wait_nodes(nodes, 360)
    finally:
        stop_nodes(nodes)
    assert codes == [0, 0, 0, 0]
    head, mid_a, mid_b, tail = nodes
    check_exactly_once([mid_a, mid_b], range(STEPS))
    losses = [records(tail)[s]["loss"] for s in range(STEPS)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    weights: list[dict[str, torch.Tensor]] = []
    for n in (mid_a, mid_b):
        ckpt = latest_checkpoint(n.data_dir, 1)
        assert ckpt is not None
        weights.append(load_file(str(ckpt / "model.safetensors")))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    # contributions a replica applied but did not compute crossed between the replicas (pushes the other's
    # server received, pulls it answered; a replica that joined late fetched the state instead of the steps
    # before it, and a pull answered after the last record is not in it): the servers moved at least one
    # step of encoded contributions, and all of it below one dense fp32 contribution per microbatch by the
    # encoding's factor.
    codec = ContributionCodec.for_module(build_stage(PRESETS["tiny"], partition(PRESETS["tiny"], 3)[1]),
                                         method, rank, bits=bits)
    crossed = sum(len(r["applied"]) - len(r["mine"]) for n in (mid_a, mid_b) for r in records(n).values())
    assert crossed >= M, "the replicas never exchanged a contribution"
    moved = sum(records(n)[STEPS - 1]["avg_wire_bytes"] for n in (mid_a, mid_b))
    assert moved >= M * 4 * codec.words
    assert moved < STEPS * M * 4 * codec.size * most
