"""Epoch settlement off chain: crediting rule, per-node totals, Merkle root, receipts file, EpochRoot.

Crediting rule: the node at stage k is credited for a microbatch only when every hop it takes part
in is co-signed and names it — the head needs its forward hop out and the backward hop in, the tail
the forward hop in and its backward hop out, a middle stage all four. Units = `compute_units` of the
stage for the smallest token count among those hops (a node cannot inflate what its neighbours signed).
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from eth_utils import keccak

from protocol.accounting import ACCOUNTING_VERSION, accounting_function_hash, compute_units
from protocol.errors import EpochError, ProtocolError, SignatureError, UnregisteredKeyError
from protocol.merkle import Leaf, MerkleTree
from protocol.receipts import (
    BACKWARD,
    FORWARD,
    Domain,
    KeyRegistry,
    SignedReceipt,
    check_bytes32,
    recover_typed,
    sign_typed,
    verify_signed_receipt,
)
from sharding.config import ModelConfig
from sharding.partition import validate_specs
from sharding.stagespec import StageSpec

EPOCH_ROOT_TYPES: dict[str, list[dict[str, str]]] = {
    "EpochRoot": [
        {"name": "modelId", "type": "uint256"},
        {"name": "epoch", "type": "uint64"},
        {"name": "root", "type": "bytes32"},
        {"name": "totalUnits", "type": "uint256"},
        {"name": "receiptsHash", "type": "bytes32"},
    ]
}

RECEIPTS_FILE_FORMAT = "pmn-epoch-receipts/1"


class AnyKey:
    """A registry that accepts every key (signatures are still checked); for offline re-verification."""

    def is_registered(self, address: str) -> bool:
        """Always True."""
        return True


@dataclass(frozen=True)
class EpochContext:
    """What is needed to recompute an epoch: the model, its stages and the ledger domain."""

    model_id: int  # on-chain model id
    epoch: int  # accounting epoch being settled
    config: ModelConfig  # the model's architecture (FLOPs depend on it)
    stages: tuple[StageSpec, ...]  # the pipeline partition the receipts' stage indices refer to
    domain: Domain  # the ContributionLedger domain receipts must be signed for

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        try:
            validate_specs(self.config, self.stages)
        except ValueError as exc:
            raise EpochError("stages", str(exc)) from exc


@dataclass(frozen=True)
class Credit:
    """One stage credited for one microbatch."""

    step: int  # optimizer step
    microbatch: int  # microbatch index
    stage: int  # stage index
    node: str  # node credited
    tokens: int  # tokens credited (min over the stage's hops)
    units: int  # compute units credited


@dataclass
class CreditReport:
    """Outcome of applying the crediting rule to a set of verified, co-signed receipts."""

    credits: list[Credit] = field(default_factory=list)  # credited (microbatch, stage) pairs
    uncredited: list[tuple[int, int, int, str]] = field(default_factory=list)  # (step, mb, stage, reason)

    def totals(self) -> dict[str, int]:
        """Units per node address."""
        out: dict[str, int] = defaultdict(int)
        for c in self.credits:
            out[c.node] += c.units
        return dict(out)


def _required_hops(stage: int, num_stages: int) -> list[tuple[int, int, str]]:
    """(receipt stage, direction, role of our node) for every hop stage `stage` must have co-signed."""
    hops: list[tuple[int, int, str]] = []
    if stage > 0:
        hops.append((stage - 1, FORWARD, "receiver"))  # forward in
        hops.append((stage, BACKWARD, "sender"))  # backward out
    if stage < num_stages - 1:
        hops.append((stage, FORWARD, "sender"))  # forward out
        hops.append((stage + 1, BACKWARD, "receiver"))  # backward in
    return hops


def credit(receipts: Iterable[SignedReceipt], config: ModelConfig, stages: tuple[StageSpec, ...]) -> CreditReport:
    """Apply the crediting rule; `receipts` must already be verified and free of duplicate keys."""
    by_mb: dict[tuple[int, int], dict[tuple[int, int], SignedReceipt]] = defaultdict(dict)
    for s in receipts:
        r = s.receipt
        if s.cosigned:
            by_mb[(r.step, r.microbatch)][(r.stage, r.direction)] = s
    report = CreditReport()
    n = len(stages)
    for (step, mb) in sorted(by_mb):
        hops = by_mb[(step, mb)]
        for spec in stages:
            required = _required_hops(spec.index, n)
            if not required:
                report.uncredited.append((step, mb, spec.index, "a single-stage pipeline has no co-signed hops"))
                continue
            missing = [(st, d) for st, d, _ in required if (st, d) not in hops]
            if missing:
                report.uncredited.append((step, mb, spec.index, f"missing co-signed hops {missing}"))
                continue
            nodes = {getattr(hops[(st, d)].receipt, role) for st, d, role in required}
            if len(nodes) != 1:
                report.uncredited.append((step, mb, spec.index, f"hops name different nodes {sorted(nodes)}"))
                continue
            tokens = min(hops[(st, d)].receipt.tokens for st, d, _ in required)
            report.credits.append(
                Credit(step, mb, spec.index, nodes.pop(), tokens, compute_units(config, spec, tokens))
            )
    return report


@dataclass
class EpochResult:
    """An epoch built by an attester (or recomputed by a verifier)."""

    context: EpochContext  # model, stages and domain
    receipts: list[SignedReceipt]  # accepted co-signed receipts, in key order
    report: CreditReport  # crediting outcome
    rejected: list[tuple[dict[str, Any], str]]  # (receipt json, reason) of receipts that were not accepted
    tree: MerkleTree  # Merkle tree of (node, units)
    receipts_file: bytes  # canonical JSON published for the epoch
    receipts_hash: bytes  # keccak256(receipts_file)

    @property
    def root(self) -> bytes:
        """The Merkle root."""
        return self.tree.root

    @property
    def totals(self) -> dict[str, int]:
        """Units per node."""
        return self.report.totals()

    @property
    def total_units(self) -> int:
        """Sum of all leaves' units."""
        return sum(leaf.units for leaf in self.tree.leaves)

    def attestation(self) -> dict[str, Any]:
        """The EpochRoot message."""
        return epoch_root_message(
            self.context.model_id, self.context.epoch, self.root, self.total_units, self.receipts_hash
        )


