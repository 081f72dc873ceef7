"""protocol's EIP-712 digests, leaf hash and Merkle proofs agree with the deployed ContributionLedger."""

from __future__ import annotations

import pytest
from eth_account import Account

from contracts import chain as chain_mod
from contracts.client import ProtocolContracts
from contracts.config import ChainConfig
from contracts.deploy import DeployParams, deploy_all
from protocol.epoch import EPOCH_ROOT_TYPES, epoch_root_message, sign_epoch_root
from protocol.merkle import Leaf, MerkleTree, leaf_hash
from protocol.receipts import typed_digest
from protocol.settlement import ChainAttesters, ledger_domain
from protocol.spotcheck import FRAUD_TYPES, fraud_message

FAST = ChainConfig(fixed_gas=3_000_000)


@pytest.fixture(scope="module")
def deployed():
    w3 = chain_mod.connect(None, FAST)
    acc = chain_mod.test_accounts(w3)
    dep = deploy_all(w3, acc[0], [v.address for v in acc[1:4]], 2, DeployParams(unbonding_delay_s=100), FAST)
    pc = ProtocolContracts(w3, dep, FAST)
    model_id = pc.propose_model(acc[4], b"\x01" * 32, "compat", 2, b"\x02" * 32, 10, 60, 500, 1)
    pc.start_training(acc[4], model_id)
    return pc, acc, model_id


def test_digests_and_leaf_match_contract(deployed):
    pc, acc, model_id = deployed
    domain = ledger_domain(pc)
    node = Account.from_key(b"\x09" * 32).address
    msg = epoch_root_message(model_id, 3, b"\x0a" * 32, 12345, b"\x0b" * 32)
    on_chain = pc.ledger.functions.epochRootDigest(model_id, 3, b"\x0a" * 32, 12345, b"\x0b" * 32).call()
    assert typed_digest(domain, EPOCH_ROOT_TYPES, msg) == bytes(on_chain)
    fraud = fraud_message(model_id, 3, node, b"\x0c" * 32)
    assert typed_digest(domain, FRAUD_TYPES, fraud) == bytes(pc.ledger.functions.fraudDigest(model_id, 3, node,
                                                                                             b"\x0c" * 32).call())
    assert leaf_hash(model_id, 3, node, 777) == bytes(pc.ledger.functions.leafHash(model_id, 3, node, 777).call())
    attesters = ChainAttesters(pc)
    assert attesters.is_registered(acc[1].address) and not attesters.is_registered(acc[4].address)


@pytest.mark.timeout(120)
def test_every_proof_of_a_five_leaf_tree_claims_through_the_contract(deployed):
    pc, acc, model_id = deployed
    nodes = [Account.from_key((500 + i).to_bytes(32, "big")) for i in range(5)]
    for i, key in enumerate(nodes):
        pc.register_node(acc[5 + i % 3], key, 1)
    tree = MerkleTree([Leaf(model_id, 0, k.address, 10 + i) for i, k in enumerate(nodes)])
    total = sum(leaf.units for leaf in tree.leaves)
    msg = epoch_root_message(model_id, 0, tree.root, total, b"\x0d" * 32)
    signers = sorted(acc[1:3], key=lambda a: int(a.address, 16))
    pc.submit_epoch_root(acc[8], model_id, 0, tree.root, total, b"\x0d" * 32,
                         [sign_epoch_root(ledger_domain(pc), msg, s) for s in signers])
    pc.advance_time(61)
    for leaf in tree.leaves:
        pc.claim_leaf(acc[8], model_id, 0, leaf.node, leaf.units, tree.proof(leaf.node))
        assert pc.is_leaf_claimed(model_id, 0, leaf.node)
    assert pc.total_supply(model_id) == total
