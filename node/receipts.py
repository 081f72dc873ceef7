"""EIP-712 receipts for every microbatch hop, plugged into the activation channel as its `ReceiptHook`.

The sender signs a `protocol.receipts.Receipt` over the frame digest when it sends a data frame; the
receiver verifies that signature (registered key, right domain, no replay) and countersigns in its ack;
the sender stores the co-signed receipt when the ack arrives, the receiver stores it when it countersigns.
So both ends of a hop hold the same co-signed receipt in their sqlite store, and an attester can collect
an epoch's receipts from any of them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from eth_account.signers.local import LocalAccount

from node import frames as F
from node.errors import FrameError
from protocol.errors import ProtocolError
from protocol.receipts import (
    BACKWARD,
    FORWARD,
    Domain,
    KeyRegistry,
    Receipt,
    SignedReceipt,
    countersign,
    sign_receipt,
)
from protocol.store import ReceiptStore


class ReceiptRejectedError(FrameError):
    """A data frame's receipt signature did not verify (wrong key, domain, unregistered sender, replay)."""


@dataclass(frozen=True)
class ReceiptContext:
    """What a node needs to sign receipts for one model."""

    model_id: int  # on-chain model id
    epoch_length: int  # training steps per accounting epoch (model terms)
    tokens_per_microbatch: int  # microbatch_size * seq_len: the tokens a hop carries
    domain: Domain  # ContributionLedger EIP-712 domain (chain id + ledger address)


class ChainReceipts:
    """`ReceiptHook` that signs, countersigns and stores receipts (thread-safe: the channel may call it from threads)."""

    def __init__(self, ctx: ReceiptContext, account: LocalAccount, store: ReceiptStore,
                 registry: KeyRegistry) -> None:
        if ctx.epoch_length < 1:
            raise ValueError(f"epoch_length must be >= 1, got {ctx.epoch_length}")
        self.ctx = ctx
        self.account = account
        self.store = store
        self.registry = registry
        self._pending: dict[tuple[int, ...], SignedReceipt] = {}
        self._lock = threading.Lock()
        self.rejected = 0  # incoming signatures refused

    def _receipt(self, header: F.FrameHeader, sender: str, receiver: str) -> Receipt:
        direction = FORWARD if header.kind == F.Kind.ACTIVATION else BACKWARD
        return Receipt(model_id=self.ctx.model_id, epoch=header.step // self.ctx.epoch_length, step=header.step,
                       microbatch=header.microbatch, stage=header.stage, direction=direction, sender=sender,
                       receiver=receiver, payload_digest=header.digest, tokens=self.ctx.tokens_per_microbatch)

    def sign(self, header: F.FrameHeader, peer_address: str) -> bytes:
        signed = sign_receipt(self._receipt(header, self.account.address, peer_address), self.ctx.domain, self.account)
        with self._lock:
            self._pending[signed.receipt.key] = signed
        return signed.sender_signature

    def countersign(self, header: F.FrameHeader, signature: bytes, peer_address: str) -> bytes:
        try:
            if not self.registry.is_registered(peer_address):
                raise ProtocolError(f"sender {peer_address} is not a registered node key")
            signed = SignedReceipt(self._receipt(header, peer_address, self.account.address), self.ctx.domain,
                                   bytes(signature))
            cosigned = countersign(signed, self.account)
            with self._lock:
                self.store.add(cosigned, require_cosigned=True)
        except (ProtocolError, ValueError) as exc:
            self.rejected += 1
            raise ReceiptRejectedError(f"receipt for step {header.step} microbatch {header.microbatch} from stage "
                                       f"{header.stage} rejected: {exc}") from None
        assert cosigned.receiver_signature is not None
        return cosigned.receiver_signature

    def on_ack(self, header: F.FrameHeader, countersignature: bytes, peer_address: str) -> None:
        key = self._receipt(header, self.account.address, peer_address).key
        with self._lock:
            signed = self._pending.pop(key, None)
            if signed is None or not countersignature:
                return
            try:
                self.store.add(SignedReceipt(signed.receipt, signed.domain, signed.sender_signature,
                                             bytes(countersignature)), require_cosigned=True)
            except ProtocolError:
                self.rejected += 1  # a bad countersignature earns the hop no credit; training goes on
