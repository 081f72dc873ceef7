"""`/pmn/state/1.0.0` over real libp2p hosts: a joiner gets the stage state; serving it is rate limited."""

from __future__ import annotations

import pytest
import torch
import trio

from node.errors import StateSyncError
from node.net.host import full_addrs
from node.replicas.statesync import StateService, fetch_state, pack_state
from node.training.worker import StageWorker
from sharding import PRESETS, OptimConfig, partition
from tests.node.conftest import running_host
from tests.waiting import until

pytestmark = pytest.mark.timeout(60)


def _worker(stage: int) -> StageWorker:
    cfg = PRESETS["tiny"]
    return StageWorker(cfg, partition(cfg, 3)[stage], codec="dense", optim=OptimConfig(), num_microbatches=2,
                       microbatch_size=2, corpus=None)


def _params(w: StageWorker) -> list[torch.Tensor]:
    return [p.detach().clone() for p in w.module.parameters()]


def test_admit_bounds_concurrency_and_a_peer_gets_a_burst_then_a_refill_rate() -> None:
    svc = StateService.__new__(StateService)
    svc.max_concurrent, svc.burst, svc.refill_s = 1, 2, 5.0
    svc.active, svc.tokens, svc.served, svc.refused = 0, {}, {}, {}
    assert svc.admit("a", 0.0) is None
    assert "busy" in (svc.admit("b", 0.1) or "")  # one transfer at a time
    svc.active -= 1
    assert svc.admit("a", 0.2) is None  # the burst: two back to back
    svc.active -= 1
    refusal = svc.admit("a", 0.3) or ""
    assert "rate limited" in refusal and "retry in" in refusal  # the bucket is empty
    assert svc.admit("b", 0.3) is None  # other peers have their own bucket
    svc.active -= 1
    assert svc.admit("a", 5.5) is None  # one token back after refill_s
    svc.active -= 1
    assert "rate limited" in (svc.admit("a", 6.0) or "")
    assert svc.served == {"a": 3, "b": 1} and svc.refused == {"b": 1, "a": 2}


def test_a_transfer_that_served_nothing_gives_the_token_back() -> None:
    svc = StateService.__new__(StateService)
    svc.max_concurrent, svc.burst, svc.refill_s = 1, 1, 5.0
    svc.active, svc.tokens, svc.served, svc.refused = 0, {}, {}, {}
    assert svc.admit("a", 0.0) is None
    svc.unbook("a")  # the stage it asked for is not served here
    assert svc.active == 0 and svc.served == {"a": 0}
    assert svc.admit("a", 0.1) is None  # the burst of 1 is still there
    svc.active -= 1
    assert "rate limited" in (svc.admit("a", 0.2) or "")


def test_joiner_fetches_state_and_a_too_early_second_request_is_refused_losing_nothing() -> None:
    source = _worker(1)
    with torch.no_grad():
        for p in source.module.parameters():
            p.add_(0.25)
    source.next_step = 5
    spec_hex = source.config.spec_hash().hex()

    async def snapshot(stage: int) -> tuple[dict, bytes] | None:
        return pack_state(source) if stage == 1 else None

    async def main() -> None:
        async with running_host(41) as (h_src, _), running_host(42) as (h_join, _), \
                running_host(43) as (h_other, _):
            svc = StateService(h_src, spec_hex, snapshot, timeout_s=10.0, max_concurrent=2, burst=1, refill_s=60.0)
            joiner = _worker(1)
            assert await fetch_state(h_join, full_addrs(h_src)[0], joiner, 10.0) == 5
            for a, b in zip(source.module.parameters(), joiner.module.parameters(), strict=True):
                assert torch.equal(a, b)
            # The same peer asks again at once: refused by name, and its installed state is untouched.
            before, with_step = _params(joiner), joiner.next_step
            with torch.no_grad():
                for p in source.module.parameters():
                    p.add_(1.0)
            with pytest.raises(StateSyncError, match="rate limited"):
                await fetch_state(h_join, full_addrs(h_src)[0], joiner, 10.0)
            assert all(torch.equal(a, b) for a, b in zip(before, _params(joiner), strict=True))
            assert joiner.next_step == with_step
            # Another peer asking for a stage not served there is refused by name.
            with pytest.raises(StateSyncError, match="stage 2 of that model is not served here"):
                await fetch_state(h_other, full_addrs(h_src)[0], _worker(2), 10.0)
            joiner_id = h_join.get_id().pretty()
            assert svc.served[joiner_id] == 1 and svc.refused[joiner_id] == 1
            # every handler releases its transfer slot once its stream is done
            await until(lambda: svc.active == 0, 5, "every state transfer slot released",
                        detail=lambda: svc.active)

    trio.run(main)
