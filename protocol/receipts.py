"""EIP-712 hop receipts: build, sign (sender), countersign (receiver), verify.

Type and domain are fixed by docs/ARCHITECTURE.md:
``Receipt(uint256 modelId,uint64 epoch,uint64 step,uint32 microbatch,uint16 stage,uint8 direction,
address sender,address receiver,bytes32 payloadDigest,uint32 tokens,uint32 rollbackGen,uint64 rollbackStep)`` under the
domain
``name="PMN ContributionLedger", version="1", chainId, verifyingContract``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from blake3 import blake3
from eth_account import Account
from eth_account.messages import SignableMessage, encode_typed_data
from eth_keys.datatypes import PrivateKey
from eth_utils import is_address, keccak, to_checksum_address

from protocol.errors import (
    DomainError,
    FieldError,
    ReceiptError,
    ReplayError,
    SignatureError,
    UnregisteredKeyError,
)

DOMAIN_NAME = "PMN ContributionLedger"
DOMAIN_VERSION = "1"
FORWARD = 0
BACKWARD = 1

RECEIPT_TYPES: dict[str, list[dict[str, str]]] = {
    "Receipt": [
        {"name": "modelId", "type": "uint256"},
        {"name": "epoch", "type": "uint64"},
        {"name": "step", "type": "uint64"},
        {"name": "microbatch", "type": "uint32"},
        {"name": "stage", "type": "uint16"},
        {"name": "direction", "type": "uint8"},
        {"name": "sender", "type": "address"},
        {"name": "receiver", "type": "address"},
        {"name": "payloadDigest", "type": "bytes32"},
        {"name": "tokens", "type": "uint32"},
        {"name": "rollbackGen", "type": "uint32"},
        {"name": "rollbackStep", "type": "uint64"},
    ]
}

_UINT_FIELDS = {  # attribute -> (EIP-712 field name, bit width)
    "model_id": ("modelId", 256),
    "epoch": ("epoch", 64),
    "step": ("step", 64),
    "microbatch": ("microbatch", 32),
    "stage": ("stage", 16),
    "direction": ("direction", 8),
    "tokens": ("tokens", 32),
    "rollback_gen": ("rollbackGen", 32),
    "rollback_step": ("rollbackStep", 64),
}


def payload_digest(payload: bytes, window: bytes = b"") -> bytes:
    """The `payloadDigest` of a hop: BLAKE3 over the token-window bytes then the codec payload bytes.

    Same definition as the wire frame digest of `node.wire.frames`, so a frame's digest is its receipt's digest.
    """
    h = blake3()
    h.update(window)
    h.update(payload)
    return h.digest()


def check_uint(field: str, value: Any, bits: int, error: type[FieldError] = ReceiptError) -> int:
    """Return `value` if it is an int in [0, 2**bits), else raise `error` naming `field`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(field, f"must be an integer, got {type(value).__name__}")
    if value < 0 or value >= 1 << bits:
        raise error(field, f"{value} is out of range for uint{bits}")
    return value


def check_address(field: str, value: Any, error: type[FieldError] = ReceiptError) -> str:
    """Return the checksummed form of `value`, or raise `error` naming `field`."""
    address = _checksummed(value) if isinstance(value, str) else None
    if address is None:
        raise error(field, f"{value!r} is not a 20-byte hex address")
    if int(address, 16) == 0:
        raise error(field, "the zero address is not a node key")
    return address


@functools.lru_cache(maxsize=1024)
def _checksummed(value: str) -> str | None:
    """The checksummed form of a hex address, None if it is none (cached: every frame's receipt names the same
    few neighbours)."""
    return to_checksum_address(value) if is_address(value) else None


def check_bytes32(field: str, value: Any, error: type[FieldError] = ReceiptError) -> bytes:
    """Return `value` if it is exactly 32 bytes, else raise `error` naming `field`."""
    if not isinstance(value, bytes | bytearray) or len(value) != 32:
        raise error(field, "must be exactly 32 bytes")
    return bytes(value)


