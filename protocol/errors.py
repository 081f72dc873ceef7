"""Errors of the `protocol` package: one root, one subclass per failure."""

from __future__ import annotations


class ProtocolError(Exception):
    """Root of every error raised by `protocol`."""


class FieldError(ProtocolError):
    """An input is rejected because of one named field; `field` holds that name."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class ReceiptError(FieldError):
    """A receipt is malformed (a field is out of range or of the wrong type)."""


class DomainError(FieldError):
    """A signature was made for another EIP-712 domain (chain id or contract)."""


class SignatureError(FieldError):
    """A signature is missing, malformed or recovers to another address than declared."""


class UnregisteredKeyError(FieldError):
    """A signer is not a registered node key."""


class ReplayError(FieldError):
    """A receipt with the same (modelId, epoch, step, microbatch, stage, direction) was already seen."""


class StoreError(ProtocolError):
    """The receipt store cannot be opened or is inconsistent."""


class AccountingError(FieldError):
    """Compute units cannot be computed for the given input."""


class MerkleError(FieldError):
    """A Merkle tree cannot be built, or a proof does not verify."""


class EpochError(FieldError):
    """An epoch's receipts file, root or attestation is invalid or does not match."""


class AggregationError(FieldError):
    """Replica updates cannot be aggregated (shape mismatch, too few finite updates)."""


class SpotCheckError(FieldError):
    """A spot check cannot be run on the given state or input."""


class SettlementError(ProtocolError):
    """Submitting a root, claim or fraud verdict to the chain failed."""


class AuditSamplingError(FieldError):
    """The audit sampling rule cannot be evaluated (bad seed, attester set, stage count or rule)."""


class ChainLookupError(ProtocolError):
    """A chain lookup (is this key registered?) got no answer: the RPC endpoint is down."""


class OutboxError(ProtocolError):
    """A chain write cannot be recorded in, or read from, the durable chain outbox."""


class OutboxRefusedError(OutboxError):
    """The chain refused a queued write (a contract error that is not "already done"); it is not retried."""

    def __init__(self, key: str, error: str, count: int = 1) -> None:
        more = f" (and {count - 1} more refused)" if count > 1 else ""
        super().__init__(f"chain write {key} refused: {error}{more}")
        self.key = key
        self.error = error


class OutboxTimeoutError(OutboxError):
    """Chain writes were still queued (the chain did not answer) when a bounded wait ran out."""
