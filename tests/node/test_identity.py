"""Node identity: Ed25519 peer key + secp256k1 node key, persisted in the data dir, and their binding."""

from __future__ import annotations

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct
from libp2p.crypto.keys import KeyType

from node.errors import BindingError, IdentityError, NodeError
from node.net.identity import (
    KEY_FILE,
    PEER_KEY_FILE,
    bind,
    identity_from_secret,
    load_or_create_identity,
    verify_binding,
)


def test_identity_is_stable_and_signs(tmp_path) -> None:
    a = load_or_create_identity(tmp_path)
    b = load_or_create_identity(tmp_path)  # a restart: the same data dir
    assert a.peer_id == b.peer_id and a.address == b.address
    assert a.key_pair.private_key.get_type() == KeyType.Ed25519
    assert a.key_pair.public_key.get_type() == KeyType.Ed25519
    assert a.peer_id.pretty().startswith("12D3KooW")  # Ed25519 peer ids (identity multihash)
    for name in (KEY_FILE, PEER_KEY_FILE):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600
    assert not list(tmp_path.glob("*.tmp"))
    sig = a.account.sign_message(encode_defunct(b"hello"))
    assert Account.recover_message(encode_defunct(b"hello"), signature=sig.signature) == a.address


def test_peer_key_is_independent_of_the_node_key(tmp_path) -> None:
    a = load_or_create_identity(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / KEY_FILE).write_text((tmp_path / "a" / KEY_FILE).read_text())
    b = load_or_create_identity(tmp_path / "b")  # same node key, its own peer key
    assert b.address == a.address and b.peer_id != a.peer_id
    assert a.peer_id != identity_from_secret(a.secret).peer_id  # not derived from the node key on disk


def test_distinct_dirs_distinct_ids(tmp_path) -> None:
    x, y = load_or_create_identity(tmp_path / "x"), load_or_create_identity(tmp_path / "y")
    assert x.peer_id != y.peer_id and x.address != y.address


def test_old_data_dir_keeps_its_address_and_gets_a_peer_key(tmp_path) -> None:
    secret = (12345).to_bytes(32, "big")
    (tmp_path / KEY_FILE).write_text("0x" + secret.hex() + "\n")  # a data dir from before peer_key.hex
    ident = load_or_create_identity(tmp_path)
    assert ident.address == Account.from_key(secret).address and ident.secret == secret
    assert (tmp_path / PEER_KEY_FILE).exists() and ident.key_pair.private_key.get_type() == KeyType.Ed25519
    assert load_or_create_identity(tmp_path).peer_id == ident.peer_id


def test_corrupt_node_key_file(tmp_path) -> None:
    (tmp_path / KEY_FILE).write_text("zz-not-hex")
    with pytest.raises(IdentityError, match=f"{KEY_FILE}: not a hex-encoded key"):
        load_or_create_identity(tmp_path)
    (tmp_path / KEY_FILE).write_text("00" * 32)
    with pytest.raises(IdentityError, match="group order"):
        load_or_create_identity(tmp_path)
    assert not (tmp_path / PEER_KEY_FILE).exists()  # nothing created next to a bad node key


def test_corrupt_peer_key_file(tmp_path) -> None:
    address = load_or_create_identity(tmp_path).address
    (tmp_path / PEER_KEY_FILE).write_text("not hex at all")
    with pytest.raises(IdentityError, match=f"{PEER_KEY_FILE}: not a hex-encoded key"):
        load_or_create_identity(tmp_path)
    (tmp_path / PEER_KEY_FILE).write_text("ab" * 31)
    with pytest.raises(IdentityError, match=f"{PEER_KEY_FILE}: peer key must be a 32-byte Ed25519 seed, got 31"):
        load_or_create_identity(tmp_path)
    (tmp_path / PEER_KEY_FILE).unlink()  # the operator removes it: a new peer key, the same address
    assert load_or_create_identity(tmp_path).address == address


def test_identity_from_secret_is_deterministic() -> None:
    secret = (101).to_bytes(32, "big")
    a, b = identity_from_secret(secret), identity_from_secret(secret)
    assert a.peer_id == b.peer_id and a.address == b.address == Account.from_key(secret).address
    assert a.key_pair.private_key.get_type() == KeyType.Ed25519
    assert identity_from_secret((102).to_bytes(32, "big")).peer_id != a.peer_id
    seeded = identity_from_secret(secret, peer_seed=b"\x09" * 32)
    assert seeded.address == a.address and seeded.peer_id != a.peer_id
    assert seeded.peer_id == identity_from_secret((7).to_bytes(32, "big"), peer_seed=b"\x09" * 32).peer_id
    with pytest.raises(IdentityError, match="node key must be 32 bytes"):
        identity_from_secret(b"\x01" * 31)
    with pytest.raises(IdentityError, match="32-byte Ed25519 seed"):
        identity_from_secret(secret, peer_seed=b"\x01" * 16)


def test_binding_verifies_and_names_what_is_wrong() -> None:
    me, other = identity_from_secret((31).to_bytes(32, "big")), identity_from_secret((32).to_bytes(32, "big"))
    sig = bind(me)
    verify_binding(me.address, me.peer_id, sig)
    verify_binding(me.address.lower(), me.peer_id.pretty(), sig)  # any address case, peer id as text
    with pytest.raises(BindingError, match=f"not to the claimed address {other.address}"):
        verify_binding(other.address, me.peer_id, sig)  # my binding, claimed for another address
    with pytest.raises(BindingError, match=f"binding of peer {other.peer_id.pretty()} recovers to"):
        verify_binding(me.address, other.peer_id, sig)  # my binding, shown by another peer id
    with pytest.raises(BindingError, match="recovers to"):
        verify_binding(other.address, other.peer_id, sig)  # bound by another node key
    with pytest.raises(BindingError, match="no binding signature"):
        verify_binding(me.address, me.peer_id, b"")
    with pytest.raises(BindingError, match="malformed"):
        verify_binding(me.address, me.peer_id, b"\x01" * 10)
    with pytest.raises(BindingError, match="not an Ethereum address"):
        verify_binding("0x1234", me.peer_id, sig)
    assert issubclass(BindingError, NodeError)