@dataclass(frozen=True)
class Domain:
    """The EIP-712 domain of the ContributionLedger that receipts, roots and verdicts are bound to."""

    chain_id: int  # EVM chain id the ledger lives on
    verifying_contract: str  # ContributionLedger address (checksummed)

    def __post_init__(self) -> None:
        check_uint("chainId", self.chain_id, 256, DomainError)
        object.__setattr__(
            self, "verifying_contract", check_address("verifyingContract", self.verifying_contract, DomainError)
        )

    def to_eip712(self) -> dict[str, Any]:
        """The domain as eth-account's `encode_typed_data` expects it."""
        return {
            "name": DOMAIN_NAME,
            "version": DOMAIN_VERSION,
            "chainId": self.chain_id,
            "verifyingContract": self.verifying_contract,
        }

    def require_equal(self, other: Domain) -> None:
        """Raise `DomainError` naming the first field in which `other` differs from this domain."""
        if other.chain_id != self.chain_id:
            raise DomainError("chainId", f"signed for chain {other.chain_id}, expected {self.chain_id}")
        if other.verifying_contract != self.verifying_contract:
            raise DomainError(
                "verifyingContract",
                f"signed for {other.verifying_contract}, expected {self.verifying_contract}",
            )


def typed_digest(domain: Domain, types: dict[str, list[dict[str, str]]], message: dict[str, Any]) -> bytes:
    """The 32-byte EIP-712 digest (what ecrecover sees) of `message` under `domain`."""
    return _signable_digest(_signable(domain, types, message))


def _signable_digest(signable: SignableMessage) -> bytes:
    return keccak(b"\x19" + signable.version + signable.header + signable.body)


def _signable(domain: Domain, types: dict[str, list[dict[str, str]]], message: dict[str, Any]) -> SignableMessage:
    """The EIP-712 message as eth-account signs and recovers it. A flat struct of static fields (every receipt,
    epoch root and fraud proof) is hashed from its fields' 32-byte ABI words under the cached domain separator:
    eth-account's general encoder costs about 0.35 ms a message, and every activation frame signs or recovers four.
    Anything else, or a value of an unexpected Python type, goes through `encode_typed_data`."""
    fields = _static_fields(types)
    if fields is not None and message.keys() == {name for name, _ in fields}:
        words = [_word(kind, message[name]) for name, kind in fields]
        if all(w is not None for w in words):
            body = keccak(_type_hash(types) + b"".join(w for w in words if w is not None))
            return SignableMessage(b"\x01", _domain_separator(domain), body)
    return encode_typed_data(domain.to_eip712(), types, message)


_STATIC_KINDS = re.compile(r"(uint(8|16|32|64|128|256)|address|bool|bytes32)")  # fast-path field types


def _static_fields(types: dict[str, list[dict[str, str]]]) -> tuple[tuple[str, str], ...] | None:
    """(name, type) of a single struct type whose fields are all static; None for anything else."""
    if len(types) != 1:
        return None
    (fields,) = types.values()
    out = tuple((f["name"], f["type"]) for f in fields)
    return out if all(_STATIC_KINDS.fullmatch(kind) for _, kind in out) else None


def _word(kind: str, value: Any) -> bytes | None:
    """The 32-byte ABI word of a static field's value, or None when the value is not of the plain Python type and
    range the fast path encodes (an int in range for uintN, a 0x-hex address, a bool, 32 bytes): such a value goes
    to the general encoder, which accepts other forms and names what is wrong."""
    if kind.startswith("uint"):
        ok = type(value) is int and 0 <= value < 1 << int(kind[4:])
        return value.to_bytes(32, "big") if ok else None
    if kind == "address":
        return _address_word(value) if isinstance(value, str) else None
    if kind == "bool":
        return (b"\x00" * 31 + (b"\x01" if value else b"\x00")) if type(value) is bool else None
    return bytes(value) if isinstance(value, bytes) and len(value) == 32 else None


def _address_word(address: str) -> bytes | None:
    """The ABI word of a 0x-hex address (checked through the cache of `check_address`)."""
    ok = len(address) == 42 and address[:2] in ("0x", "0X") and _checksummed(address) is not None
    return bytes(12) + bytes.fromhex(address[2:]) if ok else None


@functools.lru_cache(maxsize=16)
def _type_hash_of(encoded_type: str) -> bytes:
    return keccak(text=encoded_type)


def _type_hash(types: dict[str, list[dict[str, str]]]) -> bytes:
    """keccak of the struct's type string, e.g. `Receipt(uint256 modelId,...)`."""
    (name, fields), = types.items()
    return _type_hash_of(f"{name}(" + ",".join(f"{f['type']} {f['name']}" for f in fields) + ")")


@functools.lru_cache(maxsize=16)
def _domain_separator(domain: Domain) -> bytes:
    """hashStruct of the EIP712Domain (name, version, chainId, verifyingContract)."""
    return keccak(keccak(text="EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)")
                  + keccak(text=DOMAIN_NAME) + keccak(text=DOMAIN_VERSION)
                  + domain.chain_id.to_bytes(32, "big") + bytes(12) + bytes.fromhex(domain.verifying_contract[2:]))


