"""Settlement on chain: attest and submit epoch roots, claim leaves, submit fraud verdicts, verify epochs.

Thin layer over `contracts.client.ProtocolContracts`; signatures are made with `protocol`'s EIP-712
code and ordered by signer address, as the ValidatorQuorum contract requires.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from eth_account.signers.local import LocalAccount

from contracts.client import ProtocolContracts
from contracts.errors import ContractsError
from protocol.epoch import EPOCH_ROOT_TYPES, EpochResult, sign_epoch_root, verify_epoch
from protocol.errors import EpochError, SettlementError
from protocol.outbox import ChainOutbox
from protocol.receipts import Domain, KeyRegistry, recover_typed
from protocol.spotcheck import FRAUD_TYPES, FraudEvidence, fraud_message, sign_fraud


def ledger_domain(client: ProtocolContracts) -> Domain:
    """The receipt / root / fraud domain of the deployment's ContributionLedger."""
    return Domain(client.chain_id, client.ledger.address)


class ChainAttesters:
    """`KeyRegistry` of attesters: addresses holding the ValidatorQuorum's VALIDATOR_ROLE."""

    def __init__(self, client: ProtocolContracts) -> None:
        self.client = client

    def is_registered(self, address: str) -> bool:
        """True if `address` is a validator."""
        return self.client.is_validator(address)


def _by_signer(domain: Domain, types: dict[str, list[dict[str, str]]], message: dict[str, Any],
               signatures: Sequence[bytes]) -> list[bytes]:
    signers = {recover_typed(domain, types, message, s, f"signatures[{i}]"): s for i, s in enumerate(signatures)}
    return [signers[a] for a in sorted(signers, key=lambda a: int(a, 16))]


def attest(domain: Domain, result: EpochResult, attesters: Sequence[LocalAccount]) -> list[bytes]:
    """EpochRoot signatures of `attesters`, ordered by signer address."""
    message = result.attestation()
    return _by_signer(domain, EPOCH_ROOT_TYPES, message, [sign_epoch_root(domain, message, a) for a in attesters])


@dataclass(frozen=True)
class SubmittedEpoch:
    """An epoch root the chain accepted."""

    model_id: int  # model
    epoch: int  # epoch
    root: bytes  # Merkle root
    total_units: int  # sum of leaves
    receipts_hash: bytes  # keccak256 of the published receipts file


def submit_epoch(client: ProtocolContracts, submitter: LocalAccount, result: EpochResult,
                 signatures: Sequence[bytes]) -> SubmittedEpoch:
    """Submit the root of `result` with the attesters' signatures; contract errors become SettlementError."""
    domain = ledger_domain(client)
    ordered = _by_signer(domain, EPOCH_ROOT_TYPES, result.attestation(), signatures)
    ctx = result.context
    try:
        client.submit_epoch_root(submitter, ctx.model_id, ctx.epoch, result.root, result.total_units,
                                 result.receipts_hash, ordered)
    except ContractsError as exc:
        raise SettlementError(f"epoch {ctx.epoch} of model {ctx.model_id}: root rejected: {exc}") from exc
    return SubmittedEpoch(ctx.model_id, ctx.epoch, result.root, result.total_units, result.receipts_hash)


def queue_epoch(outbox: ChainOutbox, submitter: str, result: EpochResult, signatures: Sequence[bytes]) -> str:
    """Record the root of `result` in the durable outbox (sent by its next flush, exactly once); its key."""
    ordered = _by_signer(ledger_domain(outbox.client), EPOCH_ROOT_TYPES, result.attestation(), signatures)
    ctx = result.context
    return outbox.submit_root(submitter, ctx.model_id, ctx.epoch, result.root, result.total_units,
                              result.receipts_hash, ordered)


def queue_claims(outbox: ChainOutbox, caller: str, result: EpochResult, skip: Sequence[str] = ()) -> list[str]:
    """Record a claim of every leaf of an epoch but those of `skip` (voided nodes) in the outbox; their keys."""
    ctx, skipped = result.context, {s.lower() for s in skip}
    return [outbox.claim_leaf(caller, ctx.model_id, ctx.epoch, leaf.node, leaf.units, result.tree.proof(leaf.node))
            for leaf in result.tree.leaves if leaf.node.lower() not in skipped]


def claim_all(client: ProtocolContracts, caller: LocalAccount, result: EpochResult) -> dict[str, int]:
    """Claim every leaf of an epoch (after its challenge window); return the units claimed per node."""
    ctx = result.context
    claimed: dict[str, int] = {}
    for leaf in result.tree.leaves:
        if client.is_leaf_claimed(ctx.model_id, ctx.epoch, leaf.node) or client.is_leaf_voided(
            ctx.model_id, ctx.epoch, leaf.node
        ):
            continue
        try:
            client.claim_leaf(caller, ctx.model_id, ctx.epoch, leaf.node, leaf.units, result.tree.proof(leaf.node))
        except ContractsError as exc:
            raise SettlementError(f"claim of {leaf.node} in epoch {ctx.epoch} failed: {exc}") from exc
        claimed[leaf.node] = leaf.units
    return claimed


def attest_fraud(domain: Domain, evidence: FraudEvidence, attesters: Sequence[LocalAccount]) -> list[bytes]:
    """Fraud-verdict signatures of `attesters`, ordered by signer address."""
    signed = [sign_fraud(domain, evidence, a) for a in attesters]
    return _by_signer(domain, FRAUD_TYPES, signed[0][0], [s for _, s in signed])


def submit_fraud(client: ProtocolContracts, submitter: LocalAccount, evidence: FraudEvidence,
                 signatures: Sequence[bytes]) -> None:
    """Void the accused node's leaf and slash its stake (inside the challenge window)."""
    r = evidence.receipt.receipt
    domain = ledger_domain(client)
    message = fraud_message(r.model_id, r.epoch, evidence.node, evidence.hash())
    ordered = _by_signer(domain, FRAUD_TYPES, message, signatures)
    try:
        client.challenge_leaf(submitter, r.model_id, r.epoch, evidence.node, evidence.hash(), ordered)
    except ContractsError as exc:
        raise SettlementError(f"fraud verdict against {evidence.node} in epoch {r.epoch} rejected: {exc}") from exc


def verify_onchain_epoch(client: ProtocolContracts, model_id: int, epoch: int, receipts_file: bytes,
                         registry: KeyRegistry | None = None) -> EpochResult:
    """What `pmn ledger verify` does: recompute the root from the published file and compare with the chain."""
    info = client.epoch_info(model_id, epoch)
    if info.submitted_at == 0:
        raise EpochError("epoch", f"model {model_id} has no root on chain for epoch {epoch}")
    result = verify_epoch(receipts_file, info.root, registry, info.receipts_hash)
    if (result.context.model_id, result.context.epoch) != (model_id, epoch):
        raise EpochError("epoch", f"the file is for model {result.context.model_id} epoch {result.context.epoch}")
    if result.total_units != info.total_units:
        raise EpochError("totalUnits", f"recomputed {result.total_units}, the chain has {info.total_units}")
    return result
