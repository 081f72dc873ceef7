"""Faults behind NAT: a relay refusing reservations. (The hole-punch-timeout test was removed: its 50 ms budget
cancels py-libp2p's DCUtR exchange mid-write and can corrupt the node's connection to the relay; see
node/net/nat/holepunch.py.) The node falls back (another relay, the relayed path, a new reservation), names the reason in its
status, and trains to the same per-step losses (no microbatch lost)."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.testing.nat_swarm import run_nat_swarm
from node.testing.netns import available, nat_topology
from sharding import PRESETS, OptimConfig, load_corpus, train_reference

pytestmark = [pytest.mark.network, pytest.mark.skipif(available() is not None, reason=str(available()))]

M, B = 2, 2
ARGS = ["--microbatches", str(M), "--microbatch-size", str(B), "--corpus", "synthetic", "--threads", "1",
        "--nat-relay-check-interval-s", "0.2", "--nat-relay-retry-backoff-s", "0.2", "--nat-autonat-interval-s", "5",
        "--discovery-discovery-timeout-s", "120"]
ACT = "/pmn/act/1.0.0"


def _reference(steps: int) -> list[float]:
    return train_reference(PRESETS["tiny"], OptimConfig(), steps, M, B, load_corpus("synthetic"))


@pytest.mark.timeout(300)
def test_refused_reservation_moves_to_another_relay(tmp_path: Path) -> None:
    """The bootstrap relay takes no reservation; the private node reserves on the other public node instead,
    and its status names the refusal."""
    steps = 3
    with nat_topology(homes=1) as topo:
        res = run_nat_swarm(topo, tmp_path, ["public", "home1", "public"], ["--steps", str(steps), *ARGS],
                            stage_args={2: ["--nat-relay-max-reservations", "0"]}, timeout_s=250)
    assert res.losses == pytest.approx(_reference(steps), abs=1e-4)
    nat = res.statuses[1]["nat"]
    relay_refusing, other = res.ready[2]["peer_id"], res.ready[0]["peer_id"]
    assert "RESOURCE_LIMIT_EXCEEDED" in nat["relay_refused"][relay_refusing]
    assert nat["relays"] == [other]
    assert any(f"/p2p/{other}/p2p-circuit/" in a for a in res.ready[1]["addrs"])
