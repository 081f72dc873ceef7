"""EIP-712 messages of docs/ARCHITECTURE.md (Registration, EpochRoot, Fraud, RootFraud), signed with eth-account."""

from __future__ import annotations

from typing import Any

from eth_abi import encode as abi_encode
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_utils import keccak, to_checksum_address

LEDGER_DOMAIN_NAME = "PMN ContributionLedger"
REGISTRY_DOMAIN_NAME = "PMN NodeRegistry"
DOMAIN_VERSION = "1"

_DOMAIN_TYPE = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]
REGISTRATION_TYPE = [
    {"name": "operator", "type": "address"},
    {"name": "nodeKey", "type": "address"},
    {"name": "capacity", "type": "uint256"},
    {"name": "nonce", "type": "uint256"},
]
EPOCH_ROOT_TYPE = [
    {"name": "modelId", "type": "uint256"},
    {"name": "epoch", "type": "uint64"},
    {"name": "root", "type": "bytes32"},
    {"name": "totalUnits", "type": "uint256"},
    {"name": "receiptsHash", "type": "bytes32"},
]
FRAUD_TYPE = [
    {"name": "modelId", "type": "uint256"},
    {"name": "epoch", "type": "uint64"},
    {"name": "node", "type": "address"},
    {"name": "evidence", "type": "bytes32"},
]
ROOT_FRAUD_TYPE = [
    {"name": "modelId", "type": "uint256"},
    {"name": "epoch", "type": "uint64"},
    {"name": "root", "type": "bytes32"},
    {"name": "evidence", "type": "bytes32"},
]
ZERO_ADDRESS = "0x" + "00" * 20


def _typed(domain_name: str, chain_id: int, contract: str, primary: str, fields: list[dict[str, str]],
           message: dict[str, Any]) -> dict[str, Any]:
    return {
        "types": {"EIP712Domain": _DOMAIN_TYPE, primary: fields},
        "primaryType": primary,
        "domain": {
            "name": domain_name,
            "version": DOMAIN_VERSION,
            "chainId": chain_id,
            "verifyingContract": to_checksum_address(contract),
        },
        "message": message,
    }


def registration_typed_data(chain_id: int, registry: str, operator: str, node_key: str, capacity: int,
                            nonce: int) -> dict[str, Any]:
    """Registration(operator, nodeKey, capacity, nonce) in the NodeRegistry domain."""
    return _typed(REGISTRY_DOMAIN_NAME, chain_id, registry, "Registration", REGISTRATION_TYPE, {
        "operator": to_checksum_address(operator),
        "nodeKey": to_checksum_address(node_key),
        "capacity": capacity,
        "nonce": nonce,
    })


def epoch_root_typed_data(chain_id: int, ledger: str, model_id: int, epoch: int, root: bytes, total_units: int,
                          receipts_hash: bytes) -> dict[str, Any]:
    """EpochRoot(modelId, epoch, root, totalUnits, receiptsHash) in the ContributionLedger domain."""
    return _typed(LEDGER_DOMAIN_NAME, chain_id, ledger, "EpochRoot", EPOCH_ROOT_TYPE, {
        "modelId": model_id,
        "epoch": epoch,
        "root": bytes(root),
        "totalUnits": total_units,
        "receiptsHash": bytes(receipts_hash),
    })


def fraud_typed_data(chain_id: int, ledger: str, model_id: int, epoch: int, node: str | None,
                     evidence: bytes) -> dict[str, Any]:
    """Fraud(modelId, epoch, node, evidence); node None (address 0) condemns the whole root."""
    return _typed(LEDGER_DOMAIN_NAME, chain_id, ledger, "Fraud", FRAUD_TYPE, {
        "modelId": model_id,
        "epoch": epoch,
        "node": to_checksum_address(node or ZERO_ADDRESS),
        "evidence": bytes(evidence),
    })


def root_fraud_typed_data(chain_id: int, ledger: str, model_id: int, epoch: int, root: bytes,
                          evidence: bytes) -> dict[str, Any]:
    """RootFraud(modelId, epoch, root, evidence): a verdict that voids the named root of an epoch."""
    return _typed(LEDGER_DOMAIN_NAME, chain_id, ledger, "RootFraud", ROOT_FRAUD_TYPE, {
        "modelId": model_id,
        "epoch": epoch,
        "root": bytes(root),
        "evidence": bytes(evidence),
    })


def digest(typed: dict[str, Any]) -> bytes:
    """The 32-byte EIP-712 digest of a typed-data message."""
    signable = encode_typed_data(full_message=typed)
    return keccak(b"\x19" + signable.version + signable.header + signable.body)


def sign(account: LocalAccount, typed: dict[str, Any]) -> bytes:
    """A 65-byte signature (r, s, v) of the typed data."""
    return bytes(account.sign_message(encode_typed_data(full_message=typed)).signature)


def sign_quorum(accounts: list[LocalAccount], typed: dict[str, Any]) -> list[bytes]:
    """Signatures of every account, ordered by strictly increasing signer address (as the quorum wants)."""
    ordered = sorted({a.address: a for a in accounts}.values(), key=lambda a: int(a.address, 16))
    return [sign(a, typed) for a in ordered]


def recover(typed: dict[str, Any], signature: bytes) -> str:
    """The address that signed the typed data."""
    return str(Account.recover_message(encode_typed_data(full_message=typed), signature=signature))


def leaf_hash(model_id: int, epoch: int, node: str, units: int) -> bytes:
    """The Merkle leaf of a contribution (OpenZeppelin StandardMerkleTree double hash)."""
    inner = keccak(abi_encode(["uint256", "uint64", "address", "uint256"],
                              [model_id, epoch, to_checksum_address(node), units]))
    return keccak(inner)
