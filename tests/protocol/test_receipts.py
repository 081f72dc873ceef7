"""EIP-712 receipts: signing, countersigning, and rejection of forged, replayed, wrong-domain input."""

from __future__ import annotations

import dataclasses

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data

from protocol.errors import DomainError, ReceiptError, ReplayError, SignatureError, UnregisteredKeyError
from protocol.receipts import (
    RECEIPT_TYPES,
    Domain,
    Receipt,
    ReceiptVerifier,
    SignedReceipt,
    countersign,
    payload_digest,
    sign_receipt,
    verify_signed_receipt,
)


def _receipt(keys, **over) -> Receipt:
    fields = dict(
        model_id=7, epoch=1, step=3, microbatch=2, stage=0, direction=0, sender=keys[0].address,
        receiver=keys[1].address, payload_digest=payload_digest(b"activation"), tokens=512,
    )
    fields.update(over)
    return Receipt(**fields)


def test_sign_countersign_verify_roundtrip(keys, domain, registry):
    signed = countersign(sign_receipt(_receipt(keys), domain, keys[0]), keys[1])
    assert signed.cosigned
    verify_signed_receipt(signed, domain, registry)
    parsed = SignedReceipt.from_json(signed.to_json())
    assert parsed == signed


def test_digest_matches_eth_account_typed_data_hash(keys, domain):
    receipt = _receipt(keys)
    signable = encode_typed_data(domain.to_eip712(), RECEIPT_TYPES, receipt.message())
    sig = Account.sign_message(signable, keys[0].key).signature
    # signing the raw digest gives the same (deterministic, RFC 6979) signature: digest() is the hash that
    # sign_message signed, i.e. what ecrecover on chain sees
    assert Account.unsafe_sign_hash(receipt.digest(domain), keys[0].key).signature == sig


def test_sender_must_sign_with_own_key(keys, domain):
    with pytest.raises(SignatureError) as err:
        sign_receipt(_receipt(keys), domain, keys[2])
    assert err.value.field == "sender"


def test_receiver_must_countersign_with_own_key(keys, domain):
    with pytest.raises(SignatureError) as err:
        countersign(sign_receipt(_receipt(keys), domain, keys[0]), keys[2])
    assert err.value.field == "receiver"


def test_forged_sender_signature_rejected(keys, domain, registry):
    honest = sign_receipt(_receipt(keys), domain, keys[0])
    # keys[2] signs a receipt that claims keys[0] as the sender
    forged_sig = Account.sign_message(
        encode_typed_data(domain.to_eip712(), RECEIPT_TYPES, honest.receipt.message()), keys[2].key
    ).signature
    forged = dataclasses.replace(honest, sender_signature=bytes(forged_sig))
    with pytest.raises(SignatureError) as err:
        verify_signed_receipt(forged, domain, registry, require_cosigned=False)
    assert err.value.field == "senderSignature"
    with pytest.raises(SignatureError):
        countersign(forged, keys[1])


def test_tampered_content_rejected(keys, domain, registry):
    signed = countersign(sign_receipt(_receipt(keys), domain, keys[0]), keys[1])
    inflated = dataclasses.replace(signed, receipt=dataclasses.replace(signed.receipt, tokens=5120))
    with pytest.raises(SignatureError) as err:
        verify_signed_receipt(inflated, domain, registry)
    assert err.value.field == "senderSignature"


def test_wrong_chain_id_rejected(keys, domain, registry):
    other = Domain(1, domain.verifying_contract)
    signed = countersign(sign_receipt(_receipt(keys), other, keys[0]), keys[1])
    with pytest.raises(DomainError) as err:
        verify_signed_receipt(signed, domain, registry)
    assert err.value.field == "chainId"
    # lying about the domain does not help: the signature no longer recovers
    relabelled = dataclasses.replace(signed, domain=domain)
    with pytest.raises(SignatureError):
        verify_signed_receipt(relabelled, domain, registry)


