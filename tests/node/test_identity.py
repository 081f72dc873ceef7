"""Persistent secp256k1 identity."""

from __future__ import annotations

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct

from node.errors import IdentityError
from node.identity import KEY_FILE, load_or_create_identity


def test_identity_is_stable_and_signs(tmp_path) -> None:
    a = load_or_create_identity(tmp_path)
    b = load_or_create_identity(tmp_path)
    assert a.peer_id == b.peer_id and a.address == b.address
    assert a.peer_id.pretty().startswith("16Uiu2")  # secp256k1 peer ids
    assert (tmp_path / KEY_FILE).stat().st_mode & 0o777 == 0o600
    sig = a.account.sign_message(encode_defunct(b"hello"))
    assert Account.recover_message(encode_defunct(b"hello"), signature=sig.signature) == a.address


def test_distinct_dirs_distinct_ids(tmp_path) -> None:
    assert load_or_create_identity(tmp_path / "x").peer_id != load_or_create_identity(tmp_path / "y").peer_id


def test_corrupt_key_file(tmp_path) -> None:
    (tmp_path / KEY_FILE).write_text("zz-not-hex")
    with pytest.raises(IdentityError, match="not a hex-encoded key"):
        load_or_create_identity(tmp_path)
    (tmp_path / KEY_FILE).write_text("00" * 32)
    with pytest.raises(IdentityError, match="group order"):
        load_or_create_identity(tmp_path)
