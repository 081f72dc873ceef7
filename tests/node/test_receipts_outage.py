"""Hop receipts through a chain outage: a real anvil registers the node keys, then stops (state kept).

`ChainKeyRegistry` keeps counting a key it confirmed (re-read in the background, up to `stale_ok_s`), so the
receiver countersigns and both ends store every hop of known neighbours while the RPC is down; a key never
confirmed is refused with a one-line error (not stored, not crashed on); after the restart it is read again.
Time is a fake clock: TTLs expire without waiting.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from node.errors import ReceiptRejectedError
from node.services.chain_link import StoredReceipts
from node.wire import frames
from protocol.errors import ChainLookupError
from protocol.payments import ChainCheckConfig, ChainKeyRegistry
from protocol.receipts import Domain
from protocol.store import ReceiptStore, StoreConfig
from tests.contracts.anvil_support import RestartableAnvil
from tests.contracts.conftest import Env
from tests.waiting import wait_until

pytestmark = [pytest.mark.network, pytest.mark.timeout(120)]


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def _header(step: int) -> frames.FrameHeader:
    return frames.FrameHeader(kind=frames.Kind.ACTIVATION, spec_hash=b"\x01" * 32, stage=0, step=step, microbatch=0,
                              digest=step.to_bytes(32, "big"))


def _hop(a: StoredReceipts, b: StoredReceipts, step: int) -> None:
    """One forward hop a -> b: a signs, b countersigns and stores, a stores on the ack."""
    sig = a.sign(_header(step), b.account.address)
    counter = b.countersign(_header(step), sig, a.account.address)
    a.on_ack(_header(step), counter, b.account.address)


def test_known_neighbours_keep_their_receipts_through_an_outage(tmp_path: Path, anvil: RestartableAnvil,
                                                                  chain: Env) -> None:
    env = chain
    keys: list[LocalAccount] = [env.new_node(op) for op in env.operators[:2]]
    stranger = Account.create()  # registered only after the outage
    clock = Clock()
    cfg = ChainCheckConfig(registry_ttl_s=60.0, negative_ttl_s=2.0, stale_ok_s=900.0)
    registry = ChainKeyRegistry(env.pc, cfg, clock=clock)
    domain = Domain(env.pc.chain_id, env.pc.ledger.address)
    stores = [ReceiptStore(StoreConfig(data_dir=tmp_path / f"n{i}"), domain, registry) for i in range(3)]
    a = StoredReceipts(keys[0], domain, 1, 16, 4, stores[0], registry)
    b = StoredReceipts(keys[1], domain, 1, 16, 4, stores[1], registry)
    c = StoredReceipts(stranger, domain, 1, 16, 4, stores[2], registry)
    try:
        _hop(a, b, 0)  # chain up: both keys read and cached
        anvil.stop()
        clock.now = 100.0  # past registry_ttl_s: the answers are stale, re-read in the background
        for step in range(1, 4):
            _hop(a, b, step)
        wait_until(lambda: registry.refresh_failures >= 1 and registry.refreshing() == 0, 60,
                   "the background re-reads to fail on the dead RPC")
        assert registry.stale_served > 0
        # a key the chain never confirmed is refused, in one line naming the endpoint; nothing stored for it
        with pytest.raises(ReceiptRejectedError) as refused:
            _hop(c, b, 9)
        assert anvil.url in str(refused.value) and "\n" not in str(refused.value)
        assert stores[2].count() == 0
        # beyond stale_ok_s nothing is taken on trust any more
        clock.now = 1000.0
        with pytest.raises(ChainLookupError, match=anvil.url):
            registry.is_registered(keys[0].address)
        anvil.start()
        assert registry.is_registered(keys[0].address)  # read again once the chain is back
        env.pc.register_node(env.operators[2], stranger, 10)
        clock.now = 1010.0  # the stranger's "unknown" answer expired (negative_ttl_s)
        _hop(c, b, 10)
        # every hop of the known neighbours is stored, co-signed, at both ends: none lost to the outage
        for store in stores[:2]:
            assert [r.receipt.step for r in store.epoch_receipts(1, 0, cosigned_only=True)] == [0, 1, 2, 3]
        assert a.rejected == 0 and b.rejected == 1 and c.rejected == 0
        assert [r.receipt.step for r in stores[2].epoch_receipts(1, 2, cosigned_only=True)] == [10]
    finally:
        for s in stores:
            s.close()
