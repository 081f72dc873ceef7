"""A small OpenZeppelin-compatible Merkle tree (sorted pairs) over contribution leaves.

The protocol package owns the production tree; this one serves deployment checks, tests and benchmarks.
"""

from __future__ import annotations

from eth_utils import keccak

from contracts.eip712 import leaf_hash


def _pair(a: bytes, b: bytes) -> bytes:
    return keccak(a + b) if a < b else keccak(b + a)


class ContributionTree:
    """Merkle tree over (node, units) leaves of one model epoch."""

    def __init__(self, model_id: int, epoch: int, contributions: dict[str, int]) -> None:
        if not contributions:
            raise ValueError("ContributionTree needs at least one contribution")
        self.model_id = model_id
        self.epoch = epoch
        self.contributions = dict(contributions)
        self._leaves = {n: leaf_hash(model_id, epoch, n, u) for n, u in self.contributions.items()}
        level = sorted(self._leaves.values())
        self._levels = [level]
        while len(level) > 1:
            nxt = [_pair(level[i], level[i + 1]) if i + 1 < len(level) else level[i] for i in range(0, len(level), 2)]
            self._levels.append(nxt)
            level = nxt

    @property
    def root(self) -> bytes:
        """The 32-byte root."""
        return self._levels[-1][0]

    @property
    def total_units(self) -> int:
        """Sum of units over all leaves."""
        return sum(self.contributions.values())

    def proof(self, node: str) -> list[bytes]:
        """Sibling hashes from the node's leaf to the root."""
        if node not in self._leaves:
            raise KeyError(f"node {node} has no leaf in this tree")
        index = self._levels[0].index(self._leaves[node])
        out: list[bytes] = []
        for level in self._levels[:-1]:
            sibling = index ^ 1
            if sibling < len(level):
                out.append(level[sibling])
            index //= 2
        return out
