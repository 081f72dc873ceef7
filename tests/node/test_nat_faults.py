"""Faults behind NAT: a relay refusing reservations, a hole punch that times out (symmetric NATs). The node falls
back (another relay, the relayed path), names the reason in its status, and trains to the same per-step losses
(no microbatch lost)."""

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


@pytest.mark.timeout(300)
def test_hole_punch_timeout_falls_back_to_the_relay(tmp_path: Path) -> None:
    """Both homes sit behind symmetric NATs (random source ports), so DCUtR's simultaneous dials go to ports no
    mapping exists for and time out. The dial waits `holepunch_timeout_s` (1 s, below the 2 s the punch's own
    dials get), goes on relayed and retries with backoff; the status says the punch timed out, activations go
    through the relay, and training is unchanged."""
    steps = 3
    with nat_topology(homes=2, symmetric=True) as topo:
        res = run_nat_swarm(topo, tmp_path, ["home2", "home1", "public"],
                            ["--steps", str(steps), *ARGS, "--nat-holepunch-timeout-s", "1",
                             "--nat-holepunch-dial-timeout-s", "2", "--nat-holepunch-backoff-s", "0.5"],
                            timeout_s=250)
    assert res.losses == pytest.approx(_reference(steps), abs=1e-4)
    nat0, nat1 = res.statuses[0]["nat"], res.statuses[1]["nat"]
    peer0, peer1 = res.ready[0]["peer_id"], res.ready[1]["peer_id"]
    # whichever of the two dialed the other through the relay attempted the punches
    tried = [nat0["holepunch"].get(peer1), nat1["holepunch"].get(peer0)]
    assert any(t and t.startswith("punch timed out") for t in tried), tried
    assert "direct (hole punched)" not in tried
    # stream paths are sampled every relay_check_interval_s: read both ends' samples of the 0 <-> 1 link
    views = [nat0["stream_paths"].get(peer1, {}), nat1["stream_paths"].get(peer0, {})]
    assert any(ACT in v.get("relayed", []) for v in views), views
    assert not any(ACT in v.get("direct (hole punched)", []) or ACT in v.get("direct", []) for v in views), views
