"""Integration on a real anvil process: the whole flow, gas estimation, outages, concurrent senders."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest

from contracts.chain import connect
from contracts.client import ProtocolContracts
from contracts.config import ChainConfig
from contracts.errors import ChainUnavailableError, ContractRevertError

from .anvil_support import ANVIL, FlakyProxy, anvil_process
from .conftest import WINDOW, Env, make_env

pytestmark = [
    pytest.mark.anvil,
    pytest.mark.timeout(120),
    pytest.mark.skipif(not ANVIL.exists() and os.environ.get("CI") != "true", reason="anvil binary not installed (run npm ci in contracts/)"),
]

ESTIMATING = ChainConfig(backoff_initial_s=0.01, backoff_max_s=0.05)  # gas estimated per transaction


@pytest.fixture
def anvil_url() -> Iterator[str]:
    with anvil_process() as url:
        yield url


def test_full_flow_on_anvil(anvil_url: str) -> None:
    env = make_env(anvil_url, ESTIMATING)
    pc = env.pc
    assert pc.chain_id == 31337
    mid = env.propose()
    nodes = [env.new_node(env.operators[i]).address for i in range(2)]
    tree = env.settle_and_claim(mid, 0, {nodes[0]: 300, nodes[1]: 100})
    assert pc.balance_of(mid, env.operators[0].address) == 300
    h = pc.deposit_revenue(env.payer, mid, 4000, b"\x05" * 32)
    assert pc.verify_payment(mid, h, 4000) and not pc.verify_payment(mid, h, 4001)
    assert pc.claim_revenue(mid, env.operators[1]) == 1000
    with pytest.raises(ContractRevertError) as err:  # decoded from anvil's eth_estimateGas error
        pc.claim_revenue(mid, env.operators[1])
    assert str(err.value) == f"ShareTokenNothingToClaim(account={env.operators[1].address})"
    with pytest.raises(ContractRevertError, match="ContributionLedgerLeafAlreadyClaimed"):
        pc.claim_leaf(env.payer, mid, 0, nodes[0], 300, tree.proof(nodes[0]))


def test_revert_decoded_from_a_mined_failure_on_anvil(anvil_url: str) -> None:
    env = make_env(anvil_url, ChainConfig(fixed_gas=1_000_000))  # no estimate: anvil mines the failing tx
    mid = env.propose()
    nonce = env.pc.w3.eth.get_transaction_count(env.payer.address)
    with pytest.raises(ContractRevertError, match=r"ShareTokenNoSupply\(\)"):
        env.pc.deposit_revenue(env.payer, mid, 10, b"\x00" * 32)
    assert env.pc.w3.eth.get_transaction_count(env.payer.address) == nonce + 1
    env.pc.transfer(env.payer, mid, env.admin.address, 0)  # the next nonce is used, no gap
    assert env.pc.w3.eth.get_transaction_count(env.payer.address) == nonce + 2


def _proxied(env: Env, proxy: FlakyProxy, attempts: int = 5) -> ProtocolContracts:
    cfg = ChainConfig(connect_attempts=attempts, backoff_initial_s=0.01, backoff_max_s=0.05, request_timeout_s=5)
    return ProtocolContracts(connect(proxy.url, cfg), env.pc.deployment, cfg)


def test_lost_response_does_not_send_twice(anvil_url: str) -> None:
    env = make_env(anvil_url, ESTIMATING)
    mid, _ = env.propose(), None
    proxy = FlakyProxy(anvil_url)
    try:
        pc = _proxied(env, proxy)
        nonce = pc.w3.eth.get_transaction_count(env.researcher.address)
        proxy.swallow_method = "eth_sendRawTransaction"
        pc.retire_model(env.researcher, mid)
        assert proxy.sends() == 1  # the retry saw the transaction by hash instead of resending it
        assert pc.w3.eth.get_transaction_count(env.researcher.address) == nonce + 1
        assert env.pc.get_model(mid).status == "Retired"
    finally:
        proxy.close()


def test_outage_retries_then_delivers_once(anvil_url: str) -> None:
    env = make_env(anvil_url, ESTIMATING)
    mid = env.propose(start=False)
    proxy = FlakyProxy(anvil_url)
    try:
        pc = _proxied(env, proxy)
        nonce = pc.w3.eth.get_transaction_count(env.researcher.address)
        proxy.refuse_next = 3
        pc.start_training(env.researcher, mid)
        assert proxy.refused == 3 and proxy.sends() == 1
        assert pc.w3.eth.get_transaction_count(env.researcher.address) == nonce + 1
        proxy.refuse_all = True
        with pytest.raises(ChainUnavailableError) as err:
            pc.retire_model(env.researcher, mid)
        assert err.value.url == proxy.url and err.value.attempts == 5
        proxy.refuse_all = False
        assert pc.get_model(mid).status == "Training"
        pc.retire_model(env.researcher, mid)  # nothing was lost or left as a nonce gap
        assert pc.w3.eth.get_transaction_count(env.researcher.address) == nonce + 2
        assert pc.get_model(mid).status == "Retired"
    finally:
        proxy.close()


def test_concurrent_senders_share_one_nonce_sequence(anvil_url: str) -> None:
    env = make_env(anvil_url, ChainConfig(fixed_gas=500_000))
    mid = env.propose()
    node = env.new_node(env.operators[0]).address
    env.settle_and_claim(mid, 0, {node: 1000})
    sender = env.operators[0]
    nonce = env.pc.w3.eth.get_transaction_count(sender.address)
    receivers = [a.address for a in (env.admin, env.payer, env.researcher, *env.validators)]
    errors: list[BaseException] = []

    def work(to: str) -> None:
        try:
            for _ in range(3):
                env.pc.transfer(sender, mid, to, 1)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(r,)) for r in receivers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert env.pc.w3.eth.get_transaction_count(sender.address) == nonce + 3 * len(receivers)
    assert all(env.pc.balance_of(mid, r) == 3 for r in receivers)
    assert env.pc.advance_time(WINDOW) > 0


def test_two_clients_sharing_an_account_resolve_nonce_conflicts(anvil_url: str) -> None:
    env = make_env(anvil_url, ChainConfig(fixed_gas=500_000))
    mid = env.propose()
    node = env.new_node(env.operators[0]).address
    env.settle_and_claim(mid, 0, {node: 100})
    other = ProtocolContracts(connect(anvil_url, ChainConfig(fixed_gas=500_000)), env.pc.deployment,
                              ChainConfig(fixed_gas=500_000))
    sender = env.operators[0]
    errors: list[BaseException] = []

    def work(pc: ProtocolContracts, to: str) -> None:
        try:
            for _ in range(5):
                pc.transfer(sender, mid, to, 1)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(env.pc, env.payer.address)),
               threading.Thread(target=work, args=(other, env.researcher.address))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a sender is still waiting for a replaced transaction"
    assert errors == []
    assert env.pc.balance_of(mid, env.payer.address) == 5 and env.pc.balance_of(mid, env.researcher.address) == 5
