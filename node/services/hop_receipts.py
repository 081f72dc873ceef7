"""EIP-712 hop receipts on the activation protocol (a `ReceiptHook` built on `protocol.receipts`).

The sender signs a Receipt over the frame digest (sha256 of window + payload, which is
`protocol.receipts.payload_digest`) and ships the signature in the frame; the receiver checks it
and countersigns in the ACK; the sender then holds a cosigned receipt for the epoch accounting.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from eth_account.signers.local import LocalAccount

from node.errors import ReceiptRejectedError
from node.wire import frames
from protocol.errors import ProtocolError
from protocol.receipts import (
    BACKWARD,
    FORWARD,
    RECEIPT_TYPES,
    Domain,
    Receipt,
    SignedReceipt,
    countersign,
    recover_typed,
    sign_receipt,
)


class EIP712Receipts:
    """Signs outgoing and countersigns incoming data frames with the node key."""

    def __init__(
        self,
        account: LocalAccount,
        domain: Domain,
        model_id: int,
        tokens_per_microbatch: int,
        epoch_of_step: Callable[[int], int] = lambda step: 0,
        on_cosigned: Callable[[SignedReceipt], None] | None = None,
        generation: Callable[[], tuple[int, int]] = lambda: (0, 0),
    ) -> None:
        self.account = account  # the node key (its address is the receipt sender/receiver)
        self.domain = domain  # ContributionLedger EIP-712 domain
        self.model_id = model_id  # on-chain model id
        self.tokens = tokens_per_microbatch  # tokens each hop carries
        self.epoch_of_step = epoch_of_step  # accounting epoch of a global step
        self.on_cosigned = on_cosigned  # called with each receipt once both signatures are in
        # the rollback generation (number, step) the node trains in now (`Receipt.generation`): both ends of a hop
        # are in the same one (a channel from a peer of another generation is refused), so both sign the same receipt
        self.generation = generation
        self.sent: dict[tuple[int, int, int, bytes], SignedReceipt] = {}  # awaiting countersignature
        self.cosigned: list[SignedReceipt] = []  # receipts we sent, countersigned by the receiver
        self.received: list[SignedReceipt] = []  # receipts we countersigned as the receiver

    def _receipt(self, header: frames.FrameHeader, sender: str, receiver: str) -> Receipt:
        direction = FORWARD if header.kind == frames.Kind.ACTIVATION else BACKWARD
        gen, rewound_to = self.generation()
        return Receipt(model_id=self.model_id, epoch=self.epoch_of_step(header.step), step=header.step,
                       microbatch=header.microbatch, stage=header.stage, direction=direction, sender=sender,
                       receiver=receiver, payload_digest=header.digest, tokens=self.tokens, rollback_gen=gen,
                       rollback_step=rewound_to)

    def sign(self, header: frames.FrameHeader, peer_address: str) -> bytes:
        signed = sign_receipt(self._receipt(header, self.account.address, peer_address), self.domain, self.account)
        self.sent[(int(header.kind), header.step, header.microbatch, header.digest)] = signed
        return signed.sender_signature

    def countersign(self, header: frames.FrameHeader, signature: bytes, peer_address: str) -> bytes:
        try:
            receipt = self._receipt(header, peer_address, self.account.address)
            signed = countersign(SignedReceipt(receipt, self.domain, signature), self.account)
        except (ProtocolError, ValueError) as exc:
            raise ReceiptRejectedError(f"receipt for step {header.step} mb {header.microbatch} rejected: {exc}") from exc
        self.received.append(signed)
        assert signed.receiver_signature is not None
        return signed.receiver_signature

    def on_ack(self, header: frames.FrameHeader, countersignature: bytes, peer_address: str) -> None:
        signed = self.sent.pop((int(header.kind), header.step, header.microbatch, header.digest), None)
        if signed is None or not countersignature:
            return
        signer = recover_typed(self.domain, RECEIPT_TYPES, signed.receipt.message(), countersignature,
                               "receiverSignature")
        if signer != signed.receipt.receiver:
            raise ReceiptRejectedError(f"countersignature recovers to {signer}, not the receiver {signed.receipt.receiver}")
        done = replace(signed, receiver_signature=countersignature)
        self.cosigned.append(done)
        if self.on_cosigned is not None:
            self.on_cosigned(done)
