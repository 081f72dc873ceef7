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


def hop_receipts(domain, stage_keys, model_id, epoch, step, microbatch, tokens, cosign=True, sender_tokens=None):
    """Signed (and by default countersigned) receipts of every hop of one microbatch through the pipeline.

    `stage_keys[k]` is the key of the node serving stage k. `sender_tokens` maps a stage index to the token
    count that stage's node writes into the receipts it sends (an inflating node).
    """
    from protocol.receipts import Receipt, countersign, payload_digest, sign_receipt

    out = []
    n = len(stage_keys)
    for direction in (0, 1):
        for k in range(n):
            to = k + 1 if direction == 0 else k - 1
            if not 0 <= to < n:
                continue
            t = (sender_tokens or {}).get(k, tokens)
            r = Receipt(
                model_id, epoch, step, microbatch, k, direction, stage_keys[k].address, stage_keys[to].address,
                payload_digest(b"%d/%d/%d/%d/%d" % (epoch, step, microbatch, k, direction)), t,
            )
            s = sign_receipt(r, domain, stage_keys[k])
            out.append(countersign(s, stage_keys[to]) if cosign else s)
    return out