def sign_typed(domain: Domain, types: dict[str, list[dict[str, str]]], message: dict[str, Any], key: Any) -> bytes:
    """Sign an EIP-712 message with `key` (private key bytes/hex or an eth-account account); 65 bytes."""
    signable = _signable(domain, types, message)
    raw = _key(key)
    if not isinstance(raw, bytes | bytearray) or len(raw) != 32:  # hex strings and other forms: eth-account's
        return bytes(Account.sign_message(signable, private_key=raw).signature)
    sig = _signing_key(bytes(raw)).sign_msg_hash(_signable_digest(signable))
    return sig.to_bytes()[:64] + bytes([27 + sig.v])  # r, s, v as eth-account writes them (v = 27 + recovery id)


def recover_typed(
    domain: Domain, types: dict[str, list[dict[str, str]]], message: dict[str, Any], signature: bytes, field: str
) -> str:
    """Recover the signer of an EIP-712 message; a malformed signature raises `SignatureError(field)`."""
    if not isinstance(signature, bytes | bytearray) or len(signature) != 65:
        raise SignatureError(field, "must be a 65-byte secp256k1 signature")
    try:
        address = Account.recover_message(_signable(domain, types, message), signature=bytes(signature))
    except Exception as exc:  # eth-keys raises several types for bad r/s/v
        raise SignatureError(field, f"cannot recover a signer: {exc}") from exc
    return to_checksum_address(address)


def _key(key: Any) -> Any:
    return getattr(key, "key", key)


def key_address(key: Any) -> str:
    """The checksummed address of a private key or account."""
    raw = _key(key)
    if isinstance(raw, bytes | bytearray) and len(raw) == 32:
        return _address_of(bytes(raw))
    return to_checksum_address(Account.from_key(raw).address)


@functools.lru_cache(maxsize=8)
def _address_of(key: bytes) -> str:
    """The address of a node's own key, derived once from its cached key object."""
    return _signing_key(key).public_key.to_checksum_address()


@functools.lru_cache(maxsize=8)
def _signing_key(key: bytes) -> PrivateKey:
    """The node's own key as an eth-keys object, built once (eth-account rebuilds it, public key included, at
    every signature); its address too comes from here (`key_address`)."""
    return PrivateKey(key)




