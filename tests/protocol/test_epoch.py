"""Epoch crediting, Merkle root, receipts file, verify_epoch and EpochRoot quorum."""

from __future__ import annotations

import dataclasses
import json

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data

from protocol.accounting import compute_units
from protocol.epoch import (
    EPOCH_ROOT_TYPES,
    EpochContext,
    build_epoch,
    check_quorum,
    sign_epoch_root,
    verify_epoch,
)
from protocol.errors import EpochError, SignatureError, UnregisteredKeyError
from protocol.merkle import check_claim
from protocol.receipts import Domain, StaticKeyRegistry
from sharding.config import ModelConfig
from sharding.partition import partition

from .conftest import hop_receipts, make_keys

CONFIG = ModelConfig(vocab_size=256, seq_len=32, d_model=32, n_layers=3, n_heads=4)
STAGES = tuple(partition(CONFIG, 3))


def _context(domain, epoch=0):
    return EpochContext(9, epoch, CONFIG, STAGES, domain)


def _epoch_receipts(domain, keys, epoch=0, steps=2, mbs=2, tokens=64, **kw):
    out = []
    for step in range(steps):
        for mb in range(mbs):
            out += hop_receipts(domain, keys, 9, epoch, step, mb, tokens, **kw)
    return out


def test_three_stage_epoch_credits_every_stage(domain, keys, registry):
    nodes = keys[:3]
    result = build_epoch(_epoch_receipts(domain, nodes), _context(domain), registry)
    assert not result.rejected
    for k, key in enumerate(nodes):
        assert result.totals[key.address] == 4 * compute_units(CONFIG, STAGES[k], 64)
    for leaf in result.tree.leaves:
        check_claim(result.root, 9, 0, leaf.node, leaf.units, result.tree.proof(leaf.node))
    assert result.total_units == sum(result.totals.values())


def test_missing_countersignature_means_no_credit_for_either_side(domain, keys, registry):
    nodes = keys[:3]
    receipts = _epoch_receipts(domain, nodes, steps=1, mbs=1)
    # stage 1 never acknowledged stage 0's forward hop
    receipts = [dataclasses.replace(s, receiver_signature=None) if s.receipt.key[4:] == (0, 0) else s
                for s in receipts]
    result = build_epoch(receipts, _context(domain), registry)
    assert nodes[0].address not in result.totals and nodes[1].address not in result.totals
    assert result.totals[nodes[2].address] == compute_units(CONFIG, STAGES[2], 64)
    assert len(result.rejected) == 1 and "receiverSignature" in result.rejected[0][1]


def test_inflating_node_credited_only_what_was_cosigned(domain, keys, registry):
    nodes = keys[:3]
    # stage 1 writes 10x tokens into the hops it sends; its neighbours' hops into it carry the truth
    receipts = _epoch_receipts(domain, nodes, sender_tokens={1: 640})
    result = build_epoch(receipts, _context(domain), registry)
    assert result.totals[nodes[1].address] == 4 * compute_units(CONFIG, STAGES[1], 64)


def test_forged_replayed_and_wrong_domain_receipts_rejected(domain, keys, registry):
    nodes = keys[:3]
    honest = _epoch_receipts(domain, nodes, steps=1, mbs=1)
    outsider = make_keys(1, offset=100)[0]
    forged = hop_receipts(domain, [nodes[0], outsider, nodes[2]], 9, 0, 0, 5, 64)  # unregistered stage 1
    wrong = hop_receipts(Domain(1, domain.verifying_contract), nodes, 9, 0, 0, 6, 64)
    other_epoch = hop_receipts(domain, nodes, 9, 3, 0, 7, 64)
    replayed = honest[:2]  # identical copies gathered twice merge
    result = build_epoch(honest + forged + wrong + other_epoch + replayed, _context(domain), registry)
    assert len(result.receipts) == len(honest)
    reasons = " ".join(reason for _, reason in result.rejected)
    assert "chainId" in reasons and "modelId/epoch" in reasons and "not a registered" in reasons
    clean = build_epoch(honest, _context(domain), registry)
    assert result.root == clean.root and result.receipts_hash == clean.receipts_hash


def test_conflicting_copies_drop_the_key(domain, keys, registry):
    nodes = keys[:3]
    a = _epoch_receipts(domain, nodes, steps=1, mbs=1)
    b = hop_receipts(domain, nodes, 9, 0, 0, 0, 32)  # same keys, different token counts, also co-signed
    result = build_epoch(a + b[:1], _context(domain), registry)
    assert nodes[0].address not in result.totals
    assert any("conflicting" in reason for _, reason in result.rejected)


