"""Encrypted Ethereum keystores (the standard Web3 Secret Storage format) for operators and holders.

The private key is never printed: it is read from the keystore with a password and kept in memory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address

from pmn.errors import WalletError

PASSWORD_ENV = "PMN_PASSWORD"


@dataclass(frozen=True)
class WalletInfo:
    """What can be shown about a keystore without its password."""

    path: Path  # where the keystore file lives
    address: str  # checksummed address stored in the keystore


def create_keystore(path: Path, password: str, *, overwrite: bool = False) -> WalletInfo:
    """Create a new random account and write it encrypted (scrypt) to `path`."""
    if not password:
        raise WalletError("empty password: pass --password-file FILE or set PMN_PASSWORD")
    if path.exists() and not overwrite:
        raise WalletError(f"{path} already exists: choose another --keystore path or pass --force")
    account = Account.create()
    keystore = Account.encrypt(account.key, password)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(keystore))
    os.chmod(tmp, 0o600)
    tmp.replace(path)
    return WalletInfo(path=path, address=account.address)


def _read_keystore(path: Path) -> dict:
    if not path.exists():
        raise WalletError(f"no keystore at {path}: create one with `pmn wallet new --keystore {path}`")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise WalletError(f"{path} is not a keystore (invalid JSON: {exc.msg})") from None
    if not isinstance(data, dict) or "crypto" not in data or "address" not in data:
        raise WalletError(f"{path} is not a keystore: fields 'crypto' and 'address' are missing")
    return data


def show_keystore(path: Path) -> WalletInfo:
    """Read the address of a keystore (no password needed)."""
    data = _read_keystore(path)
    return WalletInfo(path=path, address=to_checksum_address("0x" + str(data["address"]).removeprefix("0x")))


def unlock_keystore(path: Path, password: str) -> LocalAccount:
    """Decrypt a keystore; a wrong password raises `WalletError` without revealing anything."""
    data = _read_keystore(path)
    try:
        key = Account.decrypt(data, password)
    except ValueError:
        raise WalletError(f"wrong password for {path}: check --password-file or PMN_PASSWORD") from None
    return Account.from_key(key)


def read_password(password_file: Path | None, *, prompt: bool = True, confirm: bool = False) -> str:
    """Password from a file, else $PMN_PASSWORD, else an interactive prompt."""
    if password_file is not None:
        if not password_file.exists():
            raise WalletError(f"password file {password_file} does not exist")
        return password_file.read_text().rstrip("\n")
    env = os.environ.get(PASSWORD_ENV)
    if env is not None:
        return env
    if not prompt:
        raise WalletError("no password: pass --password-file FILE or set PMN_PASSWORD")
    import getpass

    first = getpass.getpass("keystore password: ")
    if confirm and getpass.getpass("repeat password: ") != first:
        raise WalletError("the two passwords differ: run the command again")
    return first