def select_receipts(
    candidates: Iterable[SignedReceipt], context: EpochContext, registry: KeyRegistry
) -> tuple[list[SignedReceipt], list[tuple[dict[str, Any], str]]]:
    """Verify gathered receipts; drop invalid ones, merge identical copies, drop keys with conflicting copies.

    Copies of one key from different rollback generations (a hop re-run by another replica after a rollback,
    `Receipt.generation`) are not a conflict: the earliest generation's copy is credited, the later ones are
    rejected as superseded. Conflicting copies within one generation drop the key."""
    by_key: dict[tuple[int, ...], dict[tuple[int, int], list[SignedReceipt]]] = {}
    rejected: list[tuple[dict[str, Any], str]] = []
    for s in candidates:
        r = s.receipt
        if (r.model_id, r.epoch) != (context.model_id, context.epoch):
            rejected.append((s.to_json(), f"modelId/epoch: belongs to ({r.model_id}, {r.epoch})"))
            continue
        if r.stage >= len(context.stages) or r.receiver_stage >= len(context.stages):
            rejected.append((s.to_json(), f"stage: {r.stage} has no neighbour in direction {r.direction}"))
            continue
        try:
            verify_signed_receipt(s, context.domain, registry, require_cosigned=True)
        except ProtocolError as exc:
            rejected.append((s.to_json(), str(exc)))
            continue
        copies = by_key.setdefault(r.key, {}).setdefault(r.generation, [])
        if s not in copies:
            copies.append(s)
    accepted: list[SignedReceipt] = []
    for key in sorted(by_key):
        generations = by_key[key]
        first = min(generations)
        for gen in sorted(generations)[1:]:
            rejected += [(s.to_json(), f"receipt: superseded by the copy of rollback generation {first} of this key")
                         for s in generations[gen]]
        copies = generations[first]
        if len(copies) == 1:
            accepted.append(copies[0])
        else:
            rejected += [(s.to_json(), "receipt: conflicting co-signed copies of this key; key dropped") for s in copies]
    return accepted, rejected


