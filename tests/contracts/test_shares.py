"""ShareToken: revenue accrual, claims, transfers, and the known traps of revenue-sharing tokens."""

from __future__ import annotations

import warnings
from typing import cast

import pytest
from eth_account import Account
from eth_typing import ChecksumAddress

from contracts.build import load_artifact
from contracts.errors import ContractRevertError

from .conftest import Env

RID = b"\x01" * 32


def _holders(env: Env, units: dict[int, int]) -> tuple[int, dict[int, str]]:
    """Model with shares minted through ledger claims: operator index -> units."""
    mid = env.propose()
    nodes: dict[int, str] = {i: env.new_node(env.operators[i]).address for i in units}
    env.settle_and_claim(mid, 0, {nodes[i]: u for i, u in units.items()})
    return mid, nodes


def _fee(receipt) -> int:
    return receipt["gasUsed"] * receipt["effectiveGasPrice"]


def test_revenue_accrues_pro_rata_and_is_claimed(env: Env) -> None:
    mid, _ = _holders(env, {0: 100, 1: 50})
    a, b = env.operators[0], env.operators[1]
    with pytest.raises(ContractRevertError, match="ShareTokenZeroDeposit"):
        env.pc.deposit_revenue(env.payer, mid, 0, RID)
    env.pc.deposit_revenue(env.payer, mid, 3000, RID)
    assert env.pc.claimable(mid, a.address) == 2000 and env.pc.claimable(mid, b.address) == 1000
    before = env.pc.w3.eth.get_balance(a.address)
    assert env.pc.claim_revenue(mid, a) == 2000
    assert env.pc.last_tx is not None
    assert env.pc.w3.eth.get_balance(a.address) == before + 2000 - _fee(env.pc.last_tx.receipt)
    assert env.pc.claimed(mid, a.address) == 2000 and env.pc.claimable(mid, a.address) == 0
    with pytest.raises(ContractRevertError) as err:
        env.pc.claim_revenue(mid, a)
    assert err.value.error_name == "ShareTokenNothingToClaim" and err.value.error_args == {"account": a.address}


def test_deposit_without_shares_is_refused(env: Env) -> None:
    mid = env.propose()
    with pytest.raises(ContractRevertError, match=r"ShareTokenNoSupply\(\)"):
        env.pc.deposit_revenue(env.payer, mid, 1000, RID)
    assert env.pc.w3.eth.get_balance(cast(ChecksumAddress, env.pc.share_token(mid))) == 0  # checksummed, typed as str


def test_claim_transfer_claim_pays_nothing_extra(env: Env) -> None:
    mid, _ = _holders(env, {0: 100, 1: 50})
    a, c = env.operators[0], env.operators[1]
    fresh = Account.create()
    env.pc.deposit_revenue(env.payer, mid, 1500, RID)
    assert env.pc.claim_revenue(mid, a) == 1000
    env.pc.transfer(a, mid, fresh.address, 100)
    assert env.pc.claimable(mid, fresh.address) == 0 and env.pc.claimable(mid, a.address) == 0
    assert env.pc.claimable(mid, c.address) == 500
    env.pc.deposit_revenue(env.payer, mid, 300, RID)
    assert env.pc.claimable(mid, fresh.address) == 200 and env.pc.claimable(mid, a.address) == 0
    assert env.pc.claimable(mid, c.address) == 600


def test_minting_after_a_distribution_neither_dilutes_nor_overpays(env: Env) -> None:
    mid, nodes = _holders(env, {0: 100})
    env.pc.deposit_revenue(env.payer, mid, 1000, RID)
    late = env.new_node(env.operators[2]).address
    env.settle_and_claim(mid, 1, {late: 300})
    assert env.pc.claimable(mid, env.operators[0].address) == 1000
    assert env.pc.claimable(mid, env.operators[2].address) == 0
    env.pc.deposit_revenue(env.payer, mid, 400, RID)
    assert env.pc.claimable(mid, env.operators[0].address) == 1100
    assert env.pc.claimable(mid, env.operators[2].address) == 300


