"""Remaining contract paths: validator administration, retired models, unit caps, slashed withdrawals."""

from __future__ import annotations

import pytest
from eth_account import Account

from contracts.eip712 import sign_quorum
from contracts.errors import ContractRevertError
from contracts.merkle import ContributionTree

from .conftest import WINDOW, Env


def test_validator_set_and_quorum_administration(env: Env) -> None:
    pc = env.pc
    with pytest.raises(ContractRevertError) as err:
        pc.set_quorum(env.payer, 3)
    assert err.value.error_name == "AccessControlUnauthorizedAccount"
    assert err.value.error_args["account"] == env.payer.address
    with pytest.raises(ContractRevertError, match=r"ValidatorQuorumInvalidQuorum\(quorum=4, validatorCount=3\)"):
        pc.set_quorum(env.admin, 4)
    pc.set_quorum(env.admin, 3)
    assert pc.quorum_size() == 3
    with pytest.raises(ContractRevertError, match="ValidatorQuorumInvalidQuorum"):
        pc.set_validator(env.admin, env.validators[0].address, False)
    assert pc.is_validator(env.validators[0].address)
    newcomer = Account.create()
    pc.set_validator(env.admin, newcomer.address, True)
    pc.set_validator(env.admin, env.validators[0].address, False)
    assert not pc.is_validator(env.validators[0].address) and pc.is_validator(newcomer.address)
    mid = env.propose()
    tree = ContributionTree(mid, 0, {Account.create().address: 3})
    typed = pc.epoch_root_typed_data(mid, 0, tree.root, 3, b"\x00" * 32)
    with pytest.raises(ContractRevertError, match="ValidatorQuorumNotValidator"):
        pc.submit_epoch_root(env.payer, mid, 0, tree.root, 3, b"\x00" * 32, sign_quorum(env.validators, typed))
    pc.submit_epoch_root(env.payer, mid, 0, tree.root, 3, b"\x00" * 32,
                         sign_quorum([*env.validators[1:], newcomer], typed))
    assert pc.epoch_info(mid, 0).total_units == 3


def test_ledger_is_set_once(env: Env) -> None:
    with pytest.raises(ContractRevertError, match="ModelRegistryLedgerAlreadySet"):
        env.pc.tx.transact(env.admin, env.pc.models.functions.setLedger(env.admin.address))
    with pytest.raises(ContractRevertError, match="NodeRegistryLedgerAlreadySet"):
        env.pc.tx.transact(env.admin, env.pc.nodes.functions.setLedger(env.admin.address))


def test_retired_model_takes_no_roots_but_pays_out_settled_ones(env: Env) -> None:
    mid = env.propose()
    node = env.new_node(env.operators[0]).address
    tree = env.submit(mid, 0, {node: 9})
    env.pc.retire_model(env.researcher, mid)
    with pytest.raises(ContractRevertError, match=r"ContributionLedgerModelNotTraining\(modelId=1, status=3\)"):
        env.submit(mid, 1, {node: 9})
    with pytest.raises(ContractRevertError, match="ModelRegistryWrongStatus"):
        env.pc.retire_model(env.researcher, mid)
    env.pc.advance_time(WINDOW)
    env.pc.claim_leaf(env.payer, mid, 0, node, 9, tree.proof(node))
    assert env.pc.balance_of(mid, env.operators[0].address) == 9


def test_claims_cannot_exceed_attested_total(env: Env) -> None:
    mid = env.propose()
    a, b = env.new_node(env.operators[0]).address, env.new_node(env.operators[1]).address
    tree = ContributionTree(mid, 0, {a: 10, b: 10})
    typed = env.pc.epoch_root_typed_data(mid, 0, tree.root, 15, b"\x00" * 32)  # understated total
    env.pc.submit_epoch_root(env.payer, mid, 0, tree.root, 15, b"\x00" * 32, sign_quorum(env.validators[:2], typed))
    env.pc.advance_time(WINDOW)
    env.pc.claim_leaf(env.payer, mid, 0, a, 10, tree.proof(a))
    with pytest.raises(ContractRevertError, match=r"ContributionLedgerUnitsExceeded\(claimed=20, totalUnits=15\)"):
        env.pc.claim_leaf(env.payer, mid, 0, b, 10, tree.proof(b))
    with pytest.raises(ContractRevertError, match="ContributionLedgerInvalidLeaf"):
        env.pc.claim_leaf(env.payer, mid, 0, b, 0, tree.proof(b))
    assert env.pc.total_supply(mid) == 10


def test_slashed_node_withdraws_only_the_remainder(env: Env) -> None:
    mid = env.propose()
    key = env.new_node(env.operators[0], capacity=4)
    env.submit(mid, 0, {key.address: 1})
    ev = b"\x0e" * 32
    env.pc.challenge_leaf(env.payer, mid, 0, key.address, ev,
                          sign_quorum(env.validators[:2], env.pc.fraud_typed_data(mid, 0, key.address, ev)))
    assert env.pc.node_info(key.address).stake_wei == 2 * 10**12
    assert env.pc.nodes.functions.totalSlashed().call() == 2 * 10**12
    env.pc.begin_unbond(env.operators[0], key.address)
    env.pc.advance_time(100)
    env.pc.withdraw_stake(env.operators[0], key.address)
    assert env.pc.w3.eth.get_balance(env.pc.nodes.address) == 2 * 10**12  # the slashed part stays locked
