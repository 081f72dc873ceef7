"""Node identity: an Ed25519 peer key and a secp256k1 node key, tied together by a signed binding.

* peer key (`peer_key.hex`, Ed25519): the libp2p host key. Its public key is the peer id, which the
  Noise handshake authenticates on every connection.
* node key (`node_key.hex`, secp256k1): the node's Ethereum account. It signs EIP-712 receipts and the
  on-chain registration (`nodeKey` in NodeRegistry); the EVM verifies only secp256k1 signatures.
* binding: the node key's EIP-712 signature over the peer id bytes (`bind`). A neighbour that knows a
  peer id from Noise checks with `verify_binding` that the address the peer claims is really its node key.

Both key files hold a hex-encoded 32-byte secret, are written atomically with mode 0600 and are created
on first use; a data dir that only has `node_key.hex` keeps its address and gets a new peer key.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from eth_account import Account
from eth_account.messages import SignableMessage, encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_utils import is_address, to_checksum_address
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID

from node.errors import BindingError, IdentityError

KEY_FILE = "node_key.hex"  # data-dir file of the hex-encoded 32-byte secp256k1 node key (Ethereum account)
PEER_KEY_FILE = "peer_key.hex"  # data-dir file of the hex-encoded 32-byte Ed25519 seed of the libp2p peer key
PEER_KDF_INFO = b"pmn peer key"  # HKDF info that derives a peer seed from a node key (`identity_from_secret`)
BINDING_DOMAIN: dict[str, Any] = {"name": "PMN PeerBinding", "version": "1"}  # EIP-712 domain of bindings
BINDING_TYPES = {"PeerBinding": [{"name": "peerId", "type": "bytes"}]}  # EIP-712 type: the peer id's bytes
_SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


@dataclass(frozen=True)
class NodeIdentity:
    """The node's two keys: the libp2p peer key and the Ethereum node key."""

    secret: bytes  # 32-byte secp256k1 node key (the Ethereum account's private key)
    key_pair: KeyPair  # Ed25519 libp2p peer key pair used by the host (Noise handshake, peer id)
    account: LocalAccount  # eth-account signer of the node key; its address is the node's Ethereum address

    @property
    def peer_id(self) -> ID:
        """libp2p peer id of the Ed25519 peer key."""
        return ID.from_pubkey(self.key_pair.public_key)

    @property
    def address(self) -> str:
        """Checksummed Ethereum address of the node key."""
        return str(self.account.address)


def node_account(secret: bytes) -> LocalAccount:
    """The eth-account signer of a 32-byte secp256k1 node key (IdentityError if it is not a valid key)."""
    if len(secret) != 32:
        raise IdentityError(f"node key must be 32 bytes, got {len(secret)}")
    if not 0 < int.from_bytes(secret, "big") < _SECP256K1_N:
        raise IdentityError("node key is outside the secp256k1 group order")
    account: LocalAccount = Account.from_key(secret)
    return account


def peer_key_pair(seed: bytes) -> KeyPair:
    """The Ed25519 libp2p key pair of a 32-byte seed (IdentityError if it is not one)."""
    if len(seed) != 32:
        raise IdentityError(f"peer key must be a 32-byte Ed25519 seed, got {len(seed)} bytes")
    try:
        return create_new_key_pair(seed)
    except ValueError as exc:
        raise IdentityError(f"peer key seed is not usable: {exc}") from exc


def derive_peer_seed(secret: bytes) -> bytes:
    """A 32-byte Ed25519 seed derived from the node key (HKDF-SHA256, info `PEER_KDF_INFO`)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=PEER_KDF_INFO).derive(secret)


def identity_from_secret(secret: bytes, peer_seed: bytes | None = None) -> NodeIdentity:
    """The identity of a node key and a peer seed (derived from the node key when None: deterministic).

    IdentityError names the key that is not valid.
    """
    account = node_account(secret)
    seed = derive_peer_seed(secret) if peer_seed is None else peer_seed
    return NodeIdentity(secret=secret, key_pair=peer_key_pair(seed), account=account)


def _read_key(path: Path, check: Callable[[bytes], object]) -> bytes | None:
    """The 32-byte secret in `path` after `check` accepted it; None when the file does not exist."""
    if not path.exists():
        return None
    try:
        secret = bytes.fromhex(path.read_text().strip().removeprefix("0x"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise IdentityError(f"{path}: not a hex-encoded key ({exc})") from exc
    try:
        check(secret)
    except IdentityError as exc:
        raise IdentityError(f"{path}: {exc}") from exc
    return secret


def _write_key(path: Path, secret: bytes) -> None:
    """Write `secret` hex-encoded to `path`, mode 0600, atomically (a temp file renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret.hex() + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _new_node_secret() -> bytes:
    while True:
        secret = secrets.token_bytes(32)
        if 0 < int.from_bytes(secret, "big") < _SECP256K1_N:
            return secret


def _load_or_create_key(path: Path, check: Callable[[bytes], object], new: Callable[[], bytes]) -> bytes:
    secret = _read_key(path, check)
    if secret is None:
        secret = new()
        _write_key(path, secret)
    return secret


def load_or_create_identity(data_dir: str | Path) -> NodeIdentity:
    """Load the node key (`node_key.hex`) and the peer key (`peer_key.hex`) from `data_dir`.

    Each is created (mode 0600) when its file is missing; IdentityError names a file that is unreadable
    or does not hold a valid key.
    """
    root = Path(data_dir).expanduser()
    secret = _load_or_create_key(root / KEY_FILE, node_account, _new_node_secret)
    seed = _load_or_create_key(root / PEER_KEY_FILE, peer_key_pair, lambda: secrets.token_bytes(32))
    return identity_from_secret(secret, seed)


# -- binding ------------------------------------------------------------------------------------------


def _binding_message(peer_id: ID) -> SignableMessage:
    return encode_typed_data(BINDING_DOMAIN, BINDING_TYPES, {"peerId": peer_id.to_bytes()})


def bind(identity: NodeIdentity) -> bytes:
    """The node key's 65-byte signature binding the identity's peer id to its Ethereum address."""
    return bytes(identity.account.sign_message(_binding_message(identity.peer_id)).signature)


@lru_cache(maxsize=4096)
def _binding_signer(peer_bytes: bytes, signature: bytes) -> str:
    return str(Account.recover_message(_binding_message(ID(peer_bytes)), signature=signature))


def _peer_id(peer_id: ID | str) -> ID:
    if not isinstance(peer_id, str):
        return peer_id
    try:
        return ID.from_base58(peer_id)
    except Exception as exc:  # base58 / multihash errors come as several types
        raise BindingError(f"peer id {peer_id!r} does not parse: {exc}") from exc


def verify_binding(address: str, peer_id: ID | str, signature: bytes) -> None:
    """Check that the node key of `address` signed the binding of `peer_id` (BindingError says what is wrong)."""
    pid = _peer_id(peer_id)
    if not is_address(address):
        raise BindingError(f"claimed address {address!r} of peer {pid} is not an Ethereum address")
    if not signature:
        raise BindingError(f"no binding signature ties peer {pid} to address {address}")
    try:
        signer = _binding_signer(pid.to_bytes(), bytes(signature))
    except Exception as exc:  # eth-keys raises several types for a malformed signature
        raise BindingError(f"the binding signature of peer {pid} is malformed: {exc}") from exc
    if signer != to_checksum_address(address):
        raise BindingError(f"the binding of peer {pid} recovers to {signer}, not to the claimed address {address} "
                           "(signed by another node key or for another peer id)")
