"""`benchmarks/wan_averaging.py` swarm mode: the replicated local swarm (node processes over libp2p) trained with a
dense and a PowerSGD exchange, under either pipeline schedule."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks.scripts import run_script

pytestmark = [pytest.mark.network, pytest.mark.timeout(300)]


def test_async_swarm_runs_both_arms_with_identical_replicas_and_compressed_traffic() -> None:
    proc = run_script("wan_averaging.py", "--schedule", "async", "--max-staleness", "1", "--exchange", "step",
                      "--rank", "4", "--bits", "4", "--steps", "6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (out["schedule"], out["max_staleness"], out["exchange"], out["steps"]) == ("async", 1, "step", 6), out
    assert out["replicas_identical"], out  # each replicated stage ended bit-identical in both arms
    # int4 rank-4 factors against bf16 values: far fewer bytes per step between replicas (one bundle is ~100x
    # smaller; over 6 steps the routing may leave a replica without work in a step, and it then pushes nothing, so
    # the arms' push counts may differ)
    assert out["replica_compression"] > 5, out
    assert 0 < out["compressed_val_loss"] < 10 and 0 < out["dense_val_loss"] < 10


def test_async_needs_the_step_exchange() -> None:
    proc = run_script("wan_averaging.py", "--schedule", "async", "--steps", "6")
    assert proc.returncode == 2 and "--schedule async with replicated stages needs --exchange step" in proc.stderr
