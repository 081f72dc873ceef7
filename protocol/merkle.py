"""OpenZeppelin-compatible Merkle tree of (modelId, epoch, node, units) leaves.

Leaf: ``keccak256(bytes.concat(keccak256(abi.encode(uint256 modelId, uint64 epoch, address node,
uint256 units))))``; inner nodes hash the sorted pair, as OpenZeppelin's ``MerkleProof`` expects.
The layout follows OpenZeppelin's StandardMerkleTree (leaves sorted by hash, array-packed complete
binary tree), so roots match that library for the same leaf set.
"""

from __future__ import annotations

from dataclasses import dataclass

from eth_abi import encode
from eth_utils import keccak

from protocol.errors import MerkleError
from protocol.receipts import check_address, check_bytes32, check_uint

LEAF_TYPES = ["uint256", "uint64", "address", "uint256"]


def leaf_hash(model_id: int, epoch: int, node: str, units: int) -> bytes:
    """The double-hashed leaf the ContributionLedger recomputes on claim."""
    check_uint("modelId", model_id, 256, MerkleError)
    check_uint("epoch", epoch, 64, MerkleError)
    address = check_address("node", node, MerkleError)
    check_uint("units", units, 256, MerkleError)
    return keccak(keccak(encode(LEAF_TYPES, [model_id, epoch, address, units])))


def hash_pair(a: bytes, b: bytes) -> bytes:
    """keccak256 of the two 32-byte nodes in ascending order (OpenZeppelin `Hashes.commutativeKeccak256`)."""
    return keccak(a + b) if a < b else keccak(b + a)


def process_proof(leaf: bytes, proof: list[bytes]) -> bytes:
    """The root implied by `leaf` and `proof`."""
    node = check_bytes32("leaf", leaf, MerkleError)
    for i, sibling in enumerate(proof):
        node = hash_pair(node, check_bytes32(f"proof[{i}]", sibling, MerkleError))
    return node


def verify_proof(proof: list[bytes], root: bytes, leaf: bytes) -> bool:
    """True if `proof` links `leaf` to `root` (OpenZeppelin `MerkleProof.verify`)."""
    return process_proof(leaf, proof) == check_bytes32("root", root, MerkleError)


@dataclass(frozen=True)
class Leaf:
    """One node's credit in one epoch of one model."""

    model_id: int  # on-chain model id
    epoch: int  # accounting epoch
    node: str  # node key address credited
    units: int  # compute units credited (= shares minted on claim)

    def hash(self) -> bytes:
        """The double-hashed leaf."""
        return leaf_hash(self.model_id, self.epoch, self.node, self.units)


class MerkleTree:
    """Tree over the per-node leaves of one epoch; build once, then read the root and proofs."""

    def __init__(self, leaves: list[Leaf]) -> None:
        if not leaves:
            raise MerkleError("leaves", "a tree needs at least one leaf")
        first = leaves[0]
        seen: set[str] = set()
        for i, leaf in enumerate(leaves):
            if (leaf.model_id, leaf.epoch) != (first.model_id, first.epoch):
                raise MerkleError(f"leaves[{i}]", "all leaves of a tree must share modelId and epoch")
            if leaf.node in seen:
                raise MerkleError(f"leaves[{i}].node", f"{leaf.node} appears twice")
            seen.add(leaf.node)
        hashed = sorted(((leaf.hash(), leaf) for leaf in leaves), key=lambda item: item[0])
        n = len(hashed)
        self._tree: list[bytes] = [b""] * (2 * n - 1)
        self._position: dict[str, int] = {}
        for i, (h, leaf) in enumerate(hashed):
            index = len(self._tree) - 1 - i
            self._tree[index] = h
            self._position[leaf.node] = index
        for i in range(len(self._tree) - 1 - n, -1, -1):
            self._tree[i] = hash_pair(self._tree[2 * i + 1], self._tree[2 * i + 2])
        self.leaves = [leaf for _, leaf in hashed]
        self.model_id = first.model_id
        self.epoch = first.epoch

    @property
    def root(self) -> bytes:
        """The 32-byte root."""
        return self._tree[0]

    def leaf_for(self, node: str) -> Leaf:
        """The leaf of `node`; `MerkleError("node")` if it has none."""
        address = check_address("node", node, MerkleError)
        for leaf in self.leaves:
            if leaf.node == address:
                return leaf
        raise MerkleError("node", f"{address} has no leaf in epoch {self.epoch}")

    def proof(self, node: str) -> list[bytes]:
        """Sibling hashes from `node`'s leaf up to the root."""
        index = self._position.get(check_address("node", node, MerkleError))
        if index is None:
            raise MerkleError("node", f"{node} has no leaf in epoch {self.epoch}")
        proof: list[bytes] = []
        while index > 0:
            sibling = index + 1 if index % 2 == 1 else index - 1
            proof.append(self._tree[sibling])
            index = (index - 1) // 2
        return proof


def check_claim(root: bytes, model_id: int, epoch: int, node: str, units: int, proof: list[bytes]) -> None:
    """Raise `MerkleError` if the claimed leaf is not under `root` (e.g. a proof for another epoch)."""
    if not verify_proof(proof, root, leaf_hash(model_id, epoch, node, units)):
        raise MerkleError(
            "proof", f"does not link (modelId={model_id}, epoch={epoch}, node={node}, units={units}) to the root"
        )
