"""`/pmn/spec/1.0.0`: a newcomer fetches a model's spec by its on-chain hash from the model's peers and
refuses a spec whose hash differs (real libp2p hosts on 127.0.0.1)."""

from __future__ import annotations

import pytest
import trio
from eth_utils import keccak

from node.net.host import full_addrs
from node.services.spec_exchange import (
    SpecExchangeError,
    SpecHashError,
    SpecService,
    check_spec,
    fetch_spec_from,
)
from protocol.modelspec import canonical_spec, proposal_spec_hash
from sharding.config import PRESETS
from tests.node.conftest import running_host

pytestmark = [pytest.mark.network, pytest.mark.timeout(90)]

TRAINING = {"stages": 2, "codec": "dense", "microbatches": 2, "microbatch_size": 4, "lr": 3e-3, "warmup_steps": 10,
            "data_seed": 0}
SPEC = canonical_spec(PRESETS["tiny"], TRAINING)
HASH = proposal_spec_hash(PRESETS["tiny"], TRAINING)


class LyingSpec(SpecService):
    """Answers every request for `claimed` with other bytes (a peer pushing another spec)."""

    def __init__(self, claimed: bytes, sent: bytes) -> None:
        super().__init__(sent)
        self.spec_hash = claimed


def test_spec_is_fetched_by_hash_and_a_spec_of_another_hash_is_refused() -> None:
    async def main() -> None:
        async with running_host(301) as (honest, _), running_host(302) as (other, _), running_host(303) as (liar, _):
            SpecService(SPEC).install(honest)
            other_spec = canonical_spec(PRESETS["tiny"], {**TRAINING, "lr": 1e-3})
            SpecService(other_spec).install(other)  # trains another model
            lying = LyingSpec(HASH, other_spec)
            lying.install(liar)
            a_honest, a_other, a_liar = (full_addrs(h)[0] for h in (honest, other, liar))

            spec, peer = await fetch_spec_from([a_other, a_honest], HASH)  # the other model's peer is skipped
            assert peer == a_honest and spec["training"] == TRAINING
            assert spec["model"] == PRESETS["tiny"].to_dict()

            with pytest.raises(SpecHashError, match="refused"):
                await fetch_spec_from([a_liar, a_honest], HASH)  # a lying peer stops the join: the operator is told
            with pytest.raises(SpecExchangeError, match="no peer gave the spec"):
                await fetch_spec_from([a_other], HASH)

    trio.run(main)


def test_check_spec_refuses_other_bytes_and_malformed_specs() -> None:
    assert check_spec(SPEC, HASH)["training"]["stages"] == 2
    with pytest.raises(SpecHashError):
        check_spec(SPEC + b" ", HASH)
    with pytest.raises(SpecExchangeError, match="'model' and 'training'"):
        check_spec(b"[]", bytes(keccak(b"[]")))
