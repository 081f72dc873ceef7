"""Exceptions of the node package: one root, one subclass per failure."""

from __future__ import annotations


class NodeError(Exception):
    """Root of every error raised by the node package."""


class IdentityError(NodeError):
    """A persisted key (node key or peer key) is missing, unreadable or malformed."""


class BindingError(NodeError):
    """A peer's binding signature is missing, malformed, or not made by the node key of the address it claims."""


class FrameError(NodeError):
    """A wire frame was rejected; `reason` is a short machine-readable tag."""

    reason = "frame"


class BadMagicError(FrameError):
    """The frame does not start with the protocol magic bytes."""

    reason = "bad_magic"


class UnsupportedVersionError(FrameError):
    """The frame header carries a protocol version this node does not speak."""

    reason = "unsupported_version"


class UnknownKindError(FrameError):
    """The frame kind (or codec / dtype id) is not one this node knows."""

    reason = "unknown_kind"


class FrameTooLargeError(FrameError):
    """The header declares a body longer than the configured maximum frame size."""

    reason = "too_large"


class TruncatedFrameError(FrameError):
    """The stream ended before the declared header or body was complete."""

    reason = "truncated"


class ChecksumError(FrameError):
    """The body does not hash to the digest declared in the header."""

    reason = "checksum"


class SpecHashMismatchError(FrameError):
    """The frame (or handshake) names a different model spec hash than ours."""

    reason = "spec_hash"


class ShapeMismatchError(FrameError):
    """The declared tensor shape or lengths do not match the model spec."""

    reason = "shape"


class DtypeMismatchError(FrameError):
    """The declared dtype is not the one the codec produces."""

    reason = "dtype"


class CodecMismatchError(FrameError):
    """The frame uses a codec other than the one agreed for this model."""

    reason = "codec"


class NonFiniteError(FrameError):
    """The decoded payload holds NaN or Inf values (or could not be decoded)."""

    reason = "non_finite"


class UnexpectedFrameError(FrameError):
    """A well-formed frame arrived that this side of the protocol did not expect."""

    reason = "unexpected"


class HandshakeError(NodeError):
    """The `/pmn/act/1.0.0` handshake failed (wrong stage, refused, closed)."""


class RemoteError(NodeError):
    """The remote peer answered with an ERROR frame; the message is its text."""


class PeerBannedError(NodeError):
    """The peer's score fell below the ban threshold; it is no longer served."""


class PeerLostError(NodeError):
    """A pipeline neighbour disappeared or stopped answering within the configured timeouts."""

    def __init__(self, message: str, peer: str = "", stage: int = -1) -> None:
        super().__init__(message)
        self.peer = peer  # peer id of the neighbour that was lost ("" if none was ever found)
        self.stage = stage  # stage index that neighbour served


class DiscoveryError(NodeError):
    """No usable peer for a needed stage was found within the discovery timeout."""


class DataMismatchError(NodeError):
    """The node's local dataset or tokenizer is missing or differs from the spec's [data] (both hashes named)."""


class CheckpointError(NodeError):
    """A checkpoint is missing, does not match its manifest, or belongs to another model/stage."""


class ReceiptRejectedError(FrameError):
    """The sender's receipt signature on a data frame is missing or does not verify."""

    reason = "receipt"


class AveragingError(NodeError):
    """A stage peer's contribution or commit could not be exchanged or combined."""


class DelegationError(NodeError):
    """A head replica's delegation link (`/pmn/delegate/1.0.0`) broke the protocol or could not be opened."""


class StateSyncError(NodeError):
    """A joining replica could not fetch its stage's state from a peer."""


class NoReplicaError(PeerLostError):
    """No usable replica of the next stage was available within `replicas.no_replica_timeout_s`."""


class UpstreamLostError(PeerLostError):
    """No replica of the previous stage kept a channel open to this replica within `replicas.no_replica_timeout_s`
    (the head stage or the whole upstream pipeline is gone: a non-head replica stops instead of waiting forever)."""


class ResyncNeededError(NodeError):
    """A replica fell behind further than its stage peers keep contributions: fetch the stage state again."""


class StateLostError(NodeError):
    """Every live holder of the stage's newer state is gone (`node.replicas.rollback` decides whether the swarm
    rewinds to an earlier step or the replica stops)."""

    def __init__(self, message: str, step: int, lost: tuple[str, ...]) -> None:
        super().__init__(message)
        self.step = step  # the first step this replica has not applied
        self.lost = lost  # the peers last known to hold the newer state


class RollbackError(NodeError):
    """The swarm rewinds (`node.replicas.rollback`): this replica restarts its stage from `step`."""

    def __init__(self, message: str, gen: int, step: int, by: str, lost: tuple[str, ...], stage: int) -> None:
        super().__init__(message)
        self.gen = gen  # the new rollback generation
        self.step = step  # the step every stage restarts from
        self.stage = stage  # the stage whose newer state was lost
        self.by = by  # the peer that announced it ("" = this node)
        self.lost = lost  # the peers whose state was lost (known to the node that started it)


class NotAuthorizedError(NodeError):
    """The access policy refused a peer on a protocol (the message never names what the node trains)."""

    peer_at_fault = True  # counted against the peer's score (see ChainUnavailableError for the exception)


class ChainUnavailableError(NotAuthorizedError):
    """The chain did not answer (or failed) while a request was being authorized: the request is refused,
    but an outage is not the peer's fault, so it is not counted against it."""

    peer_at_fault = False


class OtherGenerationError(NotAuthorizedError):
    """The peer is a replica of our model and stage in another rollback generation: refused until one of the two
    follows the other, and not counted against it (an honest replica is in another generation for a moment)."""

    peer_at_fault = False


class MessageRejectedError(NodeError):
    """A protocol message was refused before or while it was parsed (size, nesting, type, timeout)."""


class PeerRefusedError(NodeError):
    """A peer was refused a stream: it is banned, or holds too many open streams on the protocol."""