def test_verify_epoch_recomputes_root(domain, keys, registry):
    result = build_epoch(_epoch_receipts(domain, keys[:3]), _context(domain), registry)
    again = verify_epoch(result.receipts_file, result.root, registry, result.receipts_hash)
    assert again.totals == result.totals
    with pytest.raises(EpochError) as err:
        verify_epoch(result.receipts_file, b"\x00" * 32)
    assert err.value.field == "root"
    with pytest.raises(EpochError) as err:
        verify_epoch(result.receipts_file, result.root, expected_receipts_hash=b"\x01" * 32)
    assert err.value.field == "receiptsHash"


def test_verify_epoch_rejects_tampered_file(domain, keys, registry):
    result = build_epoch(_epoch_receipts(domain, keys[:3]), _context(domain), registry)
    body = json.loads(result.receipts_file)
    body["receipts"][0]["receipt"]["tokens"] = 6400
    tampered = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(EpochError) as err:
        verify_epoch(tampered, result.root)
    assert err.value.field == "receipts"
    body = json.loads(result.receipts_file)
    body["accountingVersion"] = 2
    with pytest.raises(EpochError) as err:
        verify_epoch(json.dumps(body).encode(), result.root)
    assert err.value.field == "accountingVersion"
    with pytest.raises(EpochError) as err:
        verify_epoch(b"not json", result.root)
    assert err.value.field == "receiptsFile"


def test_empty_epoch_is_an_error(domain, keys, registry):
    with pytest.raises(EpochError) as err:
        build_epoch([], _context(domain), registry)
    assert err.value.field == "receipts"


def test_epoch_root_quorum(domain, keys, registry):
    result = build_epoch(_epoch_receipts(domain, keys[:3]), _context(domain), registry)
    message = result.attestation()
    attesters = make_keys(3, offset=50)
    attester_registry = StaticKeyRegistry(a.address for a in attesters)
    sigs = [sign_epoch_root(domain, message, a) for a in attesters[:2]]
    assert check_quorum(domain, message, sigs, attester_registry, 2) == [a.address for a in attesters[:2]]
    # signature matches eth-account's own encoding of the EpochRoot type
    signable = encode_typed_data(domain.to_eip712(), EPOCH_ROOT_TYPES, message)
    assert Account.recover_message(signable, signature=sigs[0]) == attesters[0].address
    with pytest.raises(SignatureError) as err:
        check_quorum(domain, message, sigs[:1], attester_registry, 2)
    assert err.value.field == "signatures"
    with pytest.raises(SignatureError) as err:
        check_quorum(domain, message, [sigs[0], sigs[0]], attester_registry, 2)
    assert err.value.field == "signatures[1]"
    with pytest.raises(UnregisteredKeyError):
        check_quorum(domain, message, [sign_epoch_root(domain, message, keys[0])], attester_registry, 1)
    wrong_epoch = dict(message, epoch=1)
    with pytest.raises(UnregisteredKeyError):  # recovers to some unrelated address
        check_quorum(domain, wrong_epoch, sigs, attester_registry, 2)


def _regenerated(s, domain, sender, receiver, generation, digest=b"rerun"):
    """The same hop key re-run after a rollback: another payload, signed in `generation`."""
    from protocol.receipts import countersign, payload_digest, sign_receipt

    r = dataclasses.replace(s.receipt, sender=sender.address, receiver=receiver.address,
                            payload_digest=payload_digest(digest), rollback_gen=generation[0],
                            rollback_step=generation[1])
    return countersign(sign_receipt(r, domain, sender), receiver)


def test_a_hop_rerun_after_a_rollback_is_credited_once_to_its_first_generation(domain, keys, registry):
    nodes, other = keys[:3], keys[3]  # `other`: a second stage-0 replica that re-ran the hop in generation 1
    first = _epoch_receipts(domain, nodes, steps=1, mbs=1)
    fwd0 = next(s for s in first if s.receipt.key[4:] == (0, 0))
    rerun = _regenerated(fwd0, domain, other, nodes[1], (1, 0))
    reg = StaticKeyRegistry([k.address for k in keys])
    result = build_epoch([rerun, *first], _context(domain), reg)  # gathered in any order
    assert result.receipts == build_epoch(first, _context(domain), reg).receipts
    assert other.address not in result.totals
    assert [(s, reason) for s, reason in result.rejected] == [
        (rerun.to_json(), "receipt: superseded by the copy of rollback generation (0, 0) of this key")]
    # two copies of one key within a generation still conflict (the key is dropped), whatever later copies exist
    twin = _regenerated(fwd0, domain, other, nodes[1], (0, 0), digest=b"twin")
    dropped = build_epoch([*first, twin, rerun], _context(domain), reg)
    assert fwd0 not in dropped.receipts and rerun not in dropped.receipts and other.address not in dropped.totals
    assert sum("conflicting" in reason for _, reason in dropped.rejected) == 2