def test_rounding_favours_the_pool(env: Env) -> None:
    mid, _ = _holders(env, {0: 1, 1: 1, 2: 1})
    env.pc.deposit_revenue(env.payer, mid, 10, RID)
    paid = sum(env.pc.claim_revenue(mid, env.operators[i]) for i in range(3))
    assert paid == 9  # 1 wei of dust stays in the pool
    assert env.pc.w3.eth.get_balance(cast(ChecksumAddress, env.pc.share_token(mid))) == 1  # checksummed, typed as str


def test_reentrant_claim_reverts_without_state_change(env: Env) -> None:
    mid, _ = _holders(env, {0: 100})
    art = load_artifact("ReentrantClaimer")
    token = cast(ChecksumAddress, env.pc.share_token(mid))  # checksummed, typed as str
    attacker = cast(ChecksumAddress, env.pc.tx.deploy(env.payer, art["abi"], art["bytecode"], token))  # checksummed
    env.pc.transfer(env.operators[0], mid, attacker, 40)
    env.pc.deposit_revenue(env.payer, mid, 1000, RID)
    claimer = env.pc.w3.eth.contract(address=attacker, abi=art["abi"])
    with pytest.raises(ContractRevertError) as err:
        env.pc.tx.transact(env.payer, claimer.functions.attack())
    assert err.value.error_name == "ReentrancyGuardReentrantCall"
    assert env.pc.claimable(mid, attacker) == 400 and env.pc.claimed(mid, attacker) == 0
    assert env.pc.w3.eth.get_balance(token) == 1000 and env.pc.w3.eth.get_balance(attacker) == 0


def test_direct_and_forced_eth_change_nobodys_fraction(env: Env) -> None:
    mid, _ = _holders(env, {0: 100, 1: 300})
    token = cast(ChecksumAddress, env.pc.share_token(mid))  # checksummed, typed as str
    env.pc.deposit_revenue(env.payer, mid, 4000, RID)
    with pytest.raises(ContractRevertError) as err:
        env.pc.tx.transact(env.payer, to=token, value=10**18)
    assert err.value.error_name == "ShareTokenDirectTransferRefused"
    art = load_artifact("ForceSender")
    forcer_address = cast(ChecksumAddress, env.pc.tx.deploy(env.payer, art["abi"], art["bytecode"]))  # checksummed
    forcer = env.pc.w3.eth.contract(address=forcer_address, abi=art["abi"])
    with warnings.catch_warnings():  # py-evm warns that SELFDESTRUCT is deprecated: that is the point here
        warnings.simplefilter("ignore", DeprecationWarning)
        env.pc.tx.transact(env.payer, forcer.functions.force(token), value=10**18)
    assert env.pc.w3.eth.get_balance(token) == 4000 + 10**18
    assert env.pc.claimable(mid, env.operators[0].address) == 1000
    assert env.pc.claimable(mid, env.operators[1].address) == 3000
    assert env.pc.claim_revenue(mid, env.operators[1]) == 3000


def test_only_the_ledger_mints_and_clones_initialize_once(env: Env) -> None:
    mid = env.propose()
    token = env.pc.token(mid)
    with pytest.raises(ContractRevertError) as err:
        env.pc.tx.transact(env.payer, token.functions.mint(env.payer.address, 10))
    assert err.value.error_name == "ShareTokenNotMinter"
    with pytest.raises(ContractRevertError, match="InvalidInitialization"):
        env.pc.tx.transact(env.payer, token.functions.initialize("x", "y", 1, env.payer.address))
    assert env.pc.total_supply(mid) == 0


def test_verify_payment_checks_the_deposit_event(env: Env) -> None:
    mid, _ = _holders(env, {0: 10})
    other = env.propose()
    h = env.pc.deposit_revenue(env.payer, mid, 5000, b"\x07" * 32)
    assert env.pc.verify_payment(mid, h, 5000)
    assert not env.pc.verify_payment(mid, h, 5001)
    assert not env.pc.verify_payment(other, h, 1)
    p = env.pc.payment(mid, h)
    assert p is not None and p.request_id == b"\x07" * 32 and p.payer == env.payer.address
    env.pc.transfer(env.operators[0], mid, env.payer.address, 1)
    assert env.pc.last_tx is not None
    assert not env.pc.verify_payment(mid, env.pc.last_tx.tx_hash, 0)
    assert not env.pc.verify_payment(mid, b"\x99" * 32, 0)
