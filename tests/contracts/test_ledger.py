"""ContributionLedger: quorum-attested roots, challenges, Merkle claims."""

from __future__ import annotations

import pytest
from eth_account import Account

from contracts.eip712 import sign, sign_quorum
from contracts.errors import ContractRevertError
from contracts.merkle import ContributionTree

from .conftest import WINDOW, Env

RH = b"\x33" * 32


def _setup(env: Env) -> tuple[int, list[str]]:
    mid = env.propose()
    nodes: list[str] = [env.new_node(env.operators[i % 3]).address for i in range(3)]
    return mid, nodes


def test_settled_leaf_mints_shares_to_operator_once(env: Env) -> None:
    mid, nodes = _setup(env)
    contrib = {nodes[0]: 100, nodes[1]: 30, nodes[2]: 7}
    tree = env.submit(mid, 0, contrib)
    info = env.pc.epoch_info(mid, 0)
    assert info.root == tree.root and info.total_units == 137 and info.challenge_closes_at == info.submitted_at + WINDOW
    with pytest.raises(ContractRevertError, match="ContributionLedgerChallengeWindowOpen"):
        env.pc.claim_leaf(env.payer, mid, 0, nodes[0], 100, tree.proof(nodes[0]))
    env.pc.advance_time(WINDOW)
    env.pc.claim_leaf(env.payer, mid, 0, nodes[0], 100, tree.proof(nodes[0]))
    assert env.pc.balance_of(mid, env.operators[0].address) == 100
    assert env.pc.is_leaf_claimed(mid, 0, nodes[0])
    with pytest.raises(ContractRevertError) as err:
        env.pc.claim_leaf(env.payer, mid, 0, nodes[0], 100, tree.proof(nodes[0]))
    assert err.value.error_name == "ContributionLedgerLeafAlreadyClaimed"
    assert env.pc.balance_of(mid, env.operators[0].address) == 100
    with pytest.raises(ContractRevertError, match="ContributionLedgerInvalidProof"):
        env.pc.claim_leaf(env.payer, mid, 0, nodes[1], 31, tree.proof(nodes[1]))
    env.pc.claim_leaf(env.payer, mid, 0, nodes[1], 30, tree.proof(nodes[1]))
    assert env.pc.total_supply(mid) == 130 and env.pc.epoch_info(mid, 0).claimed_units == 130


def test_root_needs_validator_quorum(env: Env) -> None:
    mid, nodes = _setup(env)
    tree = ContributionTree(mid, 0, {nodes[0]: 5})
    typed = env.pc.epoch_root_typed_data(mid, 0, tree.root, 5, RH)

    def submit(sigs: list[bytes]) -> ContractRevertError:
        with pytest.raises(ContractRevertError) as err:
            env.pc.submit_epoch_root(env.payer, mid, 0, tree.root, 5, RH, sigs)
        return err.value

    assert submit(sign_quorum(env.validators[:1], typed)).error_name == "ValidatorQuorumNotReached"
    forger = Account.create()
    err = submit(sign_quorum([env.validators[0], forger], typed))
    assert err.error_name == "ValidatorQuorumNotValidator" and err.error_args["signer"] == forger.address
    one = sign_quorum(env.validators[:1], typed)
    assert submit(one + one).error_name == "ValidatorQuorumSignersNotSorted"
    assert submit(list(reversed(sign_quorum(env.validators[:2], typed)))).error_name == "ValidatorQuorumSignersNotSorted"
    other = env.pc.epoch_root_typed_data(mid, 0, tree.root, 6, RH)  # signed for different units
    assert submit(sign_quorum(env.validators[:2], other)).error_name in {
        "ValidatorQuorumNotValidator", "ValidatorQuorumSignersNotSorted"}
    assert submit([b"\x01" * 65, b"\x02" * 65]).error_name == "ValidatorQuorumInvalidSignature"
    assert env.pc.epoch_info(mid, 0).submitted_at == 0
    env.pc.submit_epoch_root(env.payer, mid, 0, tree.root, 5, RH, sign_quorum(env.validators, typed))
    with pytest.raises(ContractRevertError, match="ContributionLedgerEpochAlreadySubmitted"):
        env.pc.submit_epoch_root(env.payer, mid, 0, tree.root, 5, RH, sign_quorum(env.validators, typed))


def test_roots_only_for_training_models(env: Env) -> None:
    mid = env.propose(start=False)
    with pytest.raises(ContractRevertError) as err:
        env.submit(mid, 0, {Account.create().address: 1})
    assert err.value.error_name == "ContributionLedgerModelNotTraining"
    env.pc.start_training(env.researcher, mid)
    with pytest.raises(ContractRevertError, match="ContributionLedgerInvalidRoot"):
        env.pc.submit_epoch_root(env.payer, mid, 0, b"\x00" * 32, 1, RH, [])


