"""Shared fixtures for protocol tests: deterministic node keys, a domain and a registry."""

from __future__ import annotations

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from protocol.receipts import Domain, StaticKeyRegistry

LEDGER = "0x" + "5A" * 20


def make_keys(n: int, offset: int = 1) -> list[LocalAccount]:
    """`n` deterministic secp256k1 accounts."""
    return [Account.from_key((offset + i).to_bytes(32, "big")) for i in range(n)]


@pytest.fixture
def keys() -> list[LocalAccount]:
    return make_keys(4)


@pytest.fixture
def domain() -> Domain:
    return Domain(1337, LEDGER)


@pytest.fixture
def registry(keys: list[LocalAccount]) -> StaticKeyRegistry:
    return StaticKeyRegistry(k.address for k in keys)
