"""NodeRegistry: node-key proof, stake, unbonding, slashing only by the ledger."""

from __future__ import annotations

import pytest
from eth_account import Account

from contracts import eip712
from contracts.errors import ContractRevertError

from .conftest import Env


def test_register_records_operator_capacity_and_stake(env: Env) -> None:
    key = env.new_node(env.operators[0], capacity=7)
    info = env.pc.node_info(key.address)
    assert (info.operator, info.status, info.capacity, info.stake_wei) == (env.operators[0].address, "Active", 7, 7 * 10**12)
    assert env.pc.registration_nonce(key.address) == 1


def test_signature_by_another_key_is_rejected(env: Env) -> None:
    key, impostor = Account.create(), Account.create()
    typed = env.pc.registration_typed_data(env.operators[0].address, key.address, 5)
    bad = eip712.sign(impostor, typed)
    with pytest.raises(ContractRevertError) as err:
        env.pc.register_node_signed(env.operators[0], key.address, 5, bad)
    assert err.value.error_name == "NodeRegistryInvalidPeerKeySignature"
    assert err.value.error_args["recovered"] == impostor.address
    assert env.pc.node_info(key.address).status == "None"


def test_signature_for_another_operator_cannot_be_replayed(env: Env) -> None:
    key = Account.create()
    typed = env.pc.registration_typed_data(env.operators[0].address, key.address, 5)
    sig = eip712.sign(key, typed)
    with pytest.raises(ContractRevertError, match="NodeRegistryInvalidPeerKeySignature"):
        env.pc.register_node_signed(env.operators[1], key.address, 5, sig)
    with pytest.raises(ContractRevertError, match="NodeRegistryInvalidPeerKeySignature"):
        env.pc.register_node_signed(env.operators[0], key.address, 6, sig)
    env.pc.register_node_signed(env.operators[0], key.address, 5, sig)
    assert env.pc.node_info(key.address).operator == env.operators[0].address


def test_stake_must_scale_with_capacity(env: Env) -> None:
    key = Account.create()
    with pytest.raises(ContractRevertError) as err:
        env.pc.register_node(env.operators[0], key, 10, stake_wei=10 * 10**12 - 1)
    assert err.value.error_args == {"sent": 10 * 10**12 - 1, "required": 10 * 10**12}
    with pytest.raises(ContractRevertError, match="NodeRegistryInvalidCapacity"):
        env.pc.register_node(env.operators[0], key, 0)


def test_duplicate_registration_is_rejected(env: Env) -> None:
    key = env.new_node(env.operators[0])
    with pytest.raises(ContractRevertError, match="NodeRegistryAlreadyRegistered"):
        env.pc.register_node(env.operators[1], key, 10)
    assert env.pc.node_info(key.address).operator == env.operators[0].address


def test_unbond_then_withdraw_after_delay(env: Env) -> None:
    op = env.operators[0]
    key = env.new_node(op, capacity=3)
    with pytest.raises(ContractRevertError, match="NodeRegistryWrongStatus"):
        env.pc.withdraw_stake(op, key.address)
    with pytest.raises(ContractRevertError, match="NodeRegistryNotOperator"):
        env.pc.begin_unbond(env.operators[1], key.address)
    env.pc.begin_unbond(op, key.address)
    info = env.pc.node_info(key.address)
    assert info.status == "Unbonding" and info.unbonds_at > 0
    with pytest.raises(ContractRevertError, match="NodeRegistryStillUnbonding"):
        env.pc.withdraw_stake(op, key.address)
    env.pc.advance_time(100)
    before = env.pc.w3.eth.get_balance(op.address)
    env.pc.withdraw_stake(op, key.address)
    assert env.pc.last_tx is not None
    receipt = env.pc.last_tx.receipt
    fee = receipt["gasUsed"] * receipt["effectiveGasPrice"]
    assert env.pc.w3.eth.get_balance(op.address) == before + 3 * 10**12 - fee
    info = env.pc.node_info(key.address)
    assert info.status == "Withdrawn" and info.stake_wei == 0
    # the key can register again with a fresh nonce
    env.pc.register_node(op, key, 1)
    assert env.pc.node_info(key.address).status == "Active"


def test_only_the_ledger_slashes(env: Env) -> None:
    key = env.new_node(env.operators[0])
    with pytest.raises(ContractRevertError) as err:
        env.pc.slash(env.admin, key.address, 1, b"\x00" * 32)
    assert err.value.error_name == "NodeRegistryNotLedger"
    assert env.pc.node_info(key.address).stake_wei == 10 * 10**12
