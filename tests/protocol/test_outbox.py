"""The durable chain outbox against a real anvil that goes down and comes back on the same port, state kept.

Writes recorded while the RPC is down stay queued (also across a restart of the outbox's process: a new
`ChainOutbox` on the same file), and after recovery every root, leaf claim, fee payment (revenue deposit)
and revenue claim is on chain exactly once: counted in the contracts' events. A send whose answer is lost is
found on chain and never repeated; a contract refusal is a clear error naming the contract error, not retried.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from eth_account.signers.local import LocalAccount

from contracts.merkle import ContributionTree
from protocol.errors import OutboxError, OutboxRefusedError, OutboxTimeoutError
from protocol.outbox import DONE, QUEUED, REFUSED, ChainOutbox, OutboxConfig
from tests.contracts.anvil_support import FlakyProxy, RestartableAnvil
from tests.contracts.conftest import WINDOW, Env, make_env

pytestmark = [pytest.mark.network, pytest.mark.timeout(240)]

FEE = 10**12
RECEIPTS_HASH = b"\x33" * 32


def _config(tmp_path: Path, **over: Any) -> OutboxConfig:
    base: dict[str, Any] = {"data_dir": tmp_path / "outbox", "retry_interval_s": 0.05, "max_backoff_s": 0.5,
                            "call_timeout_s": 2.0, "connect_attempts": 1, "receipt_timeout_s": 10.0,
                            "drain_timeout_s": 60.0}
    return OutboxConfig(**{**base, **over})


def _events(env: Env, contract: Any, name: str) -> list[Any]:
    """Every `name` event of `contract` on chain (from block 0)."""
    ev = getattr(contract.events, name)()
    return list(env.pc.tx.retry(lambda: ev.get_logs(from_block=0)))


def _nodes(env: Env) -> list[LocalAccount]:
    return [env.new_node(op) for op in env.operators[:2]]


def test_writes_queued_during_outages_land_exactly_once(tmp_path: Path, anvil: RestartableAnvil, chain: Env) -> None:
    env, pc = chain, chain.pc
    model_id = env.propose()
    nodes = _nodes(env)
    tree = ContributionTree(model_id, 0, {nodes[0].address: 30, nodes[1].address: 12})
    signatures = env.root_signatures(tree)
    cfg = _config(tmp_path)
    signers = [env.payer, *env.operators[:2]]
    request_ids = [os.urandom(32) for _ in range(2)]

    # the RPC goes away; what the settlement wants written is recorded, not lost
    anvil.stop()
    box = ChainOutbox.open(cfg, anvil.url, pc.deployment, signers)
    try:
        root_key = box.submit_root(env.payer.address, model_id, 0, tree.root, tree.total_units, RECEIPTS_HASH,
                                   signatures)
        report = box.flush()
        assert report.done == [] and report.queued == 1 and report.chain_down is not None
        assert anvil.url in report.chain_down  # the outage names the endpoint
        with pytest.raises(OutboxTimeoutError, match="1 chain write"):
            box.drain(timeout_s=0.3)
        assert [e.state for e in box.entries()] == [QUEUED]
    finally:
        box.close()

    # the process restarts while the chain is still down: the queue is on disk
    box = ChainOutbox.open(cfg, anvil.url, pc.deployment, signers)
    try:
        assert [e.key for e in box.entries(QUEUED)] == [root_key]
        anvil.start()
        assert box.drain() == [root_key]
        assert box.drain() == []  # nothing left, nothing sent again
        # a second outage, with the leaf claims and two paid requests' fees queued (in that order)
        anvil.stop()
        claim_keys = [box.claim_leaf(env.payer.address, model_id, 0, n.address, tree.contributions[n.address],
                                     tree.proof(n.address)) for n in nodes]
        fee_keys = [box.deposit(env.payer.address, model_id, FEE, r) for r in request_ids]
        assert box.flush().queued == 4
        anvil.start()
        # anvil's state file keeps blocks and balances, not an evm_increaseTime offset: move time on now
        pc.tx.retry(lambda: pc.advance_time(WINDOW))
        assert box.drain() == [*claim_keys, *fee_keys]
        revenue_keys = [box.claim_revenue(op.address, model_id, "final") for op in env.operators[:2]]
        assert sorted(box.drain()) == sorted(revenue_keys)
        # recording the same writes again changes nothing
        box.submit_root(env.payer.address, model_id, 0, tree.root, tree.total_units, RECEIPTS_HASH, signatures)
        box.deposit(env.payer.address, model_id, FEE, request_ids[0])
        assert box.pending() == 0 and box.drain() == []
        entries = box.entries()
        assert {e.state for e in entries} == {DONE} and all(e.sent == 1 for e in entries)
        fee_hashes = [box.result(k)["tx_hash"] for k in fee_keys]
        paid = [box.result(k)["amount_wei"] for k in revenue_keys]
    finally:
        box.close()

    # on chain: each root, claim, fee payment and revenue claim exactly once
    roots = _events(env, pc.ledger, "EpochRootSubmitted")
    assert Counter((e["args"]["modelId"], e["args"]["epoch"]) for e in roots) == {(model_id, 0): 1}
    claims = _events(env, pc.ledger, "LeafClaimed")
    assert Counter(e["args"]["node"] for e in claims) == {n.address: 1 for n in nodes}
    token = pc.token(model_id)
    deposits = _events(env, token, "RevenueDeposited")
    assert Counter(bytes(e["args"]["requestId"]) for e in deposits) == {r: 1 for r in request_ids}
    assert sorted("0x" + bytes(e["transactionHash"]).hex() for e in deposits) == sorted(fee_hashes)
    claimed = _events(env, token, "RevenueClaimed")
    assert Counter(e["args"]["account"] for e in claimed) == {op.address: 1 for op in env.operators[:2]}
    # balances agree: shares = units, the fees were split by shares and paid out once
    for k, n in enumerate(nodes):
        assert pc.balance_of(model_id, env.operators[k].address) == tree.contributions[n.address]
    assert pc.total_supply(model_id) == tree.total_units
    assert sum(paid) <= 2 * FEE and 2 * FEE - sum(paid) <= 2  # rounding dust only
    for k, op in enumerate(env.operators[:2]):
        assert pc.claimed(model_id, op.address) == paid[k] and pc.claimable(model_id, op.address) == 0
    assert anvil.restarts == 0 and anvil.running


def test_lost_answer_is_found_on_chain_not_resent(tmp_path: Path, anvil: RestartableAnvil, chain: Env) -> None:
    env, pc = chain, chain.pc
    model_id = env.propose()
    env.settle_and_claim(model_id, 0, {_nodes(env)[0].address: 9})  # shares exist: revenue can be deposited
    proxy = FlakyProxy(anvil.url)
    cfg = _config(tmp_path)
    request_id = os.urandom(32)
    try:
        box = ChainOutbox.open(cfg, proxy.url, pc.deployment, [env.payer])
        try:
            key = box.deposit(env.payer.address, model_id, FEE, request_id)
            # the payment reaches the chain, its answer does not: the outcome is unknown to the sender
            proxy.swallow_method = "eth_sendRawTransaction"
            report = box.flush()
            assert report.done == [] and report.queued == 1
            assert box.get(key).uncertain == 1  # type: ignore[union-attr]
        finally:
            box.close()  # and the process restarts
        box = ChainOutbox.open(cfg, proxy.url, pc.deployment, [env.payer])
        try:
            assert box.drain() == [key]
            entry = box.get(key)
            assert entry is not None and entry.state == DONE and entry.sent == 0
            assert entry.result is not None and entry.result["found"] == "RevenueDeposited event"
        finally:
            box.close()
        assert proxy.sends() == 1  # sent once, never again
    finally:
        proxy.close()
    deposits = _events(env, pc.token(model_id), "RevenueDeposited")
    assert [bytes(e["args"]["requestId"]) for e in deposits] == [request_id]
    assert entry.result["tx_hash"] == "0x" + bytes(deposits[0]["transactionHash"]).hex()


def test_refusal_names_the_contract_error_and_is_not_retried(tmp_path: Path) -> None:
    env = make_env()  # the embedded chain: no outage needed to be refused
    pc = env.pc
    model_id = env.propose()
    nodes = _nodes(env)
    tree = env.submit(model_id, 0, {nodes[0].address: 5, nodes[1].address: 7})
    box = ChainOutbox(_config(tmp_path), pc, [env.payer])
    try:
        # inside the challenge window a claim is refused by the ledger
        key = box.claim_leaf(env.payer.address, model_id, 0, nodes[0].address, 5, tree.proof(nodes[0].address))
        with pytest.raises(OutboxRefusedError, match="ContributionLedgerChallengeWindowOpen") as info:
            box.drain()
        assert info.value.key == key and "\n" not in str(info.value)
        entry = box.get(key)
        assert entry is not None and entry.state == REFUSED and entry.attempts == 1
        assert box.flush().done == [] and box.get(key).attempts == 1  # type: ignore[union-attr]
        # another root for an epoch that has one: refused before anything is sent
        other = ContributionTree(model_id, 0, {nodes[0].address: 1})
        root_key = box.submit_root(env.payer.address, model_id, 0, other.root, 1, RECEIPTS_HASH,
                                   env.root_signatures(other))
        report = box.flush()
        assert report.refused == [root_key] and box.get(root_key).attempts == 0  # type: ignore[union-attr]
        assert "ContributionLedgerEpochAlreadySubmitted" in (box.get(root_key).error or "")  # type: ignore[union-attr]
        # a key recorded with other content, an unknown kind, a sender the outbox cannot sign for
        with pytest.raises(OutboxError, match="already recorded"):
            box.claim_leaf(env.payer.address, model_id, 0, nodes[0].address, 6, tree.proof(nodes[0].address))
        with pytest.raises(OutboxError, match="unknown outbox entry kind"):
            box.enqueue("mint", "mint:1", env.payer.address, {})
        # a write for an account the outbox cannot sign for: a setup error; it stays queued for one that can
        stranger = box.deposit(env.operators[2].address, model_id, FEE, b"\x01" * 32)
        with pytest.raises(OutboxError, match=f"needs the signing account {env.operators[2].address}"):
            box.flush()
        assert box.get(stranger).state == QUEUED  # type: ignore[union-attr]
    finally:
        box.close()
    assert pc.is_leaf_claimed(model_id, 0, nodes[0].address) is False


def test_config_fields_are_validated(tmp_path: Path) -> None:
    for field, value in (("retry_interval_s", 0), ("max_backoff_s", -1), ("call_timeout_s", 0),
                         ("backoff_factor", 0.5), ("connect_attempts", 0)):
        with pytest.raises(ValueError, match=f"OutboxConfig.{field}"):
            _config(tmp_path, **{field: value}).validate()
    cfg = _config(tmp_path, retry_interval_s=0.5, backoff_factor=2.0, max_backoff_s=3.0)
    assert [cfg.backoff_s(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 3.0]