def test_challenge_leaf_voids_and_slashes(env: Env) -> None:
    mid, nodes = _setup(env)
    tree = env.submit(mid, 0, {nodes[0]: 10, nodes[1]: 20})
    evidence = b"\xee" * 32
    typed = env.pc.fraud_typed_data(mid, 0, nodes[1], evidence)
    with pytest.raises(ContractRevertError, match="ValidatorQuorumNotReached"):
        env.pc.challenge_leaf(env.payer, mid, 0, nodes[1], evidence, sign_quorum(env.validators[:1], typed))
    env.pc.challenge_leaf(env.payer, mid, 0, nodes[1], evidence, sign_quorum(env.validators[:2], typed))
    assert env.pc.is_leaf_voided(mid, 0, nodes[1])
    assert env.pc.node_info(nodes[1]).stake_wei == 5 * 10**12  # slash_bps = 5000 of 10 * 10**12
    with pytest.raises(ContractRevertError, match="ContributionLedgerLeafVoided"):
        env.pc.challenge_leaf(env.payer, mid, 0, nodes[1], evidence, sign_quorum(env.validators[:2], typed))
    env.pc.advance_time(WINDOW)
    with pytest.raises(ContractRevertError, match="ContributionLedgerLeafVoided"):
        env.pc.claim_leaf(env.payer, mid, 0, nodes[1], 20, tree.proof(nodes[1]))
    late = env.pc.fraud_typed_data(mid, 0, nodes[0], evidence)
    with pytest.raises(ContractRevertError, match="ContributionLedgerChallengeWindowClosed"):
        env.pc.challenge_leaf(env.payer, mid, 0, nodes[0], evidence, sign_quorum(env.validators[:2], late))
    env.pc.claim_leaf(env.payer, mid, 0, nodes[0], 10, tree.proof(nodes[0]))
    assert env.pc.total_supply(mid) == 10


def test_challenge_root_voids_epoch_and_allows_resubmission(env: Env) -> None:
    mid, nodes = _setup(env)
    tree = env.submit(mid, 0, {nodes[0]: 10})
    evidence = b"\xab" * 32
    leaf_verdict = env.pc.fraud_typed_data(mid, 0, nodes[0], evidence)
    with pytest.raises(ContractRevertError):  # a leaf verdict does not void the root
        env.pc.challenge_root(env.payer, mid, 0, evidence, sign_quorum(env.validators[:2], leaf_verdict))
    verdict = env.pc.root_fraud_typed_data(mid, 0, evidence)
    env.pc.challenge_root(env.payer, mid, 0, evidence, sign_quorum(env.validators[:2], verdict))
    assert env.pc.epoch_info(mid, 0).voided
    env.pc.advance_time(WINDOW)
    with pytest.raises(ContractRevertError, match="ContributionLedgerRootVoided"):
        env.pc.claim_leaf(env.payer, mid, 0, nodes[0], 10, tree.proof(nodes[0]))
    tree2 = env.submit(mid, 0, {nodes[0]: 8})
    env.pc.advance_time(WINDOW)
    env.pc.claim_leaf(env.payer, mid, 0, nodes[0], 8, tree2.proof(nodes[0]))
    assert env.pc.balance_of(mid, env.operators[0].address) == 8


def test_unregistered_node_leaf_cannot_mint(env: Env) -> None:
    mid = env.propose()
    stranger = Account.create().address
    tree = env.submit(mid, 3, {stranger: 4})
    env.pc.advance_time(WINDOW)
    with pytest.raises(ContractRevertError, match="ContributionLedgerUnknownNode"):
        env.pc.claim_leaf(env.payer, mid, 3, stranger, 4, tree.proof(stranger))
    with pytest.raises(ContractRevertError, match="ContributionLedgerUnknownEpoch"):
        env.pc.claim_leaf(env.payer, mid, 4, stranger, 4, tree.proof(stranger))


def test_digests_match_contract(env: Env) -> None:
    from contracts.eip712 import digest, recover

    typed = env.pc.epoch_root_typed_data(7, 2, b"\x01" * 32, 9, RH)
    on_chain = env.pc.ledger.functions.epochRootDigest(7, 2, b"\x01" * 32, 9, RH).call()
    assert digest(typed) == bytes(on_chain)
    fraud = env.pc.fraud_typed_data(7, 2, None, RH)
    assert digest(fraud) == bytes(env.pc.ledger.functions.fraudDigest(7, 2, "0x" + "00" * 20, RH).call())
    root_fraud = env.pc.root_fraud_typed_data(7, 2, RH, root=b"\x01" * 32)
    assert digest(root_fraud) == bytes(env.pc.ledger.functions.rootFraudDigest(7, 2, b"\x01" * 32, RH).call())
    node = Account.create()
    assert bytes(env.pc.ledger.functions.leafHash(7, 2, node.address, 9).call()) == __import__(
        "contracts.eip712", fromlist=["leaf_hash"]).leaf_hash(7, 2, node.address, 9)
    assert recover(typed, sign(node, typed)) == node.address
