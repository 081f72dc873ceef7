"""Persistent secp256k1 node identity: libp2p peer id and Ethereum account from one key."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from eth_account import Account
from eth_account.signers.local import LocalAccount
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.secp256k1 import create_new_key_pair
from libp2p.peer.id import ID

from node.errors import IdentityError

KEY_FILE = "node_key.hex"  # file name of the hex-encoded 32-byte secp256k1 secret inside the data dir
_SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


@dataclass(frozen=True)
class NodeIdentity:
    """The node's key in its three forms."""

    secret: bytes  # 32-byte secp256k1 private key
    key_pair: KeyPair  # libp2p key pair used by the host (Noise handshake, peer id)
    account: LocalAccount  # eth-account signer; its address is the node's Ethereum address

    @property
    def peer_id(self) -> ID:
        """libp2p peer id derived from the public key."""
        return ID.from_pubkey(self.key_pair.public_key)

    @property
    def address(self) -> str:
        """Checksummed Ethereum address of the node key."""
        return str(self.account.address)


def identity_from_secret(secret: bytes) -> NodeIdentity:
    """Build the identity for a 32-byte secret (raises IdentityError if it is not a valid key)."""
    if len(secret) != 32:
        raise IdentityError(f"node key must be 32 bytes, got {len(secret)}")
    value = int.from_bytes(secret, "big")
    if not 0 < value < _SECP256K1_N:
        raise IdentityError("node key is outside the secp256k1 group order")
    return NodeIdentity(secret=secret, key_pair=create_new_key_pair(secret), account=Account.from_key(secret))


def load_or_create_identity(data_dir: str | Path) -> NodeIdentity:
    """Load the key from `data_dir/node_key.hex`, creating it (mode 0600) on first use."""
    path = Path(data_dir).expanduser() / KEY_FILE
    if path.exists():
        text = path.read_text().strip()
        try:
            secret = bytes.fromhex(text.removeprefix("0x"))
        except ValueError as exc:
            raise IdentityError(f"{path}: not a hex-encoded key ({exc})") from exc
        return identity_from_secret(secret)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        secret = secrets.token_bytes(32)
        if 0 < int.from_bytes(secret, "big") < _SECP256K1_N:
            break
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret.hex() + "\n")
    os.replace(tmp, path)
    return identity_from_secret(secret)
