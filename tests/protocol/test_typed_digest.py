"""The EIP-712 fast path (`protocol.receipts._signable`): every flat struct of static fields hashes to exactly what
eth-account's general encoder gives, signatures made on it recover through the general path, and values of other
forms still go through the general encoder and its errors."""

from __future__ import annotations

from typing import Any

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils import keccak, to_checksum_address
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.epoch import EPOCH_ROOT_TYPES
from protocol.receipts import RECEIPT_TYPES, Domain, recover_typed, sign_typed, typed_digest
from protocol.spotcheck import FRAUD_TYPES

TYPES = {"Receipt": RECEIPT_TYPES, "EpochRoot": EPOCH_ROOT_TYPES, "Fraud": FRAUD_TYPES}
FLAGGED = {"Flagged": [{"name": "id", "type": "uint8"}, {"name": "ok", "type": "bool"}]}  # bool: not used elsewhere


def _general(domain: Domain, types: dict[str, list[dict[str, str]]], message: dict[str, Any]) -> bytes:
    """The digest through eth-account's general encoder alone."""
    signable = encode_typed_data(domain.to_eip712(), types, message)
    return keccak(b"\x19" + signable.version + signable.header + signable.body)


def _value(kind: str, draw: Any) -> Any:
    if kind.startswith("uint"):
        return draw(st.integers(0, (1 << int(kind[4:])) - 1))
    if kind == "address":
        return to_checksum_address(draw(st.binary(min_size=20, max_size=20)))
    if kind == "bool":
        return draw(st.booleans())
    return draw(st.binary(min_size=32, max_size=32))


@st.composite
def messages(draw: Any) -> tuple[Domain, dict[str, list[dict[str, str]]], dict[str, Any]]:
    types = draw(st.sampled_from([*TYPES.values(), FLAGGED]))
    (fields,) = types.values()
    contract = draw(st.binary(min_size=20, max_size=20).filter(any))  # a ledger address is never zero
    domain = Domain(draw(st.integers(1, (1 << 64) - 1)), to_checksum_address(contract))
    return domain, types, {f["name"]: _value(f["type"], draw) for f in fields}


@settings(max_examples=150, deadline=None)
@given(messages())
def test_the_fast_digest_equals_eth_accounts_encoder(case: tuple[Domain, Any, dict[str, Any]]) -> None:
    domain, types, message = case
    assert typed_digest(domain, types, message) == _general(domain, types, message)


def test_signatures_on_the_fast_path_recover_through_the_general_one_and_back() -> None:
    acct = Account.from_key(b"\x07" * 32)
    domain = Domain(31337, "0x" + "ab" * 20)
    message = {"modelId": 5, "epoch": 2, "root": b"\x01" * 32, "totalUnits": 10**30, "receiptsHash": b"\x02" * 32}
    sig = sign_typed(domain, EPOCH_ROOT_TYPES, message, acct.key)
    general = encode_typed_data(domain.to_eip712(), EPOCH_ROOT_TYPES, message)
    assert Account.recover_message(general, signature=sig) == acct.address
    assert recover_typed(domain, EPOCH_ROOT_TYPES, message, bytes(Account.sign_message(general, acct.key).signature),
                         "sig") == acct.address
    assert recover_typed(domain, EPOCH_ROOT_TYPES, {**message, "epoch": 3}, sig, "sig") != acct.address


def test_other_value_forms_take_the_general_encoder_and_its_errors() -> None:
    domain = Domain(1, "0x" + "cd" * 20)
    plain = {"modelId": 1, "epoch": 2, "node": "0x" + "ef" * 20, "evidence": b"\x03" * 32}
    hexed = {**plain, "evidence": "0x" + "03" * 32}  # bytes32 as hex: eth-account reads it, the fast path does not
    assert typed_digest(domain, FRAUD_TYPES, hexed) == typed_digest(domain, FRAUD_TYPES, plain)
    for bad in ({**plain, "epoch": 1 << 64}, {**plain, "modelId": -1}, {**plain, "node": "0x1234"}):
        with pytest.raises(Exception, match="(?i)epoch|modelId|node|address|value|bounds|uint"):
            typed_digest(domain, FRAUD_TYPES, bad)
    with pytest.raises(Exception, match="evidence"):  # eth-account's own error for a missing field
        typed_digest(domain, FRAUD_TYPES, {k: v for k, v in plain.items() if k != "evidence"})


def test_signatures_from_a_cached_key_equal_eth_accounts_for_every_key_form() -> None:
    domain = Domain(5, "0x" + "12" * 20)
    message = {"modelId": 9, "epoch": 1, "node": "0x" + "34" * 20, "evidence": b"\x05" * 32}
    general = encode_typed_data(domain.to_eip712(), FRAUD_TYPES, message)
    for seed in range(1, 6):
        acct = Account.from_key(bytes([seed]) * 32)
        want = bytes(Account.sign_message(general, acct.key).signature)
        for form in (acct, acct.key, bytes(acct.key), acct.key.hex()):  # account, HexBytes, bytes, hex string
            assert sign_typed(domain, FRAUD_TYPES, message, form) == want
        assert want[64] in (27, 28)
