"""OpenZeppelin-compatible Merkle tree: root, proofs, and rejection of proofs for another epoch."""

from __future__ import annotations

import pytest
from eth_abi import encode
from eth_utils import keccak
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import MerkleError
from protocol.merkle import Leaf, MerkleTree, check_claim, hash_pair, leaf_hash, verify_proof

from .conftest import make_keys


def test_leaf_is_double_hashed_abi_encoding():
    node = make_keys(1)[0].address
    inner = keccak(encode(["uint256", "uint64", "address", "uint256"], [5, 2, node, 1000]))
    assert leaf_hash(5, 2, node, 1000) == keccak(inner)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13])
def test_every_leaf_proves_against_root(n):
    keys = make_keys(n)
    leaves = [Leaf(1, 4, k.address, 100 * (i + 1)) for i, k in enumerate(keys)]
    tree = MerkleTree(leaves)
    for leaf in leaves:
        assert verify_proof(tree.proof(leaf.node), tree.root, leaf.hash())
        check_claim(tree.root, 1, 4, leaf.node, leaf.units, tree.proof(leaf.node))


def test_root_independent_of_leaf_order_and_matches_manual_three_leaf_tree():
    keys = make_keys(3)
    leaves = [Leaf(1, 0, k.address, 7 + i) for i, k in enumerate(keys)]
    a = MerkleTree(leaves).root
    assert MerkleTree(list(reversed(leaves))).root == a
    h = sorted(leaf.hash() for leaf in leaves)
    # OpenZeppelin StandardMerkleTree layout for 3 sorted leaves: tree = [root, H(h1, h0), h2, h1, h0]
    assert a == hash_pair(hash_pair(h[0], h[1]), h[2])


def test_proof_for_another_epoch_or_inflated_units_rejected():
    keys = make_keys(4)
    tree = MerkleTree([Leaf(1, 4, k.address, 10) for k in keys])
    proof = tree.proof(keys[0].address)
    with pytest.raises(MerkleError) as err:
        check_claim(tree.root, 1, 5, keys[0].address, 10, proof)
    assert err.value.field == "proof"
    with pytest.raises(MerkleError):
        check_claim(tree.root, 1, 4, keys[0].address, 100, proof)


def test_bad_tree_input_names_field():
    keys = make_keys(2)
    with pytest.raises(MerkleError) as err:
        MerkleTree([])
    assert err.value.field == "leaves"
    with pytest.raises(MerkleError) as err:
        MerkleTree([Leaf(1, 0, keys[0].address, 1), Leaf(1, 0, keys[0].address, 2)])
    assert err.value.field == "leaves[1].node"
    with pytest.raises(MerkleError) as err:
        MerkleTree([Leaf(1, 0, keys[0].address, 1), Leaf(1, 1, keys[1].address, 2)])
    assert err.value.field == "leaves[1]"
    with pytest.raises(MerkleError) as err:
        leaf_hash(1, 0, keys[0].address, -5)
    assert err.value.field == "units"
    with pytest.raises(MerkleError) as err:
        MerkleTree([Leaf(1, 0, keys[0].address, 1)]).proof(keys[1].address)
    assert err.value.field == "node"


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=2**64), min_size=1, max_size=12), st.integers(0, 2**64 - 1))
def test_property_proofs_verify_and_do_not_transfer(units, epoch):
    keys = make_keys(len(units), offset=300)
    leaves = [Leaf(3, epoch, k.address, u) for k, u in zip(keys, units, strict=True)]
    tree = MerkleTree(leaves)
    assert MerkleTree(list(reversed(leaves))).root == tree.root
    for leaf in leaves:
        proof = tree.proof(leaf.node)
        assert verify_proof(proof, tree.root, leaf.hash())
        assert not verify_proof(proof, tree.root, leaf_hash(3, epoch, leaf.node, leaf.units + 1))
        assert not verify_proof(proof, tree.root, leaf_hash(3, (epoch + 1) % 2**64, leaf.node, leaf.units))
