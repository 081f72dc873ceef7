"""Pushing bad contributions at an averaging server: each must be refused and counted against the sender."""

from __future__ import annotations

from typing import Any

import torch

from node.errors import AveragingError
from node.net.peerscore import PeerGuardConfig, PeerScores
from node.replicas.averaging import AveragingService, AvgLimits, ContributionStore, push


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