@dataclass(frozen=True)
class Receipt:
    """One microbatch hop between neighbouring stages; see the module docstring for the type."""

    model_id: int  # on-chain model id
    epoch: int  # accounting epoch
    step: int  # optimizer step
    microbatch: int  # microbatch index within the step
    stage: int  # stage index of the sender
    direction: int  # 0 = forward (to stage+1), 1 = backward (to stage-1)
    sender: str  # node key address of the sending stage
    receiver: str  # node key address of the receiving stage
    payload_digest: bytes  # BLAKE3 of the token window + payload bytes (activation or gradient), see payload_digest
    tokens: int  # tokens in the microbatch
    # the rollback generation the hop was computed in (replicated mode, `node.replicas.rollback`): its number and the
    # step it rewound to (0, 0 for generation 0). Steps >= rollbackStep are numbered again after a rollback: the
    # generation tells an attester which run's records (parameters, received frames) the hop must be checked against
    rollback_gen: int = 0
    rollback_step: int = 0

    def __post_init__(self) -> None:
        for name, (field, bits) in _UINT_FIELDS.items():
            check_uint(field, getattr(self, name), bits)
        if self.direction not in (FORWARD, BACKWARD):
            raise ReceiptError("direction", f"must be 0 (forward) or 1 (backward), got {self.direction!r}")
        if self.direction == BACKWARD and self.stage == 0:
            raise ReceiptError("stage", "stage 0 has no previous stage to send a backward hop to")
        object.__setattr__(self, "sender", check_address("sender", self.sender))
        object.__setattr__(self, "receiver", check_address("receiver", self.receiver))
        if self.sender == self.receiver:
            raise ReceiptError("receiver", "a node cannot receive its own hop")
        object.__setattr__(self, "payload_digest", check_bytes32("payloadDigest", self.payload_digest))
        if self.tokens == 0:
            raise ReceiptError("tokens", "a hop carries at least one token")
        if self.rollback_gen == 0 and self.rollback_step != 0:
            raise ReceiptError("rollbackStep", f"generation 0 rewound to no step, got {self.rollback_step}")

    @property
    def key(self) -> tuple[int, int, int, int, int, int]:
        """The replay key: (modelId, epoch, step, microbatch, stage, direction)."""
        return (self.model_id, self.epoch, self.step, self.microbatch, self.stage, self.direction)

    @property
    def generation(self) -> tuple[int, int]:
        """(rollbackGen, rollbackStep): the run of the swarm the hop belongs to."""
        return (self.rollback_gen, self.rollback_step)

    @property
    def receiver_stage(self) -> int:
        """Stage index of the receiver."""
        return self.stage + 1 if self.direction == FORWARD else self.stage - 1

    def message(self) -> dict[str, Any]:
        """The EIP-712 message dict."""
        return {
            "modelId": self.model_id,
            "epoch": self.epoch,
            "step": self.step,
            "microbatch": self.microbatch,
            "stage": self.stage,
            "direction": self.direction,
            "sender": self.sender,
            "receiver": self.receiver,
            "payloadDigest": self.payload_digest,
            "tokens": self.tokens,
            "rollbackGen": self.rollback_gen,
            "rollbackStep": self.rollback_step,
        }

    def digest(self, domain: Domain) -> bytes:
        """The EIP-712 digest both parties sign."""
        return typed_digest(domain, RECEIPT_TYPES, self.message())

    def to_json(self) -> dict[str, Any]:
        """JSON-safe dict (modelId as a decimal string, bytes as 0x-hex)."""
        message = self.message()
        message["modelId"] = str(self.model_id)
        message["payloadDigest"] = "0x" + self.payload_digest.hex()
        return message

    @classmethod
    def from_json(cls, data: Any) -> Receipt:
        """Parse `to_json` output; every problem raises `ReceiptError` naming the field."""
        if not isinstance(data, dict):
            raise ReceiptError("receipt", "must be a JSON object")
        missing = [f["name"] for f in RECEIPT_TYPES["Receipt"] if f["name"] not in data]
        if missing:
            raise ReceiptError(missing[0], "is missing")
        model_id = data["modelId"]
        if isinstance(model_id, str):
            if not model_id.isdigit():
                raise ReceiptError("modelId", f"{model_id!r} is not a decimal integer")
            model_id = int(model_id)
        return cls(
            model_id=model_id,
            epoch=data["epoch"],
            step=data["step"],
            microbatch=data["microbatch"],
            stage=data["stage"],
            direction=data["direction"],
            sender=data["sender"],
            receiver=data["receiver"],
            payload_digest=_hex_bytes("payloadDigest", data["payloadDigest"]),
            tokens=data["tokens"],
            rollback_gen=data["rollbackGen"],
            rollback_step=data["rollbackStep"],
        )


def _hex_bytes(field: str, value: Any) -> bytes:
    if not isinstance(value, str) or not value.startswith("0x"):
        raise ReceiptError(field, "must be a 0x-prefixed hex string")
    try:
        return bytes.fromhex(value[2:])
    except ValueError as exc:
        raise ReceiptError(field, f"is not valid hex: {exc}") from exc


@dataclass(frozen=True)
class SignedReceipt:
    """A receipt with the domain it was signed for, the sender's and (once acknowledged) the receiver's signature."""

    receipt: Receipt  # the signed content
    domain: Domain  # domain the signatures claim to be over
    sender_signature: bytes  # 65-byte signature by `receipt.sender`
    receiver_signature: bytes | None = None  # 65-byte countersignature by `receipt.receiver`, None until acked

    @property
    def cosigned(self) -> bool:
        """True once the receiver has countersigned."""
        return self.receiver_signature is not None

    def to_json(self) -> dict[str, Any]:
        """JSON-safe dict of the receipt, its domain and signatures."""
        return {
            "receipt": self.receipt.to_json(),
            "chainId": self.domain.chain_id,
            "verifyingContract": self.domain.verifying_contract,
            "senderSignature": "0x" + self.sender_signature.hex(),
            "receiverSignature": None if self.receiver_signature is None else "0x" + self.receiver_signature.hex(),
        }

    @classmethod
    def from_json(cls, data: Any) -> SignedReceipt:
        """Parse `to_json` output; problems raise errors naming the field."""
        if not isinstance(data, dict):
            raise ReceiptError("signedReceipt", "must be a JSON object")
        for name in ("receipt", "chainId", "verifyingContract", "senderSignature"):
            if name not in data:
                raise ReceiptError(name, "is missing")
        receiver_sig = data.get("receiverSignature")
        return cls(
            receipt=Receipt.from_json(data["receipt"]),
            domain=Domain(data["chainId"], data["verifyingContract"]),
            sender_signature=_hex_bytes("senderSignature", data["senderSignature"]),
            receiver_signature=None if receiver_sig is None else _hex_bytes("receiverSignature", receiver_sig),
        )