def receipts_file(context: EpochContext, receipts: list[SignedReceipt]) -> bytes:
    """Canonical JSON (sorted keys, no spaces) of everything needed to recompute the epoch."""
    body = {
        "format": RECEIPTS_FILE_FORMAT,
        "accountingVersion": ACCOUNTING_VERSION,
        "accountingHash": "0x" + accounting_function_hash().hex(),
        "modelId": str(context.model_id),
        "epoch": context.epoch,
        "chainId": context.domain.chain_id,
        "verifyingContract": context.domain.verifying_contract,
        "config": context.config.to_dict(),
        "stages": [dataclasses.asdict(s) for s in context.stages],
        "receipts": [s.to_json() for s in sorted(receipts, key=lambda s: s.receipt.key)],
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def build_epoch(candidates: Iterable[SignedReceipt], context: EpochContext, registry: KeyRegistry) -> EpochResult:
    """Check gathered receipts, credit stages, build the tree and the published receipts file."""
    receipts, rejected = select_receipts(candidates, context, registry)
    report = credit(receipts, context.config, context.stages)
    totals = report.totals()
    leaves = [Leaf(context.model_id, context.epoch, node, units) for node, units in sorted(totals.items()) if units]
    if not leaves:
        raise EpochError("receipts", f"no stage was credited in epoch {context.epoch}: nothing to settle")
    file = receipts_file(context, receipts)
    return EpochResult(context, receipts, report, rejected, MerkleTree(leaves), file, keccak(file))


def parse_receipts_file(data: bytes) -> tuple[EpochContext, list[SignedReceipt]]:
    """Parse a published receipts file; problems raise `EpochError` or `ReceiptError` naming the field."""
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EpochError("receiptsFile", f"is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise EpochError("receiptsFile", "must be a JSON object")
    for name in ("format", "accountingVersion", "accountingHash", "modelId", "epoch", "chainId",
                 "verifyingContract", "config", "stages", "receipts"):
        if name not in body:
            raise EpochError(name, "is missing from the receipts file")
    if body["format"] != RECEIPTS_FILE_FORMAT:
        raise EpochError("format", f"{body['format']!r} is not {RECEIPTS_FILE_FORMAT!r}")
    if body["accountingVersion"] != ACCOUNTING_VERSION:
        raise EpochError("accountingVersion", f"{body['accountingVersion']} is not ours ({ACCOUNTING_VERSION})")
    if body["accountingHash"] != "0x" + accounting_function_hash().hex():
        raise EpochError("accountingHash", "the file was produced by a different accounting function")
    try:
        config = ModelConfig.from_dict(body["config"])
        stages = tuple(StageSpec(**s) for s in body["stages"])
    except (TypeError, ValueError) as exc:
        raise EpochError("config", str(exc)) from exc
    if not str(body["modelId"]).isdigit():
        raise EpochError("modelId", f"{body['modelId']!r} is not a decimal integer")
    context = EpochContext(
        int(body["modelId"]), body["epoch"], config, stages, Domain(body["chainId"], body["verifyingContract"])
    )
    if not isinstance(body["receipts"], list):
        raise EpochError("receipts", "must be a list")
    return context, [SignedReceipt.from_json(r) for r in body["receipts"]]


def verify_epoch(data: bytes, expected_root: bytes, registry: KeyRegistry | None = None,
                 expected_receipts_hash: bytes | None = None) -> EpochResult:
    """Recompute the root from a published receipts file and compare it with `expected_root` (from the chain).

    Every receipt in the file must verify; a file with an invalid receipt is rejected as a whole.
    """
    expected_root = check_bytes32("root", expected_root, EpochError)
    if expected_receipts_hash is not None and keccak(data) != expected_receipts_hash:
        raise EpochError("receiptsHash", "the file's keccak256 differs from the hash on chain")
    context, receipts = parse_receipts_file(data)
    result = build_epoch(receipts, context, registry or AnyKey())
    if result.rejected:
        raise EpochError("receipts", f"{len(result.rejected)} receipt(s) do not verify: {result.rejected[0][1]}")
    if result.receipts_file != data:
        raise EpochError("receiptsFile", "is not in canonical form")
    if result.root != expected_root:
        raise EpochError(
            "root", f"recomputed 0x{result.root.hex()} but the chain has 0x{expected_root.hex()}"
        )
    return result


def epoch_root_message(model_id: int, epoch: int, root: bytes, total_units: int, receipts_hash: bytes) -> dict[str, Any]:
    """The EpochRoot EIP-712 message."""
    return {
        "modelId": model_id,
        "epoch": epoch,
        "root": check_bytes32("root", root, EpochError),
        "totalUnits": total_units,
        "receiptsHash": check_bytes32("receiptsHash", receipts_hash, EpochError),
    }


def sign_epoch_root(domain: Domain, message: dict[str, Any], key: Any) -> bytes:
    """An attester's signature over an EpochRoot message."""
    return sign_typed(domain, EPOCH_ROOT_TYPES, message, key)


def check_quorum(
    domain: Domain, message: dict[str, Any], signatures: list[bytes], attesters: KeyRegistry, quorum: int
) -> list[str]:
    """Return the distinct registered attesters who signed `message`; raise unless there are >= `quorum`."""
    if quorum < 1:
        raise ValueError("quorum must be >= 1 (number of attester signatures required)")
    signers: list[str] = []
    for i, sig in enumerate(signatures):
        signer = recover_typed(domain, EPOCH_ROOT_TYPES, message, sig, f"signatures[{i}]")
        if not attesters.is_registered(signer):
            raise UnregisteredKeyError(f"signatures[{i}]", f"{signer} is not a registered attester")
        if signer in signers:
            raise SignatureError(f"signatures[{i}]", f"{signer} signed twice")
        signers.append(signer)
    if len(signers) < quorum:
        raise SignatureError("signatures", f"{len(signers)} attester signature(s), quorum is {quorum}")
    return signers
