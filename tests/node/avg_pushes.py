"""Pushing bad contributions at an averaging server: each must be refused and counted against the sender."""

from __future__ import annotations

from typing import Any

import torch
import trio

from node.errors import AveragingError
from node.net.host import full_addrs
from node.net.peerscore import PeerGuardConfig, PeerScores
from node.replicas.averaging import AveragingService, AvgLimits, ContributionCodec, ContributionStore, push
from tests.node.conftest import running_host


def serve(host: Any, store: ContributionStore, guard: PeerGuardConfig) -> AveragingService:
    """An averaging server on `host` for spec "aa" whose stage 0 keeps its contributions in `store`."""
    return AveragingService(host, "aa", lambda s: store if s == 0 else None, 5.0, limits=AvgLimits(guard=guard),
                            scores=PeerScores(guard))


async def assert_pushes_refused(client: Any, addr: str, svc: AveragingService, step: int,
                                cases: list[tuple[torch.Tensor, str, str]]) -> None:
    """Push each (words, encoding tag, reason) of `cases` as microbatch 1, 2, ... of `step` (stage 0, spec "aa"):
    every push must fail naming its reason, lower the sender's score and count as one refusal."""
    me = client.get_id().pretty()
    for i, (vec, enc, why) in enumerate(cases, start=1):
        before = svc.gate.scores.score(me)
        try:
            await push(client, addr, "aa", 0, step, i, 0, vec, None, 5.0, enc=enc)
        except AveragingError as exc:
            assert why in str(exc)
        except Exception:  # the server's reset may overtake its error message
            pass
        else:
            raise AssertionError(f"push {i} ({why}) was accepted")
        assert svc.gate.scores.score(me) < before  # counted against the sender
    assert sum(svc.gate.refused.values()) == len(cases)


def assert_bad_pushes_keep_the_store(codec: ContributionCodec, good: torch.Tensor,
                                     cases: list[tuple[torch.Tensor, str, str]], seeds: tuple[int, int]) -> None:
    """Over two real hosts (keys from `seeds`): a server whose stage-0 store uses `codec` takes `good` as
    microbatch 0 of step 5, refuses every push of `cases` (see assert_pushes_refused), and keeps `good` bit for
    bit and nothing else."""
    store = ContributionStore(codec.words, codec)
    guard = PeerGuardConfig(ban_score=-100.0, max_streams_per_peer=16)

    async def main() -> None:
        async with running_host(seeds[0]) as (server, _), running_host(seeds[1]) as (client, _):
            svc = serve(server, store, guard)
            addr = full_addrs(server)[0]
            await push(client, addr, "aa", 0, 5, 0, 0, good, 1.0, 5.0, enc=codec.tag)
            await assert_pushes_refused(client, addr, svc, 5, cases)
            assert list(store.vecs[5]) == [(0, 0)]
            assert torch.equal(store.vecs[5][(0, 0)].view(torch.int32), good.view(torch.int32))  # bit for bit

    trio.run(main)