def sign_receipt(receipt: Receipt, domain: Domain, key: Any) -> SignedReceipt:
    """Sign `receipt` as its sender; `key` must belong to `receipt.sender`."""
    if key_address(key) != receipt.sender:
        raise SignatureError("sender", f"the signing key is {key_address(key)}, not the sender {receipt.sender}")
    return SignedReceipt(receipt, domain, sign_typed(domain, RECEIPT_TYPES, receipt.message(), key))


def countersign(signed: SignedReceipt, key: Any) -> SignedReceipt:
    """Countersign as the receiver after checking the sender's signature; `key` must belong to the receiver."""
    receipt = signed.receipt
    if key_address(key) != receipt.receiver:
        raise SignatureError(
            "receiver", f"the signing key is {key_address(key)}, not the receiver {receipt.receiver}"
        )
    signer = recover_typed(signed.domain, RECEIPT_TYPES, receipt.message(), signed.sender_signature, "senderSignature")
    if signer != receipt.sender:
        raise SignatureError("senderSignature", f"recovers to {signer}, not the sender {receipt.sender}")
    return replace(signed, receiver_signature=sign_typed(signed.domain, RECEIPT_TYPES, receipt.message(), key))


class KeyRegistry(Protocol):
    """Answers whether an address is a registered node key (a set in tests, the NodeRegistry on chain)."""

    def is_registered(self, address: str) -> bool:
        """True if `address` (checksummed) is a registered node key."""
        ...


class StaticKeyRegistry:
    """A fixed set of registered node-key addresses."""

    def __init__(self, addresses: Iterable[str]) -> None:
        self._addresses = {to_checksum_address(a) for a in addresses}

    def is_registered(self, address: str) -> bool:
        """True if `address` is in the set."""
        return to_checksum_address(address) in self._addresses


def verify_signed_receipt(
    signed: SignedReceipt, domain: Domain, registry: KeyRegistry, require_cosigned: bool = True
) -> None:
    """Check domain, sender and receiver signatures and registration; raise naming the failing field.

    Does not check replay; use `ReceiptVerifier` (or the store) for that.
    """
    domain.require_equal(signed.domain)
    receipt = signed.receipt
    message = receipt.message()
    signer = recover_typed(domain, RECEIPT_TYPES, message, signed.sender_signature, "senderSignature")
    if signer != receipt.sender:
        raise SignatureError("senderSignature", f"recovers to {signer}, not the sender {receipt.sender}")
    if not registry.is_registered(receipt.sender):
        raise UnregisteredKeyError("sender", f"{receipt.sender} is not a registered node key")
    if signed.receiver_signature is None:
        if require_cosigned:
            raise SignatureError("receiverSignature", "missing: the receiver has not countersigned")
        return
    cosigner = recover_typed(domain, RECEIPT_TYPES, message, signed.receiver_signature, "receiverSignature")
    if cosigner != receipt.receiver:
        raise SignatureError("receiverSignature", f"recovers to {cosigner}, not the receiver {receipt.receiver}")
    if not registry.is_registered(receipt.receiver):
        raise UnregisteredKeyError("receiver", f"{receipt.receiver} is not a registered node key")


class ReceiptVerifier:
    """Verifies receipts against one domain and registry, rejecting replays of an accepted key."""

    def __init__(self, domain: Domain, registry: KeyRegistry, require_cosigned: bool = True) -> None:
        self.domain = domain
        self.registry = registry
        self.require_cosigned = require_cosigned
        self._seen: set[tuple[int, int, int, int, int, int]] = set()

    def accept(self, signed: SignedReceipt) -> None:
        """Verify `signed` and remember its key; a rejected receipt leaves the verifier unchanged."""
        if signed.receipt.key in self._seen:
            raise ReplayError("receipt", f"a receipt for {_key_text(signed.receipt.key)} was already accepted")
        verify_signed_receipt(signed, self.domain, self.registry, self.require_cosigned)
        self._seen.add(signed.receipt.key)

    def __len__(self) -> int:
        return len(self._seen)


def _key_text(key: tuple[int, ...]) -> str:
    names = ("modelId", "epoch", "step", "microbatch", "stage", "direction")
    return ", ".join(f"{n}={v}" for n, v in zip(names, key, strict=True))