def test_wrong_contract_rejected(keys, domain, registry):
    other = Domain(domain.chain_id, "0x" + "77" * 20)
    signed = countersign(sign_receipt(_receipt(keys), other, keys[0]), keys[1])
    with pytest.raises(DomainError) as err:
        verify_signed_receipt(signed, domain, registry)
    assert err.value.field == "verifyingContract"


def test_unregistered_keys_rejected(keys, domain):
    from protocol.receipts import StaticKeyRegistry

    signed = countersign(sign_receipt(_receipt(keys), domain, keys[0]), keys[1])
    with pytest.raises(UnregisteredKeyError) as err:
        verify_signed_receipt(signed, domain, StaticKeyRegistry([keys[1].address]))
    assert err.value.field == "sender"
    with pytest.raises(UnregisteredKeyError) as err:
        verify_signed_receipt(signed, domain, StaticKeyRegistry([keys[0].address]))
    assert err.value.field == "receiver"


def test_missing_countersignature_rejected_when_required(keys, domain, registry):
    signed = sign_receipt(_receipt(keys), domain, keys[0])
    with pytest.raises(SignatureError) as err:
        verify_signed_receipt(signed, domain, registry)
    assert err.value.field == "receiverSignature"
    verify_signed_receipt(signed, domain, registry, require_cosigned=False)


def test_replay_rejected_and_verifier_unchanged(keys, domain, registry):
    verifier = ReceiptVerifier(domain, registry)
    signed = countersign(sign_receipt(_receipt(keys), domain, keys[0]), keys[1])
    verifier.accept(signed)
    again = countersign(
        sign_receipt(_receipt(keys, payload_digest=payload_digest(b"other")), domain, keys[0]), keys[1]
    )
    with pytest.raises(ReplayError):
        verifier.accept(again)
    # a rejected (wrong-domain) receipt does not consume its key
    bad = countersign(sign_receipt(_receipt(keys, microbatch=9), Domain(5, domain.verifying_contract), keys[0]), keys[1])
    with pytest.raises(DomainError):
        verifier.accept(bad)
    good = countersign(sign_receipt(_receipt(keys, microbatch=9), domain, keys[0]), keys[1])
    verifier.accept(good)
    assert len(verifier) == 2


@pytest.mark.parametrize(
    ("field", "attr", "value"),
    [
        ("modelId", "model_id", -1),
        ("epoch", "epoch", 1 << 64),
        ("microbatch", "microbatch", 1 << 32),
        ("stage", "stage", 1 << 16),
        ("direction", "direction", 2),
        ("tokens", "tokens", 0),
        ("tokens", "tokens", "512"),
        ("sender", "sender", "0x1234"),
        ("receiver", "receiver", "0x" + "00" * 20),
        ("payloadDigest", "payload_digest", b"short"),
        ("stage", "stage", 0),
    ],
)
def test_malformed_receipt_names_field(keys, field, attr, value):
    over = {attr: value}
    if field == "stage" and value == 0:
        over["direction"] = 1  # a backward hop from stage 0 does not exist
    with pytest.raises(ReceiptError) as err:
        _receipt(keys, **over)
    assert err.value.field == field


def test_from_json_names_missing_and_bad_fields(keys, domain):
    data = sign_receipt(_receipt(keys), domain, keys[0]).to_json()
    broken = dict(data, receipt={k: v for k, v in data["receipt"].items() if k != "tokens"})
    with pytest.raises(ReceiptError) as err:
        SignedReceipt.from_json(broken)
    assert err.value.field == "tokens"
    broken = dict(data, receipt=dict(data["receipt"], payloadDigest="zz"))
    with pytest.raises(ReceiptError) as err:
        SignedReceipt.from_json(broken)
    assert err.value.field == "payloadDigest"
    with pytest.raises(DomainError) as domain_err:
        SignedReceipt.from_json(dict(data, chainId=-3))
    assert domain_err.value.field == "chainId"


def test_payload_digest_equals_the_node_frame_digest():
    from node.wire.frames import digest

    window, payload = b"\x01\x00\x02\x00", b"payload bytes"
    assert payload_digest(payload, window) == digest(window, payload)
    assert payload_digest(payload) == digest(b"", payload)
