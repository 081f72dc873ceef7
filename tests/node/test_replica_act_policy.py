"""A replica's `/pmn/act/1.0.0` is open only to replicas of the stages next to its own that discovery knows
(`StagePeersPolicy` with `ACT`, as the replicated runner builds it), over real libp2p hosts: a stranger claiming to be
an upstream replica feeds nothing in and is counted; a replica of another rollback generation is refused but not
counted."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from node.errors import NotAuthorizedError, OtherGenerationError
from node.net.access import ACT, AVG, StagePeersPolicy
from node.net.discovery import Announcement
from node.net.host import full_addrs
from node.net.identity import NodeIdentity
from tests.node.conftest import SPEC_HASH, FixedDirectory, running_host
from tests.node.test_channel import _endpoint

pytestmark = [pytest.mark.network, pytest.mark.timeout(60)]


def _ann(host: Any, ident: NodeIdentity, stage: int, gen: int = 0) -> Announcement:
    return Announcement(host.get_id().pretty(), tuple(full_addrs(host)), SPEC_HASH.hex(), 3, stage, 1,
                        rollback_gen=gen, rollback_step=-1 if gen == 0 else 4,
                        rollback_stage=-1 if gen == 0 else 2).sign(ident)


def test_only_known_neighbour_replicas_may_open_activation_channels() -> None:
    async def main() -> None:
        async with running_host(41) as (h1, i1), running_host(42) as (up, iu), running_host(43) as (stranger, i_s), \
                running_host(44) as (peer, ip), running_host(45) as (old, io), trio.open_nursery() as nursery:
            directory = FixedDirectory(_ann(h1, i1, 1), [_ann(up, iu, 0), _ann(peer, ip, 1), _ann(old, io, 0, gen=1)])
            ep = _endpoint(h1, i1, stage=1)
            ep.policy = StagePeersPolicy(directory, protocols=(ACT,), act_stage=1)
            addr = full_addrs(h1)[0]

            async def refused(host: Any, ident: NodeIdentity, stage: int) -> str:
                ch = await _endpoint(host, ident, stage=stage).open(addr)
                await ch.run_reader()
                assert ch.failure is not None
                return str(ch.failure)

            # a stranger claiming stage 0, a replica of our own stage claiming it is one, and a stage-0 replica of
            # another rollback generation: each refused after its HELLO, before a data frame
            assert "not authorized" in await refused(stranger, i_s, 0)
            assert ep.scores.reasons["not_authorized"] == 1
            assert directory.learned == [stranger.get_id().pretty()]  # looked up once before the refusal
            assert "not authorized" in await refused(peer, ip, 1)
            assert ep.scores.reasons["not_authorized"] == 2
            assert "not authorized" in await refused(old, io, 0)
            assert ep.scores.reasons["not_authorized"] == 2  # another generation is no misbehaviour
            assert len(ep.handshake_failures) == 3
            assert ep.scores.score(old.get_id().pretty()) == 0 and ep.scores.score(stranger.get_id().pretty()) < 0
            # the known upstream replica gets its channel
            ch = await _endpoint(up, iu, stage=0).open(addr)
            nursery.start_soon(ch.run_reader)
            inbound = await ep.incoming.receive()
            assert inbound.peer == up.get_id().pretty() and inbound.remote_stage == 0
            assert ch.failure is None
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_the_policy_names_why_a_peer_is_refused() -> None:
    async def main() -> None:
        async with running_host(46) as (h1, i1), running_host(47) as (up, iu), running_host(48) as (old, io):
            directory = FixedDirectory(_ann(h1, i1, 1), [_ann(up, iu, 0), _ann(old, io, 0, gen=1)])
            acts = StagePeersPolicy(directory, protocols=(ACT,), act_stage=1)
            await acts.check(up.get_id(), ACT, 0)  # the neighbour
            with pytest.raises(NotAuthorizedError, match="next to ours \\(1\\), not to stage 3"):
                await acts.check(up.get_id(), ACT, 3)
            with pytest.raises(OtherGenerationError, match="another rollback generation"):
                await acts.check(old.get_id(), ACT, 0)
            with pytest.raises(NotAuthorizedError, match="not open"):
                await acts.check(up.get_id(), AVG, 1)  # this policy opens /pmn/act only
            # the services' policy (no ACT) refuses activation channels whatever the stage
            with pytest.raises(NotAuthorizedError, match="not open"):
                await StagePeersPolicy(directory).check(up.get_id(), ACT, 0)
            # the endpoint's stage, not the announcement's, decides which stages are next to it
            directory.me = _ann(h1, i1, 2)
            await acts.check(up.get_id(), ACT, 0)

    trio.run(main)
