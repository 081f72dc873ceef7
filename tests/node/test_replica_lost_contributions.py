"""A committed microbatch is never applied without its contribution (`ReplicaEngine._await_missing`).

The race this closes: a replica that was its stage's only holder (its peer was still fetching the stage state,
so not yet a stage peer) commits contributions alone and dies before the joiner pulled them. The joiner then
has the step's commit but not every committed contribution. It used to apply the step without them after
`avg_timeout_s` (reported as `dropped`): a committed microbatch lost, and its replicas out of step with the
other stages. Now it fetches the state from a live peer that applied the step, and with none left it fails with
a `StateLostError` that starts the rollback.

The race is injected deterministically at the point where it happens: the joiner's store holds the commit and
one of the two committed contributions, and the only other holder is a real libp2p host that is stopped (or
alive and already past the step, without the contribution).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import trio

from node.errors import ResyncNeededError, StateLostError, UpstreamLostError
from node.net.discovery import Announcement
from node.replicas.engine import ReplicaEngine
from tests.node.conftest import running_host
from tests.node.replica_pair import replica_pair

pytestmark = [pytest.mark.network, pytest.mark.timeout(60)]


def _params(eng) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    return [p.detach().clone() for p in eng.worker.module.parameters()]


def _announce(eng: ReplicaEngine, entry: Announcement) -> None:
    """`entry` reaches the engine's table from its own peer (a sign of life), and is accepted."""
    assert eng.discovery._merge([entry.to_json()], sender=entry.peer_id) == 0  # none refused


def _lacking(pair) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    """Step 2 committed as microbatches 0 and 1 (attempt 0), only microbatch 0's contribution held by the engine
    (averaging deadline 0.3 s); returns its parameters before the step."""
    pair.eng.rc.avg_timeout_s = 0.3
    pair.eng.store.add(2, 0, 0, torch.ones(pair.size), None)
    pair.eng.store.commit(2, {0: 0, 1: 0})
    return _params(pair.eng)


def test_a_committed_contribution_whose_only_holder_died_fails_the_step_instead_of_being_dropped() -> None:
    async def main() -> None:
        async with running_host(151) as (h0, id0):
            async with running_host(152) as (h1, id1):
                pair = replica_pair(h0, id0, h1, id1)
            # the peer's host is stopped: it held microbatch 1's committed contribution alone
            eng = pair.eng
            before = _lacking(pair)
            with trio.fail_after(30), pytest.raises(StateLostError) as err:
                await eng._finish(2, 0.0)
            assert err.value.step == 2
            assert pair.peer.peer_id in err.value.lost  # named as the lost holder
            msg = str(err.value)
            assert "stage 1" in msg and "step 2" in msg and "microbatches [1]" in msg and pair.peer.peer_id in msg
            # nothing applied: the replica's state is the one before the step, its contributions are kept
            assert all(torch.equal(a, b) for a, b in zip(before, _params(eng), strict=True))
            assert (0, 0) in eng.store.vecs[2] and eng.store.commits[2] == {0: 0, 1: 0}
            assert any(e["event"] == "contributions_missing" and e["microbatches"] == [1] for e in eng.events)

    trio.run(main)


def test_a_live_peer_that_already_applied_the_step_is_synced_from_instead() -> None:
    async def main() -> None:
        async with running_host(153) as (h0, id0), running_host(154) as (h1, id1):
            pair = replica_pair(h0, id0, h1, id1)
            eng = pair.eng
            # the peer announces (itself: a sign of life) that it is at step 3, past the step we lack
            ahead = replace(pair.peer, next_step=3, seq=2).sign(id1)
            _announce(eng, ahead)
            assert [e.next_step for e in eng._live_stage_peers()] == [3]
            before = _lacking(pair)
            with trio.fail_after(30), pytest.raises(ResyncNeededError, match=f"peer {ahead.peer_id}.*applied"):
                await eng._finish(2, 0.0)
            assert all(torch.equal(a, b) for a, b in zip(before, _params(eng), strict=True))

    trio.run(main)


def test_a_contribution_a_live_peer_still_holds_is_pulled_and_the_step_applied_whole() -> None:
    async def main() -> None:
        async with running_host(155) as (h0, id0), running_host(156) as (h1, id1):
            pair = replica_pair(h0, id0, h1, id1)
            eng = pair.eng
            _announce(eng, pair.peer)
            eng.worker.next_step = 2
            _lacking(pair)
            pair.peer_store.add(2, 1, 0, torch.full((pair.size,), 2.0), None)
            pair.peer_store.commit(2, {0: 0, 1: 0})
            with trio.fail_after(30):
                out = await eng._finish(2, 0.0)
            assert out.dropped == [] and out.applied == [[0, 0], [1, 0]]
            assert eng.worker.next_step == 3

    trio.run(main)


def test_a_non_head_replica_with_no_upstream_channel_stops_naming_its_stage_and_step() -> None:
    """The head stage is gone (no replica of the previous stage ever dials in): the replica does not wait for its
    step forever but stops with UpstreamLostError after the configured timeouts."""
    async def main() -> None:
        async with running_host(157) as (h0, id0), running_host(158) as (h1, id1):
            eng = replica_pair(h0, id0, h1, id1).eng
            eng.rc.no_replica_timeout_s, eng.cfg.discovery.discovery_timeout_s = 0.3, 0.6
            t0 = trio.current_time()
            with trio.fail_after(20), pytest.raises(UpstreamLostError) as err:
                await eng.run_step(2)
            assert trio.current_time() - t0 >= 0.6  # before the first channel the discovery timeout applies
            assert err.value.stage == 0
            msg = str(err.value)
            assert "stage 1 replica at step 2" in msg and "no replica of stage 0" in msg
            assert "discovery.discovery_timeout_s=0.6" in msg

    trio.run(main)
